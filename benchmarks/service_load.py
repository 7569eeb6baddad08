#!/usr/bin/env python
"""Load test of `medsim serve` on loopback: does the server keep answering under 16 concurrent clients, and how fast?

    python benchmarks/service_load.py                       # self-contained: local Orthanc + sample data
    python benchmarks/service_load.py --index IDX --pacs URL --non-indexed STUDY/SERIES/SOP ...

Self-contained mode starts a loopback Orthanc (Debian orthanc + orthanc-dicomweb) in a temporary folder, stores
the sample chest X-rays by STOW-RS, builds an index over DICOMweb from all but three patients' images, then stores
those three (and, when present, the real DICOM files in ../shared/data/dicom, used here at run time only) so they
can be queried without being indexed. It then runs `medsim serve` (waitress) as a separate process and measures,
from this process, with the server's vector cache off (every non-indexed query is fetched, decoded and embedded):

  indexed-16   16 clients, queries by UIDs of indexed instances (stored vectors), each sent as soon as the last
               is answered: the server is saturated, so latency = 16 / throughput
  paced-16     the same 16 clients, each waiting 0.1 s after every answer (--think): at most 160 queries/s offered
  pacs-1       1 client, queries by UIDs of non-indexed instances (WADO-RS fetch + decode + preprocess + embed)
  mixed-16     15 clients querying indexed instances while 1 client queries non-indexed ones back to back: what
               indexed queries see while the CPU embeds (embeddings are serialised, so one embedding client is
               what 2 cores sustain; more would only queue)

Each phase is bounded by time and count (default 6 s; pacs-1 by --sequential queries; the load phases take about
30 s). Results go to benchmarks/results/service.json: per phase and kind of query the request count, errors,
throughput and client-side p50/p90/p99/max latency (and the server's own took_ms p50).
Goals: indexed p50 < 30 ms and p99 < 100 ms; non-indexed p50 < 1.5 s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "pacs_export"
SHARED_DICOM = Path(os.environ.get("MEDSIM_SHARED_DATA", ROOT.parent / "shared" / "data")) / "dicom"
PACS_ONLY_PATIENTS = ("KERMANY-40753759", "KERMANY-D1849D79", "KERMANY-5E4D155E")
GOALS = {"indexed_p50_ms": 30.0, "indexed_p99_ms": 100.0, "non_indexed_p50_ms": 1500.0}


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(name, clients, samples, errors, seconds):
    """samples: [(kind, latency_ms, status, server_took_ms)] -> one summary per kind."""
    out = {}
    for kind in sorted({sample[0] for sample in samples}):
        rows = [sample for sample in samples if sample[0] == kind]
        ok = [ms for _, ms, status, _ in rows if status == 200]
        server_ms = [took for _, _, status, took in rows if status == 200 and took is not None]
        statuses = [status for _, _, status, _ in rows]
        out[kind] = {
            "requests": len(rows), "ok": len(ok),
            "status_counts": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "throughput_rps": round(len(rows) / seconds, 2) if seconds else None,
            "latency_ms": {key: (round(value, 1) if value is not None else None) for key, value in {
                "p50": percentile(ok, 50), "p90": percentile(ok, 90), "p99": percentile(ok, 99),
                "max": max(ok) if ok else None, "mean": statistics.fmean(ok) if ok else None}.items()},
            "server_took_ms_p50": round(percentile(server_ms, 50), 1) if server_ms else None,
        }
    return {"phase": name, "clients": clients, "seconds": round(seconds, 2), "errors": errors, "by_kind": out}


def run_phase(name, base, picks, duration, max_requests, headers, think=0.0):
    """One client thread per entry of ``picks`` (each a function returning (kind, body)); they post queries until
    ``duration`` s or ``max_requests`` in all have passed, each waiting ``think`` s after every answer."""
    samples, errors = [], []
    lock = threading.Lock()
    deadline = time.monotonic() + duration
    sent = [0]

    host, port = urlsplit(base).hostname, urlsplit(base).port

    def client(pick):
        # http.client with one keep-alive connection per client: a lean client leaves the 2 cores to the server.
        connection = http.client.HTTPConnection(host, port, timeout=120)
        while True:
            with lock:
                if time.monotonic() >= deadline or sent[0] >= max_requests:
                    break
                sent[0] += 1
            kind, body = pick()
            payload = json.dumps(body).encode()
            started = time.perf_counter()
            try:
                connection.request("POST", "/api/v1/similar", body=payload,
                                   headers={**headers, "Content-Type": "application/json"})
                response = connection.getresponse()
                data = response.read()
                elapsed = 1000 * (time.perf_counter() - started)
                took = json.loads(data).get("took_ms") if response.status == 200 else None
                with lock:
                    samples.append((kind, elapsed, response.status, took))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=120)
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
            if think:
                time.sleep(think)
        connection.close()

    started = time.monotonic()
    with ThreadPoolExecutor(len(picks)) as pool:
        list(pool.map(client, picks))
    result = summarise(name, len(picks), samples, len(errors), time.monotonic() - started)
    if errors:
        result["error_samples"] = errors[:3]
    for kind, part in result["by_kind"].items():
        print(f"{name:<11} {kind:<12} {part['requests']:>5} requests, {part['ok']} ok, {part['throughput_rps']} "
              f"req/s, p50 {part['latency_ms']['p50']} ms, p99 {part['latency_ms']['p99']} ms", flush=True)
    return result


def prepare_pacs(work: Path):
    """Self-contained set-up: Orthanc with the sample data, an index of most of it. Returns (orthanc, index, uids of
    indexed instances, uids of non-indexed instances, notes)."""
    sys.path.insert(0, str(ROOT))
    from medsim.build import build_index
    from medsim.dicomweb import DicomWebClient
    from medsim.index import CaseIndex
    from medsim.ingest import LabelTable
    from medsim.model import resolve_bundle
    from medsim.orthanc import LocalOrthanc

    if not (SAMPLE / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "sample_data" / "build_sample_data.py"), "--out", str(SAMPLE)],
                       check=True)
    manifest = json.loads((SAMPLE / "manifest.json").read_text())
    chest = [row for row in manifest["files"] if row["expected"] == "index"]
    indexed = [SAMPLE / r["path"] for r in chest if r["patient_id"] not in PACS_ONLY_PATIENTS]
    later = [SAMPLE / r["path"] for r in chest if r["patient_id"] in PACS_ONLY_PATIENTS]
    notes = []
    orthanc = LocalOrthanc(work / "orthanc").start()
    client = DicomWebClient(orthanc.dicomweb_url)
    client.store_files(indexed)
    labels = LabelTable.from_csv(SAMPLE / "labels.csv")
    t = time.perf_counter()
    report = build_index(orthanc.dicomweb_url, work / "index", resolve_bundle(None), labels=labels, workers=1,
                         progress=False)
    notes.append(f"index built over DICOMweb: {report.indexed} images in {time.perf_counter() - t:.1f} s")
    shared = sorted(SHARED_DICOM.glob("*.dcm")) if SHARED_DICOM.is_dir() else []
    stored = client.store_files(later + shared)
    notes.append(f"non-indexed instances stored: {stored.stored} ({len(later)} sample"
                 f"{f', {len(shared)} from {SHARED_DICOM}' if shared else ''})")
    with CaseIndex.open(work / "index") as index:
        indexed_uids = [{"study_uid": c.study_uid, "series_uid": c.series_uid, "sop_uid": c.sop_uid}
                        for c in index.cases()]
        known = {u["sop_uid"] for u in indexed_uids}
    non_indexed = [{"study_uid": r.study_uid, "series_uid": r.series_uid, "sop_uid": r.sop_uid}
                   for r in client.chest_instances() if r.sop_uid not in known]
    return orthanc, work / "index", indexed_uids, non_indexed, notes


def start_server(index, pacs, port, threads, env_extra, log_path):
    env = {**os.environ, **env_extra}
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "medsim.cli", "serve", "--index", str(index), "--pacs", pacs,
                                "--port", str(port), "--threads", str(threads)],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"medsim serve exited ({process.returncode}); see {log_path}")
        try:
            if requests.get(f"{base}/healthz", timeout=2).ok:
                return process, base
        except requests.RequestException:
            pass
        time.sleep(0.25)
    process.kill()
    raise SystemExit("medsim serve did not start within 180 s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, help="existing index (default: build one from the sample data)")
    parser.add_argument("--pacs", help="DICOMweb URL of the PACS holding the index's instances")
    parser.add_argument("--non-indexed", nargs="*", default=[], metavar="STUDY/SERIES/SOP",
                        help="UIDs of non-indexed instances in that PACS (with --index/--pacs)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=8, help="server threads (default: the serve default, 8)")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per phase (default: %(default)s)")
    parser.add_argument("--max-requests", type=int, default=5000, help="requests per phase at most")
    parser.add_argument("--sequential", type=int, default=8, help="non-indexed queries of the 1-client phase")
    parser.add_argument("--think", type=float, default=0.1,
                        help="seconds each client waits between queries in the paced phase (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "service.json")
    args = parser.parse_args(argv)

    from medsim.orthanc import free_port

    work = Path(tempfile.mkdtemp(prefix="medsim-load-"))
    orthanc, notes = None, []
    try:
        if args.index:
            if not args.pacs:
                parser.error("--index needs --pacs")
            from medsim.index import CaseIndex

            index, pacs_url = args.index, args.pacs
            with CaseIndex.open(index) as opened:
                indexed_uids = [{"study_uid": c.study_uid, "series_uid": c.series_uid, "sop_uid": c.sop_uid}
                                for c in opened.cases()]
            non_indexed = [dict(zip(("study_uid", "series_uid", "sop_uid"), uid.split("/")))
                           for uid in args.non_indexed]
        else:
            orthanc, index, indexed_uids, non_indexed, notes = prepare_pacs(work)
            pacs_url = orthanc.dicomweb_url
        token = "load-test-token-" + os.urandom(8).hex()
        (work / "tokens").write_text(f"load:{token}\n")
        env = {"MEDSIM_VECTOR_CACHE_SIZE": "0", "MEDSIM_CACHE_DIR": str(work / "cache"),
               "MEDSIM_TOKEN_FILE": str(work / "tokens"), "MEDSIM_AUDIT_LOG": str(work / "audit.jsonl")}
        t = time.perf_counter()
        server, base = start_server(index, pacs_url, free_port(), args.threads, env, work / "serve.log")
        notes.append(f"server start (model load + warm-up): {time.perf_counter() - t:.1f} s")
        headers = {"Authorization": f"Bearer {token}"}
        rng = random.Random(0)
        rng_lock = threading.Lock()

        def pick(pool, kind):
            def choose():
                with rng_lock:
                    uids = rng.choice(pool)
                return kind, {**uids, "k": 10}
            return choose

        indexed_pick, pacs_pick = pick(indexed_uids, "indexed"), pick(non_indexed, "non-indexed")
        phases = []
        load_before = os.getloadavg()
        try:
            run_phase("warm-up", base, [indexed_pick] * 2, 2.0, 50, headers)
            phases.append(run_phase("indexed-16", base, [indexed_pick] * args.clients, args.duration,
                                    args.max_requests, headers))
            phases.append(run_phase("paced-16", base, [indexed_pick] * args.clients, args.duration,
                                    args.max_requests, headers, think=args.think))
            if non_indexed:
                phases.append(run_phase("pacs-1", base, [pacs_pick], 60.0, args.sequential, headers))
                phases.append(run_phase("mixed-16", base, [indexed_pick] * (args.clients - 1) + [pacs_pick],
                                        args.duration, args.max_requests, headers))
            alive = requests.get(f"{base}/healthz", timeout=10).json()["status"]
            load_after = os.getloadavg()
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
        by_name = {p["phase"]: p for p in phases}
        indexed = by_name["indexed-16"]["by_kind"]["indexed"]["latency_ms"]
        pacs_one = by_name.get("pacs-1", {}).get("by_kind", {}).get("non-indexed", {}).get("latency_ms", {})
        result = {
            "benchmark": "service_load", "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"cpus": os.cpu_count(), "processor": _cpu_name(), "python": platform.python_version(),
                        "platform": platform.platform(),
                        # other work on the machine slows everything: compare runs only at a similar load
                        "load_average_1_5_15min_before": [round(v, 2) for v in load_before],
                        "load_average_1_5_15min_after": [round(v, 2) for v in load_after]},
            "setup": {"index_cases": len(indexed_uids), "non_indexed_instances": len(non_indexed),
                      "server_threads": args.threads, "clients": args.clients, "phase_seconds": args.duration,
                      "vector_cache": "off (every non-indexed query fetches, decodes and embeds)",
                      "auth": "bearer token", "transport": "HTTP/1.1 keep-alive on loopback", "notes": notes},
            "phases": phases,
            "server_alive_after_load": alive,
            "goals": {
                **GOALS,
                "indexed_p50_met": indexed["p50"] is not None and indexed["p50"] < GOALS["indexed_p50_ms"],
                "indexed_p99_met": indexed["p99"] is not None and indexed["p99"] < GOALS["indexed_p99_ms"],
                "non_indexed_p50_met": (pacs_one.get("p50") is not None
                                        and pacs_one["p50"] < GOALS["non_indexed_p50_ms"]),
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}; server after load: {alive}; goals: "
              f"{ {k: v for k, v in result['goals'].items() if k.endswith('_met')} }")
        return 0 if alive in ("ok", "degraded") and all(p["errors"] == 0 for p in phases) else 1
    finally:
        if orthanc is not None:
            orthanc.cleanup()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())

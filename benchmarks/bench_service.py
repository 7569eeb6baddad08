"""Benchmark 5, service: p50/p99 latency and requests/s of `medsim serve` on loopback under 1, 4 and 16 concurrent
clients, for indexed queries (stored vectors) and non-indexed ones (WADO-RS fetch + decode + preprocess + embed).

Uses the set-up and the client of benchmarks/service_load.py (the server engineer's load test; see its docstring):
a loopback Orthanc with the sample data, an index built over DICOMweb from all but three patients, `medsim serve`
(waitress, 8 threads) in its own process with its vector cache off, bearer-token auth, one keep-alive HTTP
connection per client. Every phase is bounded by time and by request count; clients send their next query as soon
as the last is answered (closed loop), so at saturation latency ~= clients / throughput.

    python -m benchmarks.bench_service [--quick]
    python benchmarks/service_load.py       # the server engineer's own phases (paced, mixed): service.json
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import load_average, machine, say, write_result


def run(quick: bool = False, clients=(1, 4, 16)) -> dict:
    from benchmarks import service_load as load
    from medsim.orthanc import free_port

    duration = 2.0 if quick else 6.0
    slow_duration = 6.0 if quick else 20.0
    max_requests = 200 if quick else 5000
    max_slow = 8 if quick else 64
    work = Path(tempfile.mkdtemp(prefix="medsim-bench-service-"))
    orthanc = None
    load_before = load_average()
    try:
        try:
            orthanc, index, indexed_uids, non_indexed, notes = load.prepare_pacs(work)
        except Exception as exc:  # no Orthanc on this machine
            return {"machine": machine(), "skipped": f"loopback PACS unavailable: {type(exc).__name__}: {exc}"}
        token = "bench-token-" + os.urandom(8).hex()
        (work / "tokens").write_text(f"bench:{token}\n")
        env = {"MEDSIM_VECTOR_CACHE_SIZE": "0", "MEDSIM_CACHE_DIR": str(work / "cache"),
               "MEDSIM_TOKEN_FILE": str(work / "tokens"), "MEDSIM_AUDIT_LOG": str(work / "audit.jsonl")}
        t0 = time.perf_counter()
        server, base = load.start_server(index, orthanc.dicomweb_url, free_port(), 8, env, work / "serve.log")
        notes.append(f"server start (model load + warm-up): {time.perf_counter() - t0:.1f} s")
        headers = {"Authorization": f"Bearer {token}"}
        rng, rng_lock = random.Random(0), threading.Lock()

        def pick(pool, kind):
            def choose():
                with rng_lock:
                    uids = rng.choice(pool)
                return kind, {**uids, "k": 10}
            return choose

        phases = []
        try:
            load.run_phase("warm-up", base, [pick(indexed_uids, "indexed")] * 2, 2.0, 50, headers)
            if non_indexed:
                load.run_phase("warm-up-pacs", base, [pick(non_indexed, "non-indexed")], 30.0, 1, headers)
            for n in clients:
                phases.append(load.run_phase(f"indexed-{n}", base, [pick(indexed_uids, "indexed")] * n, duration,
                                             max_requests, headers))
            for n in clients:
                if non_indexed:
                    phases.append(load.run_phase(f"non-indexed-{n}", base, [pick(non_indexed, "non-indexed")] * n,
                                                 slow_duration, max(max_slow, n), headers))
            alive = load.requests.get(f"{base}/healthz", timeout=10).json()["status"]
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
        rows = []
        for phase in phases:
            for kind, part in phase["by_kind"].items():
                rows.append({"kind": kind, "clients": phase["clients"], "requests": part["requests"],
                             "ok": part["ok"], "errors": phase["errors"], "seconds": phase["seconds"],
                             "requests_per_s": part["throughput_rps"], "p50_ms": part["latency_ms"]["p50"],
                             "p99_ms": part["latency_ms"]["p99"], "max_ms": part["latency_ms"]["max"],
                             "server_took_ms_p50": part["server_took_ms_p50"]})
        return {"machine": machine(), "load_average_before": load_before, "load_average_after": load_average(),
                "setup": {"index_cases": len(indexed_uids), "non_indexed_instances": len(non_indexed),
                          "server_threads": 8, "phase_seconds_indexed": duration,
                          "phase_seconds_non_indexed": slow_duration, "max_requests_indexed": max_requests,
                          "max_requests_non_indexed": max_slow, "notes": notes,
                          "client": "benchmarks/service_load.py run_phase (closed loop, keep-alive)"},
                "rows": rows, "phases": phases, "server_alive_after_load": alive}
    finally:
        if orthanc is not None:
            orthanc.cleanup()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    path = write_result("service_clients", run(args.quick))
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

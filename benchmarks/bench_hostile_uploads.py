"""Benchmark 5b, hostile uploads: the peak resident memory of `medsim serve` while it refuses uploads built to exhaust
it (issue 13, point 4), beside what a legitimate upload costs.

A `medsim serve` process (waitress, default settings: 64 MiB body cap, 25 M pixel decode limit, 128 MiB inflate cap,
2 concurrent decodes) over an index of the sample export. For each scenario the server's peak resident set size is
reset (``/proc/<pid>/clear_refs``), the uploads are sent (raw ``application/dicom`` bodies, in parallel where the
scenario says so), and the growth of the peak over the resident size before is recorded, with the statuses and
times. A 20 ms sampler of VmRSS backs the peak up where the kernel does not allow the reset.

    python -m benchmarks.bench_hostile_uploads [--quick]
    python -m benchmarks.bench_hostile_uploads --before before=/path/to/old/tree   # also the same server from
                                                          # another source tree (PYTHONPATH), e.g. the last commit

Scenarios: a real 1416 x 1776 16-bit upload (one, and three at once), 8.9 KB declaring 9999 x 9999 pixels, a 200 KB
deflate bomb that inflates to 200 MB, a valid 950 KB JPEG of 9000 x 9000 pixels (about 2 GB to decode), each alone
and three at once, and 24 of them from 8 clients. Goal:
every hostile upload answered 4xx, peak growth < 500 MiB. Results: benchmarks/results/hostile_uploads.json.
A server that decodes the hostile files (the "before" tree) needs several GB per request: its parallel scenarios run
only when MemAvailable allows (see ``PARALLEL_HEADROOM``).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import ROOT, SAMPLE, load_average, machine, say, write_result

GOAL_GROWTH_MIB = 500.0
PARALLEL_HEADROOM = 12 * 2**30  # bytes of MemAvailable needed before a parallel hostile scenario runs on "before"
DEFLATED = "1.2.840.10008.1.2.1.99"
LARGEST = "KERMANY-CC7FCEF0/STF58DEFB6/1/IMG0001"  # 1416 x 1776, 16 bit, explicit VR little endian, 5 MB
EXPLICIT16 = "KERMANY-58BAA57B/ST2BCE9AF0/1/IMG0001.dcm"  # 952 x 1192, 16 bit, explicit VR little endian
JPEG_BASELINE = "KERMANY-D1849D79/STA6AF94EB/1/IMG0001.dcm"  # 1040 x 1272, 8 bit, JPEG baseline


# ---- the uploads -----------------------------------------------------------------------------------------------------

def _part10(ds) -> bytes:
    from pydicom.uid import generate_uid

    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def huge_header(side: int = 9999) -> bytes:
    """~8.9 KB of a real file whose header now declares side x side 16-bit pixels."""
    import pydicom

    ds = pydicom.dcmread(SAMPLE / EXPLICIT16)
    ds.Rows = ds.Columns = side
    ds.PixelData = ds.PixelData[:8192]
    return _part10(ds)


def big_jpeg(side: int = 9000) -> bytes:
    """A valid, consistent file: one 8-bit JPEG frame of side x side pixels (~950 KB at 9000; ~2 GB to decode)."""
    import pydicom
    from PIL import Image
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(SAMPLE / JPEG_BASELINE)
    frame = io.BytesIO()
    Image.new("L", (side, side), 100).save(frame, format="JPEG", quality=90)
    ds.PixelData = encapsulate([frame.getvalue()])
    ds.Rows = ds.Columns = side
    return _part10(ds)


def deflate_bomb(rows: int = 10000, cols: int = 10000) -> bytes:
    """A real header in Deflated Explicit VR Little Endian with rows x cols x 2 bytes of zeros: ~200 KB -> 200 MB."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(SAMPLE / EXPLICIT16)
    del ds.PixelData
    ds.Rows, ds.Columns = rows, cols
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = DEFLATED
    meta, body = DicomBytesIO(), DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    body.is_little_endian, body.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    write_dataset(body, ds)
    length = rows * cols * 2
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [bytes(128), b"DICM", meta.getvalue(), compressor.compress(body.getvalue()),
           compressor.compress(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length))]
    block = bytes(2**20)
    for start in range(0, length, len(block)):
        out.append(compressor.compress(block[:min(len(block), length - start)]))
    out.append(compressor.flush())
    return b"".join(out)


# ---- the server's memory ---------------------------------------------------------------------------------------------

def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """The largest VmRSS of ``pid`` seen every ``period`` seconds while in the block."""

    def __init__(self, pid: int, period: float = 0.02):
        self.pid, self.period, self.peak_kib = pid, period, 0
        self._stop = threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, _status_kib(self.pid, "VmRSS"))
            except OSError:
                return
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)


# ---- running ---------------------------------------------------------------------------------------------------------

def _build_index(work: Path) -> Path:
    index = work / "index"
    done = subprocess.run([sys.executable, "-m", "medsim.cli", "build-index", str(SAMPLE), "--index", str(index),
                           "--workers", "0", "--no-progress"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"build-index failed: {done.stdout[-500:]} {done.stderr[-1500:]}")
    return index


def _start_server(index: Path, root: Path, work: Path, label: str):
    import requests

    from medsim.orthanc import free_port

    port = free_port()
    log = (work / f"serve-{label}.log").open("w")
    env = {**os.environ, "PYTHONPATH": str(root), "MEDSIM_CACHE_DIR": str(work / f"cache-{label}"),
           "MEDSIM_AUDIT_LOG": str(work / f"audit-{label}.jsonl")}
    server = subprocess.Popen([sys.executable, "-m", "medsim.cli", "serve", "--index", str(index), "--port",
                               str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(work))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"medsim serve ({label}) exited: {(work / f'serve-{label}.log').read_text()[-1500:]}")
        try:
            if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                return server, base
        except requests.RequestException:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"medsim serve ({label}) did not answer /healthz in 300 s")


def _post(base: str, data: bytes) -> tuple[int, str, float]:
    import requests

    started = time.perf_counter()
    try:
        response = requests.post(f"{base}/api/v1/similar?k=5", data=data, timeout=600,
                                 headers={"Content-Type": "application/dicom"})
        code = response.json().get("error", {}).get("code", "") if response.status_code >= 400 else ""
        return response.status_code, code, time.perf_counter() - started
    except (requests.RequestException, ValueError) as exc:
        return 0, f"{type(exc).__name__}", time.perf_counter() - started


def _scenario(pid: int, base: str, name: str, bodies: list[bytes], clients: int, hostile: bool) -> dict:
    time.sleep(0.5)  # let the last scenario's memory settle
    reset = _reset_peak(pid)
    before_kib = _status_kib(pid, "VmRSS")
    started = time.perf_counter()
    with RssSampler(pid) as sampler, ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda body: _post(base, body), bodies))
    seconds = time.perf_counter() - started
    peak_kib = max(_status_kib(pid, "VmHWM") if reset else 0, sampler.peak_kib)
    statuses = sorted({f"{status} {code}".strip() for status, code, _ in answers})
    row = {"scenario": name, "uploads": len(bodies), "clients": clients, "upload_bytes": len(bodies[0]),
           "hostile": hostile, "statuses": statuses, "rss_before_mib": round(before_kib / 1024, 1),
           "peak_growth_mib": round((peak_kib - before_kib) / 1024, 1), "seconds": round(seconds, 2),
           "max_answer_s": round(max(t for _, _, t in answers), 2), "peak_reset": reset,
           "all_4xx": all(400 <= status < 500 for status, _, _ in answers)}
    say(f"{name:<34} {row['statuses']} peak +{row['peak_growth_mib']} MiB in {row['seconds']} s")
    return row


def measure(index: Path, root: Path, work: Path, label: str, quick: bool) -> dict:
    legit = (SAMPLE / LARGEST).read_bytes()
    header, bomb, big = huge_header(), deflate_bomb(), big_jpeg()
    server, base = _start_server(index, root, work, label)
    rows, notes = [], []
    try:
        pid = server.pid
        _post(base, legit)  # warm: the first upload loads decoders
        plan = [("legit 1416x1776 16-bit", [legit], 1, False),
                ("legit x3 parallel", [legit] * 3, 3, False),
                ("9999x9999 header (8.9 KB)", [header], 1, True),
                ("deflate bomb (200 KB -> 200 MB)", [bomb], 1, True),
                ("valid 9000x9000 JPEG (950 KB)", [big], 1, True),
                ("9999x9999 header x3 parallel", [header] * 3, 3, True),
                ("deflate bomb x3 parallel", [bomb] * 3, 3, True),
                ("valid 9000x9000 JPEG x3 parallel", [big] * 3, 3, True)]
        if not quick:
            plan.append(("24 hostile from 8 clients", [header, bomb, big] * 8, 8, True))
        for name, bodies, clients, hostile in plan:
            if label != "after" and hostile and clients > 3:
                notes.append(f"{name}: not run on this tree (it decodes every hostile upload: several GB each)")
                continue
            if label != "after" and hostile and clients > 1 and _mem_available() < PARALLEL_HEADROOM:
                notes.append(f"{name}: skipped, MemAvailable {_mem_available() / 2**30:.1f} GiB < "
                             f"{PARALLEL_HEADROOM / 2**30:.0f} GiB")
                continue
            rows.append(_scenario(pid, base, name, bodies, clients, hostile))
        alive = _post(base, legit)[0] == 200
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    hostile = [r for r in rows if r["hostile"]]
    worst = max((r["peak_growth_mib"] for r in hostile), default=None)
    return {"label": label, "source_tree": str(root), "rows": rows, "notes": notes, "server_alive_after": alive,
            "goal": {"bound_mib": GOAL_GROWTH_MIB, "worst_hostile_growth_mib": worst,
                     "all_hostile_refused_4xx": all(r["all_4xx"] for r in hostile),
                     "met": worst is not None and worst < GOAL_GROWTH_MIB and all(r["all_4xx"] for r in hostile)}}


def run(quick: bool = False, before: dict[str, Path] | None = None) -> dict:
    """``before``: label -> another source tree to measure the same way (e.g. the last commit's server)."""
    work = Path(tempfile.mkdtemp(prefix="medsim-bench-hostile-"))
    load_before = load_average()
    index = _build_index(work)
    runs = {"after": measure(index, ROOT, work, "after", quick)}
    for label, tree in (before or {}).items():
        runs[label] = measure(index, Path(tree), work, label, quick)
    return {"machine": machine(), "load_average_before": load_before, "load_average_after": load_average(),
            "setup": {"index": "sample export (sample_data/pacs_export), built by medsim build-index",
                      "server": "medsim serve, waitress 8 threads, default limits", "quick": quick},
            "runs": runs, "goal": runs["after"]["goal"]}


def section(result: dict | None) -> list[str]:
    """Markdown for docs/performance.md (benchmarks/report.py)."""
    out = ["## 5b. Hostile uploads (memory)", ""]
    if not result:
        return out + ["Not run yet (`python -m benchmarks.bench_hostile_uploads`).", ""]
    out += [f"Peak resident memory growth of `medsim serve` while it answers each scenario "
            f"({result['setup']['server']}; goal: every hostile upload refused with a 4xx, growth < "
            f"{GOAL_GROWTH_MIB:.0f} MiB).", ""]
    for label, run_ in result["runs"].items():
        out += [f"**{label}** ({run_['source_tree']}):", "",
                "| scenario | uploads | clients | answers | peak growth MiB | seconds |", "|---|---|---|---|---|---|"]
        for r in run_["rows"]:
            out.append(f"| {r['scenario']} | {r['uploads']} | {r['clients']} | {', '.join(r['statuses'])} | "
                       f"{r['peak_growth_mib']:.0f} | {r['seconds']:.2f} |")
        out += [""] + [f"- {note}" for note in run_["notes"]] + ([""] if run_["notes"] else [])
    goal = result["goal"]
    out += [f"Goal {'met' if goal['met'] else 'missed'}: worst hostile growth {goal['worst_hostile_growth_mib']} MiB, "
            f"all refused with a 4xx: {goal['all_hostile_refused_4xx']}.", ""]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--before", action="append", default=[], metavar="[LABEL=]TREE",
                        help="also measure a server run from this source tree (PYTHONPATH); repeatable")
    args = parser.parse_args(argv)
    before = {}
    for entry in args.before:
        label, sep, tree = entry.partition("=")
        before[label if sep else f"before-{len(before) + 1}" if before else "before"] = Path(tree if sep else label)
    path = write_result("hostile_uploads", run(args.quick, before))
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

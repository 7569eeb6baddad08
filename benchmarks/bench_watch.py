"""Benchmark of `medsim watch` on a burst (issue 16): N new studies uploaded to Orthanc at once, time until all are in
the index, images/s against `build-index` on the same files (from a folder, and from the same PACS over DICOMweb).

    python -m benchmarks.bench_watch --quick      # 40 studies
    python -m benchmarks.bench_watch              # 200 studies

The studies are the sample export's chest radiographs (sample_data/pacs_export, 15 images of 1-2 k pixels a side),
each copied under fresh UIDs and a new patient (one image per study). Needs Orthanc (`make orthanc`). Writes
benchmarks/results/watch.json; docs/performance.md gets a section from it (:func:`section_watch`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    SAMPLE,
    load_average,
    machine,
    say,
    under_load,
    write_result,
)


def _burst(out: Path, n: int) -> list[Path]:
    import pydicom
    from pydicom.uid import generate_uid

    manifest = json.loads((SAMPLE / "manifest.json").read_text())
    sources = [SAMPLE / r["path"] for r in manifest["files"] if r["expected"] == "index"]
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        ds = pydicom.dcmread(sources[i % len(sources)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = f"BURST-{i:04d}"
        path = out / f"burst-{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _count(index: Path) -> int:
    from medsim.index import CaseIndex

    if not (index / "catalog.sqlite").exists():
        return 0
    with CaseIndex.open(index) as opened:
        return len(opened)


def run(quick: bool = False, n: int | None = None, workers: int = 0) -> dict:
    from medsim.build import build_index
    from medsim.dicomweb import DicomWebClient
    from medsim.model import resolve_bundle
    from medsim.orthanc import LocalOrthanc, OrthancError
    from medsim.watch import WatchConfig, Watcher

    n = n or (40 if quick else 200)
    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="medsim-bench-watch-"))
    try:
        files = _burst(work / "burst", n)
        bundle = resolve_bundle("imagenet")
        try:
            orthanc = LocalOrthanc(work / "orthanc").start()
        except OrthancError as exc:
            return {"skipped": f"Orthanc is not available: {exc}"}
        try:
            client = DicomWebClient(orthanc.dicomweb_url)
            index = work / "watch-index"
            watcher = Watcher(WatchConfig(orthanc.dicomweb_url, index, interval=0.5, reconcile_every=0,
                                          workers=workers), bundle)
            watcher.cycle()  # model loaded, feed position taken, index created lazily: not part of the burst
            thread = threading.Thread(target=watcher.run, daemon=True)
            thread.start()
            say(f"uploading {n} studies at once (STOW-RS)")
            started = time.perf_counter()
            stored = client.store_files(files)
            uploaded = time.perf_counter() - started
            first = None
            while _count(index) < n:
                if first is None and _count(index):
                    first = time.perf_counter() - started
                if time.perf_counter() - started > 60 + 5 * n:
                    break
                time.sleep(0.2)
            watch_seconds = time.perf_counter() - started
            watcher.stop()
            thread.join(60)
            indexed = _count(index)
            embed_mode = watcher.reports[-1].embed_mode if watcher.reports else ""
            say(f"watcher: {indexed}/{n} in {watch_seconds:.1f} s (upload {uploaded:.1f} s)")

            say("build-index from the same PACS (DICOMweb)")
            pacs_report = build_index(orthanc.dicomweb_url, work / "pacs-index", bundle, workers=workers,
                                      progress=False)
        finally:
            orthanc.cleanup()
        say("build-index from the same files (folder)")
        folder_report = build_index(work / "burst", work / "folder-index", bundle, progress=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = load_average()
    return {
        "studies": n, "images": n, "stored": stored.stored, "workers": workers,
        "watch": {"indexed": indexed, "seconds_from_upload_start": round(watch_seconds, 2),
                  "upload_seconds": round(uploaded, 2),
                  "first_findable_seconds": round(first, 2) if first is not None else None,
                  "images_per_second": round(indexed / watch_seconds, 3) if watch_seconds else None,
                  "embed_mode": embed_mode},
        "build_index_dicomweb": {"indexed": pacs_report.indexed, "seconds": round(pacs_report.seconds, 2),
                                 "images_per_second": round(pacs_report.images_per_second, 3), "workers": workers},
        "build_index_folder": {"indexed": folder_report.indexed, "seconds": round(folder_report.seconds, 2),
                               "images_per_second": round(folder_report.images_per_second, 3),
                               "workers": "default (cores - 1)"},
        "machine": machine(), "load_before": load_before, "load_after": load_after,
        "under_load": under_load(load_before, load_after),
    }


def section_watch(results: Path = RESULTS) -> list[str]:
    """The docs/performance.md section from benchmarks/results/watch.json (empty when it was never run)."""
    path = results / "watch.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if data.get("skipped"):
        return ["## Watching a PACS (`medsim watch`)", "", f"Skipped: {data['skipped']}", ""]
    w, d, f = data["watch"], data["build_index_dicomweb"], data["build_index_folder"]
    m = data.get("machine", {})
    busy = " (the machine was busy: other jobs competed for the cores)" if data.get("under_load") else ""
    return [
        "## Watching a PACS (`medsim watch`)", "",
        f"A burst of {data['studies']} one-image chest radiograph studies uploaded to Orthanc at once (STOW-RS, "
        f"{w['upload_seconds']:.1f} s), the watcher following Orthanc's change feed into an empty index "
        f"(`benchmarks/bench_watch.py`; {m.get('logical_cpus', '?')} logical CPUs, {m.get('cpu', '?')}, load average "
        f"{data.get('load_before')} → {data.get('load_after')}{busy}).", "",
        "| how | images | seconds | images/s |", "|---|---:|---:|---:|",
        f"| `medsim watch` (upload start → all findable; first after {w['first_findable_seconds']} s) | "
        f"{w['indexed']} | {w['seconds_from_upload_start']:.1f} | {w['images_per_second']:.2f} |",
        f"| `build-index` from the same PACS (DICOMweb, workers {d['workers']}) | {d['indexed']} | "
        f"{d['seconds']:.1f} | {d['images_per_second']:.2f} |",
        f"| `build-index` from the same files (folder, worker processes) | {f['indexed']} | {f['seconds']:.1f} | "
        f"{f['images_per_second']:.2f} |", "",
        "The watcher indexes through the same runner as `build-index`, a batch of studies per read of the change "
        "feed; it includes the upload and Orthanc's StableAge (1 s) in its time, and loads the model once for its "
        f"lifetime. Embedding mode: {w.get('embed_mode') or '-'}.", "",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_watch", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 studies instead of 200")
    parser.add_argument("-n", type=int, help="number of studies")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes of the watcher (default 0)")
    args = parser.parse_args(argv)
    path = write_result("watch", run(args.quick, args.n, args.workers))
    say(f"wrote {path}")
    print("\n".join(section_watch()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

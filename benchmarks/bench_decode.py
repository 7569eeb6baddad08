"""Benchmark 1, decode: images/s and megapixels/s per transfer syntax, pydicom against SimpleITK.

Files: the sample PACS export (sample_data/pacs_export, real chest X-rays in every transfer syntax, 0.6 to 2.5
megapixels) and, when it has been made, the JPEG Baseline DICOM export of ../shared/data/cxr (512 px) that
benchmark 3 writes to var/bench. Each file is decoded repeatedly from the page cache (the first, cold read is not
timed), one process, one thread; the figure per syntax is the median over its files of the per-file median time.

  pydicom    dcmread + Dataset.pixel_array (pylibjpeg / openjpeg / gdcm plugins as medsim uses them)
  SimpleITK  ReadImage + GetArrayFromImage (GDCM)
  medsim     medsim.dicom.read_dicom (header checks, decode, modality/VOI LUT, to display) + preprocess to the
             model's 224 px input: the per-image work of a build-index worker

    python -m benchmarks.bench_decode [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

from benchmarks.common import SAMPLE, WORK, Timer, load_average, machine, say, write_result

GROUPS = {
    "1.2.840.10008.1.2": "uncompressed",
    "1.2.840.10008.1.2.1": "uncompressed",
    "1.2.840.10008.1.2.1.99": "deflated",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.90": "JPEG 2000",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE",
}
ORDER = ["uncompressed", "deflated", "JPEG Baseline", "JPEG Lossless SV1", "JPEG 2000", "RLE"]


def sample_files() -> list[Path]:
    manifest_path = SAMPLE / "manifest.json"
    if not manifest_path.exists():
        import subprocess
        import sys

        from benchmarks.common import ROOT

        subprocess.run([sys.executable, str(ROOT / "sample_data" / "build_sample_data.py"), "--out", str(SAMPLE)],
                       check=True)
    manifest = json.loads(manifest_path.read_text())
    return [SAMPLE / row["path"] for row in manifest["files"] if row["expected"] == "index"]


def export_files(limit: int) -> list[Path]:
    folder = WORK / "cxr-dicom"
    if not (folder / "export.json").exists():
        return []
    return sorted(folder.rglob("*.dcm"))[:limit]


def _decode_pydicom(path: Path):
    import pydicom

    return pydicom.dcmread(path).pixel_array


def _decode_sitk(path: Path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _decode_medsim(path: Path, spec):
    from medsim.dicom import read_dicom
    from medsim.preprocess import prepare

    return prepare(read_dicom(path).pixels, spec).array


def _time_file(fn, path: Path, min_seconds: float, max_reps: int) -> float:
    fn(path)  # warm: page cache, decoder imports
    times = []
    started = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - started < min_seconds):
        with Timer() as t:
            fn(path)
        times.append(t.seconds)
    return statistics.median(times)


def run(quick: bool = False, export_limit: int | None = None) -> dict:
    import pydicom
    import SimpleITK as sitk
    import torch

    from medsim.preprocess import CAFFE_VGG16

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # as in a build-index worker
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    load_before = load_average()
    min_seconds, max_reps = (0.2, 5) if quick else (1.0, 40)
    files = [("sample", p) for p in sample_files()]
    files += [("cxr-export", p) for p in export_files(export_limit or (8 if quick else 40))]
    rows = []
    for origin, path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        tsuid = str(ds.file_meta.TransferSyntaxUID)
        group = GROUPS.get(tsuid, tsuid)
        megapixels = int(ds.Rows) * int(ds.Columns) / 1e6
        row = {"file": path.relative_to(SAMPLE).as_posix() if origin == "sample" else path.name,
               "origin": origin, "syntax": group, "transfer_syntax": tsuid,
               "transfer_syntax_name": ds.file_meta.TransferSyntaxUID.name, "rows": int(ds.Rows),
               "columns": int(ds.Columns),
               "bits_allocated": int(ds.BitsAllocated), "photometric": str(ds.PhotometricInterpretation),
               "megapixels": round(megapixels, 3), "file_bytes": path.stat().st_size}
        for reader, fn in (("pydicom", _decode_pydicom), ("simpleitk", _decode_sitk),
                           ("medsim", lambda p: _decode_medsim(p, CAFFE_VGG16))):
            try:
                seconds = _time_file(fn, path, min_seconds, max_reps)
                row[f"{reader}_ms"] = round(1000 * seconds, 2)
            except Exception as exc:  # a reader that cannot decode this syntax is a result, not a crash
                row[f"{reader}_ms"] = None
                row[f"{reader}_error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
        say(f"decode {row['syntax']:<18} {row['rows']}x{row['columns']} pydicom {row['pydicom_ms']} ms, "
            f"SimpleITK {row['simpleitk_ms']} ms, medsim read+prepare {row['medsim_ms']} ms")

    summary = []
    for origin in ("sample", "cxr-export"):
        for group in ORDER + sorted({r["syntax"] for r in rows} - set(ORDER)):
            members = [r for r in rows if r["syntax"] == group and r["origin"] == origin]
            if not members:
                continue
            entry = {"syntax": group, "origin": origin, "files": len(members),
                     "megapixels_median": round(statistics.median(r["megapixels"] for r in members), 2)}
            for reader in ("pydicom", "simpleitk", "medsim"):
                ms = [r[f"{reader}_ms"] for r in members if r[f"{reader}_ms"] is not None]
                mps = [r["megapixels"] / (r[f"{reader}_ms"] / 1000) for r in members if r[f"{reader}_ms"]]
                entry[f"{reader}_images_per_s"] = round(1000 / statistics.median(ms), 1) if ms else None
                entry[f"{reader}_megapixels_per_s"] = round(statistics.median(mps), 1) if mps else None
                entry[f"{reader}_failed"] = len(members) - len(ms)
            summary.append(entry)
    return {
        "machine": machine(), "load_average_before": load_before, "load_average_after": load_average(),
        "settings": {"quick": quick, "min_seconds_per_file": min_seconds, "max_reps_per_file": max_reps,
                     "pydicom": pydicom.__version__, "simpleitk": sitk.Version.VersionString(),
                     "method": "median of repeated decodes per file (page cache warm, first read untimed), "
                               "median over the files of a syntax; one process, one thread"},
        "summary": summary, "files": rows,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    path = write_result("decode", run(args.quick))
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark 3, build-index end to end against embed-only: are decoding and I/O hidden behind the model?

Two sources, each indexed from scratch by the real command (`medsim build-index`, a fresh process, default
bundle -- the fine-tuned one from `make model` when present, else ImageNet VGG-16 --, default workers, batch size
and numeric mode):

  cxr         ../shared/data/cxr as it is: 1,774 JPEGs (512 px) and 617 PNGs (64 px)
  cxr-dicom   a DICOM export of the same images, written at run time to var/bench/cxr-dicom (git-ignored): each
              JPEG encapsulated as it is (JPEG Baseline transfer syntax, no re-encoding), each PNG as uncompressed
              Explicit VR Little Endian; Modality DX, BodyPartExamined CHEST, MONOCHROME2, UIDs derived from the path

Embed-only: the same default Embedder on already-prepared 224 px tensors in memory (no decoding, no I/O, no
catalog), batch 16, measured in a fresh process just before and just after each build; the ratio is
end-to-end images/s / the mean of the two embed-only rates. The images/s of a build is indexed images / the
build's own wall time (from opening the index to the last commit, model load and worker start-up included).

The vectors the cxr build wrote are also scored (mAP@10 on the dev set, cosine to the fp32 reference of
benchmark 2): that is the quality check of the default mode, on the production code path.

Decode-only: one worker's work (medsim.build.process_file) on 240 of the source's files in one process; with
embed-only it gives the shared-core bound 1 / (1/embed + 1/decode) (:func:`shared_core_bound`), what a build can
reach when both are CPU-bound on the same cores.

The int8 default needs a trained bundle (``make model``); without one, a bundle trained by the tests can stand in for
timing (same network, so the same speed): ``MEDSIM_HOME=DIR`` with ``DIR/bundles/default`` holding it, and
``--no-score`` (its quality says nothing).

    python -m benchmarks.bench_build [--quick] [--limit N] [--mode channels_last] [--no-score]
    python -m benchmarks.bench_build --realistic [--files-per-syntax N] [--also-workers 2]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, ROOT, WORK, load_average, machine, say, shared_data, write_result

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
EXPORT_VERSION = 3

EMBED_ONLY = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np
from medsim.model import resolve_bundle
from medsim.ingest import read_any
from medsim.preprocess import prepare
paths = json.loads(sys.argv[1]); reps = int(sys.argv[2])
bundle = resolve_bundle(None)  # the default bundle, as build-index uses it
embedder = bundle.embedder(batch_size=16)
images = [prepare(read_any(p).pixels, bundle.preprocess) for p in paths]
embedder.embed_prepared(images[:16])  # warm-up (oneDNN primitive creation)
t, cpu = time.perf_counter(), time.process_time()
for _ in range(reps):
    embedder.embed_prepared(images)
seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
print(json.dumps({"images": reps * len(images), "seconds": seconds, "images_per_s": reps * len(images) / seconds,
                  "cpu_seconds_per_image": cpu / (reps * len(images)), "mode": embedder.describe()}))
"""


BUILD_IN_PROCESS = r"""
import json, resource, sys, time, warnings, logging
warnings.filterwarnings("ignore")
logging.getLogger("medsim.model").setLevel(logging.ERROR)
from medsim import build as B
from medsim.model import resolve_bundle
source, index = sys.argv[1], sys.argv[2]
workers = int(sys.argv[3]) if sys.argv[3] != "default" else None
stamps = []
flush = B.IndexWriter.flush
def timed_flush(self):
    flush(self)
    stamps.append((time.perf_counter(), self.report.indexed))
B.IndexWriter.flush = timed_flush
started = time.perf_counter()
bundle = resolve_bundle(None)
report = B.build_index(source, index, bundle, progress=False, workers=workers)
wall = time.perf_counter() - started
# steady: from the second committed batch on. At the first commit up to 2 x workers + 2 chunks may already be
# decoded (workers start before the model loads); by the second they are consumed, so the rate is the pipeline's
steady = None
if len(stamps) >= 3 and stamps[-1][0] > stamps[1][0]:
    steady = (stamps[-1][1] - stamps[1][1]) / (stamps[-1][0] - stamps[1][0])
print(json.dumps({"indexed": report.indexed, "failed": dict(report.failed), "skipped": dict(report.skipped),
                  "seconds": report.seconds, "wall": wall, "images_per_s": report.images_per_second,
                  "steady_images_per_s": steady, "first_batch_s": stamps[0][0] - started if stamps else None,
                  "mode": report.embed_mode, "workers": report.workers,
                  "peak_rss_main_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_rss_worker_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""

DECODE_ONLY = r"""
import json, sys, time, warnings, logging
warnings.filterwarnings("ignore")
logging.getLogger("medsim.model").setLevel(logging.ERROR)
from medsim import build as B
from medsim.dicom import ChestPolicy
from medsim.model import resolve_bundle
B._init_worker()  # as a build-index worker: one torch thread, no MONAI metadata
paths = json.loads(sys.argv[1])
spec = resolve_bundle(None).preprocess
B.process_file(paths[0], "/", ChestPolicy(), spec)  # warm: imports, decoders
started, cpu = time.perf_counter(), time.process_time()
for p in paths:
    B.process_file(p, "/", ChestPolicy(), spec)
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
print(json.dumps({"images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds,
                  "cpu_seconds_per_image": cpu / len(paths)}))
"""


def decode_only(paths: list[str]) -> dict:
    """One build-index worker's work (medsim.build.process_file: read at reduced resolution, LUTs, preprocessing,
    pHash) on ``paths``, in a fresh process, page cache warm: the decode-only throughput of the default 1 worker."""
    result = subprocess.run([sys.executable, "-c", DECODE_ONLY, json.dumps(paths)], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise RuntimeError(f"decode-only run failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


WORKER_BASELINE = r"""
import json, resource, warnings
warnings.filterwarnings("ignore")
from medsim import build as B
B._init_worker()
import medsim.dicom, medsim.preprocess, medsim.phash, pydicom, PIL.Image, openjpeg, libjpeg
from pydicom.pixels import get_decoder
print(json.dumps({"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def build_in_process(source: Path, index: Path, workers: int | None = None) -> dict:
    """build_index in a fresh process with the default bundle and mode, and the default workers unless given; with the
    throughput after the first committed batch (steady state: start-up excluded) and the peak RSS of the main process
    and of the workers."""
    if index.exists():
        shutil.rmtree(index)
    load_before = load_average()
    result = subprocess.run([sys.executable, "-c", BUILD_IN_PROCESS, str(source), str(index),
                             "default" if workers is None else str(workers)], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise RuntimeError(f"build failed: {result.stderr[-2000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out.update(load_average_before=load_before, load_average_after=load_average())
    return out


# Decoding may add at most this many bytes per pixel (Rows x Columns) of the largest image to a worker's RSS
# (docs/performance.md): the codec's output, masked and float32 copies, block sums, the LUTs in float64 on the reduced
# image, preprocessing, and the codec libraries loaded on first use.
MEMORY_BYTES_PER_PIXEL = 24


def memory_check(builds: dict, worker_baseline: int) -> dict:
    """Per syntax: a worker's peak RSS above its imports against MEMORY_BYTES_PER_PIXEL x the largest image's pixels."""
    per = {syntax: {"decoding_bytes": r["peak_rss_worker_bytes"] - worker_baseline,
                    "allowed_bytes": int(MEMORY_BYTES_PER_PIXEL * r["largest_megapixels"] * 1e6)}
           for syntax, r in builds.items() if r.get("largest_megapixels")}
    for entry in per.values():
        entry["ok"] = entry["decoding_bytes"] <= entry["allowed_bytes"]
    return {"bytes_per_pixel": MEMORY_BYTES_PER_PIXEL, "per_syntax": per, "ok": all(e["ok"] for e in per.values()),
            "statement": "peak RSS of a build <= main process (imports, model, index) + workers x (worker imports + "
                         f"{MEMORY_BYTES_PER_PIXEL} bytes x the pixels of the largest image)"}


def shared_core_bound(embed: float, decode: float) -> float:
    """What a build can reach when embedding (``embed`` images/s alone, on every core) and one worker's decoding
    (``decode`` images/s alone) are both CPU-bound on the same cores: the worker's seconds are taken from the
    embedder (its threads wait for each other at every layer, so a core lost to the worker stalls both), so each
    image costs 1/e + 1/d seconds. Reaching 90 % of min(e, d) needs one side >= 9 x the other."""
    return 1.0 / (1.0 / embed + 1.0 / decode)


def worker_baseline_rss() -> int:
    result = subprocess.run([sys.executable, "-c", WORKER_BASELINE], capture_output=True, text=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])["rss_bytes"] if result.returncode == 0 else 0


def run_realistic(quick: bool = False, syntaxes: list[str] | None = None, files_per_syntax: int | None = None,
                  extra_workers: tuple[int, ...] = ()) -> dict:
    """Issue 14: build-index per transfer syntax of the realistic export (benchmarks/realistic_export.py), against
    embed-only (the same embedder on prepared tensors) and decode-only (one worker's process_file on the same files,
    measured just before the build); plus the peak memory of the build."""
    from benchmarks.bench_decode import REALISTIC_ORDER
    from benchmarks.realistic_export import DEFAULT_OUT, generate

    cxr = shared_data() / "cxr"
    if not (cxr / "labels.csv").exists():
        return {"machine": machine(), "skipped": f"no dev set at {cxr}"}
    load_before = load_average()
    info = generate(DEFAULT_OUT)
    rows = info["rows"]
    with open(cxr / "labels.csv", newline="") as fh:
        dev = [str(cxr / r["path"]) for r in csv.DictReader(fh) if r["path"].endswith(".jpg")]
    sample = dev[::max(1, len(dev) // 48)][:48]  # embed-only does not depend on where the tensors came from
    decode_file = ROOT / "benchmarks" / "results" / "decode_realistic.json"
    decode = json.loads(decode_file.read_text()) if decode_file.exists() else {}
    decode_rate = {e["syntax"]: e.get("medsim_reduced_images_per_s") for e in decode.get("summary", [])}
    per_syntax = files_per_syntax or (16 if quick else 10**6)
    results = {}
    for syntax in syntaxes or REALISTIC_ORDER:
        # the largest files of the syntax: the worst case for decoding and for memory (the check below)
        members = sorted((r for r in rows if r["syntax"] == syntax), key=lambda r: -r["rows"] * r["columns"])
        members = members[:per_syntax]
        folder = WORK / "realistic-by-syntax" / syntax
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for r in members:
            (folder / r["path"].replace("/", "_")).symlink_to(DEFAULT_OUT / r["path"])
        say(f"decode-only {syntax}")
        decoded = decode_only([str(DEFAULT_OUT / r["path"]) for r in members])
        say(f"embed-only (before {syntax})")
        before = embed_only(sample, 1)
        say(f"  {before['images_per_s']:.2f} images/s; build-index {syntax} ({len(members)} files)")
        built = build_in_process(folder, WORK / f"index-realistic-{syntax}")
        others = {}
        for count in extra_workers:  # the same files with more decoding workers, still between the embed-only runs
            say(f"  build-index {syntax} with {count} workers")
            other = build_in_process(folder, WORK / f"index-realistic-{syntax}-w{count}", workers=count)
            others[str(count)] = {k: other[k] for k in ("indexed", "images_per_s", "steady_images_per_s",
                                                        "peak_rss_main_bytes", "peak_rss_worker_bytes",
                                                        "load_average_before", "load_average_after")}
        after = embed_only(sample, 1)
        embed = (before["images_per_s"] + after["images_per_s"]) / 2
        decode_rate_now = round(decoded["images_per_s"], 3)  # same minutes, same load as the build
        bound = min(embed, decode_rate_now)
        shared = shared_core_bound(embed, decoded["images_per_s"])
        steady = built["steady_images_per_s"] or built["images_per_s"]
        for other in others.values():
            other["ratio_steady_to_embed_only"] = round((other["steady_images_per_s"] or other["images_per_s"]) / embed,
                                                        3)
        entry = {**built, "files": len(members), "embed_only_images_per_s": round(embed, 3),
                 "shared_core_bound_images_per_s": round(shared, 3),
                 "ratio_steady_to_shared_core_bound": round(steady / shared, 3), "with_workers": others,
                 "decode_only": decoded, "decode_only_single_thread_bench": decode_rate.get(syntax),
                 "decode_only_images_per_s": decode_rate_now, "embed_only_before": before, "embed_only_after": after,
                 "ratio_to_embed_only": round(built["images_per_s"] / embed, 3),
                 "ratio_steady_to_embed_only": round(steady / embed, 3),
                 "ratio_steady_to_min_embed_decode": round(steady / bound, 3),
                 "largest_megapixels": max(r["rows"] * r["columns"] for r in members) / 1e6}
        results[syntax] = entry
        say(f"  {syntax}: {built['indexed']} images, {built['images_per_s']:.2f} images/s whole run, steady "
            f"{steady:.2f}; embed-only {embed:.2f}, decode-only {decode_rate_now}, shared-core bound {shared:.2f}; "
            + "".join(f"{n} workers: steady {o['steady_images_per_s'] or o['images_per_s']:.2f}; "
                      for n, o in others.items()) + f"peak RSS main "
            f"{built['peak_rss_main_bytes'] / 2**20:.0f} MiB, worker {built['peak_rss_worker_bytes'] / 2**20:.0f} MiB")
    largest = max(rows, key=lambda r: r["rows"] * r["columns"])
    baseline = worker_baseline_rss()
    return {"machine": machine(), "load_average_before": load_before, "load_average_after": load_average(),
            "export": {k: v for k, v in info.items() if k != "rows"}, "builds": results,
            "worker_baseline_rss_bytes": baseline,
            "memory_check": memory_check(results, baseline),
            "largest_image": {"rows": largest["rows"], "columns": largest["columns"],
                              "stored_bytes": largest["rows"] * largest["columns"] * 2},
            "settings": {"quick": quick, "files_per_syntax": per_syntax,
                         "method": "medsim.build.build_index in a fresh process (default bundle, mode, workers, "
                                   "batch 16); images/s = indexed / the build's wall time; steady = images committed "
                                   "after the second batch / the time since it (start-up and the images decoded "
                                   "during it excluded)"}}


# ---- the DICOM export ----------------------------------------------------------------------------------------------


def _is_baseline_gray_jpeg(data: bytes) -> bool:
    """SOF0 (baseline DCT), 8-bit, one component."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            return marker == 0xC0 and data[i + 4] == 8 and data[i + 9] == 1
        i += 2 + length
    return False


def export_dicom(cxr: Path, out: Path, limit: int | None = None) -> dict:
    """Write every labelled image of ``cxr`` as a DICOM file under ``out`` (see module docstring); incremental."""
    import pydicom
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    marker = out.parent / f"{out.name}.export.json"
    with open(cxr / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if limit:
        rows = rows[:limit]
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("files") == len(rows) and done.get("limit") == limit and done.get("version") == EXPORT_VERSION:
            return done
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    counts = {"jpeg-baseline": 0, "explicit-vr-le": 0}
    label_rows = []
    for row in rows:
        src = cxr / row["path"]
        rel = Path(row["path"]).with_suffix(".dcm")
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        data = src.read_bytes()
        with Image.open(src) as image:
            image.load()
            width, height = image.size
            gray = np.asarray(image.convert("L")) if image.mode != "L" else np.asarray(image)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
        sop_uid = generate_uid(entropy_srcs=[row["path"], "sop"])
        meta.MediaStorageSOPInstanceUID = sop_uid
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = DX_FOR_PRESENTATION, sop_uid
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[row["path"], "study"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[row["path"], "series"])
        patient = row.get("patient_id") or ""  # LO: at most 64 characters; labels.csv keeps the full id
        if len(patient) > 64:
            patient = patient[:47] + "-" + hashlib.sha1(patient.encode()).hexdigest()[:16]
        ds.PatientID = patient
        ds.PatientName = ""
        ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
        ds.ViewPosition = row.get("view") if row.get("view") in ("PA", "AP", "LL", "RL") else ""
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20200101", 1, 1
        ds.Rows, ds.Columns = height, width
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        # stored / 255 on display, exactly as medsim reads the PNG/JPEG itself (PS3.3 C.11.2.1.3.2)
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = "127.5", "255", "LINEAR_EXACT"
        if data[:3] == b"\xff\xd8\xff" and _is_baseline_gray_jpeg(data):
            meta.TransferSyntaxUID = JPEGBaseline8Bit
            ds.PixelData = encapsulate([data])
            ds["PixelData"].VR = "OB"
            ds.LossyImageCompression = "01"
            counts["jpeg-baseline"] += 1
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.PixelData = np.ascontiguousarray(gray, dtype=np.uint8).tobytes()
            counts["explicit-vr-le"] += 1
        ds.save_as(target, enforce_file_format=True)
        label_rows.append({"path": rel.as_posix(), "sop_uid": sop_uid, "labels": row.get("labels", ""),
                           "patient_id": row.get("patient_id", ""), "view": row.get("view", ""),
                           "source": row.get("source", "")})
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(label_rows[0]))
        writer.writeheader()
        writer.writerows(label_rows)
    info = {"version": EXPORT_VERSION, "files": len(rows), "limit": limit, "by_transfer_syntax": counts,
            "pydicom": pydicom.__version__,
            "seconds": round(time.perf_counter() - started, 1),
            "bytes": sum(p.stat().st_size for p in out.rglob("*.dcm"))}
    marker.write_text(json.dumps(info, indent=2))
    return info


# ---- measurements --------------------------------------------------------------------------------------------------


def embed_only(paths: list[str], reps: int) -> dict:
    result = subprocess.run([sys.executable, "-c", EMBED_ONLY, json.dumps(paths), str(reps)], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise RuntimeError(f"embed-only run failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def build(source: Path, labels: Path, index: Path, extra=()) -> dict:
    if index.exists():
        shutil.rmtree(index)
    report = index.parent / f"{index.name}.report.json"
    load_before = load_average()
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "medsim.cli", "build-index", str(source), "--index", str(index),
                             "--labels", str(labels), "--no-progress", "--report", str(report),
                             *extra], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"build-index failed ({result.returncode}): {result.stderr[-2000:]}{result.stdout[-2000:]}")
    data = json.loads(report.read_text())
    mode_line = next((line for line in result.stdout.splitlines() if line.startswith("embedding mode:")), "")
    files = {f.name: f.stat().st_size for f in index.iterdir() if f.is_file()}
    disk = {name: {"bytes": size, "bytes_per_case": round(size / max(data["total_cases"], 1), 1)}
            for name, size in files.items() if name in ("catalog.sqlite", "vectors.hnsw")}
    return {"indexed": data["indexed"], "skipped": data["skipped"], "failed": data["failed"],
            "build_seconds": round(data["seconds"], 1), "process_seconds": round(wall, 1),
            "images_per_s": round(data["images_per_second"], 3),
            "images_per_s_whole_process": round(data["indexed"] / wall, 3),
            "printed_mode": mode_line.split(":", 1)[1].strip() if mode_line else None, "workers": data.get("workers"),
            "index_on_disk": disk,
            "load_average_before": load_before, "load_average_after": load_average(),
            "stdout_tail": result.stdout.strip().splitlines()[-4:]}


def score_index(index: Path, images: Path, labels: Path) -> dict | None:
    """mAP@10 of the vectors build-index wrote (default mode), and their cosine to benchmark 2's fp32 vectors."""
    from benchmarks.bench_embed import cosine_stats, map_at_10, set_key
    from medsim.evaluate.data import load_eval_set
    from medsim.index import CaseIndex
    from medsim.search import bundle_for_index

    eval_set = load_eval_set(images, labels)
    with CaseIndex.open(index) as opened:
        _, vectors = opened.vectors()
        cases = opened.cases()  # id order, as vectors()
    by_path = {str(Path(c.source_path).resolve()): v for c, v in zip(cases, vectors)}
    missing = [item.path for item in eval_set.items if str(Path(item.path).resolve()) not in by_path]
    if missing:
        return {"error": f"{len(missing)} dev-set images are not in the index (e.g. {missing[0]})"}
    matrix = np.stack([by_path[str(Path(item.path).resolve())] for item in eval_set.items])
    out = {"images": len(eval_set), "mAP@10": round(map_at_10(matrix, eval_set), 5)}
    with CaseIndex.open(index) as opened:
        bundle = bundle_for_index(opened)
    out["bundle"] = {"name": bundle.name, "fingerprint": bundle.fingerprint}
    if bundle.extra.get("int8"):  # a trained bundle: its own int8-vs-fp32 check on its validation split
        out["bundle_int8_check"] = bundle.extra["int8"]
    reference = WORK / "vectors" / f"{set_key(eval_set, bundle, 'fp32')}.npy"
    if reference.exists():
        ref = np.load(reference)
        out["mAP@10_fp32"] = round(map_at_10(ref, eval_set), 5)
        out["delta_vs_fp32"] = round(out["mAP@10"] - out["mAP@10_fp32"], 5)
        out["within_0.005"] = abs(out["delta_vs_fp32"]) <= 0.005
        out["cosine_to_fp32"] = cosine_stats(matrix, ref)
    else:
        out["note"] = "no fp32 reference vectors for this image set yet (benchmark 2 writes them)"
    return out


def run(quick: bool = False, limit: int | None = None, embed_images: int | None = None, score: bool = True) -> dict:
    cxr = shared_data() / "cxr"
    if not (cxr / "labels.csv").exists():
        return {"machine": machine(), "skipped": f"no dev set at {cxr}"}
    limit = limit or (48 if quick else None)
    load_before = load_average()
    export_dir = WORK / ("cxr-dicom" if not limit else f"cxr-dicom-{limit}")
    say(f"DICOM export of {cxr} -> {export_dir}")
    export = export_dicom(cxr, export_dir, limit)
    say(f"  {export}")
    source_cxr = cxr
    labels_cxr = cxr / "labels.csv"
    if limit:  # a subset: a folder of links to the first `limit` labelled images, with its own labels file
        source_cxr = WORK / f"cxr-{limit}"
        if source_cxr.exists():
            shutil.rmtree(source_cxr)
        source_cxr.mkdir(parents=True)
        with open(cxr / "labels.csv", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)[:limit]
            fields = reader.fieldnames
        for row in rows:
            link = source_cxr / row["path"]
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(cxr / row["path"])
        with open(source_cxr / "labels.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        labels_cxr = source_cxr / "labels.csv"

    with open(labels_cxr, newline="") as fh:
        all_paths = [str(source_cxr / r["path"]) for r in csv.DictReader(fh)]
    n_embed = embed_images or (16 if quick else 160)
    sample = all_paths[:: max(1, len(all_paths) // n_embed)][:n_embed]
    reps = 1
    sources = {"cxr": (source_cxr, labels_cxr), "cxr-dicom": (export_dir, export_dir / "labels.csv")}
    results = {}
    for name, (source, labels) in sources.items():
        with open(labels, newline="") as fh:
            files = [str(source / r["path"]) for r in csv.DictReader(fh)]
        say(f"decode-only ({name})")
        decoded = decode_only(files[::max(1, len(files) // 240)][:240])
        say(f"embed-only (before {name})")
        before = embed_only(sample, reps)
        say(f"  {before['images_per_s']:.3f} images/s; build-index {name}")
        built = build(source, labels, WORK / f"index-{name}")
        say(f"  {built['indexed']} images, {built['images_per_s']:.3f} images/s ({built['printed_mode']})")
        after = embed_only(sample, reps)
        say(f"embed-only (after {name}) {after['images_per_s']:.3f} images/s")
        reference = (before["images_per_s"] + after["images_per_s"]) / 2
        shared = shared_core_bound(reference, decoded["images_per_s"])
        results[name] = {**built, "embed_only_before": before, "embed_only_after": after,
                         "embed_only_images_per_s": round(reference, 3), "decode_only": decoded,
                         "decode_only_images_per_s": round(decoded["images_per_s"], 3),
                         "shared_core_bound_images_per_s": round(shared, 3),
                         "ratio_end_to_end_to_embed_only": round(built["images_per_s"] / reference, 3),
                         "ratio_end_to_end_to_shared_core_bound": round(built["images_per_s"] / shared, 3)}
    quality = None
    if score:
        say("scoring the vectors of the cxr build (default mode)")
        quality = score_index(WORK / "index-cxr", source_cxr, labels_cxr)
    return {"machine": machine(), "load_average_before": load_before, "load_average_after": load_average(),
            "export": export, "workers": max((r.get("workers") or 0 for r in results.values()), default=None),
            "embed_only_images": len(sample), "builds": results, "default_mode_quality": quality,
            "settings": {"quick": quick, "limit": limit}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--limit", type=int, help="only the first N labelled images")
    parser.add_argument("--realistic", action="store_true", help="issue 14: per syntax of the full-resolution "
                        "export; writes results/realistic_build.json")
    parser.add_argument("--syntax", action="append", help="realistic: only this syntax (repeatable)")
    parser.add_argument("--files-per-syntax", type=int, help="realistic: only the N largest files of each syntax")
    parser.add_argument("--also-workers", type=int, action="append", default=[],
                        help="realistic: also build each syntax with this many decoding workers (repeatable)")
    parser.add_argument("--no-score", action="store_true", help="skip scoring the cxr build's vectors (e.g. when "
                        "the default bundle is a stand-in for timing only)")
    parser.add_argument("--mode", help="embedding mode for build-index and embed-only (MEDSIM_EMBED_MODE); writes "
                        "results/build_MODE.json, shown beside the default mode's results")
    args = parser.parse_args(argv)
    if args.mode:
        os.environ["MEDSIM_EMBED_MODE"] = args.mode
    if args.realistic:
        path = write_result("realistic_build" + (f"_{args.mode}" if args.mode else ""),
                            run_realistic(args.quick, args.syntax, args.files_per_syntax,
                                          tuple(args.also_workers)))
        say(f"wrote {path}")
        return 0
    result = run(args.quick, args.limit, score=not (args.mode or args.no_score))
    earlier = RESULTS / "build.json"
    if args.no_score and not args.mode and earlier.exists():  # keep the last quality check, saying when it was run
        before = json.loads(earlier.read_text())
        if before.get("default_mode_quality"):
            result["default_mode_quality"] = {"measured_at": before["default_mode_quality"].get("measured_at")
                                              or before.get("created_at"), **before["default_mode_quality"]}
    path = write_result(f"build_{args.mode}" if args.mode else "build", result)
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

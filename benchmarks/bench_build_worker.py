"""Where a build-index worker's time goes per image, stage by stage (issue 14): a profile, not a timed test.

One process set up like a worker (``medsim.build._init_worker``: one torch thread, no MONAI metadata) runs, on up to
200 files of a source, each stage of ``medsim.build.process_file`` separately -- the read (``read_for_index``), the
preprocessing (``prepare``), the pHash by both methods (``display``: the whole display image, what ingest stored
before issue 14; ``area-224``: the prepared model input, what it stores now) and the pickling of the outcome that
crosses to the embedding process -- and then the whole ``process_file`` + pickling as a worker does it now. CPU time
(``time.process_time``) per image, so other jobs on the machine shift it little; the load average is recorded.
It also gives the Hamming distance between the two pHash methods on the same images.

Sources: ``cxr`` (../shared/data/cxr, evenly spread over its labels: 512-px JPEGs and 64-px PNGs, as the 512-px
build benchmark reads them), ``cxr-dicom`` (its DICOM export, var/bench/cxr-dicom-800, when bench_build wrote it),
``sample`` (sample_data/pacs_export: 0.6-2.5 MP DICOMs in nine transfer syntaxes).

Writes benchmarks/results/worker_profile.json (not ``build_*``: the report reads those as build runs).

    python -m benchmarks.bench_build_worker [--limit 150] [--source cxr --source sample] [--out NAME]
"""

from __future__ import annotations

import argparse
import csv
import pickle
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.common import SAMPLE, WORK, load_average, machine, say, shared_data, write_result

MAX_FILES = 200
STAGES = ("read", "prepare", "phash_display", "phash_area", "pickle")


def source_files(name: str, limit: int) -> list[str]:
    """Up to ``limit`` files of a source, evenly spread over it (sorted, so every run takes the same ones)."""
    if name == "cxr":
        cxr = shared_data() / "cxr"
        with open(cxr / "labels.csv", newline="", encoding="utf-8") as fh:
            files = [str(cxr / row["path"]) for row in csv.DictReader(fh)]
    else:
        root = {"cxr-dicom": WORK / "cxr-dicom-800", "sample": SAMPLE}[name]
        files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix in ("", ".dcm")
                       and p.name != "DICOMDIR")
    step = max(1, len(files) // limit)
    return files[::step][:limit]


def profile(files: list[str], root: str) -> dict:
    """Per-stage CPU ms per image over ``files`` (those that index), and the worker's whole cost as it runs now."""
    from medsim.build import _init_worker, process_file, read_for_index
    from medsim.dicom import ChestPolicy
    from medsim.errors import ReadFailure, SkipFile
    from medsim.phash import hamming, perceptual_hash, reduced_perceptual_hash
    from medsim.preprocess import CAFFE_VGG16, prepare

    _init_worker()
    policy, spec = ChestPolicy(any_body_part=True, any_modality=True), CAFFE_VGG16
    for path in files[:5]:  # warm-up: imports, codec libraries, MONAI's first transform
        process_file(path, root, policy, spec)
    stage_ms = {stage: [] for stage in STAGES}
    distances, megapixels = [], []
    for path in files:
        clock = time.process_time()
        try:
            radiograph = read_for_index(path, policy, spec.image_size, root=root)
        except (SkipFile, ReadFailure):
            continue
        marks = [clock, time.process_time()]
        image = prepare(radiograph.pixels, spec)
        marks.append(time.process_time())
        display = perceptual_hash(radiograph.pixels)
        marks.append(time.process_time())
        area = reduced_perceptual_hash(image, radiograph.pixels.shape)
        marks.append(time.process_time())
        outcome = process_file(path, root, policy, spec)  # not timed here: only its pickle
        clock = time.process_time()
        pickle.dumps(outcome)
        marks += [marks[-1] + time.process_time() - clock]
        for stage, start, end in zip(STAGES, marks, marks[1:]):
            stage_ms[stage].append(1000 * (end - start))
        distances.append(hamming(display, area))
        megapixels.append(radiograph.pixels.size / 1e6)
    whole = []
    for path in files:  # the worker as it runs now, stage by stage above
        clock = time.process_time()
        outcome = process_file(path, root, policy, spec)
        pickle.dumps(outcome)
        if outcome.record.status == "indexed":
            whole.append(1000 * (time.process_time() - clock))
    mean = {stage: round(float(np.mean(v)), 3) for stage, v in stage_ms.items()}
    return {
        "files": len(files), "indexed": len(whole), "mean_megapixels_read": round(float(np.mean(megapixels)), 3),
        "cpu_ms_per_image": mean,
        "worker_cpu_ms_before": round(mean["read"] + mean["prepare"] + mean["phash_display"] + mean["pickle"], 3),
        "worker_cpu_ms_after_from_stages": round(mean["read"] + mean["prepare"] + mean["phash_area"]
                                                 + mean["pickle"], 3),
        "worker_cpu_ms_now_measured": round(float(np.mean(whole)), 3),
        "phash_method_distance": {"mean": round(float(np.mean(distances)), 2), "max": int(max(distances)),
                                  "p95": float(np.percentile(distances, 95)),
                                  "histogram": dict(sorted(Counter(int(d) for d in distances).items()))},
    }


def run(sources: list[str], limit: int) -> dict:
    limit = min(limit, MAX_FILES)
    load_before = load_average()
    results = {}
    for name in sources:
        files = source_files(name, limit)
        if not files:
            say(f"{name}: no files (skipped)")
            continue
        say(f"{name}: {len(files)} files")
        root = str(Path(files[0]).parent if name != "cxr" else shared_data() / "cxr")
        results[name] = profile(files, root)
        r = results[name]
        say(f"  CPU ms/image {r['cpu_ms_per_image']}; worker before {r['worker_cpu_ms_before']}, now "
            f"{r['worker_cpu_ms_now_measured']}; pHash methods differ by {r['phash_method_distance']['mean']} bits")
    return {"machine": machine(), "load_average_before": load_before, "load_average_after": load_average(),
            "method": "one process set up like a build-index worker; CPU time (time.process_time) per image, mean over "
                      "the files that index; 'before' = read + prepare + display pHash + pickle, 'now' = the whole "
                      "process_file + pickle as it runs now", "sources": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=150, help=f"files per source (at most {MAX_FILES})")
    parser.add_argument("--source", action="append", choices=("cxr", "cxr-dicom", "sample"),
                        help="repeatable (default: cxr, cxr-dicom when present, sample)")
    parser.add_argument("--out", default="worker_profile", help="result name under benchmarks/results")
    args = parser.parse_args(argv)
    sources = args.source or ["cxr", "cxr-dicom", "sample"]
    path = write_result(args.out, run(sources, args.limit))
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

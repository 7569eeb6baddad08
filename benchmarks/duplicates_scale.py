"""How `medsim duplicates` scales with the number of cases, on synthetic indexes (no images needed).

    .venv/bin/python benchmarks/duplicates_scale.py --sizes 100000,1000000

For each size N: an index with N 512-d unit vectors in clusters (within-cluster cosine ~0.85, like chest X-rays under
ImageNet VGG-16) and random 256-bit pHashes, 1 % of the cases planted as exact copies (same pixel hash and vector) and
1 % as near copies (vector noise, 3 pHash bits flipped), hnswlib with medsim's defaults (M=32, ef_construction=200,
ef=128). Records the time to build the index, and the time and peak memory (max RSS) of `find_duplicates` run in a
fresh process, plus whether every planted pair was found. Results are written after each size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCAN = """
import json, sys, time
from medsim.duplicates import Thresholds, find_duplicates
t = time.perf_counter()
r = find_duplicates(sys.argv[1], Thresholds(min_cosine=float(sys.argv[2]), max_hamming=int(sys.argv[3])))
print(json.dumps({"seconds": time.perf_counter() - t, **r.counts()}))
"""


def make_index(path: Path, n: int, dim: int, seed: int = 0, batch: int = 20_000) -> dict:
    from medsim.index import Case, CaseIndex

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(1, n // 1000), dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    planted = {"exact": 0, "near": 0}
    started = time.perf_counter()
    with CaseIndex.create(path, model_fingerprint="synthetic", model_name="synthetic", dim=dim) as index:
        for start in range(0, n, batch):
            m = min(batch, n - start)
            v = centers[rng.integers(len(centers), size=m)] + rng.normal(scale=0.42 / np.sqrt(dim), size=(m, dim))
            v = v.astype(np.float32)
            hashes = rng.integers(0, 256, size=(m, 32), dtype=np.uint8)
            pixel = [f"{start + i:x}" for i in range(m)]
            for i in range(0, m - 1, 100):  # per 100 cases: one exact copy, one near copy of the case before it
                v[i + 1], hashes[i + 1], pixel[i + 1] = v[i], hashes[i], pixel[i]
                planted["exact"] += 1
            for i in range(50, m - 1, 100):
                v[i + 1] = v[i] + rng.normal(scale=0.05 / np.sqrt(dim), size=dim)
                hashes[i + 1] = hashes[i]
                hashes[i + 1, 0] ^= 0b100101
                planted["near"] += 1
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            cases = [Case(sop_uid=f"2.25.{start + i}", series_uid="2.25.1", study_uid="2.25.2",
                          patient_id=f"p{(start + i) // 3}", source_path=f"/synthetic/{start + i}.dcm",
                          pixel_hash=pixel[i], phash=hashes[i].tobytes().hex()) for i in range(m)]
            index.add(cases, v, "synthetic")
            print(f"  {start + m}/{n} cases, {time.perf_counter() - started:.0f} s", flush=True)
    return {"build_seconds": round(time.perf_counter() - started, 1), "planted": planted}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--work", type=Path, default=ROOT / "var" / "duplicates-scale")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "duplicates_scale.json")
    parser.add_argument("--min-cosine", type=float, default=None)
    parser.add_argument("--max-hamming", type=int, default=None)
    args = parser.parse_args(argv)
    from medsim.duplicates import Thresholds

    min_cosine = Thresholds().min_cosine if args.min_cosine is None else args.min_cosine
    max_hamming = Thresholds().max_hamming if args.max_hamming is None else args.max_hamming
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version()},
               "dim": args.dim, "thresholds": {"min_cosine": min_cosine, "max_hamming": max_hamming}, "runs": []}
    for n in [int(s) for s in args.sizes.split(",")]:
        path = args.work / f"index-{n}-{args.dim}"
        if path.exists():
            shutil.rmtree(path)
        print(f"building {n} cases", flush=True)
        run = {"cases": n, **make_index(path, n, args.dim)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", SCAN, str(path), str(min_cosine), str(max_hamming)],
                              capture_output=True, text=True, check=True)
        wall = time.perf_counter() - started
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        scan = json.loads(done.stdout.strip().splitlines()[-1])
        catalog = (path / "catalog.sqlite").stat().st_size
        graph = (path / "vectors.hnsw").stat().st_size
        run.update({"scan_seconds": round(scan["seconds"], 1), "scan_wall_seconds_with_startup": round(wall, 1),
                    "scan_peak_rss_mib": round(max(peak_kib, before) / 1024, 1),
                    "catalog_mib": round(catalog / 2**20, 1), "graph_mib": round(graph / 2**20, 1),
                    "pairs_by_kind": scan["pairs_by_kind"], "groups": scan["groups"],
                    "all_planted_found": scan["pairs_by_kind"].get("exact", 0) >= run["planted"]["exact"]
                    and scan["pairs_by_kind"].get("near-duplicate", 0) >= run["planted"]["near"]})
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        shutil.rmtree(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

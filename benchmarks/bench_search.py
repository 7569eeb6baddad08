"""Benchmark 4, search: hnswlib at 10k, 100k (and 1M with --with-1m) clustered 512-d unit vectors, an M and ef
sweep, beside exact numpy search and faiss-cpu (flat and HNSW) on the same vectors.

Vectors: unit-normalised 512-d points in clusters of ~100 (cluster centres and within-cluster offsets drawn from a
Gaussian whose per-dimension variance falls as 1/(1 + j/8), j = 0..511, so that a few dozen directions carry most of
the variance, as in CNN embeddings; offsets at 0.6 x the centres' scale). Queries are 1,000 fresh points of the
same distribution (not in the index). Ground truth: exact top 10 by cosine (numpy, float32).

Per configuration: build time (all cores), memory (growth of this process's resident set while building, and
hnswlib's own formula), recall@10 against the exact top 10, single-query latency p50/p99 (one query at a time, one
thread, as the server asks), and queries/s batched (all queries in one call, all cores).

    python -m benchmarks.bench_search [--quick] [--with-1m] [--sizes 10000,100000]
    python -m benchmarks.bench_search --sizes 1000000        # only the 1M run -> results/search_1m.json
    python -m benchmarks.bench_search --sizes 1000000 --ms-1m 32   # another M at 1M, merged into that file
"""

from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, WORK, Timer, load_average, machine, percentile, say, write_result

DIM = 512
K = 10
EF_CONSTRUCTION = 200
MEDSIM_DEFAULT = {"M": 32, "ef_construction": 200, "ef": 64}  # medsim.index.CaseIndex.create


def spectrum(dim: int) -> np.ndarray:
    scale = 1.0 / np.sqrt(1.0 + np.arange(dim) / 8.0)
    return (scale / np.linalg.norm(scale) * np.sqrt(dim)).astype(np.float32)


def make_vectors(n: int, n_queries: int, dim: int = DIM, cluster_size: int = 100, spread: float = 0.6,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = spectrum(dim)
    n_clusters = max(1, n // cluster_size)
    centres = (rng.standard_normal((n_clusters, dim), dtype=np.float32) * scale)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), dtype=np.float32)
        for start in range(0, m, 100_000):
            stop = min(m, start + 100_000)
            v = centres[rng.integers(n_clusters, size=stop - start)]
            v = v + spread * rng.standard_normal((stop - start, dim), dtype=np.float32) * scale
            out[start:stop] = v / np.linalg.norm(v, axis=1, keepdims=True)
        return out

    return draw(n), draw(n_queries)


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int = K, chunk: int = 100_000) -> np.ndarray:
    """Exact top-k ids by inner product (cosine on unit vectors), best first."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), k), dtype=np.int64)
    for start in range(0, len(base), chunk):
        scores = queries @ base[start:start + chunk].T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        s = np.concatenate([best_s, np.take_along_axis(scores, part, axis=1)], axis=1)
        i = np.concatenate([best_i, part + start], axis=1)
        order = np.argsort(-s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)
    return best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[:K].tolist()) & set(t[:K].tolist())) for f, t in zip(found, truth))
    return hits / (K * len(truth))


def latency(fn, queries: np.ndarray, limit: int) -> dict:
    """Single-query latency: p50/p99/max in ms over up to ``limit`` queries, one at a time."""
    fn(queries[:1])
    times = []
    for q in queries[:limit]:
        with Timer() as t:
            fn(q[None])
        times.append(1000 * t.seconds)
    return {"queries": len(times), "p50_ms": round(percentile(times, 50), 3), "p99_ms": round(percentile(times, 99), 3),
            "max_ms": round(max(times), 3), "mean_ms": round(float(np.mean(times)), 3)}


def hnswlib_memory_formula(n: int, dim: int, M: int) -> int:
    """Approximate bytes of an hnswlib index (hnswalg.h): per element, level 0 holds the vector (dim x 4), 2M links
    (4 bytes each), a link count (4) and the label (8); upper levels (an element reaches level >= 1 with probability
    1/M, so 1/(M - 1) levels on average) hold M links + count each; plus a level-list pointer (8), the level (4), a
    per-element std::mutex (40) and the label hash-map entry (~48)."""
    per_element = dim * 4 + 2 * M * 4 + 4 + 8 + (M * 4 + 4) / max(M - 1, 1) + 8 + 4 + 40 + 48
    return int(n * per_element)


def anon_rss() -> int:
    """Anonymous resident memory of this process (heap; not the memory-mapped input vectors)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def bench_hnswlib(base, queries, truth, M: int, efs, latency_queries: int, threads: int) -> dict:
    import hnswlib

    gc.collect()
    rss0 = anon_rss()
    index = hnswlib.Index(space="cosine", dim=base.shape[1])
    with Timer() as t:
        index.init_index(max_elements=len(base), M=M, ef_construction=EF_CONSTRUCTION, random_seed=0)
        index.add_items(base, np.arange(len(base)), num_threads=threads)
    rss = anon_rss() - rss0
    out = {"library": "hnswlib", "M": M, "ef_construction": EF_CONSTRUCTION, "n": len(base),
           "build_seconds": round(t.seconds, 2), "memory_bytes_rss": rss,
           "memory_bytes_per_vector_rss": round(rss / len(base), 1),
           "memory_bytes_per_vector_formula": round(hnswlib_memory_formula(len(base), base.shape[1], M) / len(base), 1),
           "sweep": []}
    for ef in efs:
        index.set_ef(max(ef, K))
        index.set_num_threads(threads)
        with Timer() as tb:
            labels, _ = index.knn_query(queries, k=K, num_threads=threads)
        index.set_num_threads(1)
        lat = latency(lambda q: index.knn_query(q, k=K, num_threads=1), queries, latency_queries)
        row = {"ef": ef, "recall@10": round(recall_at_k(labels, truth), 4),
               "batched_qps": round(len(queries) / tb.seconds, 1), **lat}
        out["sweep"].append(row)
        say(f"  hnswlib M={M} ef={ef}: recall@10 {row['recall@10']:.4f}, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} "
            f"ms, {row['batched_qps']} q/s batched")
    index = None  # free it before the next configuration
    gc.collect()
    return out


def bench_faiss_hnsw(base, queries, truth, M: int, efs, latency_queries: int, threads: int) -> dict:
    import faiss

    faiss.omp_set_num_threads(threads)
    gc.collect()
    rss0 = anon_rss()
    index = faiss.IndexHNSWFlat(base.shape[1], M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    with Timer() as t:
        index.add(base)
    rss = anon_rss() - rss0
    out = {"library": "faiss-hnsw", "M": M, "ef_construction": EF_CONSTRUCTION, "n": len(base),
           "build_seconds": round(t.seconds, 2), "memory_bytes_rss": rss,
           "memory_bytes_per_vector_rss": round(rss / len(base), 1), "sweep": []}
    for ef in efs:
        index.hnsw.efSearch = max(ef, K)
        faiss.omp_set_num_threads(threads)
        with Timer() as tb:
            _, labels = index.search(queries, K)
        faiss.omp_set_num_threads(1)
        lat = latency(lambda q: index.search(q, K), queries, latency_queries)
        row = {"ef": ef, "recall@10": round(recall_at_k(labels, truth), 4),
               "batched_qps": round(len(queries) / tb.seconds, 1), **lat}
        out["sweep"].append(row)
        say(f"  faiss HNSW M={M} ef={ef}: recall@10 {row['recall@10']:.4f}, p50 {row['p50_ms']} ms, p99 "
            f"{row['p99_ms']} ms, {row['batched_qps']} q/s batched")
    faiss.omp_set_num_threads(threads)
    index = None  # free it before the next configuration
    gc.collect()
    return out


def bench_exact(base, queries, truth, latency_queries: int, threads: int) -> list[dict]:
    rows = []

    def numpy_one(q):
        s = q @ base.T
        return np.argpartition(-s[0], K)[:K]

    with Timer() as tb:
        found = exact_topk(base, queries)
    lat = latency(numpy_one, queries, latency_queries)
    rows.append({"library": "numpy-exact", "n": len(base), "recall@10": round(recall_at_k(found, truth), 4),
                 "batched_qps": round(len(queries) / tb.seconds, 1), "memory_bytes_per_vector": base.shape[1] * 4,
                 **lat})
    try:
        import faiss
    except ImportError:
        rows.append({"library": "faiss-flat", "error": "faiss-cpu is not installed (pip install -e '.[bench]')"})
        return rows
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(base.shape[1])
    with Timer() as t:
        index.add(base)
    with Timer() as tb:
        _, labels = index.search(queries, K)
    faiss.omp_set_num_threads(1)
    lat = latency(lambda q: index.search(q, K), queries, latency_queries)
    faiss.omp_set_num_threads(threads)
    rows.append({"library": "faiss-flat", "n": len(base), "build_seconds": round(t.seconds, 3),
                 "recall@10": round(recall_at_k(labels, truth), 4), "batched_qps": round(len(queries) / tb.seconds, 1),
                 "memory_bytes_per_vector": base.shape[1] * 4, **lat})
    for row in rows:
        say(f"  {row['library']}: recall@10 {row.get('recall@10')}, p50 {row.get('p50_ms')} ms, p99 "
            f"{row.get('p99_ms')} ms, {row.get('batched_qps')} q/s batched")
    index = None  # free it before the next configuration
    return rows


WORKER = {"hnswlib": bench_hnswlib, "faiss-hnsw": bench_faiss_hnsw}


def in_fresh_process(data: Path, library: str, M: int, efs, latency_queries: int, threads: int) -> dict:
    """One index configuration in a fresh process (so that its memory is measured alone): the vectors are
    memory-mapped from ``data`` (an .npz written by ``run``), the result comes back as JSON."""
    import json
    import subprocess
    import sys

    from benchmarks.common import ROOT

    cmd = [sys.executable, "-m", "benchmarks.bench_search", "--worker", str(data), library, str(M),
           ",".join(map(str, efs)), str(latency_queries), str(threads)]
    result = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        return {"library": library, "M": M, "error": f"worker exited with {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _worker(argv) -> int:
    import json

    data, library, M, efs, latency_queries, threads = argv
    folder = Path(data)
    base = np.load(folder / "base.npy", mmap_mode="r")
    queries, truth = np.load(folder / "queries.npy"), np.load(folder / "truth.npy")
    out = WORKER[library](base, queries, truth, int(M), [int(e) for e in efs.split(",")], int(latency_queries),
                          int(threads))
    print(json.dumps(out))
    return 0


def run(quick: bool = False, with_1m: bool = False, sizes=None, n_queries: int | None = None,
        large_ms: tuple[int, ...] = (16,)) -> dict:
    threads = os.cpu_count() or 1
    if sizes is None:
        sizes = [10_000] if quick else [10_000, 100_000]
        if with_1m:
            sizes.append(1_000_000)
    n_queries = n_queries or (200 if quick else 1000)
    efs = (10, 32, 64, 128) if quick else (10, 20, 40, 64, 96, 128, 200, 300)
    Ms = (16, 32) if quick else (16, 32, 48)
    load_before = load_average()
    results = []
    for n in sizes:
        say(f"search: {n} vectors, {n_queries} queries")
        with Timer() as t:
            base, queries = make_vectors(n, n_queries)
        with Timer() as tt:
            truth = exact_topk(base, queries)
        nn_cos = float(np.mean(np.sum(base[truth[:, 0]] * queries, axis=1)))
        rand = np.random.default_rng(1).integers(n, size=(2000, 2))
        pair_cos = float(np.mean(np.sum(base[rand[:, 0]] * base[rand[:, 1]], axis=1)))
        entry = {"n": n, "dim": base.shape[1], "queries": n_queries, "generate_seconds": round(t.seconds, 1),
                 "ground_truth_seconds": round(tt.seconds, 1),
                 "data": {"mean_cosine_query_to_nearest": round(nn_cos, 4),
                          "mean_cosine_random_pair": round(pair_cos, 4)},
                 "exact": [], "hnswlib": [], "faiss_hnsw": [], "load_average_start": load_average()}
        exact_latency_queries = 200 if n <= 100_000 else 50
        entry["exact"] = bench_exact(base, queries, truth, exact_latency_queries, threads)
        data = WORK / "search" / str(n)
        data.mkdir(parents=True, exist_ok=True)
        np.save(data / "base.npy", base)
        np.save(data / "queries.npy", queries)
        np.save(data / "truth.npy", truth)
        large = n >= 1_000_000  # a 1M graph takes 15+ minutes per configuration on 2 cores: few Ms, no faiss HNSW
        for M in (Ms if not large else large_ms):
            entry["hnswlib"].append(in_fresh_process(data, "hnswlib", M, efs, n_queries, threads))
        try:
            import faiss  # noqa: F401 - only whether it is installed

            if large:
                entry["faiss_hnsw"].append({"library": "faiss-hnsw", "M": 32,
                                            "error": "not run at 1M (build time on 2 cores); see 100k"})
            else:
                entry["faiss_hnsw"].append(in_fresh_process(data, "faiss-hnsw", 32, efs, n_queries, threads))
        except ImportError:
            entry["faiss_hnsw"].append({"error": "faiss-cpu is not installed (pip install -e '.[bench]')"})
        for name in ("base.npy", "queries.npy", "truth.npy"):
            (data / name).unlink()
        entry["load_average_end"] = load_average()
        results.append(entry)
        del base, queries
        gc.collect()
    return {"machine": machine(), "load_average_before": load_before, "load_average_after": load_average(),
            "settings": {"k": K, "ef_construction": EF_CONSTRUCTION, "efs": list(efs), "Ms": list(Ms),
                         "threads_batched": threads, "threads_single_query": 1, "medsim_default": MEDSIM_DEFAULT,
                         "generator": "clusters of ~100, per-dimension scale 1/sqrt(1 + j/8), offsets 0.6 x centre "
                                      "scale, unit-normalised; queries fresh from the same distribution"},
            "sizes": results, "goal": goal_check(results)}


def goal_check(results) -> dict:
    """At the largest size: the cheapest hnswlib setting with recall@10 >= 0.95, its p99, and the default's."""
    if not results:
        return {}
    largest = results[-1]
    best = None
    for cfg in largest["hnswlib"]:
        for row in cfg["sweep"]:
            if row["recall@10"] >= 0.95 and (best is None or row["p99_ms"] < best["p99_ms"]):
                best = {"M": cfg["M"], **row, "memory_bytes_per_vector_rss": cfg["memory_bytes_per_vector_rss"],
                        "build_seconds": cfg["build_seconds"]}
    default = next((dict(row, M=cfg["M"]) for cfg in largest["hnswlib"] if cfg["M"] == MEDSIM_DEFAULT["M"]
                    for row in cfg["sweep"] if row["ef"] == MEDSIM_DEFAULT["ef"]), None)
    return {"n": largest["n"], "best_meeting_recall_0.95": best, "medsim_default": default,
            "met": bool(best and best["p99_ms"] <= 2.0),
            "default_met": bool(default and default["recall@10"] >= 0.95 and default["p99_ms"] <= 2.0)}


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return _worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--with-1m", action="store_true")
    parser.add_argument("--sizes", help="comma-separated, e.g. 10000,100000")
    parser.add_argument("--queries", type=int)
    parser.add_argument("--ms-1m", default="16", help="hnswlib M values built at 1M (default: 16); configurations "
                        "measured earlier at 1M and not rebuilt are kept in results/search_1m.json")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    if sizes == [1_000_000]:
        ms = tuple(int(m) for m in args.ms_1m.split(","))
        result = run(sizes=sizes, n_queries=args.queries, large_ms=ms)
        earlier = RESULTS / "search_1m.json"
        if earlier.exists():  # keep the other Ms of an earlier 1M run (same generator and seed: same vectors)
            import json

            kept = [c for c in json.loads(earlier.read_text())["sizes"][-1]["hnswlib"] if c.get("M") not in ms]
            entry = result["sizes"][-1]
            entry["hnswlib"] = sorted(kept + entry["hnswlib"], key=lambda c: c.get("M", 0))
            result["goal"] = goal_check(result["sizes"])
        path = write_result("search_1m", result)
    else:
        path = write_result("search", run(args.quick, False, sizes, args.queries))
        if args.with_1m:  # its own file (docs/performance.md merges the two)
            say(f"wrote {path}")
            path = write_result("search_1m", run(sizes=[1_000_000], n_queries=args.queries))
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

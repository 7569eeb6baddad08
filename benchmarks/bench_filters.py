"""Filtered search (issue 15): query latency at 100k cases with filters applied inside the nearest-neighbour search.

The index is a real medsim index (CaseIndex: SQLite catalog + hnswlib graph, medsim's default M = 32,
ef_construction = 200, ef = 64) of 100,000 clustered 512-d unit vectors (the distribution of benchmark 4,
benchmarks/bench_search.py). Each case gets a view (90 % PA/AP, 10 % lateral), a sex, an age 18..90 and findings:
"Rare" on exactly 1 % of the cases, "Common" on 10 %, "Half" on 50 %, drawn independently of the vectors.

Measured per filter, one query at a time (as the server asks), fresh queries of the same distribution: the latency
of ``CaseIndex.search(vector, k=10, exclude_patient=..., case_filter=...)`` end to end (the SQL selection of the
allowed cases, then the exact scan or hnswlib's filtered search, then reading the hits' catalog rows), p50 / p99;
and recall@10 against the exact top 10 of the allowed cases. The unfiltered search is the baseline.

    python -m benchmarks.bench_filters [--n 100000] [--queries 300] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_search import make_vectors
from benchmarks.common import RESULTS, WORK, machine, percentile, say, write_result

FILTERS = {
    "none (baseline)": None,
    "findings: Rare (1 %)": {"findings": ["Rare"], "view": "any"},
    "findings: Common (10 %)": {"findings": ["Common"], "view": "any"},
    "findings: Half (50 %)": {"findings": ["Half"], "view": "any"},
    "view: frontal (default of a frontal query, 90 %)": {"view": "frontal"},
    "sex F + age 40-60 + Common (~1.4 %)": {"sex": "F", "age": "40-60", "findings": ["Common"], "view": "any"},
}


def build(n: int, path, reuse: bool = False) -> tuple[np.ndarray, list, np.ndarray]:
    from medsim.index import Case, CaseIndex

    rng = np.random.default_rng(1)
    vectors, queries = make_vectors(n, 1000, seed=3)
    rare = np.zeros(n, bool)
    rare[rng.choice(n, n // 100, replace=False)] = True
    common = rng.random(n) < 0.10
    half = rng.random(n) < 0.5
    lateral = rng.random(n) < 0.10
    cases = []
    for i in range(n):
        labels = tuple(name for name, on in (("Rare", rare[i]), ("Common", common[i]), ("Half", half[i])) if on)
        cases.append(Case(sop_uid=f"2.25.{i + 1}", series_uid=f"2.25.9{i + 1}", study_uid=f"2.25.8{i + 1}",
                          patient_id=f"p{i // 3}", source_path=f"/bench/{i}.dcm",
                          view="LL" if lateral[i] else ("PA", "AP")[i % 2], modality="CR", labels=labels,
                          attributes={"sex": "FM"[int(rng.random() < 0.5)], "age": str(int(rng.integers(18, 91)))}))
    if reuse and (path / "catalog.sqlite").exists():
        with CaseIndex.open(path) as index:
            if len(index) == n:
                say(f"reusing the index of {n} cases at {path}")
                return vectors, cases, queries
    if path.exists():
        shutil.rmtree(path)
    started = time.perf_counter()
    with CaseIndex.create(path, model_fingerprint="bench", model_name="bench", dim=vectors.shape[1]) as index:
        for start in range(0, n, 10_000):
            index.add(cases[start:start + 10_000], vectors[start:start + 10_000], "bench")
    say(f"built {n} cases in {time.perf_counter() - started:.1f} s")
    return vectors, cases, queries


def section_filters(results: Path = RESULTS) -> list[str]:
    """The docs/performance.md section from benchmarks/results/filters.json (empty when it was never run)."""
    path = results / "filters.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    m = data.get("machine", {})
    load = m.get("load_average_1_5_15min") or ["?"]
    busy = ": other work shared the cores, so the p99s are noisy" if isinstance(load[0], (int, float)) and \
        load[0] >= 1.5 else ""
    one = min(data["rows"], key=lambda r: abs(r["share"] - 0.01))
    rows = [f"| {r['filter']} | {r['share'] * 100:.1f} % | {r['allowed']:,} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['recall_at_10']:.3f} |" for r in data["rows"]]
    return [
        "## Filtered search (issue 15)", "",
        f"`CaseIndex.search` end to end (SQL selection of the cases that pass, exact scan under 5 % or hnswlib's "
        f"filter callback, reading the hits' rows) on a real index of {data['n']:,} clustered 512-d vectors (M = 32, "
        f"ef = 64), k = {data['k']}, {data['queries']} queries one at a time (`benchmarks/bench_filters.py`; "
        f"{m.get('logical_cpus', '?')} logical CPUs, {m.get('cpu', '?')}, {data.get('created_at', '')}, 1-min "
        f"load average {load[0]}{busy}).", "",
        f"A filter that keeps {one['share'] * 100:.0f} % of the cases ({one['filter']}): p50 **{one['p50_ms']:.2f} ms**, "
        f"p99 **{one['p99_ms']:.2f} ms**, recall@10 {one['recall_at_10']:.3f}.", "",
        "| filter | cases kept | cases | p50 ms | p99 ms | recall@10 |", "|---|---:|---:|---:|---:|---:|",
        *rows, "",
    ]


def main(argv=None) -> int:
    from medsim.index import CaseIndex
    from medsim.search import parse_filters

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--reuse", action="store_true", help="reuse an index this benchmark built before")
    args = parser.parse_args(argv)
    path = WORK / f"filters-{args.n}"
    vectors, cases, queries = build(args.n, path, args.reuse)
    queries = queries[:args.queries]
    rows = []
    with CaseIndex.open(path) as index:
        index.store()  # loaded before timing
        for name, spec in FILTERS.items():
            case_filter = parse_filters(spec) if spec else None
            keep = np.asarray([case_filter.matches(c) for c in cases]) if case_filter else np.ones(len(cases), bool)
            allowed = np.flatnonzero(keep)
            times, recalls = [], []
            for q in queries:
                started = time.perf_counter()
                hits = index.search(q, k=10, exclude_patient="nobody", case_filter=case_filter)
                times.append(1000 * (time.perf_counter() - started))
                exact = allowed[np.argsort(-(vectors[allowed] @ q))[:10]]
                want = {f"2.25.{i + 1}" for i in exact}
                recalls.append(len(want & {h.case.sop_uid for h in hits}) / max(1, len(want)))
                assert len(hits) == min(10, len(allowed))
            row = {"filter": name, "share": round(float(keep.mean()), 4), "allowed": int(keep.sum()),
                   "p50_ms": round(percentile(times, 50), 2), "p99_ms": round(percentile(times, 99), 2),
                   "recall_at_10": round(float(np.mean(recalls)), 4)}
            rows.append(row)
            say(f"{name:<52} share {row['share']:.3f}  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
                f"recall@10 {row['recall_at_10']:.4f}")
    write_result("filters", {"machine": machine(), "n": args.n, "queries": len(queries), "k": 10, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

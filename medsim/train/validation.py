"""Validation retrieval metrics, computed with :mod:`medsim.evaluate.metrics` (the definitions `medsim evaluate`
reports): every validation image queries every other validation image, its own patient's images excluded;
relevant = shares at least one label ("No Finding" counts as a label).

Besides, the measure of the product's promise (cases that share the query's *findings*), on the NIH images only
(:data:`medsim.evaluate.metrics.NIH_FINDING_SOURCES`: full-resolution NIH ChestX-ray14 with NIH patient ids; RSNA
images are NIH images whose patients cannot be linked, and nih64 are 64 px copies, so neither is query nor gallery):
per NIH finding X with >= 5 queries, mAP@10 of the queries that have X with relevant = the gallery image has X; the
macro average over those findings, and the same for a random ranking (exact expectation); and the share of the top
10 from the query's own source among the queries whose relevant cases exist in other sources.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medsim.evaluate import metrics as M

NIH_SOURCE = "nih"
K = 10
MIN_FINDING_QUERIES = 5  # a finding enters the per-finding macro average with at least this many queries  # the retrieval depth of validation (mAP@10 picks the best epoch)


def _block(scores: np.ndarray, labels: Sequence[tuple[str, ...]], patients: Sequence[str], k: int,
           break_even: bool) -> dict:
    n = len(labels)
    ids = np.arange(n)
    valid = ~M.exclusion_mask(ids, ids, list(patients), list(patients))
    relevant = M.relevance_matrix(list(labels), list(labels), "shares")
    out: dict = {"images": n, "patients": len(set(patients))}
    if n < 2 or not valid.any():
        out.update({f"mAP@{k}": float("nan"), f"P@{k}": float("nan")})
        return out
    topk = M.rank_topk(scores, valid, k)
    ranking = M.ranking_metrics(topk, relevant, valid, ks=(k,))
    out[f"mAP@{k}"] = M.mean_over_queries(ranking[f"mAP@{k}"])
    out[f"P@{k}"] = M.mean_over_queries(ranking[f"P@{k}"])
    out["queries_with_relevant"] = int(np.sum(ranking["has_relevant"]))
    if break_even:
        curve = M.sweep_counts(scores, relevant, valid).curve()
        be = M.break_even(curve)
        out["break_even"] = {"precision": be["precision"], "recall": be["recall"], "f1": be["f1"],
                             "threshold": be["threshold"]}
        out["pairwise_ap"] = M.average_precision_pairwise(curve)
    return out


def retrieval_report(embeddings: np.ndarray, labels: Sequence[tuple[str, ...]], patients: Sequence[str],
                     sources: Sequence[str], k: int = 10, break_even: bool = True) -> dict:
    """Metrics on the whole validation set and per source (queries and gallery both of that source).

    Keys: ``mAP@k``, ``P@k``, ``break_even`` {precision, recall, f1, threshold}, ``pairwise_ap``, ``by_source``
    {source: the same}, and ``nih_queries_vs_all`` (NIH queries ranked against the whole validation gallery)."""
    emb = np.asarray(embeddings, dtype=np.float64)
    scores = emb @ emb.T
    report = _block(scores, labels, patients, k, break_even)
    sources = list(sources)
    by_source = {}
    for source in sorted(set(sources)):
        idx = np.flatnonzero(np.asarray([s == source for s in sources]))
        if len(idx) < 2:
            continue
        by_source[source or "(none)"] = _block(scores[np.ix_(idx, idx)], [labels[i] for i in idx],
                                               [patients[i] for i in idx], k, break_even)
    report["by_source"] = by_source
    # shortcut check: how often a result comes from the query's own source (images of other sources excluded nothing)
    src = np.asarray(sources, dtype=object)
    ids = np.arange(len(labels))
    valid = ~M.exclusion_mask(ids, ids, list(patients), list(patients))
    topk = M.rank_topk(scores, valid, k)
    same = (src[topk.indices] == src[:, None]) & topk.filled
    report[f"same_source_at_{k}"] = float(same.sum() / max(1, topk.filled.sum()))
    relevant = M.relevance_matrix(list(labels), list(labels), "shares")
    cross = M.same_source_share(topk, relevant, valid, sources, k=k)
    report[f"same_source_at_{k}_cross"] = cross["share"]
    report["same_source_cross_queries"] = cross["queries"]
    findings = nih_findings(scores, labels, patients, sources, k=k)
    if findings is not None:
        report["nih_findings"] = M.finding_summary(findings[0], findings[1])
    nih = np.asarray([s == NIH_SOURCE for s in sources])
    if nih.any():
        n = len(labels)
        ids = np.arange(n)
        valid = ~M.exclusion_mask(ids, ids, list(patients), list(patients))
        relevant = M.relevance_matrix(list(labels), list(labels), "shares")
        topk = M.rank_topk(scores, valid, k)
        ranking = M.ranking_metrics(topk, relevant, valid, ks=(k,))
        report["nih_queries_vs_all"] = {f"mAP@{k}": M.mean_over_queries(np.where(nih, ranking[f"mAP@{k}"], np.nan)),
                                        "queries": int(nih.sum())}
    return report


def nih_subset(sources: Sequence[str]) -> np.ndarray:
    """Indices of the images that the NIH per-finding figures use (queries and gallery)."""
    return np.flatnonzero(np.asarray([s in M.NIH_FINDING_SOURCES for s in sources], dtype=bool))


def nih_findings(scores: np.ndarray, labels, patients, sources, k: int = K, min_queries: int = MIN_FINDING_QUERIES,
                 n_resamples: int = 1000, seed: int = 0):
    """(:class:`~medsim.evaluate.metrics.FindingAP`, patient-bootstrap weights) of the NIH images among themselves,
    or None when there are none (:func:`medsim.evaluate.metrics.nih_finding_ap`)."""
    return M.nih_finding_ap(scores, labels, patients, sources, k=k, min_queries=min_queries,
                            n_resamples=n_resamples, seed=seed)


def headline(report: dict, k: int = 10) -> dict:
    """The numbers the progress line and the model card quote."""
    nih = report.get("by_source", {}).get(NIH_SOURCE, {})
    be = report.get("break_even", {})
    nf = report.get("nih_findings", {})
    return {f"mAP@{k}": report.get(f"mAP@{k}"), f"nih_mAP@{k}": nih.get(f"mAP@{k}"),
            "break_even_precision": be.get("precision"), "nih_break_even_precision":
            nih.get("break_even", {}).get("precision"), f"finding_mAP@{k}": nf.get("macro"),
            f"finding_random_mAP@{k}": nf.get("random_macro"), "finding_lift": nf.get("lift"),
            "finding_ci95": nf.get("macro_ci95"), "same_source_cross": report.get(f"same_source_at_{k}_cross")}


def _per_query_ap(scores, labels, patients, k):
    ids = np.arange(len(labels))
    valid = ~M.exclusion_mask(ids, ids, list(patients), list(patients))
    relevant = M.relevance_matrix(list(labels), list(labels), "shares")
    return M.ranking_metrics(M.rank_topk(scores, valid, k), relevant, valid, ks=(k,))[f"mAP@{k}"]


def paired_difference(model: np.ndarray, baseline: np.ndarray, labels: Sequence[tuple[str, ...]],
                      patients: Sequence[str], sources: Sequence[str], k: int = 10, n_resamples: int = 1000,
                      seed: int = 0) -> dict:
    """mAP@k(model) - mAP@k(baseline) on the same queries, with a 95 % patient-bootstrap interval (patients
    resampled with replacement), on the whole set and on the NIH images (queries and gallery NIH)."""
    out = {}
    subsets = {"all": np.arange(len(labels))}
    nih = np.flatnonzero(np.asarray([s == NIH_SOURCE for s in sources]))
    if len(nih) >= 2:
        subsets["nih"] = nih
    for name, idx in subsets.items():
        lab = [labels[i] for i in idx]
        pat = [patients[i] for i in idx]
        aps = []
        for emb in (model, baseline):
            e = np.asarray(emb, dtype=np.float64)[idx]
            aps.append(_per_query_ap(e @ e.T, lab, pat, k))
        diff = aps[0] - aps[1]
        weights = M.patient_bootstrap_weights(pat, n_resamples, seed)
        defined = np.isfinite(diff)
        w = weights[:, defined]
        samples = (w @ diff[defined]) / np.maximum(w.sum(axis=1), 1e-12)
        lo, hi = M.percentile_interval(samples)
        out[name] = {f"delta_mAP@{k}": M.mean_over_queries(diff), "ci95": [lo, hi], "queries": int(defined.sum())}
    a = nih_findings(np.asarray(model, dtype=np.float64) @ np.asarray(model, dtype=np.float64).T, labels, patients,
                     sources, k=k, n_resamples=n_resamples, seed=seed)
    b = nih_findings(np.asarray(baseline, dtype=np.float64) @ np.asarray(baseline, dtype=np.float64).T, labels,
                     patients, sources, k=k, n_resamples=n_resamples, seed=seed)
    if a is not None and b is not None and a[0].findings == b[0].findings:
        summary = M.finding_summary(a[0], a[1], other=b[0])
        out["nih_findings"] = {f"delta_mAP@{k}": summary["vs_other"]["delta"], "ci95": summary["vs_other"]["ci95"],
                               "queries": int(a[0].queries().sum()), "findings": len(a[0].findings)}
    return out


def compare(model: np.ndarray, other: np.ndarray, records: Sequence, k: int = K, n_resamples: int = 1000,
            seed: int = 0) -> dict:
    """:func:`paired_difference` of two embeddings of ``records`` (model - other)."""
    return paired_difference(model, other, [r.labels for r in records], [r.patient_id for r in records],
                             [r.source for r in records], k=k, n_resamples=n_resamples, seed=seed)


def validation_report(embeddings: np.ndarray, records: Sequence, k: int = K) -> dict:
    """:func:`retrieval_report` of the embeddings of ``records`` (training records: labels, patient_id, source)."""
    return retrieval_report(embeddings, [r.labels for r in records], [r.patient_id for r in records],
                            [r.source for r in records], k=k)


def selection_score(report: dict, select: str, k: int = K) -> float:
    """The number that picks the best epoch (``--select``: mAP@k on ``all`` validation images, on the ``nih``
    images, or the ``mean`` of both; ``finding``: the mean of the whole-split mAP@k and the NIH per-finding macro
    mAP@k); 0 when undefined (no validation query has a relevant case). ``last`` scores no report: the training loop
    ranks its epochs by number (:func:`medsim.train.loop.fit`)."""
    all_ = report.get(f"mAP@{k}")
    if select == "finding":
        macro = report.get("nih_findings", {}).get("macro")
        value = all_ if macro is None or not np.isfinite(macro) else 0.5 * (float(all_) + float(macro))
        return float(value) if value is not None and np.isfinite(value) else 0.0
    nih = report.get("by_source", {}).get(NIH_SOURCE, {}).get(f"mAP@{k}")
    if select == "all" or nih is None or not np.isfinite(nih):
        value = all_
    elif select == "nih":
        value = nih
    else:
        value = 0.5 * (float(all_) + float(nih))
    return float(value) if value is not None and np.isfinite(value) else 0.0


def fmt(value) -> str:
    """A metric for a progress line: 3 decimals, "-" when undefined."""
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.3f}"

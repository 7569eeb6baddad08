"""Retrieval metrics as pure numpy functions of a similarity matrix, a relevance matrix and an exclusion mask.

Shapes: ``scores`` (Q, G) float, higher = more similar; ``relevant`` (Q, G) bool; ``valid`` (Q, G) bool, False for
the pairs that do not count (the query itself, by default the query's own patient). Nothing loops over pairs in
Python; 2,391 x 2,391 pairs take well under a second per metric family.

Definitions (the report repeats them):

* Pairwise set metrics. Every valid query/gallery pair is predicted "similar" when its score is >= the threshold.
  TP/FP/TN/FN count pairs; accuracy = (TP+TN)/all, precision = TP/(TP+FP), recall = TP/(TP+FN),
  F1 = 2PR/(P+R). Undefined ratios (0/0) are NaN.
* Break-even point: the threshold of the sweep where pairwise precision and recall are closest (equal up to the
  resolution of the sweep).
* Ranking metrics, per query over its valid gallery items ranked by score (ties broken by a fixed pseudo-random
  order), then averaged over the queries that have at least one relevant gallery item (R_q > 0):
  P@k = hits in top k / k; R@k = hits in top k / R_q; AP@k = sum_{i<=k} P@i * rel_i / min(k, R_q);
  nDCG@k = sum_{i<=k} rel_i / log2(i+1), divided by the same sum for an ideal ranking (min(k, R_q) relevant first).
* List (top-k) operating point: the result list a user sees is the top k; a threshold t keeps the hits with
  score >= t. List recall(t) = relevant hits kept / relevant hits in the top k (pooled over queries); list
  precision(t) = relevant hits kept / hits kept; empty rate(t) = share of queries left with no hit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_KS = (1, 5, 10, 50)


# ---- relevance and exclusion -----------------------------------------------------------------------------------


def label_matrix(labels: list[tuple[str, ...]] | list[set[str]], vocabulary: list[str] | None = None):
    """(N, L) bool multi-hot matrix and the vocabulary (sorted label names) it uses."""
    if vocabulary is None:
        vocabulary = sorted({label for row in labels for label in row})
    column = {label: i for i, label in enumerate(vocabulary)}
    matrix = np.zeros((len(labels), len(vocabulary)), dtype=bool)
    for i, row in enumerate(labels):
        for label in row:
            if label in column:
                matrix[i, column[label]] = True
    return matrix, list(vocabulary)


def relevance_matrix(query_labels, gallery_labels, mode: str = "shares") -> np.ndarray:
    """(Q, G) bool: is gallery item g relevant to query q.

    mode "shares": the two share at least one label ("No Finding" counts as a label, so two normal studies are
        relevant to each other). "same-set": identical label sets. "finding:X": the gallery item has finding X
        and so does the query (queries without X have nothing relevant).
    """
    if mode == "shares":
        vocabulary = sorted({label for row in list(query_labels) + list(gallery_labels) for label in row})
        q, _ = label_matrix(query_labels, vocabulary)
        g, _ = label_matrix(gallery_labels, vocabulary)
        return (q.astype(np.float32) @ g.T.astype(np.float32)) > 0
    if mode == "same-set":
        keys = {}
        q = np.asarray([keys.setdefault(frozenset(row), len(keys)) for row in query_labels], dtype=np.int64)
        g = np.asarray([keys.setdefault(frozenset(row), len(keys)) for row in gallery_labels], dtype=np.int64)
        return q[:, None] == g[None, :]
    if mode.startswith("finding:"):
        finding = mode.split(":", 1)[1]
        q = np.asarray([finding in row for row in query_labels], dtype=bool)
        g = np.asarray([finding in row for row in gallery_labels], dtype=bool)
        return q[:, None] & g[None, :]
    raise ValueError(f"unknown relevance mode {mode!r} (shares, same-set, finding:X)")


def exclusion_mask(query_ids, gallery_ids, query_patients=None, gallery_patients=None,
                   include_same_patient: bool = False) -> np.ndarray:
    """(Q, G) bool, True for the pairs that do not count: the query itself, and (unless ``include_same_patient``)
    every gallery item of the query's patient. A patient of None or "" matches nobody."""
    query_ids = np.asarray(query_ids)
    gallery_ids = np.asarray(gallery_ids)
    excluded = query_ids[:, None] == gallery_ids[None, :]
    if not include_same_patient and query_patients is not None and gallery_patients is not None:
        qp = np.asarray([p or "" for p in query_patients], dtype=object)
        gp = np.asarray([p or "" for p in gallery_patients], dtype=object)
        codes = {}
        qc = np.asarray([codes.setdefault(p, len(codes)) if p else -1 for p in qp], dtype=np.int64)
        gc = np.asarray([codes.setdefault(p, len(codes)) if p else -2 for p in gp], dtype=np.int64)
        excluded |= qc[:, None] == gc[None, :]
    return excluded


# ---- pairwise set metrics --------------------------------------------------------------------------------------


def _ratio(num, den):
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out if out.ndim else float(out)


def binary_metrics(tp, fp, tn, fn) -> dict:
    """Accuracy, precision, recall, F1 (and the counts) from confusion counts; scalars or arrays alike."""
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    with np.errstate(invalid="ignore"):
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    accuracy = _ratio(tp + tn, tp + fp + tn + fn)
    out = {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1}
    counts = {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for key, value in counts.items():
        out[key] = float(value) if value.ndim == 0 else value
    return out


def pair_counts_at(scores, relevant, valid, threshold) -> dict:
    """Per-query confusion counts (arrays of length Q) when pairs with score >= threshold are predicted similar.

    ``threshold`` is a scalar or one threshold per query (shape (Q,))."""
    scores = np.asarray(scores)
    threshold = np.asarray(threshold, dtype=np.float64)
    if threshold.ndim == 1:
        threshold = threshold[:, None]
    predicted = (scores >= threshold) & valid
    positive = relevant & valid
    tp = (predicted & positive).sum(axis=1)
    fp = (predicted & ~positive).sum(axis=1)
    fn = (~predicted & positive).sum(axis=1)
    tn = valid.sum(axis=1) - tp - fp - fn
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def pairwise_metrics_at(scores, relevant, valid, threshold, weights=None) -> dict:
    """Accuracy, precision, recall, F1 over all valid pairs at one threshold (scalar or per query)."""
    counts = pair_counts_at(scores, relevant, valid, threshold)
    w = np.ones(len(counts["tp"])) if weights is None else np.asarray(weights, dtype=np.float64)
    return binary_metrics(*(float(w @ counts[k]) for k in ("tp", "fp", "tn", "fn")))


def threshold_grid(scores, valid=None, max_points: int = 2048) -> np.ndarray:
    """Ascending thresholds for a sweep: every distinct score when there are at most ``max_points``, else quantiles
    of the scores (always including the minimum and maximum)."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[valid] if valid is not None else values.ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.zeros(1)
    unique = np.unique(values)
    if unique.size <= max_points:
        return unique
    grid = np.quantile(values, np.linspace(0.0, 1.0, max_points), method="inverted_cdf")
    return np.unique(np.concatenate([grid, unique[[0, -1]]]))


@dataclass
class SweepCounts:
    """Per-query cumulative counts over a threshold grid: ``pos_above[q, t]`` = relevant valid pairs of query q with
    score >= thresholds[t], ``neg_above`` the same for irrelevant pairs; ``pos``/``neg`` = totals per query."""

    thresholds: np.ndarray
    pos_above: np.ndarray
    neg_above: np.ndarray
    pos: np.ndarray
    neg: np.ndarray

    def curve(self, weights=None) -> dict:
        """Pairwise metrics at every threshold of the grid (queries weighted by ``weights``; default 1)."""
        if weights is None:
            tp = self.pos_above.sum(axis=0, dtype=np.float64)
            fp = self.neg_above.sum(axis=0, dtype=np.float64)
            p, n = float(self.pos.sum()), float(self.neg.sum())
        else:
            w = np.asarray(weights, dtype=np.float64)
            tp, fp = w @ self.pos_above, w @ self.neg_above
            p, n = float(w @ self.pos), float(w @ self.neg)
        out = binary_metrics(tp, fp, n - fp, p - tp)
        out["thresholds"] = self.thresholds
        return out

    def curves(self, weight_matrix) -> dict:
        """Like :meth:`curve` for many weight vectors at once: arrays of shape (B, T)."""
        w = np.asarray(weight_matrix, dtype=np.float64)
        tp, fp = w @ self.pos_above, w @ self.neg_above
        p, n = (w @ self.pos)[:, None], (w @ self.neg)[:, None]
        return binary_metrics(tp, fp, n - fp, p - tp)


def sweep_counts(scores, relevant, valid, thresholds=None, max_points: int = 2048, chunk: int = 256) -> SweepCounts:
    """Cumulative per-query counts of relevant/irrelevant pairs above each threshold of a grid (see SweepCounts)."""
    scores = np.asarray(scores)
    if thresholds is None:
        thresholds = threshold_grid(scores, valid, max_points)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    n_queries, n_thresholds = scores.shape[0], len(thresholds)
    pos_above = np.zeros((n_queries, n_thresholds), dtype=np.int32)
    neg_above = np.zeros((n_queries, n_thresholds), dtype=np.int32)
    for start in range(0, n_queries, chunk):
        stop = min(start + chunk, n_queries)
        s = scores[start:stop]
        v = valid[start:stop]
        r = relevant[start:stop] & v
        # bin b: thresholds[b] <= s < thresholds[b+1]; a pair counts as "above" every threshold <= its bin.
        bins = np.searchsorted(thresholds, s, side="right") - 1
        keep = v & (bins >= 0)
        rows = np.broadcast_to(np.arange(stop - start)[:, None], s.shape)
        flat = rows[keep] * n_thresholds + bins[keep]
        rel = r[keep]
        size = (stop - start) * n_thresholds
        hist_pos = np.bincount(flat[rel], minlength=size).reshape(stop - start, n_thresholds)
        hist_neg = np.bincount(flat[~rel], minlength=size).reshape(stop - start, n_thresholds)
        pos_above[start:stop] = np.cumsum(hist_pos[:, ::-1], axis=1)[:, ::-1]
        neg_above[start:stop] = np.cumsum(hist_neg[:, ::-1], axis=1)[:, ::-1]
    pos = (relevant & valid).sum(axis=1)
    neg = valid.sum(axis=1) - pos
    return SweepCounts(thresholds, pos_above, neg_above, pos, neg)


def break_even_index(precision, recall) -> int:
    """Index of the sweep point with a true positive where precision and recall are closest (ties: the highest
    threshold)."""
    precision = np.asarray(precision, dtype=np.float64)
    recall = np.asarray(recall, dtype=np.float64)
    gap = np.abs(precision - recall)
    gap = np.where(np.isfinite(gap) & (recall > 0), gap, np.inf)  # P = R = 0 (no true positive) is no break-even
    return int(len(gap) - 1 - np.argmin(gap[::-1]))


def break_even(curve: dict) -> dict:
    """Pairwise metrics at the break-even point of a curve from :meth:`SweepCounts.curve`."""
    i = break_even_index(curve["precision"], curve["recall"])
    out = {key: float(np.asarray(curve[key])[i]) for key in
           ("accuracy", "precision", "recall", "f1", "tp", "fp", "tn", "fn")}
    out["threshold"] = float(curve["thresholds"][i])
    return out


def average_precision_pairwise(curve: dict) -> float:
    """Area under the pairwise PR curve (step-wise, sum over thresholds of precision x recall increments)."""
    precision = np.asarray(curve["precision"], dtype=np.float64)[::-1]
    recall = np.asarray(curve["recall"], dtype=np.float64)[::-1]
    recall = np.concatenate([[0.0], np.nan_to_num(recall)])
    return float(np.sum(np.diff(recall) * np.nan_to_num(precision)))


# ---- ranking -----------------------------------------------------------------------------------------------------


@dataclass
class TopK:
    """The ranked head of every query's result list: gallery ``indices`` (Q, K), their ``scores`` and ``filled``
    (False where a query has fewer than K valid gallery items)."""

    indices: np.ndarray
    scores: np.ndarray
    filled: np.ndarray


def tie_breaker(shape, seed: int = 0) -> np.ndarray:
    """A fixed pseudo-random order in [0, 1) used to break ties between equal scores."""
    return np.random.default_rng(seed).random(shape)


def rank_topk(scores, valid, k: int, seed: int = 0, chunk: int = 512) -> TopK:
    """Top-k valid gallery items per query, best first; equal scores are ordered by a fixed pseudo-random order."""
    scores = np.asarray(scores, dtype=np.float64)
    n_queries, n_gallery = scores.shape
    k = max(1, min(k, n_gallery))
    order_noise = tie_breaker(scores.shape, seed)
    indices = np.zeros((n_queries, k), dtype=np.int64)
    for start in range(0, n_queries, chunk):
        stop = min(start + chunk, n_queries)
        s = np.where(valid[start:stop], scores[start:stop], -np.inf)
        noise = order_noise[start:stop]
        # Candidates: everything tied with or above the k-th best score, then an exact sort by (score, noise).
        if k < n_gallery:
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            kth = np.take_along_axis(s, part, axis=1).min(axis=1, keepdims=True)
        else:
            kth = np.full((stop - start, 1), -np.inf)
        key = np.where(s >= kth, s, -np.inf)
        # lexsort sorts ascending by the last key first: score descending, then noise descending.
        order = np.lexsort((-noise, -key), axis=1)[:, :k]
        indices[start:stop] = order
    top_scores = np.take_along_axis(scores, indices, axis=1)
    filled = np.take_along_axis(np.asarray(valid), indices, axis=1)
    return TopK(indices=indices, scores=np.where(filled, top_scores, -np.inf), filled=filled)


def ranking_metrics(topk: TopK, relevant, valid, ks=DEFAULT_KS) -> dict:
    """Per-query P@k, R@k, AP@k, nDCG@k (arrays of length Q, NaN for queries without a relevant gallery item),
    plus ``n_relevant`` per query and ``has_relevant``."""
    relevant = np.asarray(relevant, dtype=bool)
    n_relevant = (relevant & valid).sum(axis=1)
    hits = np.take_along_axis(relevant, topk.indices, axis=1) & topk.filled
    depth = hits.shape[1]
    positions = np.arange(1, depth + 1)
    cum_hits = np.cumsum(hits, axis=1)
    discount = 1.0 / np.log2(positions + 1.0)
    has = n_relevant > 0
    out = {"n_relevant": n_relevant, "has_relevant": has}
    for k in ks:
        kk = min(k, depth)
        hits_k = cum_hits[:, kk - 1].astype(np.float64)
        ideal_n = np.minimum(k, n_relevant)
        precision_at_i = cum_hits[:, :kk] / positions[:kk]
        ap = (precision_at_i * hits[:, :kk]).sum(axis=1)
        dcg = (hits[:, :kk] * discount[:kk]).sum(axis=1)
        ideal_cum = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(1, k + 1) + 1.0))])
        idcg = ideal_cum[np.minimum(ideal_n, k)]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[f"P@{k}"] = np.where(has, hits_k / k, np.nan)
            out[f"R@{k}"] = np.where(has, hits_k / np.maximum(n_relevant, 1), np.nan)
            out[f"mAP@{k}"] = np.where(has, ap / np.maximum(ideal_n, 1), np.nan)
            out[f"nDCG@{k}"] = np.where(has, dcg / np.where(idcg > 0, idcg, 1.0), np.nan)
    return out


def mean_over_queries(per_query: np.ndarray, weights=None) -> float:
    """Weighted mean over the queries where the value is defined (not NaN)."""
    values = np.asarray(per_query, dtype=np.float64)
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    defined = np.isfinite(values)
    total = float(w[defined].sum())
    return float((w[defined] * values[defined]).sum() / total) if total > 0 else float("nan")


# ---- the list (top-k) operating point ------------------------------------------------------------------------------


def list_counts_at(top_scores, top_relevant, threshold) -> dict:
    """Per-query counts for a result list cut at ``threshold`` (scalar or per query): ``relevant_in_list`` (relevant
    hits in the top k), ``kept`` (hits with score >= threshold), ``relevant_kept``."""
    top_scores = np.asarray(top_scores, dtype=np.float64)
    top_relevant = np.asarray(top_relevant, dtype=bool)
    threshold = np.asarray(threshold, dtype=np.float64)
    if threshold.ndim == 1:
        threshold = threshold[:, None]
    kept = top_scores >= threshold
    return {
        "relevant_in_list": top_relevant.sum(axis=1),
        "kept": kept.sum(axis=1),
        "relevant_kept": (kept & top_relevant).sum(axis=1),
        "listed": np.isfinite(top_scores).sum(axis=1),
    }


def list_metrics(counts: dict, weights=None) -> dict:
    """List recall, list precision, empty rate and mean hits kept from :func:`list_counts_at` counts."""
    n = len(counts["kept"])
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    relevant_kept = float(w @ counts["relevant_kept"])
    relevant_in_list = float(w @ counts["relevant_in_list"])
    kept = float(w @ counts["kept"])
    total = float(w.sum())
    return {
        "list_recall": _ratio(relevant_kept, relevant_in_list),
        "list_precision": _ratio(relevant_kept, kept),
        "empty_rate": _ratio(float(w @ (counts["kept"] == 0)), total),
        "any_relevant_kept_rate": _ratio(float(w @ (counts["relevant_kept"] > 0)), total),
        "kept_per_query": _ratio(kept, total),
        "dropped_irrelevant_share": _ratio(
            float(w @ ((counts["listed"] - counts["kept"]) - (counts["relevant_in_list"] - counts["relevant_kept"]))),
            float(w @ (counts["listed"] - counts["relevant_in_list"]))),
    }


def list_threshold_for_recall(top_scores, top_relevant, target_recall: float) -> float:
    """The highest threshold whose list recall (pooled over queries) is >= ``target_recall``: the
    ceil(target * R)-th highest score among the R relevant hits of all top-k lists."""
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    relevant_scores = np.sort(np.asarray(top_scores, dtype=np.float64)[np.asarray(top_relevant, dtype=bool)])[::-1]
    relevant_scores = relevant_scores[np.isfinite(relevant_scores)]
    if relevant_scores.size == 0:
        return float("-inf")
    m = int(np.ceil(target_recall * relevant_scores.size - 1e-9))
    return float(relevant_scores[max(m, 1) - 1])


def list_curve(top_scores, top_relevant, recall_levels=None) -> dict:
    """The recall -> threshold curve of a set of result lists: for each recall level, the threshold that reaches it
    and the list precision, empty rate and hits kept per query there."""
    if recall_levels is None:
        recall_levels = np.round(np.arange(1, 101) / 100.0, 2)
    rows = {"target_recall": [], "threshold": [], "list_recall": [], "list_precision": [], "empty_rate": [],
            "kept_per_query": []}
    for level in recall_levels:
        t = list_threshold_for_recall(top_scores, top_relevant, float(level))
        m = list_metrics(list_counts_at(top_scores, top_relevant, t))
        rows["target_recall"].append(float(level))
        rows["threshold"].append(t)
        for key in ("list_recall", "list_precision", "empty_rate", "kept_per_query"):
            rows[key].append(m[key])
    return rows


# ---- bootstrap -----------------------------------------------------------------------------------------------------


def patient_bootstrap_weights(patients, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(B, Q) query weights for a bootstrap that resamples patients with replacement: a query's weight is how many
    times its patient was drawn. Queries without a patient id count as their own patient."""
    patients = [p if p else f"\0query-{i}" for i, p in enumerate(patients)]
    codes = {}
    group = np.asarray([codes.setdefault(p, len(codes)) for p in patients], dtype=np.int64)
    n_groups = len(codes)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_resamples, n_groups))
    multiplicity = np.zeros((n_resamples, n_groups), dtype=np.float64)
    np.add.at(multiplicity, (np.repeat(np.arange(n_resamples), n_groups), draws.ravel()), 1.0)
    return multiplicity[:, group]


def percentile_interval(samples, level: float = 0.95) -> tuple[float, float]:
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return (float("nan"), float("nan"))
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


# ---- per-finding retrieval (the product's promise: cases that share the query's findings) ---------------------------

# The 14 findings of NIH ChestX-ray14 ("No Finding" is not a finding).
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
                "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
# Full-resolution NIH ChestX-ray14 images whose patient ids are NIH patient numbers (so a query's own patient can
# be excluded). Not "rsna" (NIH images whose patients cannot be linked to NIH ids) nor "nih64" (64 px copies).
NIH_FINDING_SOURCES = ("nih", "nih2", "nihtest")
# Sources that are the same archive (NIH ChestX-ray14) for the same-source share.
SOURCE_FAMILIES = {"nih2": "nih", "nih64": "nih", "nihtest": "nih", "rsna": "nih"}


def source_family(source: str) -> str:
    return SOURCE_FAMILIES.get(source, source)


def random_ap_at_k(n_relevant, n_valid, k: int) -> np.ndarray:
    """Exact expected AP@k of a uniformly random ranking of ``n_valid`` gallery items of which ``n_relevant`` are
    relevant (per query; NaN where n_relevant = 0).

    E[AP@k] = 1/min(k, R) * sum_{i<=min(k, N)} E[rel_i * hits_i] / i, and E[rel_i * hits_i] = R/N + (i-1) R(R-1) /
    (N(N-1)) (item i relevant, plus each of the i-1 items above it relevant together with it)."""
    R = np.asarray(n_relevant, dtype=np.float64)
    N = np.asarray(n_valid, dtype=np.float64)
    total = np.zeros(np.broadcast(R, N).shape)
    n_safe = np.maximum(N, 1.0)
    pair = np.where(N > 1, R * (R - 1) / (n_safe * np.maximum(N - 1, 1.0)), 0.0)
    for i in range(1, k + 1):
        total = total + np.where(i <= N, (R / n_safe + (i - 1) * pair) / i, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(R > 0, total / np.maximum(np.minimum(k, R), 1.0), np.nan)


@dataclass
class FindingAP:
    """Per-finding AP@k of a set of queries: ``ap`` and ``random`` are (F, Q) arrays, NaN where query q is not a
    query of finding f (it lacks f, or no valid gallery item has f)."""

    findings: list
    ap: np.ndarray
    random: np.ndarray
    k: int

    def queries(self) -> np.ndarray:
        return np.isfinite(self.ap).sum(axis=1)

    def macro(self, weights=None) -> np.ndarray | float:
        """Mean over findings of the mean AP@k over the finding's queries; ``weights`` (B, Q) gives one value per
        bootstrap resample (a finding absent from a resample is left out of that resample's mean)."""
        return _finding_macro(self.ap, weights)

    def random_macro(self, weights=None):
        return _finding_macro(self.random, weights)


def _finding_macro(values: np.ndarray, weights=None):
    values = np.asarray(values, dtype=np.float64)
    defined = np.isfinite(values)
    v = np.where(defined, values, 0.0)
    if weights is None:
        per = np.where(defined.any(axis=1), v.sum(axis=1) / np.maximum(defined.sum(axis=1), 1), np.nan)
        return float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")
    w = np.asarray(weights, dtype=np.float64)
    num = v @ w.T  # (F, B)
    den = defined.astype(np.float64) @ w.T
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
        return np.nanmean(per, axis=0)


def finding_ap(topk: TopK, query_labels, gallery_labels, valid, findings, k: int = 10,
               min_queries: int = 1) -> FindingAP:
    """AP@k per finding on one ranking: for finding X, the queries that have X (and a valid gallery item with X),
    relevant = the gallery item has X. Findings with fewer than ``min_queries`` such queries are left out."""
    valid = np.asarray(valid, dtype=bool)
    n_valid = valid.sum(axis=1)
    kept, aps, rands = [], [], []
    for finding in findings:
        rel = relevance_matrix(query_labels, gallery_labels, f"finding:{finding}")
        r = ranking_metrics(topk, rel, valid, ks=(k,))
        ap = r[f"mAP@{k}"]
        if np.isfinite(ap).sum() < min_queries:
            continue
        kept.append(finding)
        aps.append(ap)
        rands.append(random_ap_at_k(r["n_relevant"], n_valid, k))
    q = topk.indices.shape[0]
    return FindingAP(kept, np.asarray(aps).reshape(len(kept), q), np.asarray(rands).reshape(len(kept), q), k)


def finding_summary(fa: FindingAP, weights=None, other: FindingAP | None = None) -> dict:
    """Per-finding mAP@k and random baseline, their macro averages, the lift (model - random) with bootstrap
    intervals when ``weights`` (B, Q) are given, and (``other``: a second model on the same queries) the paired
    difference of the macros with its interval."""
    k = fa.k
    out = {"k": k, "findings": {}, "macro": fa.macro(), "random_macro": fa.random_macro()}
    out["lift"] = out["macro"] - out["random_macro"]
    for i, finding in enumerate(fa.findings):
        ap, rnd = fa.ap[i], fa.random[i]
        out["findings"][finding] = {"queries": int(np.isfinite(ap).sum()), f"mAP@{k}": mean_over_queries(ap),
                                    "random": mean_over_queries(rnd)}
    if weights is not None:
        boot = fa.macro(weights)
        boot_random = fa.random_macro(weights)
        out["macro_ci95"] = list(percentile_interval(boot))
        out["lift_ci95"] = list(percentile_interval(boot - boot_random))
        if other is not None:
            diff = boot - other.macro(weights)
            out["vs_other"] = {"delta": out["macro"] - other.macro(), "ci95": list(percentile_interval(diff))}
    return out


def same_source_share(topk: TopK, relevant, valid, sources, k: int = 10, families: bool = True,
                      query_sources=None) -> dict:
    """Share of the top-k results that come from the query's own source, over the queries that have a relevant
    valid gallery item in another source (so a method could have shown one). ``families``: NIH ChestX-ray14
    sources (nih, nih2, nih64, nihtest, rsna) count as one source."""
    src = np.asarray([source_family(s) if families else s for s in sources], dtype=object)
    qsrc = src if query_sources is None else np.asarray(
        [source_family(s) if families else s for s in query_sources], dtype=object)
    relevant = np.asarray(relevant, dtype=bool)
    other = relevant & np.asarray(valid, dtype=bool) & (src[None, :] != qsrc[:, None])
    rows = other.any(axis=1)
    idx = topk.indices[:, :k]
    filled = topk.filled[:, :k]
    same = (src[idx] == qsrc[:, None]) & filled
    shown = filled[rows].sum()
    return {"share": float(same[rows].sum() / shown) if shown else float("nan"), "queries": int(rows.sum()),
            "share_all_queries": float(same.sum() / max(filled.sum(), 1))}


def nih_finding_ap(scores, labels, patients, sources, k: int = 10, min_queries: int = 5,
                   subset_sources=NIH_FINDING_SOURCES, n_resamples: int = 1000, seed: int = 0):
    """Per-finding AP@k of the images of ``subset_sources`` among themselves (queries and gallery; own patient
    excluded) over the NIH findings with at least ``min_queries`` queries: (:class:`FindingAP`, (B, Q)
    patient-bootstrap weights of those queries), or None when there is no such finding."""
    idx = np.flatnonzero(np.asarray([s in subset_sources for s in sources], dtype=bool))
    if len(idx) < 2:
        return None
    lab = [labels[i] for i in idx]
    pat = [patients[i] for i in idx]
    ids = np.arange(len(idx))
    valid = ~exclusion_mask(ids, ids, pat, pat)
    topk = rank_topk(np.asarray(scores)[np.ix_(idx, idx)], valid, k, seed=seed)
    fa = finding_ap(topk, lab, lab, valid, NIH_FINDINGS, k=k, min_queries=min_queries)
    if not fa.findings:
        return None
    return fa, patient_bootstrap_weights(pat, n_resamples, seed)

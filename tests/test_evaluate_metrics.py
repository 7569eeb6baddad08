"""Every evaluation metric against values computed by hand on tiny cases."""

import math

import numpy as np
import pytest

from medsim.evaluate import metrics as M

# 2 queries x 4 gallery items. Query 0 is gallery item 0 (excluded as itself); query 1's patient owns item 3.
SCORES = np.array([[1.0, 0.9, 0.4, 0.7],
                   [0.2, 0.8, 0.6, 0.95]])
RELEVANT = np.array([[True, True, False, True],
                     [False, True, True, True]])
VALID = np.array([[False, True, True, True],
                  [True, True, True, False]])


def test_relevance_modes():
    q = [("Pneumonia", "Bacterial"), ("No Finding",)]
    g = [("Pneumonia", "Viral"), ("No Finding",), ("Pneumonia", "Bacterial"), ("Effusion",)]
    assert M.relevance_matrix(q, g, "shares").tolist() == [[True, False, True, False], [False, True, False, False]]
    assert M.relevance_matrix(q, g, "same-set").tolist() == [[False, False, True, False], [False, True, False, False]]
    assert M.relevance_matrix(q, g, "finding:Pneumonia").tolist() == [[True, False, True, False], [False] * 4]
    with pytest.raises(ValueError):
        M.relevance_matrix(q, g, "nonsense")


def test_exclusion_mask_self_and_patient():
    excluded = M.exclusion_mask([0, 1], [0, 1, 2, 3], ["a", "b"], ["a", "x", "a", "b"])
    assert excluded.tolist() == [[True, False, True, False], [False, True, False, True]]
    kept = M.exclusion_mask([0, 1], [0, 1, 2, 3], ["a", "b"], ["a", "x", "a", "b"], include_same_patient=True)
    assert kept.tolist() == [[True, False, False, False], [False, True, False, False]]
    unknown = M.exclusion_mask([0], [0, 1], [None], [None, None])  # no patient id matches nobody
    assert unknown.tolist() == [[True, False]]


def test_pairwise_metrics_at_threshold_by_hand():
    # threshold 0.7: q0 valid pairs (0.9 R, 0.4 N, 0.7 R) -> TP 2, TN 1; q1 (0.2 N, 0.8 R, 0.6 R) -> TP 1, FN 1, TN 1
    counts = M.pair_counts_at(SCORES, RELEVANT, VALID, 0.7)
    assert counts["tp"].tolist() == [2, 1] and counts["fp"].tolist() == [0, 0]
    assert counts["fn"].tolist() == [0, 1] and counts["tn"].tolist() == [1, 1]
    m = M.pairwise_metrics_at(SCORES, RELEVANT, VALID, 0.7)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 0, 2, 1)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    # A per-query threshold: q0 at 0.95 (nothing predicted), q1 at 0.5 (0.8, 0.6 predicted, both relevant).
    m = M.pairwise_metrics_at(SCORES, RELEVANT, VALID, np.array([0.95, 0.5]))
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 0, 2, 2)
    # Query weights (the bootstrap) multiply a query's pairs.
    m = M.pairwise_metrics_at(SCORES, RELEVANT, VALID, 0.7, weights=[2, 0])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (4, 0, 2, 0)


def test_binary_metrics_undefined_is_nan():
    m = M.binary_metrics(0, 0, 5, 3)
    assert math.isnan(m["precision"]) and m["recall"] == 0.0 and m["accuracy"] == pytest.approx(5 / 8)


def test_sweep_matches_pointwise_and_break_even_by_hand():
    sweep = M.sweep_counts(SCORES, RELEVANT, VALID)
    assert sweep.thresholds.tolist() == [0.2, 0.4, 0.6, 0.7, 0.8, 0.9]  # distinct valid scores (1.0, 0.95 excluded)
    curve = sweep.curve()
    for i, t in enumerate(sweep.thresholds):
        m = M.pairwise_metrics_at(SCORES, RELEVANT, VALID, t)
        for key in ("tp", "fp", "tn", "fn", "precision", "recall", "accuracy"):
            assert curve[key][i] == pytest.approx(m[key], nan_ok=True)
    # Relevant valid scores: 0.9, 0.7, 0.8, 0.6; irrelevant: 0.4, 0.2. P = R at t = 0.6: TP 4, FP 0 -> P = R = 1.
    be = M.break_even(curve)
    assert be["threshold"] == 0.6 and be["precision"] == 1.0 and be["recall"] == 1.0 and be["f1"] == 1.0
    # Weighted curves for many weight vectors at once equal single weighted curves.
    many = sweep.curves(np.array([[1.0, 1.0], [2.0, 0.0]]))
    single = sweep.curve([2.0, 0.0])
    assert np.allclose(many["tp"][1], single["tp"]) and np.allclose(many["recall"][0], curve["recall"])


def test_break_even_ignores_points_without_true_positives():
    # P = R = 0 at the top threshold (one irrelevant pair above it) is not a break-even point.
    scores = np.array([[0.9, 0.5, 0.4, 0.1]])
    relevant = np.array([[False, True, False, True]])
    valid = np.ones_like(relevant)
    curve = M.sweep_counts(scores, relevant, valid).curve()
    be = M.break_even(curve)
    # t=0.5: TP 1, FP 1 -> P 1/2, R 1/2.
    assert be["threshold"] == 0.5 and be["precision"] == 0.5 and be["recall"] == 0.5


def test_sweep_quantile_grid_is_bounded():
    rng = np.random.default_rng(0)
    scores = rng.random((30, 40))
    grid = M.threshold_grid(scores, np.ones_like(scores, dtype=bool), max_points=64)
    assert len(grid) <= 66 and grid[0] == scores.min() and grid[-1] == scores.max()


def test_pairwise_average_precision_by_hand():
    # One query, scores 0.9 R, 0.8 N, 0.7 R: AP = 1/2 * 1 + 1/2 * 2/3.
    curve = M.sweep_counts(np.array([[0.9, 0.8, 0.7]]), np.array([[True, False, True]]),
                           np.ones((1, 3), dtype=bool)).curve()
    assert M.average_precision_pairwise(curve) == pytest.approx(0.5 + 1 / 3)


def test_ranking_metrics_by_hand():
    # One query; ranked relevance 1 0 1 0 0 (distinct scores), 3 relevant items in the gallery in total
    # (the third at rank 6).
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    relevant = np.array([[True, False, True, False, False, True]])
    valid = np.ones_like(relevant)
    top = M.rank_topk(scores, valid, 6)
    assert top.indices.tolist() == [[0, 1, 2, 3, 4, 5]]
    r = M.ranking_metrics(top, relevant, valid, ks=(1, 5))
    assert r["P@1"][0] == 1.0 and r["R@1"][0] == pytest.approx(1 / 3)
    assert r["P@5"][0] == pytest.approx(2 / 5) and r["R@5"][0] == pytest.approx(2 / 3)
    assert r["mAP@1"][0] == 1.0
    assert r["mAP@5"][0] == pytest.approx((1 / 1 + 2 / 3) / 3)
    dcg = 1 + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert r["nDCG@5"][0] == pytest.approx(dcg / idcg)
    assert r["nDCG@1"][0] == 1.0


def test_ranking_respects_exclusions_and_skips_queries_without_relevant():
    top = M.rank_topk(SCORES, VALID, 3)
    # q0: item 0 excluded -> 1 (0.9), 3 (0.7), 2 (0.4); q1: item 3 excluded -> 1 (0.8), 2 (0.6), 0 (0.2)
    assert top.indices.tolist() == [[1, 3, 2], [1, 2, 0]]
    r = M.ranking_metrics(top, RELEVANT, VALID, ks=(1, 2))
    assert r["P@2"].tolist() == [1.0, 1.0]
    assert r["R@1"][0] == pytest.approx(1 / 2) and r["R@2"][1] == pytest.approx(1.0)
    none = M.ranking_metrics(top, np.zeros_like(RELEVANT), VALID, ks=(1,))
    assert np.isnan(none["P@1"]).all() and not none["has_relevant"].any()
    assert math.isnan(M.mean_over_queries(none["P@1"]))
    assert M.mean_over_queries(np.array([1.0, np.nan, 0.0]), weights=[3, 1, 1]) == pytest.approx(0.75)


def test_rank_topk_fewer_valid_items_than_k():
    top = M.rank_topk(np.array([[0.5, 0.9, 0.1]]), np.array([[True, False, True]]), 3)
    assert top.indices[0, :2].tolist() == [0, 2] and top.filled.tolist() == [[True, True, False]]
    r = M.ranking_metrics(top, np.array([[True, True, True]]), np.array([[True, False, True]]), ks=(3,))
    assert r["P@3"][0] == pytest.approx(2 / 3) and r["R@3"][0] == 1.0


def test_ties_are_broken_by_a_fixed_pseudo_random_order():
    scores = np.zeros((1, 200))
    valid = np.ones_like(scores, dtype=bool)
    a = M.rank_topk(scores, valid, 10, seed=0).indices
    assert np.array_equal(a, M.rank_topk(scores, valid, 10, seed=0).indices)
    assert not np.array_equal(a[0], np.arange(10))  # not gallery order
    # A strictly higher score always ranks first.
    scores[0, 150] = 0.5
    assert M.rank_topk(scores, valid, 1).indices[0, 0] == 150


def test_list_threshold_and_list_metrics_by_hand():
    # Two queries' top-3 lists. Relevant scores: 0.9, 0.7 (q0), 0.8 (q1) -> R = 3.
    top_scores = np.array([[0.9, 0.8, 0.7], [0.85, 0.8, 0.3]])
    top_relevant = np.array([[True, False, True], [False, True, False]])
    # target 0.75: ceil(0.75 * 3) = 3 -> the 3rd highest relevant score, 0.7; target 0.5: ceil(1.5) = 2 -> 0.8
    assert M.list_threshold_for_recall(top_scores, top_relevant, 0.75) == 0.7
    assert M.list_threshold_for_recall(top_scores, top_relevant, 1.0) == 0.7
    assert M.list_threshold_for_recall(top_scores, top_relevant, 0.5) == 0.8
    counts = M.list_counts_at(top_scores, top_relevant, 0.8)
    m = M.list_metrics(counts)
    # kept: q0 0.9 R, 0.8 N; q1 0.85 N, 0.8 R -> relevant kept 2 of 3 relevant in lists; precision 2/4
    assert m["list_recall"] == pytest.approx(2 / 3) and m["list_precision"] == pytest.approx(0.5)
    assert m["empty_rate"] == 0.0 and m["kept_per_query"] == 2.0 and m["any_relevant_kept_rate"] == 1.0
    assert m["dropped_irrelevant_share"] == pytest.approx(1 / 3)  # irrelevant in lists: 0.8, 0.85, 0.3 -> 0.3 dropped
    m = M.list_metrics(M.list_counts_at(top_scores, top_relevant, np.array([0.95, 0.0])))
    assert m["empty_rate"] == 0.5 and m["list_recall"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        M.list_threshold_for_recall(top_scores, top_relevant, 0.0)
    curve = M.list_curve(top_scores, top_relevant, recall_levels=[0.25, 0.5, 1.0])
    assert curve["threshold"] == [0.9, 0.8, 0.7]
    assert curve["list_recall"] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert curve["list_precision"] == pytest.approx([1.0, 0.5, 0.6])  # at 0.7: 3 relevant of 5 kept


def test_patient_bootstrap_weights_move_patients_together():
    patients = ["a", "a", "b", "c", None]
    w = M.patient_bootstrap_weights(patients, n_resamples=500, seed=1)
    assert w.shape == (500, 5)
    assert np.array_equal(w[:, 0], w[:, 1])  # both images of patient a
    # four groups (a, b, c, and the query without a patient) drawn four times per resample
    assert np.allclose(w[:, [0, 2, 3, 4]].sum(axis=1), 4)
    assert abs(w.mean() - 1.0) < 0.1
    lo, hi = M.percentile_interval(np.arange(1001) / 1000.0)
    assert lo == pytest.approx(0.025) and hi == pytest.approx(0.975)


def test_full_size_is_fast():
    import time

    n = 2391
    rng = np.random.default_rng(0)
    v = rng.normal(size=(n, 32)).astype(np.float32)
    scores = v @ v.T
    labels = [("A",) if i % 3 else ("B",) for i in range(n)]
    relevant = M.relevance_matrix(labels, labels)
    valid = ~M.exclusion_mask(np.arange(n), np.arange(n))
    started = time.perf_counter()
    sweep = M.sweep_counts(scores, relevant, valid)
    M.break_even(sweep.curve())
    M.ranking_metrics(M.rank_topk(scores, valid, 50), relevant, valid)
    assert time.perf_counter() - started < 20

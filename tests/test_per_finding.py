"""Per-finding retrieval metrics (issue 18): AP@k per finding, the exact random-ranking expectation, the macro
average with patient-bootstrap intervals, and the same-source share -- on small hand-made cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medsim.evaluate import metrics as M


def _enumerated_random_ap(n, r, k):
    """Mean AP@k over every placement of r relevant items among n (exact, by enumeration)."""
    total, count = 0.0, 0
    for pos in itertools.combinations(range(n), r):
        rel = np.zeros(n, dtype=bool)
        rel[list(pos)] = True
        hits = rel[:k]
        prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        total += float((prec * hits).sum()) / min(k, r)
        count += 1
    return total / count


@pytest.mark.parametrize("n,r,k", [(1, 1, 10), (5, 2, 10), (6, 3, 2), (12, 4, 10), (13, 1, 10), (9, 9, 10)])
def test_random_ap_is_the_exact_expectation(n, r, k):
    assert M.random_ap_at_k(r, n, k) == pytest.approx(_enumerated_random_ap(n, r, k), abs=1e-12)


def test_random_ap_hand_values():
    # 2 relevant of 5: 237/400 (enumerated by hand over the 10 placements)
    assert M.random_ap_at_k(2, 5, 10) == pytest.approx(237 / 400)
    # one relevant among N, k >= N: mean of 1/i = H_N / N
    assert M.random_ap_at_k(1, 4, 10) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    # nothing relevant: undefined
    assert np.isnan(M.random_ap_at_k(0, 4, 10))
    # vectorised
    out = M.random_ap_at_k(np.array([1, 2]), np.array([1, 5]), 10)
    assert out == pytest.approx([1.0, 237 / 400])


def _case():
    # 5 images of 5 patients; query rows = gallery columns
    labels = [("Mass",), ("Mass", "Effusion"), ("Effusion",), ("No Finding",), ("Mass",)]
    patients = ["p0", "p1", "p2", "p3", "p4"]
    scores = np.array([
        [1.0, 0.9, 0.8, 0.7, 0.1],  # query 0 (Mass): ranks 1 (Mass), 2, 3, 4 (Mass)
        [0.9, 1.0, 0.2, 0.8, 0.7],  # query 1 (Mass, Effusion): ranks 0 (Mass), 3, 4 (Mass), 2 (Effusion)
        [0.8, 0.2, 1.0, 0.9, 0.1],  # query 2 (Effusion): ranks 3, 0, 1 (Effusion), 4
        [0.7, 0.8, 0.9, 1.0, 0.3],
        [0.15, 0.7, 0.1, 0.3, 1.0],  # query 4 (Mass): ranks 1 (Mass), 3, 0 (Mass), 2
    ])
    ids = np.arange(5)
    valid = ~M.exclusion_mask(ids, ids, patients, patients)
    return labels, patients, scores, valid


def test_finding_ap_hand_case():
    labels, _, scores, valid = _case()
    topk = M.rank_topk(scores, valid, 10)
    fa = M.finding_ap(topk, labels, labels, valid, ["Mass", "Effusion", "Nodule"], k=10)
    assert fa.findings == ["Mass", "Effusion"]  # Nodule: no query
    mass, effusion = fa.ap
    # Mass queries 0, 1, 4 (each has 2 other Mass images)
    assert mass[0] == pytest.approx((1 / 1 + 2 / 4) / 2)
    assert mass[1] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert mass[4] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert np.isnan(mass[2]) and np.isnan(mass[3])
    # Effusion queries 1 and 2, one relevant image each
    assert effusion[1] == pytest.approx(1 / 4)
    assert effusion[2] == pytest.approx(1 / 3)
    assert fa.queries().tolist() == [3, 2]
    # random: Mass queries have R=2 of N=4, Effusion R=1 of N=4
    assert fa.random[0, 0] == pytest.approx(_enumerated_random_ap(4, 2, 10))
    assert fa.random[1, 2] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    macro = fa.macro()
    assert macro == pytest.approx(0.5 * (np.nanmean(mass) + np.nanmean(effusion)))
    # bootstrap weights of all ones reproduce the point estimate
    assert fa.macro(np.ones((3, 5))) == pytest.approx([macro] * 3)


def test_finding_ap_min_queries():
    labels, _, scores, valid = _case()
    topk = M.rank_topk(scores, valid, 10)
    fa = M.finding_ap(topk, labels, labels, valid, ["Mass", "Effusion"], k=10, min_queries=3)
    assert fa.findings == ["Mass"]


def test_finding_summary_and_paired_difference():
    labels, patients, scores, valid = _case()
    fa = M.finding_ap(M.rank_topk(scores, valid, 10), labels, labels, valid, ["Mass", "Effusion"], k=10)
    # the reversed ranking as the second model
    fb = M.finding_ap(M.rank_topk(-scores, valid, 10), labels, labels, valid, ["Mass", "Effusion"], k=10)
    # query 0 reversed: 4 (Mass), 3, 2, 1 (Mass) -> (1 + 2/4) / 2; query 1: 2 (Effusion) first
    assert fb.ap[0, 0] == pytest.approx((1 + 2 / 4) / 2)
    assert fb.ap[1, 1] == pytest.approx(1.0)
    w = M.patient_bootstrap_weights(patients, 200, 0)
    s = M.finding_summary(fa, w, other=fb)
    assert s["lift"] == pytest.approx(s["macro"] - s["random_macro"])
    assert s["findings"]["Effusion"]["queries"] == 2
    assert s["vs_other"]["delta"] == pytest.approx(fa.macro() - fb.macro())
    lo, hi = s["macro_ci95"]
    assert lo - 1e-9 <= s["macro"] <= hi + 1e-9
    lo, hi = s["vs_other"]["ci95"]
    assert lo - 1e-9 <= s["vs_other"]["delta"] <= hi + 1e-9
    assert s["random_macro"] == pytest.approx(0.5 * (np.nanmean(fa.random[0]) + np.nanmean(fa.random[1])))


def test_same_source_share_counts_only_queries_with_relevant_cases_elsewhere():
    # queries 0, 1 from nih; 2 from rsna (same family as nih); 3, 4 from kermany
    sources = ["nih", "nih", "rsna", "kermany", "kermany"]
    labels = [("Pneumonia",), ("Pneumonia",), ("Pneumonia",), ("Pneumonia",), ("No Finding",)]
    patients = ["a", "b", "c", "d", "e"]
    ids = np.arange(5)
    valid = ~M.exclusion_mask(ids, ids, patients, patients)
    scores = np.array([
        [9, 8, 7, 6, 5],
        [8, 9, 1, 2, 3],
        [7, 1, 9, 6, 5],
        [6, 2, 6, 9, 8],
        [5, 3, 5, 8, 9],
    ], dtype=float)
    topk = M.rank_topk(scores, valid, 2)
    relevant = M.relevance_matrix(labels, labels, "shares")
    out = M.same_source_share(topk, relevant, valid, sources, k=2)
    # query 4 (No Finding) has no relevant case anywhere: left out; queries 0-3 have one in another family
    assert out["queries"] == 4
    # top 2: q0 -> 1 (nih), 2 (nih family) = 2 same; q1 -> 0 (same), 4 (kermany) = 1; q2 -> 0 (same), 3 = 1;
    # q3 -> 4 (same), then 0 or 2 tied at 6 (other) = 1
    assert out["share"] == pytest.approx(5 / 8)
    per_source = M.same_source_share(topk, relevant, valid, sources, k=2, families=False)
    # rsna is its own source: q0 -> 1 same, q2 -> 0 (nih) not same
    assert per_source["share"] < out["share"]

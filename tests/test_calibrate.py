"""Calibrated thresholds: list recall against a brute-force reference, storage with the index, use by the Searcher."""

import math

import numpy as np
import pytest

from medsim.errors import MedsimError
from medsim.evaluate.calibrate import calibrate_index, calibrate_vectors, describe, patient_fold, validation_patients
from medsim.index import Case, CaseIndex
from medsim.operating_point import META_KEY, NONE, threshold_for_recall
from medsim.search import QueryInfo, Searcher


def _data(n=60, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = [("A",), ("B",), ("A", "C"), ("No Finding",)]
    centers = rng.normal(size=(4, dim))
    kinds = rng.integers(0, 4, size=n)
    vectors = centers[kinds] + rng.normal(scale=1.2, size=(n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    patients = [f"p{i // 2}" for i in range(n)]  # two images per patient
    return vectors.astype(np.float32), patients, [labels[k] for k in kinds]


def _reference_lists(vectors, patients, labels, k):
    """Brute force, one query at a time: top-k of other patients' cases and whether each shares a label."""
    scores, relevant = [], []
    for q in range(len(vectors)):
        candidates = [(float(vectors[q] @ vectors[g]), g) for g in range(len(vectors)) if patients[g] != patients[q]]
        candidates.sort(key=lambda sg: -sg[0])
        top = candidates[:k]
        scores.append([s for s, _ in top])
        relevant.append([bool(set(labels[q]) & set(labels[g])) for _, g in top])
    return np.array(scores), np.array(relevant)


def test_threshold_matches_brute_force_list_recall():
    vectors, patients, labels = _data()
    op = calibrate_vectors(vectors, np.arange(len(vectors)), patients, labels, target_recall=0.8, k=5,
                           check_fraction=0.0)
    scores, relevant = _reference_lists(vectors, patients, labels, 5)
    rel_scores = np.sort(scores[relevant])[::-1]
    expected = rel_scores[math.ceil(0.8 * len(rel_scores)) - 1]
    assert op["threshold"] == pytest.approx(expected, abs=1e-5)
    kept = scores >= op["threshold"] - 1e-6
    assert op["calibration"]["list_recall"] == pytest.approx((kept & relevant).sum() / relevant.sum(), abs=1e-5)
    assert op["calibration"]["list_recall"] >= 0.8
    assert op["calibration"]["list_precision"] == pytest.approx((kept & relevant).sum() / kept.sum(), abs=1e-5)
    assert op["calibration"]["precision_at_5_without_threshold"] == pytest.approx(relevant.mean(), abs=1e-5)
    assert op["calibration"]["empty_rate"] == pytest.approx((~kept).all(axis=1).mean(), abs=1e-5)
    # pairwise figures beside it: all other-patient pairs at the same threshold
    n = len(vectors)
    s = vectors @ vectors.T
    other = np.array([[patients[i] != patients[j] for j in range(n)] for i in range(n)])
    rel = np.array([[bool(set(labels[i]) & set(labels[j])) for j in range(n)] for i in range(n)])
    pred = (s >= op["threshold"]) & other
    assert op["calibration"]["pairwise"]["recall"] == pytest.approx((pred & rel).sum() / (rel & other).sum(), abs=1e-5)
    assert op["calibration"]["pairwise_base_rate"] == pytest.approx((rel & other).sum() / other.sum(), abs=1e-5)
    assert op["check"] is None and op["definition"].startswith("list recall@k")


def test_check_split_is_patient_disjoint_and_curve_answers_other_targets():
    vectors, patients, labels = _data(n=120)
    op = calibrate_vectors(vectors, np.arange(len(vectors)), patients, labels, target_recall=0.9, k=10)
    data = op["data"]
    assert data["calibration_queries"] + data["check_queries"] == 120
    assert data["calibration_patients"] + data["check_patients"] == 60  # no patient on both sides
    assert op["check"]["n_queries"] == data["check_queries"]
    assert op["precision_paid"]["measured_on"] == "check patients"
    assert threshold_for_recall(op) == op["threshold"]
    assert threshold_for_recall(op, 0.9) == op["threshold"]
    curve = op["curve"]
    for target in (0.5, 0.73, 0.95):
        t = threshold_for_recall(op, target)
        level = min(v for v in curve["target_recall"] if v >= target)
        assert t == curve["threshold"][curve["target_recall"].index(level)]
    # lower target -> higher (stricter) threshold
    assert threshold_for_recall(op, 0.5) >= threshold_for_recall(op, 0.95)
    with pytest.raises(MedsimError):
        threshold_for_recall(op, 1.5)
    with pytest.raises(MedsimError):
        threshold_for_recall({}, 0.9)
    assert any("threshold" in line for line in describe(op))


def test_patient_fold_is_stable_and_groups_patients():
    folds = patient_fold(["a", "b", "a", "c"], 2)
    assert folds[0] == folds[2]
    assert np.array_equal(folds, patient_fold(["a", "b", "a", "c"], 2))


def test_validation_patients_from_bundle_metadata():
    class Bundle:
        metadata = {"extra": {"split": {"validation_patients": ["p1", "p2"]}}}

    assert validation_patients(Bundle()) == ["p1", "p2"]
    assert validation_patients(None) is None


def _index(tmp_path, vectors, patients, labels):
    index = CaseIndex.create(tmp_path / "idx", model_fingerprint="fp", model_name="test-model", dim=vectors.shape[1],
                             M=8, ef_construction=100, ef=200)
    cases = [Case(sop_uid=f"1.2.{i}", series_uid=f"1.3.{i}", study_uid=f"1.4.{i}", patient_id=patients[i],
                  source_path=f"/x/{i}.png", labels=labels[i]) for i in range(len(vectors))]
    index.add(cases, vectors, "fp")
    index.close()
    return tmp_path / "idx"


def test_calibrate_index_stores_operating_point_used_by_searcher(tmp_path):
    vectors, patients, labels = _data(n=80)
    path = _index(tmp_path, vectors, patients, labels)
    op = calibrate_index(path, target_recall=0.9, k=10)
    assert op["model_fingerprint"] == "fp" and op["data"]["index_cases"] == 80
    with CaseIndex.open(path) as index:
        stored = index.meta[META_KEY]
        assert stored["threshold"] == op["threshold"] and stored["curve"]["threshold"]
    searcher = Searcher.open(path)
    try:
        info = QueryInfo("1.2.0", "1.3.0", "1.4.0", patients[0], "", indexed=True)
        def query(**request):
            return searcher.search(vectors[0], info, searcher.operating_point(k=20, **request))

        result = query()
        assert result.operating_point.source == "stored operating point"
        assert all(hit.score >= op["threshold"] for hit in result.hits)
        plain = query(threshold=NONE)
        assert plain.to_dict()["operating_point"] is None and len(plain.hits) == 20
        assert [h.case.sop_uid for h in result.hits] == [h.case.sop_uid for h in plain.hits[:len(result.hits)]]
        strict = query(target_recall=0.3)
        assert strict.operating_point.threshold == threshold_for_recall(op, 0.3)
        assert len(strict.hits) <= len(result.hits)
        fixed = query(threshold=0.99)
        assert fixed.to_dict()["operating_point"] == {"threshold": 0.99, "source": "requested threshold"}
        assert result.to_dict()["operating_point"]["threshold"] == op["threshold"]
    finally:
        searcher.close()


def test_searcher_without_operating_point_is_plain_top_k(tmp_path):
    vectors, patients, labels = _data(n=20)
    path = _index(tmp_path, vectors, patients, labels)
    with Searcher.open(path) as searcher:
        info = QueryInfo("1.2.0", "1.3.0", "1.4.0", patients[0], "", indexed=True)
        result = searcher.search(vectors[0], info, searcher.operating_point(k=5))
        assert result.to_dict()["operating_point"] is None and len(result.hits) == 5
        with pytest.raises(MedsimError):
            searcher.operating_point(k=5, target_recall=0.9)


def test_calibrate_dry_run_stores_nothing(tmp_path):
    vectors, patients, labels = _data(n=30)
    path = _index(tmp_path, vectors, patients, labels)
    calibrate_index(path, target_recall=0.9, k=5, store=False)
    with CaseIndex.open(path) as index:
        assert META_KEY not in index.meta

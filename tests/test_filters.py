"""Filters (issue 15, part 2): view class, sex, age, findings, modality and study date, applied *inside* the
nearest-neighbour search: k results whenever k cases pass, exactly the top k of those cases; laterals never answer a
frontal query unless asked. In the index, the API (/similar ``filters``) and the CLI (`medsim query` flags)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from orthanc_fixtures import make_app, pacs, service  # noqa: F401

from medsim.errors import MedsimError
from medsim.index import Case, CaseFilter, CaseIndex, view_class
from medsim.vectors import filtered_knn
from medsim.operating_point import OperatingPoint
from medsim.search import FilterError, QueryInfo, Searcher, for_query, parse_filters

DIM = 16
VIEWS = ("PA", "AP", "LL", "", "LATERAL", "AP SUPINE", "RLD")
FINDINGS = ("Effusion", "Nodule", "Cardiomegaly", "Pneumonia")


def _case(i: int, rng) -> Case:
    labels = tuple(f for f in FINDINGS if rng.random() < 0.3)
    attributes = {"sex": "FM"[i % 2], "age": str(20 + i % 60) if i % 11 else f"{(20 + i % 60):03d}Y",
                  "study_date": f"20{10 + i % 15:02d}0{1 + i % 9}15"}
    if i % 13 == 0:
        del attributes["age"]
    return Case(sop_uid=f"1.2.3.{i}", series_uid=f"1.2.4.{i}", study_uid=f"1.2.5.{i}", patient_id=f"p{i // 2}",
                source_path=f"/x/{i}.dcm", view=VIEWS[i % len(VIEWS)], modality=("CR", "DX")[i % 3 == 0],
                labels=labels, attributes=attributes)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """An index of 3000 random vectors with varied views, sexes, ages, findings, modalities and study dates."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("filters") / "index"
    cases = [_case(i, rng) for i in range(3000)]
    vectors = rng.normal(size=(len(cases), DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with CaseIndex.create(path, model_fingerprint="test", model_name="test", dim=DIM) as index:
        index.add(cases, vectors, "test")
    return path, cases, vectors, rng


def _exact(cases, vectors, query, case_filter, k, exclude_patient=None, exclude_sop=None):
    keep = [i for i, c in enumerate(cases) if case_filter.matches(c) and c.patient_id != exclude_patient
            and c.sop_uid != exclude_sop]
    scores = vectors[keep] @ (query / np.linalg.norm(query))
    order = np.argsort(-scores, kind="stable")[:k]
    return [cases[keep[i]].sop_uid for i in order]


FILTERS = [
    {"view": "lateral"},
    {"view": "frontal", "sex": "F"},
    {"age": "40-45", "sex": "M"},  # about 4 %: the exact scan
    {"findings": {"all": ["Effusion", "Nodule"]}, "modality": "DX"},
    {"findings": ["Cardiomegaly", "Pneumonia"]},  # about 50 %: hnswlib's filter callback
    {"study_date": {"from": "2015-01-01", "to": "2019-12-31"}},
    {"age": {"min": 30}, "view": ["lateral", "unknown"]},
    {"view": "any", "age": {"max": 25}, "findings": {"any": ["Nodule"]}},
]


@pytest.mark.parametrize("spec", FILTERS, ids=[json.dumps(f) for f in FILTERS])
def test_filtered_search_is_the_exact_top_k_of_the_matching_cases(synthetic, spec):
    path, cases, vectors, rng = synthetic
    case_filter = parse_filters(spec)
    matching = sum(case_filter.matches(c) for c in cases)
    with CaseIndex.open(path) as index:
        allowed = index.allowed_ids(case_filter)
        assert len(allowed) == matching > 0  # the SQL and the Python reading of the filter agree
        for _ in range(5):
            query = rng.normal(size=DIM).astype(np.float32)
            for k in (1, 10, 50):
                hits = index.search(query, k=k, exclude_patient="p3", exclude_sop_uid="1.2.3.99",
                                    case_filter=case_filter)
                assert len(hits) == min(k, matching)  # k whenever k cases pass: never cut from a top-k list
                assert all(case_filter.matches(h.case) and h.case.patient_id != "p3" for h in hits)
                got = [h.case.sop_uid for h in hits]
                want = _exact(cases, vectors, query, case_filter, k, "p3", "1.2.3.99")
                # hnswlib is approximate on the permissive filters: allow a miss, never a wrong case
                assert len(set(got) & set(want)) >= len(want) - max(1, k // 10)
                assert [round(h.score, 5) for h in hits] == sorted((round(h.score, 5) for h in hits), reverse=True)


def test_very_selective_filter_still_returns_k(synthetic):
    """A filter that keeps a handful of cases scattered over the graph: all of them come back, exactly ranked."""
    path, cases, vectors, rng = synthetic
    case_filter = parse_filters({"age": "41-41", "sex": "M", "modality": "DX"})
    matching = [c for c in cases if case_filter.matches(c)]
    assert 1 <= len(matching) < 100
    with CaseIndex.open(path) as index:
        query = rng.normal(size=DIM).astype(np.float32)
        hits = index.search(query, k=200, case_filter=case_filter)
        assert len(hits) == len(matching)
        assert [h.case.sop_uid for h in hits] == _exact(cases, vectors, query, case_filter, 200)


def test_filtered_knn_falls_back_to_the_exact_scan(synthetic):
    """The graph path (allowed share above the exact-scan cut) returns min(k, allowed) ids, all allowed."""
    path, cases, vectors, rng = synthetic
    with CaseIndex.open(path) as index:
        graph = index.store().graph
        allowed = index.allowed_ids(parse_filters({"sex": "F"}))
        labels, distances = filtered_knn(graph, rng.normal(size=DIM), 200, allowed, ef=16)
        assert len(labels) == 200 and set(labels.tolist()) <= set(allowed.tolist())
        assert np.all(np.diff(distances) >= -1e-6)


def test_laterals_never_answer_a_frontal_query_unless_asked(synthetic):
    path, cases, vectors, rng = synthetic
    lateral = next(i for i, c in enumerate(cases) if view_class(c.view) == "lateral")
    frontal = next(i for i, c in enumerate(cases) if view_class(c.view) == "frontal")
    with Searcher(CaseIndex.open(path)) as searcher:
        op = OperatingPoint("top-k", 50)
        for query_index, forbidden in ((frontal, "lateral"), (lateral, "frontal")):
            case = cases[query_index]
            info = QueryInfo(case.sop_uid, case.series_uid, case.study_uid, case.patient_id, case.view, True)
            # the query's nearest neighbour is a copy of the query seen from the other side: still never returned
            result = searcher.search(vectors[query_index], info, op)
            assert len(result.hits) == 50
            assert forbidden not in {view_class(h.case.view) for h in result.hits}
            assert result.filters.views == (view_class(case.view), "unknown")
            asked = searcher.search(vectors[query_index], info, op, filters=parse_filters({"view": forbidden}))
            assert {view_class(h.case.view) for h in asked.hits} == {forbidden}
            anything = searcher.search(vectors[query_index], info, op, filters=parse_filters({"view": "any"}))
            assert {view_class(h.case.view) for h in anything.hits} >= {"frontal", "lateral"}
        unknown = QueryInfo("9.9", "9.9", "9.9", None, "", False)
        assert not for_query(None, "")  # a query of unknown view: any view answers
        assert len(searcher.search(vectors[0], unknown, op).hits) == 50


def test_view_classes():
    assert [view_class(v) for v in ("PA", "ap", "AP SUPINE", "LL", "RL", "LATERAL", "", "RLD", "LAO")] == [
        "frontal", "frontal", "frontal", "lateral", "lateral", "lateral", "unknown", "unknown", "unknown"]


@pytest.mark.parametrize("spec, message", [
    ([], "must be an object"),
    ({"colour": "red"}, "unknown filter"),
    ({"view": "oblique"}, "unknown view class"),
    ({"view": []}, "filters.view"),
    ({"sex": "X"}, "filters.sex"),
    ({"sex": 1}, "filters.sex"),
    ({"age": "old"}, "filters.age"),
    ({"age": {"min": 60, "max": 40}}, "min is above max"),
    ({"age": {"min": True}}, "numbers of years"),
    ({"age": {"low": 3}}, "filters.age"),
    ({"findings": []}, "1 to 50"),
    ({"findings": {"some": ["A"]}}, "filters.findings"),
    ({"findings": [3]}, "1 to 50"),
    ({"modality": "C;R"}, "DICOM modality"),
    ({"study_date": {"from": "2020-13-01"}}, "not a calendar date"),
    ({"study_date": {"from": "yesterday"}}, "YYYY-MM-DD"),
    ({"study_date": {"from": "2021-01-01", "to": "2020-01-01"}}, "after"),
    ({"study_date": {}}, "filters.study_date"),
])
def test_invalid_filters_say_what_is_wrong(spec, message):
    with pytest.raises(FilterError, match=message):
        parse_filters(spec)
    assert issubclass(FilterError, MedsimError)


def test_parsed_filters():
    f = parse_filters({"view": ["lateral", "frontal"], "sex": "female", "age": "40-", "findings": "Nodule",
                       "modality": ["cr", "DX"], "study_date": {"to": "20201231"}})
    assert f == CaseFilter(views=("frontal", "lateral"), sex="F", age_min=40.0, age_max=None, findings=("Nodule",),
                           findings_mode="any", modalities=("CR", "DX"), date_from=None, date_to="20201231")
    assert not parse_filters({"view": "any"}) and not parse_filters({}) and not parse_filters(None)
    assert f.to_dict()["findings"] == {"any": ["Nodule"]}


# ---- the API ---------------------------------------------------------------------------------------------------------


def _similar(client, status=200, **body):
    response = client.post("/api/v1/similar", json=body)
    assert response.status_code == status, response.get_json()
    return response.get_json()


def test_api_filters(make_app, pacs):
    client = make_app().test_client()
    query = pacs.indexed[0]
    plain = _similar(client, sop_uid=query.sop_uid, k=20, threshold="none", group_by="image")
    assert plain["filters"] == {"view": ["frontal", "unknown"]}  # the sample's views are AP/PA: frontal queries
    pneumonia = _similar(client, sop_uid=query.sop_uid, k=20, threshold="none", group_by="image",
                         filters={"findings": {"all": ["Pneumonia"]}, "view": "any"})
    assert pneumonia["filters"] == {"view": ["frontal", "lateral", "unknown"], "findings": {"all": ["Pneumonia"]}}
    assert pneumonia["results"] and all("Pneumonia" in row["labels"] for row in pneumonia["results"])
    expected = [row for row in plain["results"] if "Pneumonia" in row["labels"]]
    assert [row["sop_uid"] for row in pneumonia["results"]] == [row["sop_uid"] for row in expected]
    none = _similar(client, sop_uid=query.sop_uid, k=5, threshold="none", filters={"view": "lateral"})
    assert none["results"] == []
    female = _similar(client, sop_uid=query.sop_uid, k=5, threshold="none", filters={"sex": "F"})
    assert female["results"] == []  # the sample export records no sex: a case without it does not pass
    # form/query-string uploads give filters as a JSON string
    by_query_string = client.post("/api/v1/similar?filters=" + json.dumps({"findings": ["Pneumonia"]}),
                                  json={"sop_uid": query.sop_uid, "threshold": "none", "group_by": "image", "k": 20})
    assert by_query_string.status_code == 200
    assert [r["sop_uid"] for r in by_query_string.get_json()["results"]] == [r["sop_uid"] for r in expected]


@pytest.mark.parametrize("filters, status", [
    ({"view": "sideways"}, 400), ("lateral", 400), ({"age": {"min": "forty"}}, 400), ({"nope": 1}, 400),
])
def test_api_rejects_bad_filters(make_app, pacs, filters, status):
    client = make_app().test_client()
    body = _similar(client, status=status, sop_uid=pacs.indexed[0].sop_uid, filters=filters)
    assert body["error"]["code"] == "invalid-parameter"


# ---- the CLI ---------------------------------------------------------------------------------------------------------


def test_cli_query_filters(sample_index, capsys):
    from medsim.cli import main
    from medsim.index import CaseIndex as Index

    path, _ = sample_index
    with Index.open(path) as index:
        query = next(c for c in index.cases() if c.view)
    assert main(["query", query.source_path, "--index", str(path), "--no-threshold", "--view", "lateral", "--sex",
                 "F", "--age", "40-60", "--finding", "Pneumonia", "--finding", "Effusion", "--all-findings",
                 "--modality", "CR", "--date-from", "2000-01-01", "--date-to", "2030-12-31", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"] == []
    assert out["filters"] == {"view": ["lateral"], "sex": "F", "age": {"min": 40.0, "max": 60.0},
                              "findings": {"all": ["Pneumonia", "Effusion"]}, "modality": ["CR"],
                              "study_date": {"from": "20000101", "to": "20301231"}}
    assert main(["query", query.source_path, "--index", str(path), "--no-threshold", "-k", "20", "--finding",
                 "Pneumonia", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"] and all("Pneumonia" in row["labels"] for row in out["results"])
    assert main(["query", query.source_path, "--index", str(path), "--finding", "Pneumonia"]) == 0
    assert "filters: " in capsys.readouterr().out
    assert main(["query", query.source_path, "--index", str(path), "--age", "sixty"]) != 0
    assert "filters.age" in capsys.readouterr().err

"""The similar-case API against a real Orthanc: queries by indexed UIDs, by non-indexed UIDs (fetched from the PACS),
by upload; grouping; same-patient exclusion; calibrated threshold vs explicit k; cases, thumbnails, index, health."""

import io
import re
from pathlib import Path

import pytest

from medsim.dicom import read_dicom
from medsim.index import CaseIndex
from orthanc_fixtures import PHI_BIRTH_DATE, PHI_NAME, make_app, pacs, service  # noqa: F401

UID = r"[0-9]+(\.[0-9]+)*"


@pytest.fixture
def client(make_app):
    return make_app().test_client()


def similar(client, **body):
    response = client.post("/api/v1/similar", json=body)
    assert response.status_code == 200, response.get_json()
    assert_no_phi(response.get_data(as_text=True))
    return response.get_json()


def assert_no_phi(text: str) -> None:
    """No patient names, birth dates or raw patient IDs: only pseudonyms and UIDs."""
    for forbidden in (PHI_NAME, PHI_BIRTH_DATE, "Anon^", "KERMANY-", "PatientName", "00100010", "00100030"):
        assert forbidden not in text, forbidden


def expected_hits(pacs, vector, patient_id, sop_uid, k, include_same_patient=False):
    with CaseIndex.open(pacs.index_path) as index:
        hits = index.search(vector, k=k, exclude_patient=None if include_same_patient else patient_id,
                            exclude_sop_uid=sop_uid)
        return [(h.case.sop_uid, h.score) for h in hits]


def stored_vector(pacs, sop_uid):
    with CaseIndex.open(pacs.index_path) as index:
        return index.vector(sop_uid)


def test_query_by_indexed_uids(client, pacs, service):
    query = pacs.indexed[0]
    body = similar(client, **query.uids, k=5, threshold="none", group_by="image")
    assert body["query"].pop("transfer_syntax", "").startswith("1.2.840.10008.1.2")  # issue 15: for the viewer
    assert body["query"] == {**query.uids, "view": "AP", "indexed": True, "source": "index",
                             "patient": service.patient_ref(query.patient_id)}
    assert body["operating_point"]["mode"] == "top-k" and body["operating_point"]["k"] == 5
    results = body["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    want = expected_hits(pacs, stored_vector(pacs, query.sop_uid), query.patient_id, query.sop_uid, 5)
    assert [r["sop_uid"] for r in results] == [sop for sop, _ in want]
    assert [r["score"] for r in results] == pytest.approx([s for _, s in want], abs=1e-5)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    by_sop = {i.sop_uid: i for i in pacs.indexed}
    for row in results:
        case = by_sop[row["sop_uid"]]
        assert (row["study_uid"], row["series_uid"]) == (case.study_uid, case.series_uid)
        assert row["labels"] == [v for v in case.labels.split("|") if v]
        assert row["patient"] == service.patient_ref(case.patient_id) and row["patient"].startswith("anon-")
        assert row["view"] in ("AP", "PA")
        # absolute (issue 15): a viewer on another origin can load them without --public-url
        assert re.fullmatch(rf"http://localhost/api/v1/cases/{UID}/thumbnail", row["thumbnail_url"])
        assert row["viewer_url"] == f"http://localhost/viewer?StudyInstanceUIDs={case.study_uid}"
        assert case.patient_id != query.patient_id
    assert set(body) >= {"query", "operating_point", "results", "group_by", "include_same_patient", "model",
                         "took_ms"}


def test_query_by_sop_uid_alone_when_indexed(client, pacs):
    query = pacs.indexed[1]
    body = similar(client, sop_uid=query.sop_uid, k=3, threshold="none")
    assert body["query"]["indexed"] and body["query"]["study_uid"] == query.study_uid
    assert len(body["results"]) == 3


def test_query_by_non_indexed_uids_fetches_from_the_pacs(client, pacs, service):
    query = pacs.pacs_only[0]  # JPEG 2000 lossless: fetched as stored, decoded here
    body = similar(client, **query.uids, k=6, threshold="none", group_by="image")
    assert body["query"].pop("transfer_syntax", "").startswith("1.2.840.10008.1.2")  # issue 15: for the viewer
    assert body["query"] == {**query.uids, "view": "AP", "indexed": False, "source": "pacs",
                             "patient": service.patient_ref(query.patient_id)}
    vector = service.embed(read_dicom(query.path))
    want = expected_hits(pacs, vector, query.patient_id, query.sop_uid, 6)
    assert [r["sop_uid"] for r in body["results"]] == [sop for sop, _ in want]
    assert [r["score"] for r in body["results"]] == pytest.approx([s for _, s in want], abs=1e-4)
    again = similar(client, **query.uids, k=6, threshold="none", group_by="image")  # the vector is cached now
    assert again["results"] == body["results"]


def test_query_by_upload(client, pacs):
    query = pacs.pacs_only[1]
    by_uids = similar(client, **query.uids, k=4, threshold="none", group_by="image")
    data = query.path.read_bytes()
    upload = client.post("/api/v1/similar", data={"file": (io.BytesIO(data), "query.dcm"), "k": "4",
                                                  "threshold": "none", "group_by": "image"}, content_type="multipart/form-data")
    assert upload.status_code == 200, upload.get_json()
    body = upload.get_json()
    assert body["query"]["source"] == "upload" and body["query"]["indexed"] is False
    assert body["query"]["sop_uid"] == query.sop_uid
    assert [r["sop_uid"] for r in body["results"]] == [r["sop_uid"] for r in by_uids["results"]]
    assert [r["score"] for r in body["results"]] == pytest.approx([r["score"] for r in by_uids["results"]], abs=1e-5)
    raw = client.post("/api/v1/similar?k=4&threshold=none&group_by=image", data=data, content_type="application/dicom")
    assert raw.status_code == 200 and raw.get_json()["results"] == body["results"]
    indexed = pacs.indexed[2]
    known = client.post("/api/v1/similar", data={"file": (io.BytesIO(indexed.path.read_bytes()), "x.dcm")},
                        content_type="multipart/form-data")
    assert known.status_code == 200 and known.get_json()["query"]["indexed"] is True


def test_group_by_study_keeps_each_studys_best_image(client, pacs):
    two_images = pacs.second_view.study_uid
    query = next(i for i in pacs.indexed if i.patient_id != pacs.second_view.patient_id)
    images = similar(client, **query.uids, k=100, threshold="none", group_by="image")["results"]
    studies = similar(client, **query.uids, k=100, threshold="none", group_by="study")["results"]
    assert [r["study_uid"] for r in images].count(two_images) == 2
    assert len({r["study_uid"] for r in studies}) == len(studies)
    row = next(r for r in studies if r["study_uid"] == two_images)
    assert row["matched_images"] == 2
    best = max((r for r in images if r["study_uid"] == two_images), key=lambda r: r["score"])
    assert row["score"] == best["score"]
    assert [r["rank"] for r in studies] == list(range(1, len(studies) + 1))
    few = similar(client, **query.uids, k=3, threshold="none")  # group_by defaults to study
    assert few["group_by"] == "study" and len({r["study_uid"] for r in few["results"]}) == 3


def test_same_patient_is_excluded_unless_asked(client, pacs, service):
    patient = "KERMANY-12917FD6"  # two studies of one patient
    query, other = pacs.by_patient(patient)
    default = similar(client, **query.uids, k=100, threshold="none")
    assert default["include_same_patient"] is False
    assert service.patient_ref(patient) not in {r["patient"] for r in default["results"]}
    assert other.study_uid not in {r["study_uid"] for r in default["results"]}
    included = similar(client, **query.uids, k=100, threshold="none", include_same_patient=True)
    assert other.sop_uid in {r["sop_uid"] for r in included["results"]}
    assert query.sop_uid not in {r["sop_uid"] for r in included["results"]}  # never the query itself
    assert len(included["results"]) == len(default["results"]) + 1


def calibrated_query(pacs):
    """The indexed instance whose calibrated list is shortest but not empty, and that length."""
    op = pacs.operating_point
    best = None
    with CaseIndex.open(pacs.index_path) as index:
        for instance in pacs.indexed:
            hits = index.search(index.vector(instance.sop_uid), k=op["k"], exclude_patient=instance.patient_id,
                                exclude_sop_uid=instance.sop_uid)
            kept = sum(h.score >= op["threshold"] - 1e-6 for h in hits)
            if 0 < kept < op["k"] and (best is None or kept < best[1]):
                best = (instance, kept)
    assert best is not None, "no query in the sample index is cut by the calibrated threshold"
    return best


def test_calibrated_threshold_versus_explicit_k(client, pacs, service, monkeypatch):
    from medsim.operating_point import threshold_for_recall

    query, kept = calibrated_query(pacs)
    stored = pacs.operating_point
    threshold = stored["threshold"]
    calibrated = similar(client, **query.uids, group_by="image")
    op = calibrated["operating_point"]
    assert op["mode"] == "calibrated" and op["threshold"] == pytest.approx(threshold)
    assert op["target_recall"] == 0.9 and op["k"] == stored["k"] == 10
    assert len(calibrated["results"]) == kept < 10
    assert all(r["score"] >= threshold - 1e-6 for r in calibrated["results"])

    explicit = similar(client, **query.uids, k=8, threshold="none", group_by="image")
    assert explicit["operating_point"]["mode"] == "top-k" and explicit["operating_point"]["threshold"] is None
    assert len(explicit["results"]) == 8 and min(r["score"] for r in explicit["results"]) < threshold
    capped = similar(client, **query.uids, k=2, group_by="image")  # k caps the calibrated list
    assert capped["operating_point"]["mode"] == "calibrated" and len(capped["results"]) == min(2, kept)

    by_threshold = similar(client, **query.uids, threshold=-1.0, k=5, group_by="image")
    assert by_threshold["operating_point"]["mode"] == "threshold" and len(by_threshold["results"]) == 5

    relaxed = similar(client, **query.uids, target_recall=1.0, group_by="image")
    assert relaxed["operating_point"]["mode"] == "target_recall"
    assert relaxed["operating_point"]["threshold"] == pytest.approx(threshold_for_recall(stored, 1.0))
    assert relaxed["operating_point"]["threshold"] <= threshold
    assert len(relaxed["results"]) >= len(calibrated["results"])

    both = client.post("/api/v1/similar", json={**query.uids, "target_recall": 0.9, "threshold": 0.5})
    assert both.status_code == 422 and both.get_json()["error"]["code"] == "operating-point"
    for bad in ({"target_recall": 1.5}, {"target_recall": 0}, {"threshold": "all"}, {"threshold": 2}):
        assert client.post("/api/v1/similar", json={**query.uids, **bad}).status_code == 400, bad

    monkeypatch.delitem(service.index.meta, "operating_point")  # an index without calibration
    plain = similar(client, **query.uids, group_by="image")
    assert plain["operating_point"]["mode"] == "top-k" and len(plain["results"]) == 10
    no_calibration = client.post("/api/v1/similar", json={**query.uids, "target_recall": 0.9})
    assert no_calibration.status_code == 422 and "calibrat" in no_calibration.get_json()["error"]["message"]


def test_index_resource(client, pacs, service):
    response = client.get("/api/v1/index")
    assert response.status_code == 200
    info = response.get_json()
    assert info["cases"] == len(pacs.indexed)
    assert info["studies"] == len({i.study_uid for i in pacs.indexed})
    assert info["model"]["fingerprint"] == service.index.model_fingerprint and info["model"]["dim"] == 512
    assert info["operating_point"]["calibrated"] is True and info["operating_point"]["k"] == 10
    assert info["operating_point"]["threshold"] == pytest.approx(pacs.operating_point["threshold"])
    assert "data" not in info["operating_point"]["calibration"]  # it names server-side paths
    assert info["label_vocabulary"] == ["Bacterial", "No Finding", "Pneumonia"]
    assert info["views"] == {"AP": len(pacs.indexed) - 1, "PA": 1}
    assert "path" not in info
    assert_no_phi(response.get_data(as_text=True))


def test_case_and_thumbnail(client, pacs, service):
    from PIL import Image

    case = pacs.indexed[3]
    info = client.get(f"/api/v1/cases/{case.sop_uid}")
    assert info.status_code == 200 and info.get_json()["study_uid"] == case.study_uid
    response = client.get(f"/api/v1/cases/{case.sop_uid}/thumbnail")
    assert response.status_code == 200 and response.mimetype == "image/png"
    image = Image.open(io.BytesIO(response.data))
    assert image.mode == "L" and max(image.size) == 256
    assert "max-age" in response.headers["Cache-Control"]
    etag = response.headers["ETag"]
    cached_files = list(service.thumbnails.folder.glob("*.png"))
    assert cached_files, "thumbnail not cached on disk"
    again = client.get(f"/api/v1/cases/{case.sop_uid}/thumbnail", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert client.get(f"/api/v1/cases/{case.sop_uid}/thumbnail").data == response.data
    assert client.get("/api/v1/cases/1.2.3.4/thumbnail").status_code == 404
    assert client.get("/api/v1/cases/not-a-uid/thumbnail").status_code == 400
    assert client.get(f"/api/v1/cases/{pacs.pacs_only[0].sop_uid}").status_code == 404  # not indexed


def test_healthz(client, service, monkeypatch):
    from medsim.dicomweb import DicomWebClient
    from orthanc_fixtures import closed_port_url

    body = client.get("/healthz").get_json()
    assert body["status"] == "ok" and body["index"]["loaded"] and body["pacs"]["reachable"]
    monkeypatch.setattr(service, "pacs", DicomWebClient(closed_port_url(), timeout=1))
    monkeypatch.setattr(service, "_pacs_health", None)
    down = client.get("/healthz")
    assert down.status_code == 200 and down.get_json()["status"] == "degraded"
    assert down.get_json()["pacs"]["reachable"] is False
    monkeypatch.setattr(service, "_pacs_health", None)


def test_openapi_document_matches_the_routes(make_app):
    app = make_app()
    spec = app.test_client().get("/api/v1/openapi.yaml")
    assert spec.status_code == 200 and spec.mimetype == "application/yaml"
    text = spec.get_data(as_text=True)
    documented = set(re.findall(r"^  (/[^:\s]+):", text, flags=re.MULTILINE))
    routes = {re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule) for rule in app.url_map.iter_rules()
              if rule.rule.startswith("/api/") or rule.rule == "/healthz"}
    assert documented == routes
    docs_copy = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
    assert docs_copy.read_text() == text, "docs/openapi.yaml differs from medsim/server/openapi.yaml"


def test_upload_with_patient_name_returns_no_phi(client, pacs):
    data = pacs.second_view.path.read_bytes()
    assert PHI_NAME.encode() in data
    response = client.post("/api/v1/similar", data=data, content_type="application/dicom")
    assert response.status_code == 200
    assert_no_phi(response.get_data(as_text=True))
    assert response.get_json()["query"]["indexed"] is True

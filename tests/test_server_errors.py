"""Bad input and failures: each gets a JSON 4xx/5xx with a reason; the server stays up and the index is untouched."""

import io
import json

import pytest

from medsim.dicomweb import DicomWebClient
from medsim.server.state import LRU
from orthanc_fixtures import closed_port_url, index_digest, make_app, pacs, service, silent_server  # noqa: F401


@pytest.fixture
def client(make_app, pacs):
    before = index_digest(pacs.index_path)
    app = make_app()
    test_client = app.test_client()
    yield test_client
    assert test_client.get("/healthz").status_code == 200, "the server must stay up"
    assert index_digest(pacs.index_path) == before, "a request changed the index"


def error(response, status, code=None):
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:300])
    assert response.mimetype == "application/json"
    body = response.get_json()["error"]
    assert body["status"] == status and body["message"] and body["request_id"]
    if code is not None:
        assert body["code"] == code, body
    return body


def post_json(client, body):
    return client.post("/api/v1/similar", json=body)


def test_unknown_uids(client, pacs):
    known = pacs.indexed[0]
    error(post_json(client, {"sop_uid": "1.2.3.4.5"}), 404, "not-indexed")
    body = error(post_json(client, {"study_uid": known.study_uid, "series_uid": known.series_uid,
                                    "sop_uid": "1.2.3.4.5"}), 404, "not-found")
    assert "1.2.3.4.5" in body["message"]
    error(post_json(client, {"study_uid": "1.2.3", "series_uid": "1.2.4", "sop_uid": known.sop_uid}), 409,
          "uid-mismatch")


def test_pacs_down(client, pacs, service, monkeypatch):
    monkeypatch.setattr(service, "pacs", DicomWebClient(closed_port_url(), timeout=2))
    monkeypatch.setattr(service, "vectors", LRU(16))
    query = pacs.pacs_only[0]
    body = error(post_json(client, query.uids), 502, "pacs-unavailable")
    assert "unreachable" in body["message"]
    indexed = pacs.indexed[0]  # indexed queries still work without the PACS
    assert post_json(client, {**indexed.uids, "k": 2}).status_code == 200


def test_pacs_timeout(client, pacs, service, monkeypatch):
    monkeypatch.setattr(service, "vectors", LRU(16))
    with silent_server() as url:
        monkeypatch.setattr(service, "pacs", DicomWebClient(url, timeout=0.5, connect_timeout=0.5))
        error(post_json(client, pacs.pacs_only[1].uids), 504, "pacs-timeout")


def test_non_chest_and_non_image_instances_from_the_pacs(client, pacs):
    body = error(post_json(client, pacs.ct.uids), 422, "not-chest-radiograph")
    assert "CT" in body["message"]
    error(post_json(client, pacs.sr.uids), 422, "not-an-image")


def test_bad_uploads(client, pacs):
    def upload(data, name="x.dcm"):
        return client.post("/api/v1/similar", data={"file": (io.BytesIO(data), name)},
                           content_type="multipart/form-data")

    error(upload(pacs.truncated.read_bytes()), 422)
    assert upload(pacs.truncated.read_bytes()).get_json()["error"]["code"] in ("corrupt", "decode-error")
    error(upload(pacs.not_dicom[0].read_bytes(), "notes.txt"), 415, "not-dicom")
    error(upload(b""), 400)
    error(upload(pacs.ct.path.read_bytes()), 422, "not-chest-radiograph")
    error(client.post("/api/v1/similar", data={"k": "3"}, content_type="multipart/form-data"), 400, "bad-request")
    error(client.post("/api/v1/similar", data=b"", content_type="application/dicom"), 400)


def test_huge_upload(make_app, pacs):
    app = make_app(max_upload_bytes=1024 * 1024)
    client = app.test_client()
    big = pacs.indexed[0].path.read_bytes() * 2
    assert len(big) > 1024 * 1024
    body = error(client.post("/api/v1/similar", data={"file": (io.BytesIO(big), "x.dcm")},
                             content_type="multipart/form-data"), 413, "too-large")
    assert str(1024 * 1024) in body["message"]
    error(client.post("/api/v1/similar", data=big, content_type="application/dicom"), 413, "too-large")
    huge_json = json.dumps({"sop_uid": "1.2", "k": 1, "pad": "x" * 100_000})
    error(client.post("/api/v1/similar", data=huge_json, content_type="application/json"), 413, "too-large")
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("raw, code", [
    (b"{", "malformed-json"),
    (b"[1, 2]", "malformed-json"),
    (b'"sop_uid"', "malformed-json"),
    (b"\xff\xfe", "malformed-json"),
    (b'{"sop_uid": "1.2", "top_k": 3}', "unknown-field"),
    (b'{"k": 3}', "bad-request"),
    (b'{"sop_uid": "1.2.abc"}', "invalid-uid"),
    (b'{"sop_uid": "' + b"1." * 40 + b'1"}', "invalid-uid"),
    (b'{"sop_uid": 12}', "invalid-uid"),
])
def test_malformed_json(client, raw, code):
    error(client.post("/api/v1/similar", data=raw, content_type="application/json"), 400, code)


@pytest.mark.parametrize("params", [
    {"k": 0}, {"k": 101}, {"k": "5"}, {"k": 2.5}, {"k": True}, {"threshold": "high"}, {"threshold": 1.5},
    {"target_recall": 0}, {"target_recall": 2}, {"include_same_patient": "yes"}, {"group_by": "series"},
])
def test_invalid_parameters(client, pacs, params):
    error(post_json(client, {**pacs.indexed[0].uids, **params}), 400, "invalid-parameter")


def test_content_type_and_methods(client, pacs):
    error(client.post("/api/v1/similar", data=json.dumps(pacs.indexed[0].uids), content_type="text/plain"), 415,
          "unsupported-media-type")
    error(client.post("/api/v1/similar", data=json.dumps(pacs.indexed[0].uids)), 415)
    error(client.get("/api/v1/similar"), 405, "method-not-allowed")
    error(client.get("/api/v1/nothing-here"), 404, "not-found")
    error(client.delete("/api/v1/index"), 405)

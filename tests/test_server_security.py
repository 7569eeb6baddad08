"""Auth on/off, signed thumbnail URLs, CORS, the audit log, and settings from flags, environment and files."""

import json
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from medsim.server.settings import Settings, SettingsError, settings_from_args
from orthanc_fixtures import PHI_BIRTH_DATE, PHI_NAME, make_app, pacs, service  # noqa: F401

TOKEN = "t0ken-for-the-viewer-0123456789"
OTHER = "another-token-for-a-notebook-42"
VIEWER = "http://localhost:3000"


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_auth_off_on_loopback(make_app, pacs):
    client = make_app().test_client()
    assert client.post("/api/v1/similar", json={"sop_uid": pacs.indexed[0].sop_uid, "k": 1}).status_code == 200
    assert client.get("/api/v1/index").status_code == 200


def test_auth_on(make_app, pacs):
    client = make_app(tokens={"viewer": TOKEN, "notebook": OTHER}).test_client()
    query = {"sop_uid": pacs.indexed[0].sop_uid, "k": 2}
    missing = client.post("/api/v1/similar", json=query)
    assert missing.status_code == 401 and missing.get_json()["error"]["code"] == "unauthorized"
    assert client.post("/api/v1/similar", json=query, headers=bearer("wrong-token-wrong-token")).status_code == 401
    assert client.post("/api/v1/similar", json=query, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert client.get("/api/v1/index").status_code == 401
    assert client.get(f"/api/v1/cases/{pacs.indexed[0].sop_uid}").status_code == 401
    for token in (TOKEN, OTHER):
        assert client.post("/api/v1/similar", json=query, headers=bearer(token)).status_code == 200
    assert client.get("/api/v1/index", headers=bearer(TOKEN)).status_code == 200
    assert client.get("/healthz").status_code == 200  # open: probes carry no token
    assert client.get("/api/v1/openapi.yaml").status_code == 200


def test_signed_thumbnail_urls(make_app, pacs, service):
    client = make_app(tokens={"viewer": TOKEN}).test_client()
    body = client.post("/api/v1/similar", json={"sop_uid": pacs.indexed[0].sop_uid, "k": 1},
                       headers=bearer(TOKEN)).get_json()
    url = body["results"][0]["thumbnail_url"]
    parts = urlsplit(url)
    params = parse_qs(parts.query)
    assert set(params) == {"exp", "sig"}
    assert client.get(url).status_code == 200  # an <img src> works without the header
    sop_uid = parts.path.split("/")[-2]
    tampered = f"{parts.path}?exp={params['exp'][0]}&sig={'0' * 32}"
    assert client.get(tampered).status_code == 401
    other = pacs.indexed[1].sop_uid  # a signature is for one case only
    assert client.get(f"/api/v1/cases/{other}/thumbnail?{parts.query}").status_code == 401
    past = int(time.time()) - 10
    expired = f"{parts.path}?exp={past}&sig={service.sign(sop_uid, past)}"
    assert client.get(expired).status_code == 401
    assert client.get(parts.path).status_code == 401
    # signed URLs open nothing else
    assert client.get(f"/api/v1/cases/{sop_uid}?{parts.query}").status_code == 401


def test_cors_allow_list(make_app, pacs):
    client = make_app(tokens={"viewer": TOKEN}, cors_origins=[VIEWER]).test_client()
    preflight = client.options("/api/v1/similar", headers={
        "Origin": VIEWER, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 204  # no token needed for a preflight
    assert preflight.headers["Access-Control-Allow-Origin"] == VIEWER
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    response = client.post("/api/v1/similar", json={"sop_uid": pacs.indexed[0].sop_uid, "k": 1},
                           headers={**bearer(TOKEN), "Origin": VIEWER})
    assert response.status_code == 200 and response.headers["Access-Control-Allow-Origin"] == VIEWER
    assert "Origin" in response.headers["Vary"]
    evil = client.post("/api/v1/similar", json={"sop_uid": pacs.indexed[0].sop_uid, "k": 1},
                       headers={**bearer(TOKEN), "Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in evil.headers
    evil_preflight = client.options("/api/v1/similar", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in evil_preflight.headers


def test_audit_log(make_app, pacs, tmp_path):
    log = tmp_path / "audit.jsonl"
    client = make_app(tokens={"viewer": TOKEN}, audit_log=log).test_client()
    query = pacs.second_view  # the instance whose header carries a patient name and birth date
    client.post("/api/v1/similar", json={**query.uids, "k": 3, "threshold": "none"}, headers=bearer(TOKEN))
    client.post("/api/v1/similar", json=query.uids)
    client.post("/api/v1/similar", data=query.path.read_bytes(), content_type="application/dicom",
                headers=bearer(TOKEN))
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3
    ok, denied, upload = records
    assert ok["client"] == "viewer" and ok["status"] == 200 and ok["sop_uid"] == query.sop_uid
    assert ok["study_uid"] == query.study_uid and ok["results"] == 3 and ok["k"] == 3 and ok["mode"] == "top-k"
    assert ok["method"] == "POST" and ok["path"] == "/api/v1/similar" and ok["remote_addr"]
    assert ok["time"].endswith("+00:00") and ok["request_id"]
    assert denied["client"] == "anonymous" and denied["status"] == 401 and denied["error"] == "unauthorized"
    assert upload["source"] == "upload" and upload["sop_uid"] == query.sop_uid and upload["upload_bytes"] > 0
    text = log.read_text()
    for forbidden in (PHI_NAME, PHI_BIRTH_DATE, "KERMANY-", TOKEN):
        assert forbidden not in text


def test_listening_beyond_loopback_needs_tokens(pacs, tmp_path):
    with pytest.raises(SettingsError, match="beyond loopback"):
        Settings(index=pacs.index_path, host="0.0.0.0").validate()
    Settings(index=pacs.index_path, host="0.0.0.0", tokens={"viewer": TOKEN}).validate()
    Settings(index=pacs.index_path, host="::1").validate()
    with pytest.raises(SettingsError, match="shorter"):
        Settings(index=pacs.index_path, tokens={"viewer": "short"}).validate()
    with pytest.raises(SettingsError, match="wildcard"):
        Settings(index=pacs.index_path, cors_origins=["*"]).validate()
    with pytest.raises(SettingsError, match="placeholder"):
        Settings(index=pacs.index_path, viewer_url_template="/v?study={patient}").validate()
    with pytest.raises(SettingsError, match="no index"):
        Settings().validate()
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# clients\nviewer:{TOKEN}\n{OTHER}\n")
    tokens = Settings(index=pacs.index_path, token_file=token_file).all_tokens()
    assert tokens == {"viewer": TOKEN, "tokens:3": OTHER}


def test_settings_sources_and_priority(tmp_path):
    toml = tmp_path / "medsim.toml"
    toml.write_text('[serve]\nindex = "idx"\nport = 9001\nthreads = 4\ncors_origins = ["http://a:1"]\n'
                    '[serve.tokens]\nviewer = "' + TOKEN + '"\n')
    settings = Settings.load(config_file=toml, env={})
    assert settings.index == tmp_path / "idx" and settings.port == 9001 and settings.threads == 4
    assert settings.tokens == {"viewer": TOKEN} and settings.cors_origins == ["http://a:1"]
    env = {"MEDSIM_PORT": "9002", "MEDSIM_CORS_ORIGINS": "http://b:2,http://c:3", "MEDSIM_TOKEN": OTHER,
           "MEDSIM_PSEUDONYMIZE_PATIENT_IDS": "false", "MEDSIM_HOME": "/elsewhere"}
    settings = Settings.load(config_file=toml, env=env, overrides={"port": 9003, "threads": None})
    assert settings.port == 9003 and settings.threads == 4  # flags > env > file; unset flags do not count
    assert settings.cors_origins == ["http://b:2", "http://c:3"] and settings.tokens == {"default": OTHER}
    assert settings.pseudonymize_patient_ids is False
    json_file = tmp_path / "medsim.json"
    json_file.write_text(json.dumps({"index": "/abs/idx", "pacs_url": "http://127.0.0.1:8042/dicom-web"}))
    from_env_file = Settings.load(env={"MEDSIM_CONFIG": str(json_file)})
    assert from_env_file.index == Path("/abs/idx") and from_env_file.pacs_url.endswith("/dicom-web")
    with pytest.raises(SettingsError, match="unknown setting"):
        Settings.from_dict({"prot": 1})
    with pytest.raises(SettingsError, match="'port'"):
        Settings.load(env={"MEDSIM_PORT": "eighty"})
    with pytest.raises(SettingsError, match="not valid"):
        bad = tmp_path / "bad.toml"
        bad.write_text("port = = 1")
        Settings.load(config_file=bad, env={})
    assert "pacs_password" in Settings(pacs_password="secret").public() and \
        Settings(pacs_password="secret").public()["pacs_password"] == "***"


def test_cli_flags_map_onto_settings(tmp_path):
    from medsim.cli import _parser

    args = _parser().parse_args(["serve", "--index", str(tmp_path), "--pacs", "http://127.0.0.1:8042/dicom-web",
                                 "--port", "8123", "--cors-origin", VIEWER, "--cors-origin", "http://x:1",
                                 "--max-upload-mb", "2", "--viewer-url-template", "/ohif/viewer?s={study_uid}"])
    settings = settings_from_args(args)
    assert settings.index == tmp_path and settings.port == 8123 and settings.cors_origins == [VIEWER, "http://x:1"]
    assert settings.max_upload_bytes == 2 * 1024 * 1024 and settings.viewer_url_template.startswith("/ohif/")
    assert settings.pacs_url == "http://127.0.0.1:8042/dicom-web"


def test_public_url_and_viewer_template(make_app, pacs):
    client = make_app(public_url="https://pacs.example/medsim",
                      viewer_url_template="https://viewer.example/viewer?StudyInstanceUIDs={study_uid}"
                                          "&SeriesInstanceUIDs={series_uid}").test_client()
    row = client.post("/api/v1/similar", json={"sop_uid": pacs.indexed[0].sop_uid, "k": 1}).get_json()["results"][0]
    assert row["thumbnail_url"] == f"https://pacs.example/medsim/api/v1/cases/{row['sop_uid']}/thumbnail"
    assert row["viewer_url"] == (f"https://viewer.example/viewer?StudyInstanceUIDs={row['study_uid']}"
                                 f"&SeriesInstanceUIDs={row['series_uid']}")


def test_pseudonyms_are_stable_and_keyed(make_app, pacs, service):
    query = {"sop_uid": pacs.indexed[0].sop_uid, "k": 3}
    first = make_app().test_client().post("/api/v1/similar", json=query).get_json()
    second = make_app().test_client().post("/api/v1/similar", json=query).get_json()
    assert [r["patient"] for r in first["results"]] == [r["patient"] for r in second["results"]]
    assert service.patient_ref("KERMANY-0CC42119") != service.patient_ref("KERMANY-12917FD6")
    raw = make_app(pseudonymize_patient_ids=False).test_client().post("/api/v1/similar", json=query).get_json()
    assert all(r["patient"].startswith("KERMANY-") for r in raw["results"])

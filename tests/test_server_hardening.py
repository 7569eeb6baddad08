"""Hardening (issue 13): the Host-header allow-list (DNS rebinding), thumbnails checked against the catalog before
they are drawn, no server paths in error responses, and the DICOMweb proxy's path checks and route allow-list.

The first part needs no Orthanc (the fake PACS and the stand-in service of test_viewer.py); the second runs against
the session's real Orthanc and index (orthanc_fixtures.py), with a service of its own over a copy of that index
whose cases point at files in a temporary folder (so a test can move, replace and truncate them).
"""

from __future__ import annotations

import http.client
import io
import json
import re
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest

from medsim.server import Settings, SettingsError, create_app
from orthanc_fixtures import PHI_NAME, live_server, pacs  # noqa: F401
from test_viewer import STUDIES_JSON, StandInService, fake_pacs, viewer_dist  # noqa: F401

TOKEN = "a-long-test-token-0123456789"
EVIL = "rebind.attacker.example"


def viewer_app(tmp_path, viewer_dist, **settings):  # noqa: F811
    values = {"index": tmp_path / "no-index", "viewer_dir": viewer_dist, "cache_dir": tmp_path / "cache"}
    values.update(settings)
    return create_app(Settings(**values), service=StandInService())


@pytest.fixture
def client(tmp_path, viewer_dist, fake_pacs):  # noqa: F811
    fake_pacs.requests.clear()
    return viewer_app(tmp_path, viewer_dist, pacs_url=fake_pacs.dicomweb_url, pacs_timeout=1.0).test_client()


# Every kind of route: API, health, OpenAPI, the viewer (SPA, static, config, plugin) and the DICOMweb proxy.
ROUTES = ("/dicom-web/studies", "/dicom-web/studies/1.2.3/metadata", "/api/v1/index", "/api/v1/cases/1.2.3",
          "/healthz", "/api/v1/openapi.yaml", "/", "/similar?x=1", "/app.bundle.0f6159c501addfe9.js", "/app-config.js",
          "/medsim-plugin/extension.js", "/no-such-thing")


# ---- 3. Host header ---------------------------------------------------------------------------------------------


def refused(response, status=421, code="host-not-allowed"):
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:200])
    assert response.is_json
    error = response.get_json()["error"]
    assert error["code"] == code and error["message"] and error["request_id"]
    return error


@pytest.mark.parametrize("host", [EVIL, f"{EVIL}:8000", "192.168.1.20:8000", "localhost.attacker.example",
                                  "127.0.0.1.nip.io", "example.com"])
def test_unknown_host_is_refused_on_every_route(client, fake_pacs, host):
    for path in ROUTES:
        error = refused(client.get(path, headers={"Host": host}))
        assert "allowed_hosts" in error["message"], path
    preflight = client.options("/api/v1/similar", headers={"Host": host, "Origin": "http://x.example",
                                                           "Access-Control-Request-Method": "POST"})
    refused(preflight)
    refused(client.post("/api/v1/similar", json={"sop_uid": "1.2"}, headers={"Host": host}))
    assert fake_pacs.requests == [], "nothing reached the PACS"


def test_malformed_host_is_refused(client, fake_pacs):
    for host in ("a b", "evil@127.0.0.1", "[::1", "127.0.0.1:80:80", "127.0.0.1:port", "x/y"):
        refused(client.get("/dicom-web/studies", headers={"Host": host}), 400, "bad-host")
    assert fake_pacs.requests == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8000", "localhost", "LOCALHOST:3000", "localhost.",
                                  "[::1]:8000", "[::1]", "127.0.0.2:8000"])
def test_loopback_hosts_any_port_are_answered(client, host):
    assert client.get("/app-config.js", headers={"Host": host}).status_code == 200
    assert client.get("/dicom-web/studies", headers={"Host": host}).data == STUDIES_JSON
    assert client.get("/api/v1/openapi.yaml", headers={"Host": host}).status_code == 200


def test_allowed_hosts_public_url_and_listening_address(tmp_path, viewer_dist, fake_pacs):  # noqa: F811
    app = viewer_app(tmp_path, viewer_dist, pacs_url=fake_pacs.dicomweb_url, allowed_hosts=["Medsim.Example.org"],
                     public_url="https://pacs.example/medsim")
    client = app.test_client()
    for host in ("medsim.example.org", "medsim.example.org:8443", "pacs.example", "pacs.example:443", "localhost"):
        assert client.get("/app-config.js", headers={"Host": host}).status_code == 200, host
    refused(client.get("/app-config.js", headers={"Host": "other.example.org"}))
    refused(client.get("/app-config.js", headers={"Host": "example.org"}))
    listening = viewer_app(tmp_path, viewer_dist, host="10.1.2.3", tokens={"ohif": TOKEN}).test_client()
    assert listening.get("/app-config.js", headers={"Host": "10.1.2.3:8000"}).status_code == 200
    refused(listening.get("/app-config.js", headers={"Host": EVIL}))
    anything = viewer_app(tmp_path, viewer_dist, allowed_hosts=["*"], tokens={"ohif": TOKEN}).test_client()
    assert anything.get("/app-config.js", headers={"Host": EVIL}).status_code == 200


def test_allowed_hosts_setting_sources_and_checks(tmp_path):
    from medsim.cli import _parser
    from medsim.server.settings import settings_from_args

    assert Settings().allowed_hosts == []
    env = {"MEDSIM_ALLOWED_HOSTS": "a.example, b.example:8000", "MEDSIM_INDEX": "idx"}
    assert Settings.load(env=env).allowed_hosts == ["a.example", "b.example:8000"]
    config = tmp_path / "medsim.toml"
    config.write_text('[serve]\nindex = "idx"\nallowed_hosts = ["c.example"]\n')
    assert Settings.load(config_file=config, env={}).allowed_hosts == ["c.example"]
    args = _parser().parse_args(["serve", "--index", "idx", "--allowed-host", "d.example",
                                 "--allowed-host", "[2001:db8::1]"])
    assert settings_from_args(args).allowed_hosts == ["d.example", "[2001:db8::1]"]
    Settings(index=tmp_path, allowed_hosts=["d.example", "[2001:db8::1]:8000", "10.0.0.1"]).validate()
    with pytest.raises(SettingsError, match="allowed_hosts"):
        Settings(index=tmp_path, allowed_hosts=["bad host"]).validate()
    with pytest.raises(SettingsError, match="requires bearer tokens"):
        Settings(index=tmp_path, allowed_hosts=["*"]).validate()
    import argparse

    from medsim.server.settings import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "--allowed-host" in parser.format_help() and "421" in parser.format_help()


def test_host_check_through_waitress(tmp_path, viewer_dist, fake_pacs):  # noqa: F811
    """A real server and raw requests: the Host header a browser sends after DNS rebinding is refused."""
    app = viewer_app(tmp_path, viewer_dist, pacs_url=fake_pacs.dicomweb_url)
    fake_pacs.requests.clear()
    with live_server(app, threads=2) as base:
        port = int(base.rsplit(":", 1)[1])
        for host, status in ((EVIL, 421), (f"{EVIL}:{port}", 421), (f"127.0.0.1:{port}", 200),
                             (f"localhost:{port}", 200)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/dicom-web/studies", headers={"Host": host})
            response = conn.getresponse()
            body = response.read()
            conn.close()
            assert response.status == status, (host, body[:200])
            if status == 421:
                assert json.loads(body)["error"]["code"] == "host-not-allowed"
    assert len(fake_pacs.requests) == 2, "only the loopback requests reached the PACS"


# ---- 13. DICOMweb proxy: path checks and the route allow-list ---------------------------------------------------


BAD_PATHS = ("/dicom-web/..%00", "/dicom-web/studies/%00", "/dicom-web/studies/1.2%00/metadata",
             "/dicom-web/%2e%2e/system", "/dicom-web/%2E%2E/system", "/dicom-web/.%2e/system",
             "/dicom-web/studies/%2e%2e/%2e%2e/system", "/dicom-web/studies/1.2/%2e%2e/%2e%2e/tools/find",
             "/dicom-web/%252e%252e/system", "/dicom-web/studies/%252E%252E/x", "/dicom-web/%5c..%5csystem",
             "/dicom-web/studies\\..\\system", "/dicom-web/studies/%0a/metadata", "/dicom-web/studies/..;x/metadata",
             "/dicom-web/studies?limit=1%00")


def test_proxy_refuses_nul_dot_segments_and_backslashes(client, fake_pacs):
    for path in BAD_PATHS:
        response = client.get(path)
        assert response.status_code in (400, 404), (path, response.status_code)
        assert response.is_json, path
        if response.status_code == 404:  # werkzeug's own routing may already refuse it; never the PACS's answer
            assert response.get_json()["error"]["code"] == "not-found", path
    for path in ("/dicom-web/..%00", "/dicom-web/%2e%2e/system", "/dicom-web/%252e%252e/system",
                 "/dicom-web/%5c..%5csystem", "/dicom-web/studies?limit=1%00"):
        assert client.get(path).status_code == 400, path
    assert fake_pacs.requests == [], "nothing reached the PACS"


def test_proxy_refuses_bad_paths_over_http(tmp_path, viewer_dist, fake_pacs):  # noqa: F811
    """Raw request lines through waitress (no client-side normalisation)."""
    app = viewer_app(tmp_path, viewer_dist, pacs_url=fake_pacs.dicomweb_url)
    fake_pacs.requests.clear()
    with live_server(app, threads=2) as base:
        port = int(base.rsplit(":", 1)[1])
        for path in BAD_PATHS + ("/dicom-web/servers", "/dicom-web/info", "/dicom-web/studies/1.2/../../servers"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.putrequest("GET", path, skip_accept_encoding=True)
            conn.endheaders()
            response = conn.getresponse()
            response.read()
            conn.close()
            assert response.status in (400, 404), (path, response.status)
    assert fake_pacs.requests == [], [r["path"] for r in fake_pacs.requests]


NOT_ALLOWED = ("/dicom-web", "/dicom-web/", "/dicom-web/servers", "/dicom-web/servers/sample/stow",
               "/dicom-web/info", "/dicom-web/system", "/dicom-web/tools/find", "/dicom-web/studies/1.2/series/3.4",
               "/dicom-web/studies/1.2", "/dicom-web/studies/abc/metadata", "/dicom-web/studies/1.2/series/3.4/"
               "instances/5.6/frames/x", "/dicom-web/wado?requestType=WADO", "/dicom-web/studies/1.2/metadata/x")
ALLOWED = ("/dicom-web/studies?limit=25", "/dicom-web/series", "/dicom-web/instances?PatientID=1",
           "/dicom-web/studies/1.2/series", "/dicom-web/studies/1.2/instances", "/dicom-web/studies/1.2/metadata",
           "/dicom-web/studies/1.2/thumbnail", "/dicom-web/studies/1.2/series/3.4/instances",
           "/dicom-web/studies/1.2/series/3.4/metadata", "/dicom-web/studies/1.2/series/3.4/thumbnail",
           "/dicom-web/studies/1.2/series/3.4/instances/5.6",
           "/dicom-web/studies/1.2/series/3.4/instances/5.6/metadata",
           "/dicom-web/studies/1.2/series/3.4/instances/5.6/rendered",
           "/dicom-web/studies/1.2/series/3.4/instances/5.6/thumbnail",
           "/dicom-web/studies/1.2/series/3.4/instances/5.6/frames/1",
           "/dicom-web/studies/1.2/series/3.4/instances/5.6/frames/1,2,3/rendered",
           "/dicom-web/studies/1.2/series/3.4/instances/5.6/bulk/7fe00010",
           "/dicom-web/studies/1.2/series/3.4/instances/5.6/bulk/00282000/0/00283006")


def test_proxy_serves_only_the_viewers_read_routes(client, fake_pacs):
    for path in NOT_ALLOWED:
        response = client.get(path)
        assert response.status_code in (404, 308), path  # 308: werkzeug's redirect of /dicom-web/ to /dicom-web
        if response.status_code == 404:
            assert response.is_json and response.get_json()["error"]["code"] == "not-found", path
    assert fake_pacs.requests == [], [r["path"] for r in fake_pacs.requests]
    for path in ALLOWED:
        client.get(path)
        assert fake_pacs.requests[-1]["path"] == path, path
    assert len(fake_pacs.requests) == len(ALLOWED)


# ---- against the real Orthanc -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hardened(pacs, tmp_path_factory):  # noqa: F811
    """A service over a copy of the session's index whose cases point at copies of their files in ``sources/``
    (no PACS: a case whose file is gone cannot be fetched), plus the folders a response must never name."""
    from medsim.server.state import Service

    work = tmp_path_factory.mktemp("hardening")
    index = work / "index"
    shutil.copytree(pacs.index_path, index)
    sources = work / "sources"
    sources.mkdir()
    with sqlite3.connect(index / "catalog.sqlite") as db:
        for number, instance in enumerate(pacs.indexed):
            copy = sources / f"case-{number}.dcm"
            shutil.copyfile(instance.path, copy)
            db.execute("UPDATE cases SET source_path=? WHERE sop_uid=?", (str(copy.resolve()), instance.sop_uid))
        assert db.execute("SELECT COUNT(*) FROM cases WHERE pixel_hash != ''").fetchone()[0] == len(pacs.indexed)
    db.close()
    settings = Settings(index=index, cache_dir=work / "cache", warm_up=False)
    service = Service(settings)
    yield {"service": service, "settings": settings, "work": work, "index": index, "sources": sources,
           "cases": {i.sop_uid: sources / f"case-{n}.dcm" for n, i in enumerate(pacs.indexed)}}
    service.close()


def hardened_app(hardened, **overrides):
    from dataclasses import replace

    return create_app(replace(hardened["settings"], **overrides), service=hardened["service"])


def assert_no_server_path(response, *folders):
    """Neither the folders nor anything that looks like an absolute path or a temporary file appears."""
    text = response.get_data(as_text=True)
    error = response.get_json()["error"]
    message = json.dumps({k: v for k, v in error.items() if k != "request_id"})
    for folder in (*folders, tempfile.gettempdir() + "/", str(Path.home()) + "/"):
        assert str(folder) not in text, (folder, text)
    assert "medsim-query-" not in text and ".dcm" not in text, text
    assert not re.search(r"(?<![\w.:/])/[\w.-]+/", message), message


def test_thumbnail_of_a_replaced_file_is_refused(hardened, pacs):  # noqa: F811
    client = hardened_app(hardened).test_client()
    shown, replaced, edited = pacs.indexed[0], pacs.indexed[1], pacs.indexed[2]
    assert client.get(f"/api/v1/cases/{shown.sop_uid}/thumbnail").status_code == 200
    # another patient's image now sits at the case's source path
    other = next(i for i in pacs.indexed if i.patient_id != replaced.patient_id)
    shutil.copyfile(other.path, hardened["cases"][replaced.sop_uid])
    response = client.get(f"/api/v1/cases/{replaced.sop_uid}/thumbnail")
    assert response.status_code == 409, (response.status_code, response.mimetype, response.data[:100])
    assert response.get_json()["error"]["code"] == "source-mismatch"
    assert "SOP Instance UID" in response.get_json()["error"]["message"]
    assert_no_server_path(response, hardened["work"], hardened["sources"])
    assert not list(hardened["service"].thumbnails.folder.glob("*.tmp-*"))
    # the same SOP Instance UID, other pixels (an edited file)
    import pydicom

    ds = pydicom.dcmread(edited.path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)  # keep the SOP Instance UID: only the pixels change
    ds.PixelData = ds.pixel_array[::-1].copy().tobytes()
    ds.save_as(hardened["cases"][edited.sop_uid])
    response = client.get(f"/api/v1/cases/{edited.sop_uid}/thumbnail")
    assert response.status_code == 409 and response.get_json()["error"]["code"] == "source-mismatch"
    assert "pixel hash" in response.get_json()["error"]["message"]
    assert_no_server_path(response, hardened["work"])


def test_thumbnail_from_a_pacs_answering_with_another_instance_is_refused(hardened, pacs, monkeypatch):  # noqa: F811
    from medsim.ingest import read_any

    case = pacs.indexed[3]
    other = next(i for i in pacs.indexed if i.patient_id != case.patient_id)
    service = hardened["service"]
    hardened["cases"][case.sop_uid].unlink()
    monkeypatch.setattr(service, "pacs", object())  # a PACS is configured...
    monkeypatch.setattr(service, "fetch_radiograph", lambda *args, **kwargs: read_any(other.path))  # ...and errs
    response = hardened_app(hardened).test_client().get(f"/api/v1/cases/{case.sop_uid}/thumbnail")
    assert response.status_code == 409 and response.get_json()["error"]["code"] == "source-mismatch"


def test_errors_name_no_server_paths(hardened, pacs):  # noqa: F811
    client = hardened_app(hardened).test_client()
    folders = (hardened["work"], hardened["index"], hardened["sources"], Path(__file__).resolve().parents[1])
    # a source file moved away (no PACS to fall back on)
    moved = pacs.indexed[4]
    shutil.move(hardened["cases"][moved.sop_uid], hardened["work"] / "moved-away.dcm")
    response = client.get(f"/api/v1/cases/{moved.sop_uid}/thumbnail")
    assert 400 <= response.status_code < 500, response.get_data(as_text=True)[:300]
    assert response.get_json()["error"]["code"] == "image-unavailable"
    assert_no_server_path(response, *folders)
    # a truncated source
    truncated = pacs.indexed[5]
    hardened["cases"][truncated.sop_uid].write_bytes(pacs.truncated.read_bytes())
    response = client.get(f"/api/v1/cases/{truncated.sop_uid}/thumbnail")
    assert response.status_code == 422, response.get_data(as_text=True)[:300]
    assert_no_server_path(response, *folders)
    # a truncated upload (read from a temporary file named medsim-query-XXXX.dcm)
    for upload in (client.post("/api/v1/similar", data=pacs.truncated.read_bytes(), content_type="application/dicom"),
                   client.post("/api/v1/similar", data={"file": (io.BytesIO(pacs.truncated.read_bytes()), "q.dcm")},
                               content_type="multipart/form-data")):
        assert upload.status_code == 422, upload.get_data(as_text=True)[:300]
        assert upload.get_json()["error"]["code"] in ("corrupt", "decode-error")
        assert_no_server_path(upload, *folders)


def test_scrub_removes_paths_and_temporary_names():
    from medsim.server.errors import scrub

    assert scrub('corrupt: reader for "/tmp/tmp9spq3din/medsim-qu...') == "corrupt: reader for <file>"
    assert scrub("not at /srv/pacs/a b.dcm and no PACS") == "not at <file> b.dcm and no PACS"
    assert scrub("No such file or directory: '/srv/pacs/a b.dcm'") == "No such file or directory: <file>"
    assert scrub("in medsim-query-k2j3h4.dcm and tmpab12cd34 and file:///etc/x") == "in <file> and <file> and <file>"
    for kept in ("PACS at http://127.0.0.1:8042/dicom-web timed out",
                 "neither application/json nor multipart/form-data",
                 "not a DICOM UID: '1.2.x'", "modality CR/DX"):
        assert scrub(kept) == kept
    assert scrub({"a": ["/x/y", 3]}) == {"a": ["<file>", 3]}


def test_dns_rebinding_cannot_read_phi_through_the_proxy(hardened, pacs, viewer_dist):  # noqa: F811
    """With Orthanc behind the proxy: a rebinding page gets 421, not the study's metadata (with the patient's name)
    nor the instance; loopback gets both."""
    app = hardened_app(hardened, pacs_url=pacs.url, viewer_dir=viewer_dist)
    client = app.test_client()
    study = pacs.second_view
    metadata = f"/dicom-web/studies/{study.study_uid}/metadata"
    instance = f"/dicom-web/studies/{study.study_uid}/series/{study.series_uid}/instances/{study.sop_uid}"
    for path in (metadata, instance, f"/api/v1/cases/{study.sop_uid}", "/dicom-web/studies"):
        response = client.get(path, headers={"Host": EVIL})
        assert response.status_code == 421, path
        assert PHI_NAME.encode() not in response.data
    ok = client.get(metadata, headers={"Host": "127.0.0.1:8000", "Accept": "application/dicom+json"})
    assert ok.status_code == 200 and PHI_NAME.encode() in ok.data  # what the attacker would have read
    whole = client.get(instance, headers={"Host": "127.0.0.1:8000",
                                          "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert whole.status_code == 200 and len(whole.data) > 10000


def test_proxy_against_orthanc(hardened, pacs, viewer_dist):  # noqa: F811
    """Orthanc's own answers: its root and its non-DICOMweb routes stay out of reach; what the viewer needs (QIDO,
    metadata, frames, the BulkDataURIs Orthanc writes into metadata) comes through."""
    client = hardened_app(hardened, pacs_url=pacs.url, viewer_dir=viewer_dist).test_client()
    for path in ("/dicom-web/..%00", "/dicom-web/..%00/system", "/dicom-web/%2e%2e/system", "/dicom-web/servers",
                 "/dicom-web/info", "/dicom-web/..%2500/system"):
        response = client.get(path)
        assert response.status_code in (400, 404), (path, response.status_code)  # Orthanc: 301 to its root, 200
        assert response.is_json and "Location" not in response.headers, path
        for orthanc_says in (b"ApiVersion", b"DicomAet", b"DicomWebRoot", b"OrthancApiRoot", b"explorer"):
            assert orthanc_says not in response.data, path
    case = pacs.indexed[0]
    studies = client.get(f"/dicom-web/studies?StudyInstanceUID={case.study_uid}&includefield=00081030",
                         headers={"Accept": "application/dicom+json"})
    assert studies.status_code == 200 and case.study_uid in studies.get_data(as_text=True)
    series = client.get(f"/dicom-web/studies/{case.study_uid}/series", headers={"Accept": "application/dicom+json"})
    assert series.status_code == 200 and case.series_uid in series.get_data(as_text=True)
    uris = []
    for case in pacs.indexed:  # Orthanc writes BulkDataURIs for the pixel data of uncompressed instances
        metadata = client.get(f"/dicom-web/studies/{case.study_uid}/series/{case.series_uid}/metadata",
                              headers={"Accept": "application/dicom+json"})
        assert metadata.status_code == 200
        frame = client.get(f"/dicom-web/studies/{case.study_uid}/series/{case.series_uid}/instances/{case.sop_uid}"
                           "/frames/1", headers={"Accept": "multipart/related; type=application/octet-stream; "
                                                           "transfer-syntax=*"})
        assert frame.status_code == 200 and len(frame.data) > 1000
        uris += re.findall(r'"BulkDataURI"\s*:\s*"([^"]+)"', metadata.get_data(as_text=True))
        if uris:
            break
    assert uris, "Orthanc's metadata names bulk data"
    for uri in uris[:3]:
        assert uri.startswith("http://localhost/dicom-web/"), uri  # back through this proxy (Forwarded)
        path = "/dicom-web/" + uri.split("/dicom-web/", 1)[1]
        response = client.get(path, headers={"Accept": "multipart/related; type=application/octet-stream"})
        assert response.status_code == 200, (path, response.get_data(as_text=True)[:200])
        assert len(response.data) > 1000

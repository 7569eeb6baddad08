"""The viewer blueprint (medsim/server/viewer.py): the OHIF single-page app, app-config.js, the plugin's modules and
the DICOMweb proxy; and the viewer fetch script (plugin/ohif/fetch_viewer.py). No network, no Orthanc, no model:
the PACS is a small fake HTTP server and the app gets a stand-in service."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import http.server
import importlib.util
import io
import json
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from medsim.server import Settings, SettingsError, create_app

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SRC = ROOT / "plugin" / "ohif" / "src"
TOKEN = "a-long-test-token-0123456789"


# ---- a fake PACS ------------------------------------------------------------------------------------------------


class FakePacs(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakePacsHandler)
        self.requests: list[dict] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"

    def close(self):
        self.shutdown()
        self.server_close()

    def handle_error(self, request, client_address):
        pass  # a client that gave up (the proxy's timeout test) is not an error here


STUDIES_JSON = json.dumps([{"0020000D": {"vr": "UI", "Value": ["1.2.3"]},
                            "00081030": {"vr": "LO", "Value": ["CHEST 1 VIEW"]}}] * 50).encode()
FRAME = bytes(range(256)) * 64
BOUNDARY = "fake-boundary-1"
SLOW_PATH = "/dicom-web/studies/9.9.9/metadata"  # an allowed route the fake PACS answers late


class FakePacsHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, headers: dict):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "keep-alive")
        self.send_header("X-Upstream-Secret", "hop")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        self.server.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers)})
        path = self.path.split("?", 1)[0]
        if path == "/dicom-web/studies":
            if "gzip" in self.headers.get("Accept-Encoding", ""):
                self._send(200, gzip.compress(STUDIES_JSON, mtime=0),
                           {"Content-Type": "application/dicom+json", "Content-Encoding": "gzip", "ETag": '"e1"'})
            else:
                self._send(200, STUDIES_JSON, {"Content-Type": "application/dicom+json", "ETag": '"e1"'})
        elif path.endswith("/frames/1"):
            body = (f"--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n".encode() + FRAME
                    + f"\r\n--{BOUNDARY}--\r\n".encode())
            self._send(200, body, {"Content-Type": f'multipart/related; type="application/octet-stream"; '
                                                   f"boundary={BOUNDARY}"})
        elif path == SLOW_PATH:
            time.sleep(2.5)
            self._send(200, b"late", {"Content-Type": "text/plain"})
        else:
            self._send(404, b'{"Message": "Unknown resource"}', {"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def fake_pacs():
    pacs = FakePacs()
    yield pacs
    pacs.close()


# ---- the app -----------------------------------------------------------------------------------------------------


class StandInService:
    """What the app factory needs of a service when the test never touches the index."""

    def close(self):
        pass


@pytest.fixture(scope="module")
def viewer_dist(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("viewer") / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<!doctype html><title>OHIF Viewer</title><div id=root></div>")
    (dist / "app.bundle.0f6159c501addfe9.js").write_text("console.log('app');")
    (dist / "5130ccb17e3f3f5b.wasm").write_bytes(b"\0asm\1\0\0\0")
    (dist / "assets" / "logo.svg").write_text("<svg/>")
    (dist / "app-config.js").write_text("window.config = {name: 'the one from the package'};")
    (dist / ".medsim-viewer.json").write_text("{}")
    return dist


def make_app(tmp_path, viewer_dist, **settings):
    values = {"index": tmp_path / "no-index", "viewer_dir": viewer_dist, "cache_dir": tmp_path / "cache"}
    values.update(settings)
    return create_app(Settings(**values), service=StandInService())


@pytest.fixture
def client(tmp_path, viewer_dist, fake_pacs):
    fake_pacs.requests.clear()
    return make_app(tmp_path, viewer_dist, pacs_url=fake_pacs.dicomweb_url, pacs_timeout=1.0).test_client()


# ---- the single-page app -----------------------------------------------------------------------------------------


def test_viewer_routes_get_the_app(client):
    for path in ("/", "/similar?StudyInstanceUIDs=1.2.3", "/viewer", "/notfoundstudy", "/index.html", "/a/b/c"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert b"OHIF Viewer" in response.data, path
        assert response.mimetype == "text/html"
        assert response.headers["Cache-Control"] == "no-cache"


def test_static_files_types_and_caching(client):
    bundle = client.get("/app.bundle.0f6159c501addfe9.js")
    assert bundle.status_code == 200
    assert bundle.mimetype == "text/javascript"
    assert "max-age=31536000" in bundle.headers["Cache-Control"], "content-hashed bundles are cached"
    wasm = client.get("/5130ccb17e3f3f5b.wasm")
    assert wasm.mimetype == "application/wasm"
    svg = client.get("/assets/logo.svg")
    assert svg.status_code == 200
    assert "max-age=31536000" not in svg.headers.get("Cache-Control", "")


def test_missing_assets_hidden_files_and_traversal_are_404(client):
    for path in ("/missing.js", "/assets/missing.png", "/.medsim-viewer.json", "/../pyproject.toml",
                 "/assets/../../pyproject.toml", "/%2e%2e/pyproject.toml"):
        response = client.get(path)
        assert response.status_code == 404, path


def test_reserved_prefixes_never_get_the_app(client):
    for path in ("/api/v1/unknown", "/api/v2/similar", "/medsim-plugin/missing.js", "/healthz/x"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.is_json, path
        assert response.json["error"]["code"] == "not-found"


def test_app_config_is_generated(client):
    response = client.get("/app-config.js")
    assert response.status_code == 200
    assert response.mimetype == "text/javascript"
    assert response.headers["Cache-Control"] == "no-cache"
    text = response.get_data(as_text=True)
    assert "the one from the package" not in text
    for needle in ("/medsim-plugin/extension.js", "/medsim-plugin/mode.js", "'/dicom-web'",
                   "@ohif/extension-default.dataSourcesModule.dicomweb", '"apiRoot": "/api/v1"'):
        assert needle in text


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_app_config_runs_and_points_at_this_origin(client):
    text = client.get("/app-config.js").get_data(as_text=True)
    script = ("globalThis.window = {location: {origin: 'http://127.0.0.1:8000'}};\n" + text
              + "\nconsole.log(JSON.stringify(window.config));")
    done = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    assert config["extensions"] == ["http://127.0.0.1:8000/medsim-plugin/extension.js"]
    assert config["modes"] == ["http://127.0.0.1:8000/medsim-plugin/mode.js"]
    source = config["dataSources"][0]
    assert config["defaultDataSourceName"] == source["sourceName"]
    for root in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert source["configuration"][root] == "http://127.0.0.1:8000/dicom-web"
    assert config["medsim"]["modeRoute"] == "similar"
    assert config["medsim"]["showAnywayK"] == 10


def test_plugin_modules_are_served(client):
    for name in ("extension.js", "mode.js", "logic.js", "panel.js", "panel.css"):
        response = client.get(f"/medsim-plugin/{name}")
        assert response.status_code == 200, name
        assert response.data == (PLUGIN_SRC / name).read_bytes()
        assert response.headers["Cache-Control"] == "no-cache"
    assert client.get("/medsim-plugin/mode.js").mimetype == "text/javascript"
    assert client.get("/medsim-plugin/panel.css").mimetype == "text/css"
    assert client.get("/medsim-plugin/../fetch_viewer.py").status_code == 404


def test_api_routes_still_win(client):
    # /healthz and the API are the service's, not the app's (the stand-in service makes /healthz fail: 503 JSON)
    assert client.get("/api/v1/openapi.yaml").status_code == 200
    assert client.get("/healthz").is_json


def test_without_a_viewer_nothing_is_served_at_root(tmp_path, fake_pacs):
    app = create_app(Settings(index=tmp_path / "i", pacs_url=fake_pacs.dicomweb_url, cache_dir=tmp_path / "c"),
                     service=StandInService())
    client = app.test_client()
    assert client.get("/").status_code == 404
    assert client.get("/dicom-web/studies").status_code == 404


def test_a_folder_without_the_viewer_is_refused(tmp_path):
    with pytest.raises(SettingsError, match="make viewer"):
        make_app(tmp_path, tmp_path / "empty")


def test_serve_flag_and_environment(tmp_path):
    import argparse

    from medsim.server.settings import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)  # the flags of `medsim serve`
    args = parser.parse_args(["--index", "idx", "--viewer", "var/ohif/3.13.2/dist"])
    assert settings_from_args(args).viewer_dir == Path("var/ohif/3.13.2/dist")
    settings = Settings.load(env={"MEDSIM_INDEX": "idx", "MEDSIM_VIEWER_DIR": str(tmp_path)})
    assert settings.viewer_dir == tmp_path
    config = tmp_path / "medsim.toml"
    config.write_text('index = "idx"\nviewer_dir = "viewer/dist"\n')
    assert Settings.load(config_file=config, env={}).viewer_dir == tmp_path / "viewer" / "dist"


# ---- the DICOMweb proxy ------------------------------------------------------------------------------------------


def test_proxy_passes_the_raw_query_string(client, fake_pacs):
    query = "limit=101&offset=0&includefield=00081030%2C00080060&PatientName=*O%27Brien%20A*&StudyDate=20180101-"
    response = client.get(f"/dicom-web/studies?{query}", headers={"Accept": "application/dicom+json"})
    assert response.status_code == 200
    assert response.data == STUDIES_JSON
    seen = fake_pacs.requests[-1]
    assert seen["path"] == f"/dicom-web/studies?{query}"
    assert seen["headers"]["Accept"] == "application/dicom+json"
    assert seen["headers"]["Forwarded"] == "host=localhost;proto=http"


def test_proxy_passes_compressed_bodies_unchanged(client, fake_pacs):
    response = client.get("/dicom-web/studies", headers={"Accept-Encoding": "gzip, deflate"})
    assert response.status_code == 200
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.data == gzip.compress(STUDIES_JSON, mtime=0), "the gzip bytes, not decoded"
    assert int(response.headers["Content-Length"]) == len(response.data)
    assert response.headers["ETag"] == '"e1"'
    assert "X-Upstream-Secret" not in response.headers
    assert fake_pacs.requests[-1]["headers"]["Accept-Encoding"] == "gzip, deflate"


def test_proxy_without_accept_encoding_asks_for_identity(client, fake_pacs):
    client.get("/dicom-web/studies")
    assert fake_pacs.requests[-1]["headers"]["Accept-Encoding"] == "identity"


def test_proxy_streams_multipart_frames(client):
    response = client.get("/dicom-web/studies/1/series/2/instances/3/frames/1",
                          headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("multipart/related")
    assert FRAME in response.data


def test_proxy_head_and_errors_pass_through(client):
    head = client.head("/dicom-web/studies")
    assert head.status_code == 200
    assert head.data == b""
    assert int(head.headers["Content-Length"]) == len(STUDIES_JSON)
    missing = client.get("/dicom-web/studies/1.2.3/series/4.5/metadata")  # a route the proxy serves
    assert missing.status_code == 404
    assert missing.data == b'{"Message": "Unknown resource"}', "the PACS's own answer"


def test_proxy_is_read_only_and_refuses_traversal(client, fake_pacs):
    count = len(fake_pacs.requests)
    for method in ("post", "put", "delete"):
        assert getattr(client, method)("/dicom-web/studies", data=b"x").status_code == 405
    assert client.get("/dicom-web/studies/%2e%2e/%2e%2e/system").status_code in (400, 404)
    assert len(fake_pacs.requests) == count, "nothing reached the PACS"


def test_proxy_pacs_down_and_slow(tmp_path, viewer_dist, fake_pacs):
    from medsim.orthanc import free_port

    down = make_app(tmp_path, viewer_dist, pacs_url=f"http://127.0.0.1:{free_port()}/dicom-web").test_client()
    response = down.get("/dicom-web/studies")
    assert response.status_code == 502
    assert response.json["error"]["code"] == "pacs-unavailable"
    slow = make_app(tmp_path, viewer_dist, pacs_url=fake_pacs.dicomweb_url, pacs_timeout=0.5).test_client()
    started = time.monotonic()
    response = slow.get(SLOW_PATH)
    assert response.status_code == 504
    assert response.json["error"]["code"] == "pacs-timeout"
    assert time.monotonic() - started < 2.4


def test_proxy_without_pacs(tmp_path, viewer_dist):
    response = make_app(tmp_path, viewer_dist).test_client().get("/dicom-web/studies")
    assert response.status_code == 404
    assert response.json["error"]["code"] == "no-pacs"


def test_proxy_needs_the_bearer_token_when_the_service_has_tokens(tmp_path, viewer_dist, fake_pacs):
    client = make_app(tmp_path, viewer_dist, pacs_url=fake_pacs.dicomweb_url, tokens={"ohif": TOKEN}).test_client()
    assert client.get("/dicom-web/studies").status_code == 401
    assert client.get("/dicom-web/studies", headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}).status_code == 401
    assert client.get("/dicom-web/studies", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    # the viewer itself and its config stay open: they carry no data
    assert client.get("/").status_code == 200
    assert client.get("/app-config.js").status_code == 200
    assert "Authorization" not in fake_pacs.requests[-1]["headers"], "the viewer's token is not sent to the PACS"


def test_proxy_sends_pacs_credentials(tmp_path, viewer_dist, fake_pacs):
    client = make_app(tmp_path, viewer_dist, pacs_url=fake_pacs.dicomweb_url, pacs_username="orthanc",
                      pacs_password="secret").test_client()
    client.get("/dicom-web/studies")
    expected = "Basic " + base64.b64encode(b"orthanc:secret").decode()
    assert fake_pacs.requests[-1]["headers"]["Authorization"] == expected


def test_proxy_over_http_keeps_the_query_bytes(tmp_path, viewer_dist, fake_pacs):
    """Through a real server (waitress), a raw request line: the query string reaches the PACS byte for byte."""
    from waitress.server import create_server

    app = make_app(tmp_path, viewer_dist, pacs_url=fake_pacs.dicomweb_url)
    server = create_server(app, host="127.0.0.1", port=0, threads=2)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        query = "includefield=00081030%2c00080060&x=%E2%9C%93&y=a+b&z=%2F"
        conn = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=10)
        conn.request("GET", f"/dicom-web/studies?{query}", headers={"Accept-Encoding": "gzip"})
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200
        assert response.getheader("Content-Encoding") == "gzip"
        assert gzip.decompress(body) == STUDIES_JSON
        seen = fake_pacs.requests[-1]
        assert seen["path"] == f"/dicom-web/studies?{query}"
        assert seen["headers"]["Forwarded"] == f"host=127.0.0.1:{server.effective_port};proto=http"
        conn.close()
    finally:
        server.close()
        thread.join(5)


# ---- plugin/ohif/fetch_viewer.py ---------------------------------------------------------------------------------


def load_fetch_viewer():
    spec = importlib.util.spec_from_file_location("fetch_viewer", ROOT / "plugin" / "ohif" / "fetch_viewer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_tarball(path: Path, extra: list[tarfile.TarInfo] | None = None) -> Path:
    files = {"package/package.json": b'{"name": "@ohif/app"}', "package/dist/index.html": b"<html>OHIF</html>",
             "package/dist/app-config.js": b"window.config = {};", "package/dist/ort/big.wasm": b"x" * 1000,
             "package/dist/assets/a.png": b"png", "package/README.md": b"readme"}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"" if not info.size else b"y" * info.size))
    return path


def sri(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def test_fetch_viewer_unpacks_dist_without_dropped_parts_and_is_idempotent(tmp_path):
    fv = load_fetch_viewer()
    tarball = fake_tarball(tmp_path / "app.tgz")
    pin = {"package": "@ohif/app", "version": "9.9.9", "integrity": sri(tarball), "drop": ["ort"]}
    log = []
    dist = fv.fetch(tmp_path / "cache", pin, tarball=tarball, check_registry=False, log=log.append)
    assert dist == tmp_path / "cache" / "9.9.9" / "dist"
    assert (dist / "index.html").read_bytes() == b"<html>OHIF</html>"
    assert (dist / "assets" / "a.png").exists()
    assert not (dist / "ort").exists()
    assert not (dist / "package.json").exists() and not (dist / "README.md").exists()
    stamp = json.loads((dist / fv.STAMP).read_text())
    assert stamp["integrity"] == pin["integrity"] and stamp["files"] == 3
    assert fv.is_complete(dist, pin)
    fv.fetch(tmp_path / "cache", pin, tarball=tmp_path / "not-there.tgz", check_registry=False, log=log.append)
    assert "nothing to do" in log[-1]


def test_fetch_viewer_refuses_a_tarball_that_does_not_match_the_pin_or_the_registry(tmp_path):
    fv = load_fetch_viewer()
    tarball = fake_tarball(tmp_path / "app.tgz")
    pin = {"package": "@ohif/app", "version": "9.9.9", "integrity": "sha512-" + base64.b64encode(b"0" * 64).decode()}
    with pytest.raises(fv.FetchError, match="does not match the pinned"):
        fv.fetch(tmp_path / "cache", pin, tarball=tarball, check_registry=False, log=lambda m: None)
    assert not (tmp_path / "cache" / "9.9.9" / "dist").exists()
    good = dict(pin, integrity=sri(tarball))
    with pytest.raises(fv.FetchError, match="registry publishes"):
        fv.verify(tarball, good, registry="sha512-" + base64.b64encode(b"1" * 64).decode())
    assert fv.verify(tarball, good, registry=good["integrity"]) == good["integrity"]


@pytest.mark.parametrize("bad", ["link", "traversal"])
def test_fetch_viewer_refuses_links_and_paths_outside_dist(tmp_path, bad):
    fv = load_fetch_viewer()
    if bad == "link":
        info = tarfile.TarInfo("package/dist/evil")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
    else:
        info = tarfile.TarInfo("package/dist/../../evil.txt")
        info.size = 3
    tarball = fake_tarball(tmp_path / "app.tgz", [info])
    pin = {"package": "@ohif/app", "version": "9.9.9", "integrity": sri(tarball)}
    with pytest.raises(fv.FetchError):
        fv.fetch(tmp_path / "cache", pin, tarball=tarball, check_registry=False, log=lambda m: None)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "cache" / "evil.txt").exists()
    assert not (tmp_path / "cache" / "9.9.9" / "dist").exists()


def test_the_pin_is_well_formed():
    fv = load_fetch_viewer()
    pin = fv.load_pin()
    assert pin["package"] == "@ohif/app"
    assert pin["version"] == "3.13.2"
    assert len(base64.b64decode(pin["integrity"][len("sha512-"):])) == 64
    assert "ort" in pin["drop"]


# ---- medsim.stack (the browser test runs it whole) ---------------------------------------------------------------


def test_stack_refuses_missing_parts_with_one_line(tmp_path, capsys, viewer_dist):
    from medsim import stack

    assert stack.main(["--viewer", str(tmp_path / "none")]) == 2
    assert "make viewer" in capsys.readouterr().err
    assert stack.main(["--viewer", str(viewer_dist), "--sample", str(tmp_path / "none")]) == 2
    assert "make sample-data" in capsys.readouterr().err


def test_stack_refuses_a_busy_port():
    from medsim import stack
    from medsim.errors import MedsimError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(MedsimError, match="pass --port"):
            stack.check_port("127.0.0.1", busy.getsockname()[1])


def test_stack_opens_the_sample_query_study_first():
    from conftest import SAMPLE_DIR, sample_manifest
    from medsim import stack

    sample_manifest()
    # the pneumonia study of the patient with two studies: the panel then shows that the other one is left out
    assert stack.sample_study(SAMPLE_DIR) == "2.25.2947286558313810814397790499317612737"

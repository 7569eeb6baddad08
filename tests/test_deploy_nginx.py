"""The deployment examples in docs/deploy/ work as written.

* nginx.conf: nginx (Debian package, ``make nginx``) runs that file on loopback, with only the ports, the certificate
  (self-signed, made here with openssl) and the upstream address replaced, in front of a running medsim app under
  waitress (a stand-in service: no model, no index). Through it over TLS: the Host check passes for the configured
  name and refuses another, the bearer token passes through (401 without, 200 with), nginx's request id becomes
  medsim's, ``/metrics`` is scraped, and plain HTTP redirects to HTTPS.
* medsim.service: ``systemd-analyze verify`` accepts the unit.

Skips, saying why, without nginx, openssl or systemd-analyze.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from medsim.server import Settings, create_app
from orthanc_fixtures import live_server

NGINX_CONF = ROOT / "docs" / "deploy" / "nginx.conf"
UNIT = ROOT / "docs" / "deploy" / "medsim.service"
SERVER_NAME = "medsim.example.org"
TOKEN = "a-long-proxy-token-0123456789abcdef"

pytestmark = pytest.mark.timeout(300)


def nginx_binary() -> str | None:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StandInService:
    """What the app needs of a service for /metrics and the OpenAPI document."""

    started_at = time.time()

    @contextlib.contextmanager
    def pinned(self):
        class Snapshot:
            count, updated_at, loaded_at = 7, time.time() - 60, time.time()

        yield Snapshot()

    def close(self):
        pass


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"docs/deploy/nginx.conf no longer has exactly one {old!r}; update this test"
    return text.replace(old, new)


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (make nginx, or apt-get install nginx)")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    work = tmp_path_factory.mktemp("nginx")
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
                    "-out", str(cert), "-subj", f"/CN={SERVER_NAME}", "-addext", f"subjectAltName=DNS:{SERVER_NAME}"],
                   check=True, capture_output=True, timeout=120)

    settings = Settings(index=work / "no-index", cache_dir=work / "cache", audit_log=work / "audit.log",
                        tokens={"prometheus": TOKEN}, public_url=f"https://{SERVER_NAME}")
    app = create_app(settings, service=StandInService())
    with live_server(app) as upstream:
        https_port, http_port = free_port(), free_port()
        site = NGINX_CONF.read_text()
        site = replace_once(site, "server 127.0.0.1:8000;", f"server {upstream.removeprefix('http://')};")
        site = replace_once(site, "listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;")
        site = replace_once(site, "listen 80;", f"listen 127.0.0.1:{http_port};")
        site = replace_once(site, "/etc/ssl/medsim/fullchain.pem", str(cert))
        site = replace_once(site, "/etc/ssl/medsim/privkey.pem", str(key))
        site = replace_once(site, "/var/log/nginx/medsim.access.log", str(work / "access.log"))
        site = replace_once(site, "/var/log/nginx/medsim.error.log", str(work / "error.log"))
        (work / "medsim.conf").write_text(site)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (work / sub).mkdir()
        (work / "nginx.conf").write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    include {work}/medsim.conf;
}}
""")
        check = subprocess.run([binary, "-t", "-p", str(work), "-c", str(work / "nginx.conf")], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        process = subprocess.Popen([binary, "-p", str(work), "-c", str(work / "nginx.conf")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while True:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", https_port)) == 0:
                        break
                assert process.poll() is None, process.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.2)
            yield {"https_port": https_port, "http_port": http_port, "cert": cert, "work": work}
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def get(nginx, path: str, host: str = SERVER_NAME, headers: dict | None = None):
    """GET over TLS to nginx on loopback, with SNI and certificate check for ``SERVER_NAME``."""
    import urllib3

    pool = urllib3.HTTPSConnectionPool("127.0.0.1", nginx["https_port"], server_hostname=SERVER_NAME,
                                       assert_hostname=SERVER_NAME, ca_certs=str(nginx["cert"]),
                                       cert_reqs="CERT_REQUIRED", retries=False, timeout=30)
    return pool.request("GET", path, headers={"Host": host, **(headers or {})}, redirect=False)


@pytest.mark.nginx
def test_requests_through_nginx_with_tls_host_check_and_token(nginx):
    # the token passes through: /metrics needs it
    refused = get(nginx, "/metrics")
    assert refused.status == 401, refused.data[:300]
    scraped = get(nginx, "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert scraped.status == 200, scraped.data[:300]
    assert b"medsim_index_cases 7.0" in scraped.data
    # open documents pass too; nginx's request id (32 hex) is medsim's
    spec = get(nginx, "/api/v1/openapi.yaml")
    assert spec.status == 200 and b"openapi:" in spec.data
    assert re.fullmatch(r"[0-9a-f]{32}", spec.headers["X-Request-ID"]), spec.headers
    assert spec.headers["Strict-Transport-Security"].startswith("max-age=")
    # a Host that medsim does not know (DNS rebinding through the proxy) is still refused
    other = get(nginx, "/metrics", host="rebind.attacker.example", headers={"Authorization": f"Bearer {TOKEN}"})
    assert other.status in (421, 404), other.status  # nginx may answer an unknown name itself (default server)
    if other.status == 421:
        assert b"host-not-allowed" in other.data


@pytest.mark.nginx
def test_the_request_id_reaches_the_audit_log(nginx):
    response = get(nginx, "/api/v1/no-such-resource", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 404
    request_id = response.headers["X-Request-ID"]
    audit = (nginx["work"] / "audit.log").read_text()
    assert f'"request_id":"{request_id}"' in audit


@pytest.mark.nginx
def test_plain_http_redirects_to_https(nginx):
    import urllib3

    pool = urllib3.HTTPConnectionPool("127.0.0.1", nginx["http_port"], retries=False, timeout=30)
    response = pool.request("GET", "/similar?StudyInstanceUIDs=1.2.3", headers={"Host": SERVER_NAME},
                            redirect=False)
    assert response.status == 301
    assert response.headers["Location"] == f"https://{SERVER_NAME}/similar?StudyInstanceUIDs=1.2.3"


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    medsim = ROOT / ".venv" / "bin" / "medsim"
    if not medsim.is_file():
        medsim = Path(shutil.which("medsim") or "/bin/true")
    unit = tmp_path / "medsim.service"
    text = UNIT.read_text()
    assert "ExecStart=/opt/medsim/bin/medsim serve" in text
    unit.write_text(text.replace("/opt/medsim/bin/medsim", str(medsim)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "medsim.service" not in done.stderr, done.stderr  # no complaint about the unit itself
    # every flag in the unit's ExecStart is one that `medsim serve` knows
    flags = set(re.findall(r"(--[a-z-]+)", text.split("ExecStart=", 1)[1].split("\n#", 1)[0]))
    help_text = subprocess.run([sys.executable, "-m", "medsim.cli", "serve", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert flags and all(flag in help_text for flag in flags), flags - {f for f in flags if f in help_text}

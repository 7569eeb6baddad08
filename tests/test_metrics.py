"""``/metrics`` (medsim/server/metrics.py), request ids and JSON logs (medsim/server/security.py).

The scrapes are parsed with the Prometheus client's own parser (``text_string_to_metric_families``). Most tests run
the app over a stand-in service (no model, no index, no Orthanc); the last one scrapes a real service over HTTP
(waitress) after real uploads that do and do not decode, and is marked orthanc through its fixtures.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time

import pytest
import requests
from flask import Blueprint
from prometheus_client.parser import text_string_to_metric_families

from medsim.errors import ReadFailure
from medsim.server import Settings, create_app
from medsim.server.errors import ApiError
from medsim.server.security import JsonFormatter, RequestIdFilter
from orthanc_fixtures import live_server, make_app, pacs, service  # noqa: F401

TOKEN = "a-long-metrics-token-0123456789"
log = logging.getLogger("medsim.server.test")


class FakeSnapshot:
    count = 42

    def __init__(self):
        self.updated_at = time.time() - 3600.0
        self.loaded_at = time.time() - 60.0


class FakeEmbedder:
    mode = "int8"


class StandInService:
    """What /metrics reads of a service: the snapshot (cases, update time), the model's embed mode, the start."""

    def __init__(self, broken: bool = False):
        self.started_at = time.time() - 10.0
        self._embedder = FakeEmbedder()
        self.broken = broken

    @contextlib.contextmanager
    def pinned(self):
        if self.broken:
            raise OSError("catalog unreadable")
        yield FakeSnapshot()

    def close(self):
        pass


def routes_for_tests() -> Blueprint:
    bp = Blueprint("metrics_test", __name__)

    @bp.get("/t/ok")
    def ok():
        log.info("answering ok")
        return "ok"

    @bp.post("/t/corrupt-upload")
    def corrupt():
        raise ReadFailure("corrupt", "truncated pixel data")

    @bp.post("/t/undecodable")
    def undecodable():
        raise ApiError(422, "decode-error", "pixel data could not be decoded")

    @bp.get("/t/boom")
    def boom():
        raise RuntimeError("unexpected")

    return bp



def build_app(tmp_path, service=None, **settings):
    values = {"index": tmp_path / "no-index", "cache_dir": tmp_path / "cache", "audit_log": tmp_path / "audit.log"}
    values.update(settings)
    return create_app(Settings(**values), service=service or StandInService(), extra_blueprints=[routes_for_tests()])


def scrape(client, **kwargs) -> dict:
    """{(name, frozenset(labels)): value} of every sample, parsed by prometheus_client."""
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return samples(response.get_data(as_text=True))


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(scraped: dict, name: str, **labels) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def test_counters_and_latency_move_with_requests(tmp_path):
    client = build_app(tmp_path).test_client()
    before = scrape(client)
    labels = {"route": "/t/ok", "method": "GET", "status": "200"}
    assert value(before, "medsim_http_requests_total", **labels) == 0
    for _ in range(3):
        assert client.get("/t/ok").status_code == 200
    assert client.get("/no/such/route").status_code == 404
    after = scrape(client)
    assert value(after, "medsim_http_requests_total", **labels) == 3
    assert value(after, "medsim_http_request_duration_seconds_count", **labels) == 3
    assert value(after, "medsim_http_request_duration_seconds_sum", **labels) > 0
    assert value(after, "medsim_http_request_duration_seconds_bucket", le="+Inf", **labels) == 3
    assert value(after, "medsim_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value(after, "medsim_http_errors_total", code="not-found") == 1
    # scrapes are not counted, and the UID-free route keeps the number of series bounded
    assert not any(name == "medsim_http_requests_total" and ("route", "/metrics") in labels_
                   for name, labels_ in after)


def test_decode_failures_are_counted_by_reason(tmp_path):
    client = build_app(tmp_path).test_client()
    before = scrape(client)
    assert value(before, "medsim_decode_failures_total", reason="corrupt") == 0  # present from the start
    assert client.post("/t/corrupt-upload").status_code == 422
    assert client.post("/t/corrupt-upload").status_code == 422
    assert client.post("/t/undecodable").status_code == 422
    assert client.get("/t/ok").status_code == 200
    after = scrape(client)
    assert value(after, "medsim_decode_failures_total", reason="corrupt") == 2
    assert value(after, "medsim_decode_failures_total", reason="decode-error") == 1
    assert value(after, "medsim_http_errors_total", code="corrupt") == 2
    assert value(after, "medsim_http_requests_total", route="/t/corrupt-upload", method="POST", status="422") == 2


def test_openmetrics_when_asked_for(tmp_path):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

    client = build_app(tmp_path).test_client()
    client.get("/t/ok")
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(response.get_data(as_text=True))}
    assert families["medsim_http_requests"].type == "counter"


def test_index_size_age_and_embed_mode(tmp_path):
    scraped = scrape(build_app(tmp_path).test_client())
    assert value(scraped, "medsim_index_loaded") == 1
    assert value(scraped, "medsim_index_cases") == 42
    assert 3590 <= value(scraped, "medsim_index_age_seconds") <= 3700
    assert value(scraped, "medsim_index_updated_timestamp_seconds") == pytest.approx(time.time() - 3600, abs=60)
    assert value(scraped, "medsim_embed_mode_info", mode="int8") == 1
    from medsim import __version__

    assert value(scraped, "medsim_build_info", version=__version__) == 1
    assert value(scraped, "medsim_uptime_seconds") >= 10
    assert ("process_resident_memory_bytes", frozenset()) in scraped  # the client library's process collector

    broken = scrape(build_app(tmp_path, service=StandInService(broken=True)).test_client())
    assert value(broken, "medsim_index_loaded") == 0
    assert ("medsim_index_cases", frozenset()) not in broken


def test_metrics_need_a_token_when_tokens_are_configured_and_keep_the_host_check(tmp_path):
    client = build_app(tmp_path, tokens={"prometheus": TOKEN}).test_client()
    response = client.get("/metrics")
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    scraped = scrape(client, headers={"Authorization": f"Bearer {TOKEN}"})
    assert value(scraped, "medsim_http_requests_total", route="/metrics", method="GET", status="401") == 0
    assert value(scraped, "medsim_http_errors_total", code="unauthorized") == 2
    # DNS rebinding guard: a foreign Host is refused before anything else, token or not
    refused = client.get("/metrics", headers={"Host": "rebind.attacker.example",
                                              "Authorization": f"Bearer {TOKEN}"})
    assert refused.status_code == 421
    open_client = build_app(tmp_path).test_client()
    assert open_client.get("/metrics", headers={"Host": "rebind.attacker.example"}).status_code == 421


def test_request_id_in_header_error_body_audit_and_logs(tmp_path):
    app = build_app(tmp_path)
    client = app.test_client()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("medsim")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        ok = client.get("/t/ok", headers={"X-Request-ID": "lb-1234.abc:5"})
        boom = client.get("/t/boom")
        api = client.get("/api/v1/nothing-here", headers={"X-Request-ID": "bad id with spaces\u00e9"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert ok.headers["X-Request-ID"] == "lb-1234.abc:5"  # a sane id from a proxy is kept
    generated = boom.headers["X-Request-ID"]
    assert len(generated) == 32 and generated != "lb-1234.abc:5"
    assert boom.status_code == 500 and boom.get_json()["error"]["request_id"] == generated
    assert api.headers["X-Request-ID"] != "bad id with spaces\u00e9"  # an unusable id is replaced
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    answered = next(line for line in lines if line["message"] == "answering ok")
    assert answered["request_id"] == "lb-1234.abc:5" and answered["level"] == "INFO" and answered["time"]
    failed = next(line for line in lines if line["request_id"] == generated)
    assert failed["level"] == "ERROR" and "RuntimeError" in failed["exception"]
    audit = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert audit[-1]["path"] == "/api/v1/nothing-here"
    assert audit[-1]["request_id"] == api.headers["X-Request-ID"] == api.get_json()["error"]["request_id"]


def test_a_real_service_scraped_over_http(make_app, pacs, service):
    """The real service under waitress: index gauges from the served snapshot, the model's embed mode, a real
    upload that does not decode (the sample's truncated DICOM) and one that does."""
    app = make_app()
    with live_server(app) as base:
        def scrape_http() -> dict:
            response = requests.get(f"{base}/metrics", timeout=30)
            assert response.status_code == 200
            return samples(response.text)

        before = scrape_http()
        assert value(before, "medsim_index_cases") == service.stats()["cases"] > 0
        assert value(before, "medsim_index_age_seconds") >= 0
        modes = [dict(labels)["mode"] for name, labels in before if name == "medsim_embed_mode_info"]
        assert modes and modes[0] in ("fp32", "channels_last", "bf16", "int8")
        failed_before = sum(value(before, "medsim_decode_failures_total", reason=r)
                            for r in ("corrupt", "decode-error"))
        bad = requests.post(f"{base}/api/v1/similar", timeout=120,
                            files={"file": ("x.dcm", pacs.truncated.read_bytes(), "application/dicom")})
        assert bad.status_code == 422, bad.text[:300]
        good = requests.post(f"{base}/api/v1/similar", timeout=120, json={**pacs.indexed[0].uids, "k": 2})
        assert good.status_code == 200, good.text[:300]
        after = scrape_http()
        failed_after = sum(value(after, "medsim_decode_failures_total", reason=r) for r in ("corrupt", "decode-error"))
        assert failed_after == failed_before + 1
        route = {"route": "/api/v1/similar", "method": "POST"}
        assert value(after, "medsim_http_requests_total", status="200", **route) == \
            value(before, "medsim_http_requests_total", status="200", **route) + 1
        assert value(after, "medsim_http_request_duration_seconds_count", status="422", **route) >= 1

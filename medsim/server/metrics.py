"""``/metrics``: the service's health over months, in the Prometheus text format (``prometheus_client``).

One registry per app (apps in one process, such as the tests', never share counts):

* ``medsim_http_requests_total{route,method,status}`` and ``medsim_http_request_duration_seconds{route,method,status}``
  (a histogram): every request, by its URL rule (``/api/v1/cases/<sop_uid>/thumbnail``, not the UID itself, so the
  number of series stays bounded; ``unmatched`` for paths no route knows). The duration runs from the start of the
  request to the response object: a streamed body (the DICOMweb proxy) is not included.
* ``medsim_http_errors_total{code}``: JSON error responses by machine-readable code (``not-found``,
  ``pacs-timeout``...), counted where errors become responses (:mod:`medsim.server.errors`).
* ``medsim_decode_failures_total{reason}``: uploads and PACS instances that could not be decoded (``corrupt``,
  ``decode-error``, ``too-large``, ``unreadable``; the reasons of :data:`medsim.errors.FAIL_REASONS`).
* ``medsim_index_cases``, ``medsim_index_updated_timestamp_seconds``, ``medsim_index_age_seconds`` (since the catalog
  was last updated), ``medsim_index_loaded_timestamp_seconds``, ``medsim_index_loaded`` (0 when the index cannot be
  read): read from the served snapshot at scrape time.
* ``medsim_embed_mode_info{mode}``: the embedding mode of the loaded model (int8, bf16, channels_last, fp32); absent
  until the model is loaded.
* ``medsim_build_info{version}``, ``medsim_uptime_seconds``, and the client library's ``process_*`` and
  ``python_*`` collectors.

``/metrics`` needs a bearer token when the service has tokens (like ``/api/v1``); the Host check applies as on
every route. It is never audited and never counted in itself.
"""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import GaugeMetricFamily

from medsim.errors import FAIL_REASONS

EXTENSION = "medsim.metrics"
PATH = "/metrics"
# Seconds: static files and index look-ups are milliseconds, embeddings and PACS fetches up to tens of seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The app's registry and its metrics."""

    def __init__(self, service):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("medsim_http_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("medsim_http_request_duration_seconds",
                                 "Time to answer a request (to the response object; a streamed body not included)",
                                 ["route", "method", "status"], buckets=BUCKETS, registry=self.registry)
        self.errors = Counter("medsim_http_errors", "JSON error responses, by error code", ["code"],
                              registry=self.registry)
        self.decode_failures = Counter("medsim_decode_failures",
                                       "Uploads and PACS instances that could not be decoded, by reason", ["reason"],
                                       registry=self.registry)
        for reason in FAIL_REASONS:  # present (at 0) from the start, so rate() works from the first failure
            self.decode_failures.labels(reason=reason)
        self.registry.register(_ServiceCollector(service))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        labels = {"route": route, "method": method, "status": str(status)}
        self.requests.labels(**labels).inc()
        self.latency.labels(**labels).observe(seconds)

    def count_error(self, code: str) -> None:
        self.errors.labels(code=code).inc()
        if code in FAIL_REASONS:
            self.decode_failures.labels(reason=code).inc()

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape body and its content type, negotiated from ``accept`` as the client library's own exporter does
        (Prometheus text format; OpenMetrics when asked for)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _ServiceCollector:
    """Gauges read from the service at scrape time (never raising: a broken index shows as loaded 0)."""

    def __init__(self, service):
        self.service = service

    def describe(self):
        return []

    def collect(self):
        from medsim import __version__

        service = self.service
        now = time.time()
        build = GaugeMetricFamily("medsim_build_info", "The medsim version serving", labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        started = getattr(service, "started_at", None)
        if started is not None:
            yield GaugeMetricFamily("medsim_uptime_seconds", "Seconds since the service started",
                                    value=max(0.0, now - started))
        loaded = GaugeMetricFamily("medsim_index_loaded", "1 when the served index snapshot could be read")
        try:
            with service.pinned() as snapshot:
                count, updated, loaded_at = snapshot.count, snapshot.updated_at, snapshot.loaded_at
        except Exception:  # noqa: BLE001 - a scrape must answer whatever the index does
            loaded.add_metric([], 0)
            yield loaded
        else:
            loaded.add_metric([], 1)
            yield loaded
            yield GaugeMetricFamily("medsim_index_cases", "Cases in the served index snapshot", value=count)
            if updated:
                yield GaugeMetricFamily("medsim_index_updated_timestamp_seconds",
                                        "When the index catalog was last updated (Unix time)", value=updated)
                yield GaugeMetricFamily("medsim_index_age_seconds", "Seconds since the index catalog was last updated",
                                        value=max(0.0, now - updated))
            yield GaugeMetricFamily("medsim_index_loaded_timestamp_seconds",
                                    "When the served snapshot was loaded (Unix time)", value=loaded_at)
        embedder = getattr(service, "_embedder", None)
        mode = getattr(embedder, "mode", None)
        if mode:
            info = GaugeMetricFamily("medsim_embed_mode_info", "The embedding mode of the loaded model",
                                     labels=["mode"])
            info.add_metric([str(mode)], 1)
            yield info


def register(app: Flask) -> Metrics:
    """Count every request of ``app`` and serve ``/metrics`` (token-protected when the app has tokens)."""
    from medsim.server import security

    metrics = Metrics(app.extensions["medsim"])
    app.extensions[EXTENSION] = metrics

    @app.after_request
    def _count(response):
        if request.path != PATH:
            rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
            started = g.get("started")
            seconds = time.perf_counter() - started if started is not None else 0.0
            metrics.observe(rule, request.method, response.status_code, seconds)
        return response

    bp = Blueprint("metrics", __name__)
    security.require_token(bp)

    @bp.get(PATH)
    def scrape():
        body, content_type = current_app.extensions[EXTENSION].exposition(request.headers.get("Accept", ""))
        response = Response(body, content_type=content_type)
        response.headers["Cache-Control"] = "no-store"
        return response

    app.register_blueprint(bp)
    return metrics

"""The app factory and the production server.

``create_app(settings)`` builds the Flask app: the versioned API blueprint ``/api/v1`` (similar, cases, index; bearer
tokens checked on the blueprint), ``/healthz``, ``/metrics`` (Prometheus), the OpenAPI document, JSON errors (never
naming server paths), the Host-header allow-list (every route), CORS, request ids and the audit log.
Further blueprints (the viewer's static files and the DICOMweb proxy to the PACS) register beside the API blueprint
with their own rules, through ``extra_blueprints`` or on the returned app.

``serve(settings)`` runs the app under waitress (a production WSGI server; never Flask's development server).
"""

from __future__ import annotations

import gc
import logging
import signal
from importlib import resources

from flask import Blueprint, Flask, Response

from medsim import __version__
from medsim.server import cases, cohort, errors, explain, feedback, health, index, metrics, security, similar
from medsim.server.settings import Settings
from medsim.server.state import Service

log = logging.getLogger("medsim.server")

API_PREFIX = "/api/v1"


def openapi_text() -> str:
    return resources.files("medsim.server").joinpath("openapi.yaml").read_text(encoding="utf-8")


def create_app(settings: Settings, service: Service | None = None, extra_blueprints=()) -> Flask:
    """A ready app for ``settings`` (validated here). ``service`` lets tests share one loaded index and model."""
    settings.validate()
    app = Flask("medsim.server")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        MEDSIM_SETTINGS=settings,
        MEDSIM_TOKENS=settings.all_tokens(),
        MEDSIM_CORS_ORIGINS=list(settings.cors_origins),
        JSON_SORT_KEYS=False,
    )
    app.json.sort_keys = False
    app.extensions["medsim"] = service or Service(settings)
    app.config["MEDSIM_AUDIT_LOGGER"] = security.configure_audit_log(settings.audit_log)
    errors.register(app)
    security.register(app)
    metrics.register(app)  # /metrics and the request counters (Prometheus text format)

    api = Blueprint("api", __name__, url_prefix=API_PREFIX)
    security.require_token(api)
    for module in (similar, cases, index, explain, cohort, feedback):
        api.register_blueprint(module.blueprint())
    app.register_blueprint(api)
    app.register_blueprint(health.blueprint())
    for extra in extra_blueprints:
        app.register_blueprint(extra)
    if settings.viewer_dir is not None:  # the OHIF viewer, the medsim plugin and the DICOMweb proxy (viewer.py)
        from medsim.server import viewer

        app.register_blueprint(viewer.blueprint(settings))

    spec = openapi_text()

    @app.get(f"{API_PREFIX}/openapi.yaml")
    def _openapi():
        return Response(spec, mimetype="application/yaml")

    return app


def serve(settings: Settings) -> None:
    """Run the service until interrupted (waitress, ``settings.threads`` threads)."""
    import waitress

    settings.validate()
    log_format = security.configure_logging()  # JSON lines with the request id (MEDSIM_LOG_FORMAT=text: plain)
    app = create_app(settings)
    service: Service = app.extensions["medsim"]
    stats = service.stats()
    log.info("medsim serve %s: index %s (%d cases, model %s %s); PACS %s; auth %s; listening on http://%s:%d; "
             "logs: %s", __version__, settings.index, stats["cases"], stats["model"]["name"],
             stats["model"]["fingerprint"], settings.pacs_url or "none",
             "bearer tokens" if app.config["MEDSIM_TOKENS"] else "off (loopback only)", settings.host, settings.port,
             log_format)

    def _stop(signum, frame):  # SIGTERM (systemd, docker stop) ends the server like Ctrl-C, through the finally below
        raise SystemExit(0)

    if settings.host in ("0.0.0.0", "::", "") and not settings.allowed_hosts and not settings.public_url:
        log.warning("listening on all interfaces, but only requests with a loopback Host header are answered (421 "
                    "otherwise): name the host clients use with --allowed-host or --public-url")

    signal.signal(signal.SIGTERM, _stop)
    # The model, index and libraries are loaded and live as long as the process: keep them out of the garbage
    # collector's full passes, which otherwise walk them all (0.2-0.8 s here) and show up as latency spikes.
    gc.collect()
    gc.freeze()
    try:
        waitress.serve(
            app, host=settings.host, port=settings.port, threads=settings.threads, ident="medsim",
            # waitress refuses bodies well beyond the app's limit outright; those just over it get the app's JSON 413
            max_request_body_size=settings.max_upload_bytes + 16 * 1024 * 1024,
            channel_timeout=120, connection_limit=256, clear_untrusted_proxy_headers=True,
        )
    finally:
        service.close()

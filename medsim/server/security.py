"""Bearer-token auth, the CORS allow-list, request ids and the audit log.

* Auth: when any token is configured, every ``/api/v1`` request needs ``Authorization: Bearer <token>``
  (401 otherwise). Thumbnail URLs in responses are signed and expire, so an ``<img src>`` works without the header.
  ``/healthz`` and the OpenAPI document are open. Settings refuse to listen beyond loopback without tokens.
* Host: a request whose ``Host`` header names a host the server was not configured for is refused (421, JSON) on
  every route, before anything else: loopback names (127.0.0.1, localhost, [::1], any port), the host of
  ``public_url`` and ``allowed_hosts`` pass. Without it a web page could read the token-less loopback server (API
  and DICOMweb proxy) through DNS rebinding (``Host: rebind.attacker.example``).
* CORS: only origins in ``cors_origins`` get ``Access-Control-Allow-Origin``; preflights are answered without auth.
* Audit: one JSON line per API request: time (UTC), client (token name, or "anonymous"), remote address, method,
  path, status, duration, request id, and what was asked (query UIDs, k, mode, result count). Never patient names,
  birth dates or image data.
* Request ids: every request gets one: the client's ``X-Request-ID`` when it is sane (1-64 characters of
  ``A-Z a-z 0-9 . _ : - @ / + =``), else a new random one. It is returned in the ``X-Request-ID`` response header, in
  every JSON error body, in the audit record, and in every log line written while the request runs
  (:class:`RequestIdFilter`; ``medsim serve`` logs JSON lines, :func:`configure_logging`).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from flask import Blueprint, Flask, current_app, g, has_request_context, request

from medsim.server.errors import ApiError
from medsim.server.settings import host_allow_list, host_name, is_loopback

audit_log = logging.getLogger("medsim.audit")

CORS_ALLOW_HEADERS = "Authorization, Content-Type, X-Request-ID"
CORS_EXPOSE_HEADERS = "X-Request-ID"
CORS_MAX_AGE = "600"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,64}")
LOG_FORMATS = ("json", "text")


# ---- request ids in logs ------------------------------------------------------------------------------------------


def current_request_id() -> str | None:
    """The id of the request being answered in this thread, or None outside a request."""
    return g.get("request_id") if has_request_context() else None


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the current request's, else "-") to every record passing a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, request_id (inside a request), exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id and request_id != "-":
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"), default=str)


def configure_logging(fmt: str | None = None, level: int = logging.INFO) -> str:
    """Log lines of the whole process as JSON (default; ``MEDSIM_LOG_FORMAT=text`` for plain lines), each with the
    request id. Returns the format used."""
    fmt = (fmt or os.environ.get("MEDSIM_LOG_FORMAT") or "json").strip().lower()
    if fmt not in LOG_FORMATS:
        fmt = "json"
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    for handler in root.handlers:
        handler.setFormatter(formatter)
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
    root.setLevel(level)
    return fmt


def configure_audit_log(path) -> logging.Logger:
    """The audit logger writing to ``path`` (appending) or standard error: ``medsim.audit`` for standard error,
    a child of it per file, so apps with different audit files do not write into each other's."""
    logger = audit_log.getChild(f"file-{abs(hash(str(Path(path).resolve()))):x}") if path else audit_log
    if not logger.handlers:
        handler = logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def audit(**fields) -> None:
    """Add what a request asked for to its audit record."""
    g.setdefault("audit", {}).update({k: v for k, v in fields.items() if v is not None})


def require_token(blueprint: Blueprint) -> None:
    """Bearer-token check for every route of ``blueprint`` (except CORS preflights and signed thumbnail URLs)."""

    @blueprint.before_request
    def _check():
        tokens = current_app.config["MEDSIM_TOKENS"]
        if not tokens or request.method == "OPTIONS":
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() == "bearer" and presented:
            presented = presented.strip().encode()
            for name, token in tokens.items():
                if hmac.compare_digest(presented, token.encode()):
                    g.client = name
                    return None
            g.client = "invalid-token"
            raise ApiError(401, "unauthorized", "invalid bearer token")
        if request.endpoint and request.endpoint.endswith(".thumbnail") and "sig" in request.args:
            service = current_app.extensions["medsim"]
            sop_uid = (request.view_args or {}).get("sop_uid", "")
            if service.check_signature(sop_uid, request.args.get("exp"), request.args.get("sig", "")):
                g.client = "signed-url"
                return None
            raise ApiError(401, "unauthorized", "thumbnail URL signature invalid or expired")
        raise ApiError(401, "unauthorized", "this API needs 'Authorization: Bearer <token>'")


def check_host(allowed: frozenset[str] | None) -> None:
    """Refuse a Host header outside ``allowed`` (None: any) with a 421, a malformed one with a 400. A request without
    a Host header (HTTP/1.0 from a script; browsers always send one) passes."""
    if allowed is None:
        return
    header = request.environ.get("HTTP_HOST")
    if header is None:
        return
    name = host_name(header)
    if name is None:
        raise ApiError(400, "bad-host", "the Host header is not a valid host name")
    if name in allowed or is_loopback(name):
        return
    shown = header if len(header) <= 100 else header[:100] + "..."
    raise ApiError(421, "host-not-allowed",
                   f"this server does not answer for Host {shown!r} (a guard against DNS rebinding); add the host to "
                   "allowed_hosts (--allowed-host, MEDSIM_ALLOWED_HOSTS) if it is meant to reach this server")


def register(app: Flask) -> None:
    origins = set(app.config["MEDSIM_CORS_ORIGINS"])
    allowed_hosts = host_allow_list(app.config["MEDSIM_SETTINGS"])

    @app.before_request
    def _start():
        g.started = time.perf_counter()
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        g.client = "anonymous"
        check_host(allowed_hosts)
        origin = request.headers.get("Origin")
        if (request.method == "OPTIONS" and origin and request.headers.get("Access-Control-Request-Method")
                and request.path.startswith("/api/")):
            response = app.make_default_options_response()
            response.status_code = 204
            return response
        return None

    @app.after_request
    def _finish(response):
        response.headers["X-Request-ID"] = g.get("request_id", "")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        origin = request.headers.get("Origin")
        if origin and origin in origins and (request.path.startswith("/api/") or request.path == "/healthz"):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
                response.headers["Access-Control-Max-Age"] = CORS_MAX_AGE
        response.vary.add("Origin")
        if request.path.startswith("/api/"):
            _write_audit(response)
        return response


def _write_audit(response) -> None:
    if request.method == "OPTIONS":
        return
    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "client": g.get("client", "anonymous"),
        "remote_addr": request.remote_addr,
        "method": request.method,
        "path": request.path,
        "status": response.status_code,
        "ms": round(1000 * (time.perf_counter() - g.get("started", time.perf_counter())), 1),
        "request_id": g.get("request_id"),
    }
    if g.get("error_code"):
        record["error"] = g.error_code
    record.update(g.get("audit", {}))
    current_app.config["MEDSIM_AUDIT_LOGGER"].info(json.dumps(record, separators=(",", ":")))

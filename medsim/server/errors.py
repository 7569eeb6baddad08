"""Every failure is a JSON error with a status, a machine-readable code and a reason::

    {"error": {"status": 404, "code": "not-found", "message": "...", "request_id": "..."}}

Pipeline errors map onto HTTP: an instance the PACS does not hold is 404, a PACS that is down or times out is
502/504, a non-chest or unreadable image is 422, a body over the size limit is 413, a wrong content type is 415.
Unexpected exceptions are logged with their traceback and answered 500 without internals; the server stays up.

No response names a server path: :func:`scrub` replaces anything that looks like a filesystem path (absolute, ``~/``,
``file://``) or a temporary file's name (``medsim-query-*.dcm``, ``tmp*``) in every message and detail with
``<file>``, here where errors become responses, whatever raised them (a moved or truncated source, a decoder's
message about the upload's temporary file). The log keeps the full message.
"""

from __future__ import annotations

import logging
import re

from flask import Flask, current_app, g, jsonify
from werkzeug.exceptions import HTTPException

from medsim.dicomweb import InstanceTooLarge, PacsError, PacsNotFound, PacsUnavailable
from medsim.errors import FAIL_REASONS, SKIP_REASONS, MedsimError, ModelMismatch, ReadFailure, SkipFile

log = logging.getLogger("medsim.server")


class ApiError(Exception):
    """An error the client can act on."""

    def __init__(self, status: int, code: str, message: str, **detail):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail


PATH_PLACEHOLDER = "<file>"
_PATH_PATTERNS = (
    # a quoted path, which may hold spaces; an unterminated quote (a message cut short) runs to the end of the line
    re.compile(r"""(?P<q>['"`])(?:file://)?~?/[^'"`\n]*(?:(?P=q)|$)""", re.MULTILINE),
    re.compile(r"""file://\S*"""),
    # an unquoted absolute or home path: a slash that starts a word (not "application/dicom", not a URL's path)
    re.compile(r"""(?<![\w.:/~%@\\-])~?/[^\s'"`<>(){}\[\],;|]+"""),
    re.compile(r"""\\\\[^\s'"`]+|\b[A-Za-z]:\\[^\s'"`]*"""),  # Windows and UNC paths
    # temporary files named alone: the upload's medsim-query-*.dcm, tempfile's tmpXXXXXXXX
    re.compile(r"""\bmedsim-[\w-]*?query[\w.-]*"""),
    re.compile(r"""\btmp[a-z0-9_]{6,}(?:\.\w+)?\b"""),
)


def scrub(text):
    """``text`` without server paths or temporary file names (each becomes ``<file>``); other values unchanged,
    lists and dicts scrubbed item by item."""
    if isinstance(text, str):
        for pattern in _PATH_PATTERNS:
            text = pattern.sub(PATH_PLACEHOLDER, text)
        return text
    if isinstance(text, dict):
        return {k: scrub(v) for k, v in text.items()}
    if isinstance(text, (list, tuple)):
        return [scrub(v) for v in text]
    return text


def error_response(status: int, code: str, message: str, **detail):
    body = {"status": status, "code": code, "message": scrub(message), "request_id": getattr(g, "request_id", None)}
    if detail:
        body["detail"] = scrub(detail)
    response = jsonify({"error": body})
    response.status_code = status
    g.error_code = code
    _count_error(code)
    return response


def _count_error(code: str) -> None:
    """Count the error in the app's metrics (medsim/server/metrics.py: by code; decode failures by reason)."""
    metrics = current_app.extensions.get("medsim.metrics")
    if metrics is not None:
        metrics.count_error(code)


def api_error_for(exc: MedsimError) -> ApiError:
    """The HTTP meaning of a pipeline error."""
    if isinstance(exc, PacsNotFound):
        return ApiError(404, "not-found", f"{exc} (and not indexed)")
    if isinstance(exc, InstanceTooLarge):
        return ApiError(413, "too-large", str(exc))
    if isinstance(exc, PacsUnavailable):
        timed_out = "timed out" in str(exc)
        return ApiError(504 if timed_out else 502, "pacs-timeout" if timed_out else "pacs-unavailable", str(exc))
    if isinstance(exc, PacsError):
        return ApiError(502, "pacs-error", str(exc))
    if isinstance(exc, SkipFile):
        return ApiError(422, exc.reason, f"{SKIP_REASONS.get(exc.reason, exc.reason)}: {exc.detail}".rstrip(": "))
    if isinstance(exc, ReadFailure):
        status = 413 if exc.reason == "too-large" else 422
        return ApiError(status, exc.reason, f"{FAIL_REASONS.get(exc.reason, exc.reason)}: {exc.detail}".rstrip(": "))
    if isinstance(exc, ModelMismatch):
        return ApiError(500, "model-mismatch", str(exc))
    return ApiError(500, "error", str(exc))


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, **exc.detail)

    @app.errorhandler(MedsimError)
    def _medsim_error(exc: MedsimError):
        api = api_error_for(exc)
        if api.status >= 500:
            log.warning("request %s: %s", getattr(g, "request_id", "-"), exc)
        return error_response(api.status, api.code, api.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = {400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found",
                405: "method-not-allowed", 413: "too-large", 415: "unsupported-media-type"}.get(exc.code, "http-error")
        message = exc.description or exc.name
        if exc.code == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"request body exceeds the upload limit of {limit} bytes" if limit else message
        response = error_response(exc.code or 500, code, message)
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("request %s failed", getattr(g, "request_id", "-"))
        return error_response(500, "internal-error", f"internal error ({type(exc).__name__}); see the server log "
                              "for this request id")

"""The viewer on the service's own origin: the prebuilt OHIF viewer, the medsim plugin, and a DICOMweb proxy.

``medsim serve --viewer DIR --pacs URL`` (or ``viewer_dir`` in the settings) registers this blueprint beside the
API, so one origin serves everything and the browser needs no CORS:

* ``/`` and every viewer route (``/similar``, ``/viewer``, the study list, ...): the OHIF single-page app from
  ``DIR`` (``make viewer`` fetches it to ``var/ohif/<version>/dist``); unknown paths without a file behind them get
  ``index.html`` so that OHIF's router can answer them;
* ``/app-config.js``: OHIF's configuration, generated here: one DICOMweb data source (this server's
  ``/dicom-web``), the medsim extension and mode (plain ES modules, by URL), and the plugin's settings
  (``window.config.medsim``);
* ``/medsim-plugin/*``: the plugin's modules (``plugin/ohif/src``);
* ``/dicom-web/*``: a read-only reverse proxy (GET/HEAD) to ``pacs_url``, for the DICOMweb read routes the viewer
  uses and no others (:data:`ALLOWED_ROUTES`: QIDO-RS searches for studies, series and instances; WADO-RS metadata,
  instances, frames, bulk data, rendered and thumbnail; anything else, such as Orthanc's ``/dicom-web/servers`` or
  ``/dicom-web/info``, is 404 without asking the PACS). A path with a NUL or other control character, a dot
  segment, a backslash or a percent sign left after decoding (``%2e``, ``%00``, ``%5c``, ``%252e``) is 400. The raw
  query string and the request's
  ``Accept``/``Accept-Encoding`` go upstream unchanged, and the answer comes back as sent: status, content type,
  ``Content-Encoding`` (compressed bodies are passed through, never decoded), length, caching headers. Orthanc is
  told the public host (``Forwarded``) so the BulkDataURIs in its metadata point back at this proxy. When the
  service has bearer tokens, the proxy needs one too (OHIF sends it once opened with ``?token=``).

Nothing here reads patient data; the proxy adds no caching of its own.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import mimetypes
import os
import posixpath
import re
import socket
from pathlib import Path
from urllib.parse import quote, urlsplit

from flask import Blueprint, Response, abort, current_app, request, send_from_directory, stream_with_context

from medsim.server import security
from medsim.server.errors import ApiError
from medsim.server.settings import Settings, SettingsError

log = logging.getLogger("medsim.server")

PLUGIN_PREFIX = "/medsim-plugin"
DICOMWEB_PREFIX = "/dicom-web"
MODE_ROUTE = "similar"
EXTENSION_MODULE = "extension.js"
MODE_MODULE = "mode.js"
# The plugin's one copy: plugin/ohif/src in a checkout, which the wheel carries as package data of medsim.ohif.
PINNED = "pinned"  # `--viewer pinned`: the OHIF viewer pinned in ohif-viewer.json, fetched at first use
# Paths the single-page fallback must never answer with index.html.
RESERVED = ("api/", "dicom-web/", "medsim-plugin/", "healthz")
# Request headers passed to the PACS, and response headers passed back (hop-by-hop headers never are).
FORWARD_REQUEST = ("Accept", "Accept-Encoding", "Accept-Language", "If-None-Match", "If-Modified-Since", "Range",
                   "Cache-Control")
FORWARD_RESPONSE = ("Content-Type", "Content-Encoding", "Content-Length", "Content-Range", "Accept-Ranges", "ETag",
                    "Last-Modified", "Cache-Control", "Expires", "Vary", "Content-Disposition", "Content-Location",
                    "Warning")
CHUNK = 256 * 1024
# The DICOMweb read routes the viewer (and the plugin's QIDO-RS study look-up) use, below /dicom-web/; the path is
# matched after percent-decoding, UIDs are digits and dots (at most 64 characters).
_UID = r"[0-9]{1,64}(?:\.[0-9]{1,64}){0,63}"
_STUDY = rf"studies/{_UID}"
_SERIES = rf"{_STUDY}/series/{_UID}"
_INSTANCE = rf"{_SERIES}/instances/{_UID}"
_FRAMES = r"frames/[0-9]{1,6}(?:,[0-9]{1,6}){0,999}"
_BULK = r"bulk(?:data)?(?:/[0-9A-Fa-f]{8}(?:/[0-9]{1,6}/[0-9A-Fa-f]{8})*)?"
ALLOWED_ROUTES = re.compile("|".join([
    r"studies|series|instances",                                      # QIDO-RS: all studies, series, instances
    rf"{_STUDY}/(?:series|instances)",                                # QIDO-RS within a study
    rf"{_SERIES}/instances",                                          # QIDO-RS within a series
    rf"(?:{_STUDY}|{_SERIES}|{_INSTANCE})/(?:metadata|thumbnail)",    # WADO-RS metadata, thumbnails
    rf"{_INSTANCE}",                                                  # WADO-RS one instance
    rf"{_INSTANCE}/(?:rendered|{_FRAMES}(?:/rendered|/thumbnail)?)",  # WADO-RS rendered, frames
    rf"{_INSTANCE}/{_BULK}",                                          # bulk data (Orthanc's BulkDataURIs)
]))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
PATH_SAFE = "/:@!$&'()*+,;=-._~"

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")


def plugin_package_dir() -> Path:
    """The folder of the OHIF plugin package: ``medsim.ohif`` (plugin/ohif in a checkout, editable or not; the
    package data in an installed wheel)."""
    from importlib import resources

    try:
        return Path(str(resources.files("medsim.ohif")))
    except ModuleNotFoundError:  # a source tree on sys.path without an install
        return Path(__file__).resolve().parents[2] / "plugin" / "ohif"


def default_plugin_dir() -> Path:
    """The plugin's ES modules and CSS, exactly as the viewer loads them: ``$MEDSIM_PLUGIN_DIR`` when set (e.g. the
    ``package/src`` of an unpacked ``npm pack`` tarball), else ``src/`` of the ``medsim.ohif`` package."""
    env = os.environ.get("MEDSIM_PLUGIN_DIR", "").strip()
    return Path(env).expanduser() if env else plugin_package_dir() / "src"


def fetch_viewer_module():
    """plugin/ohif/fetch_viewer.py (``medsim.ohif.fetch_viewer``)."""
    import importlib

    try:  # a data package mapped from plugin/ohif (pyproject.toml), not a module under medsim/
        fetch_viewer = importlib.import_module("medsim.ohif.fetch_viewer")
    except ModuleNotFoundError:
        import importlib.util

        path = plugin_package_dir() / "fetch_viewer.py"
        spec = importlib.util.spec_from_file_location("medsim_fetch_viewer", path)
        fetch_viewer = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fetch_viewer)
    return fetch_viewer


def pinned_viewer_dir(fetch: bool = True, say=None) -> Path:
    """The pinned OHIF viewer's dist folder (var/ohif in a checkout, $MEDSIM_HOME/ohif installed,
    $MEDSIM_VIEWER_CACHE when set); fetched with ``npm pack`` and sha512-checked first when ``fetch`` and it is
    not there yet (progress lines to ``say``, default the log)."""
    fv = fetch_viewer_module()
    pin = fv.load_pin()
    dist = fv.dist_dir(fv.default_cache(), pin)
    if fv.is_complete(dist, pin) or not fetch:
        return dist
    try:
        return fv.fetch(fv.default_cache(), pin, log=say or (lambda message: log.info("%s", message)))
    except fv.FetchError as exc:
        raise SettingsError(f"could not fetch the OHIF viewer: {exc}") from None


def resolve_viewer_dir(value: str | Path | None) -> Path:
    """``value`` as a dist folder: ``pinned`` is the pinned viewer (fetched at first use), anything else a path."""
    if value is not None and str(value) == PINNED:
        return pinned_viewer_dir()
    return Path(value or "").expanduser()


def blueprint(settings: Settings, viewer_dir: str | Path | None = None,
              plugin_dir: str | Path | None = None) -> Blueprint:
    """The viewer blueprint for ``settings`` (``viewer_dir`` defaults to ``settings.viewer_dir``; ``pinned`` is the
    pinned OHIF viewer, fetched into the viewer cache at first use)."""
    viewer = resolve_viewer_dir(viewer_dir or settings.viewer_dir)
    if not (viewer / "index.html").is_file():
        raise SettingsError(f"viewer_dir {viewer} holds no OHIF viewer (index.html); pass `--viewer pinned` (fetched "
                            "at first use with npm), or run `make viewer` / `python -m medsim.ohif.fetch_viewer` and "
                            "pass its dist folder")
    plugin = Path(plugin_dir or default_plugin_dir())
    if not (plugin / EXTENSION_MODULE).is_file() or not (plugin / MODE_MODULE).is_file():
        raise SettingsError(f"the medsim OHIF plugin is not in {plugin} ({EXTENSION_MODULE}, {MODE_MODULE})")
    viewer, plugin = viewer.resolve(), plugin.resolve()
    log.info("viewer: OHIF from %s, the medsim plugin from %s", viewer, plugin)
    index_html = (viewer / "index.html").read_bytes()
    bp = Blueprint("viewer", __name__)

    @bp.get("/app-config.js")
    def app_config():
        response = Response(app_config_js(settings), mimetype="text/javascript")
        response.headers["Cache-Control"] = "no-cache"
        return response

    @bp.get(f"{PLUGIN_PREFIX}/<path:name>")
    def plugin_file(name: str):
        response = send_from_directory(plugin, name, max_age=0)
        response.headers["Cache-Control"] = "no-cache"
        return response

    proxy_bp = Blueprint("dicomweb_proxy", __name__)
    security.require_token(proxy_bp)
    proxy_bp.add_url_rule(f"{DICOMWEB_PREFIX}/<path:rest>", view_func=_proxy, methods=["GET", "HEAD"])
    proxy_bp.add_url_rule(DICOMWEB_PREFIX, view_func=_proxy, methods=["GET", "HEAD"], defaults={"rest": ""})
    bp.register_blueprint(proxy_bp)

    def spa_index():
        response = Response(index_html, mimetype="text/html")
        response.headers["Cache-Control"] = "no-cache"
        return response

    @bp.get("/")
    def root():
        return spa_index()

    @bp.get("/<path:path>")
    def static_or_route(path: str):
        if path.startswith(RESERVED):
            abort(404)
        if path == "index.html":
            return spa_index()
        file = _safe_file(viewer, path)
        if file is not None:
            return send_from_directory(viewer, path, max_age=_max_age(path))
        if posixpath.splitext(path)[1] and not path.endswith(".html"):
            abort(404)  # a missing asset is a 404, not the app
        return spa_index()

    return bp


def _safe_file(base: Path, path: str) -> Path | None:
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") or p.startswith(".") for p in parts):
        return None
    candidate = (base / "/".join(parts)).resolve()
    return candidate if base in candidate.parents and candidate.is_file() else None


def _max_age(path: str) -> int:
    name = posixpath.basename(path)
    # content-hashed bundles (e.g. app.bundle.0f6159c501addfe9.js, 776f756dd939124e.wasm) never change
    stem = name.split(".")
    hashed = any(len(part) >= 16 and all(c in "0123456789abcdef" for c in part) for part in stem)
    return 31536000 if hashed else 0


# ---- app-config.js ----------------------------------------------------------------------------------------------


def plugin_config(settings: Settings) -> dict:
    """``window.config.medsim``: what the plugin needs to know about this server (see plugin/ohif/README.md)."""
    return {
        "apiRoot": "/api/v1",
        "modeRoute": MODE_ROUTE,
        "defaultK": settings.default_k,
        "showAnywayK": min(10, settings.max_k),
    }


def app_config_js(settings: Settings) -> str:
    """OHIF's app config for this server: one DICOMweb data source behind the proxy, plus the medsim plugin."""
    medsim = json.dumps(plugin_config(settings), indent=2).replace("\n", "\n  ")
    return f"""/* OHIF configuration generated by medsim (medsim/server/viewer.py); see docs/viewer.md. */
(function () {{
  var origin = window.location.origin;
  var dicomweb = origin + '{DICOMWEB_PREFIX}';
  window.config = {{
    name: 'medsim',
    routerBasename: '/',
    // The medsim plugin: plain ES modules loaded at run time by URL (the mode names its extension by this URL).
    extensions: [origin + '{PLUGIN_PREFIX}/{EXTENSION_MODULE}'],
    modes: [origin + '{PLUGIN_PREFIX}/{MODE_MODULE}'],
    customizationService: {{}},
    showStudyList: true,
    maxNumberOfWebWorkers: 2,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: false,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    groupEnabledModesFirst: true,
    maxNumRequests: {{ interaction: 100, thumbnail: 5, prefetch: 10 }},
    investigationalUseDialog: {{ option: 'never' }},
    defaultDataSourceName: 'medsim',
    dataSources: [
      {{
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'medsim',
        configuration: {{
          friendlyName: 'PACS (through medsim)',
          name: 'medsim',
          wadoUriRoot: dicomweb,
          qidoRoot: dicomweb,
          wadoRoot: dicomweb,
          qidoSupportsIncludeField: true,
          supportsReject: false,
          dicomUploadEnabled: false,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          singlepart: 'bulkdata,video',
          bulkDataURI: {{ enabled: true, relativeResolution: 'studies' }},
          omitQuotationForMultipartRequest: true,
        }},
      }},
    ],
    medsim: {medsim},
  }};
}})();
"""


# ---- DICOMweb proxy -----------------------------------------------------------------------------------------------


class _Upstream:
    """One request to the PACS with http.client: the request target is sent exactly as given (no re-encoding, no
    normalised percent escapes) and the body is read as sent (no content decoding)."""

    def __init__(self, settings: Settings, method: str, target: str, headers: dict):
        parts = urlsplit(settings.pacs_url)
        connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.conn = connection(parts.hostname, parts.port, timeout=settings.pacs_connect_timeout)
        self.read_timeout = settings.pacs_timeout
        self.method, self.target, self.headers = method, target, headers

    def open(self) -> http.client.HTTPResponse:
        self.conn.connect()
        self.conn.sock.settimeout(self.read_timeout)
        self.conn.putrequest(self.method, self.target, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            self.conn.putheader(name, value)
        self.conn.endheaders()
        return self.conn.getresponse()

    def close(self) -> None:
        self.conn.close()


def check_proxy_path(rest: str, raw_query: bytes = b"") -> None:
    """Raise a 400 for a path (``rest``, below /dicom-web/, percent-decoded once) that could leave the DICOMweb root
    upstream: control characters (NUL), dot segments, backslashes, or a percent sign left after decoding (a
    double-encoded ``%252e``); and for a NUL in the raw query string. Raise a 404 for a path that is not one of
    :data:`ALLOWED_ROUTES`."""
    segments = rest.split("/")
    if (_CONTROL.search(rest) or "\\" in rest or "%" in rest or any(s.startswith(".") for s in segments)
            or re.search(rb"%00|[\x00-\x1f\x7f]", raw_query)):
        raise ApiError(400, "bad-request", "invalid DICOMweb path (control characters, dot segments, backslashes "
                       "or percent signs after decoding)")
    if ALLOWED_ROUTES.fullmatch(rest) is None:
        # a viewer that needs another route shows up here (the path is UIDs and names: no patient data)
        log.warning("DICOMweb proxy: not an allowed route: %r", rest[:200])
        raise ApiError(404, "not-found", "not a DICOMweb route this proxy serves (QIDO-RS searches and WADO-RS "
                       "reads of studies, series and instances)")


def _proxy(rest: str):
    settings: Settings = current_app.config["MEDSIM_SETTINGS"]
    check_proxy_path(rest, request.query_string)
    if not settings.pacs_url:
        raise ApiError(404, "no-pacs", "no PACS is configured (pass --pacs), so there is no DICOMweb to proxy")
    target = urlsplit(settings.pacs_url).path.rstrip("/") + ("/" + quote(rest, safe=PATH_SAFE) if rest else "")
    raw_query = request.query_string.decode("latin-1")  # exactly as the browser sent it: never re-encoded
    if raw_query:
        target += "?" + raw_query
    headers = {name: request.headers[name] for name in FORWARD_REQUEST if name in request.headers}
    headers.setdefault("Accept-Encoding", "identity")
    public = urlsplit(request.host_url)
    parts = urlsplit(settings.pacs_url)
    headers["Host"] = parts.netloc.rsplit("@", 1)[-1]
    headers["Forwarded"] = f"host={public.netloc};proto={public.scheme}"
    headers["X-Forwarded-Host"] = public.netloc
    headers["X-Forwarded-Proto"] = public.scheme
    if settings.pacs_username:
        credentials = f"{settings.pacs_username}:{settings.pacs_password or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode("ascii")
    upstream = _Upstream(settings, request.method, target, headers)
    try:
        upstream_response = upstream.open()
    except (socket.timeout, TimeoutError):
        upstream.close()
        raise ApiError(504, "pacs-timeout", f"the PACS did not answer within {settings.pacs_timeout:g} s") from None
    except (OSError, http.client.HTTPException) as exc:
        upstream.close()
        raise ApiError(502, "pacs-unavailable", f"the PACS is unreachable: {type(exc).__name__}") from None
    passed = {name: upstream_response.headers[name] for name in FORWARD_RESPONSE if name in upstream_response.headers}

    def body():
        try:
            while True:
                chunk = upstream_response.read1(CHUNK) if hasattr(upstream_response, "read1") else \
                    upstream_response.read(CHUNK)
                if not chunk:
                    break
                yield chunk
        except (OSError, http.client.HTTPException):
            return  # the PACS broke off mid-answer: end the response (the client sees a short body)
        finally:
            upstream.close()

    if request.method == "HEAD":
        upstream.close()
        response = Response(status=upstream_response.status)
    else:
        response = Response(stream_with_context(body()), status=upstream_response.status, direct_passthrough=True)
    for name, value in passed.items():
        response.headers[name] = value
    if "Content-Type" not in passed:
        response.headers.pop("Content-Type", None)
    if upstream_response.chunked:
        response.headers.pop("Content-Length", None)
    return response

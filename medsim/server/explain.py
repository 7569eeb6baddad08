"""``GET /api/v1/explain?query=SOP&hit=SOP``: where two images match (:mod:`medsim.explain`).

The score of a hit decomposes exactly over the 14 x 14 positions of each image's conv5_3 map (average pooling). The
answer gives both maps (``map``: rows of numbers that sum to ``score``), and each as a transparent PNG overlay
(``overlay``: a data URL) at the image's own aspect ratio with the letterbox padding cropped away, so it lies on the
image as displayed (thumbnail or viewport).

``hit`` must be indexed. ``query`` is an indexed SOP Instance UID, or (as for /similar) any instance of the PACS when
``study_uid`` and ``series_uid`` are given too. Parameters: ``size`` (longest side of the overlays, 32..1024, default
the thumbnail size). Models with GeM pooling cannot be explained this way: 422 ``not-explainable``.
"""

from __future__ import annotations

import base64
import threading
import time

from flask import Blueprint, current_app, jsonify, request

from medsim.dicomweb import is_uid
from medsim.explain import Explainer, ExplainError, Features, overlay_png
from medsim.server.errors import ApiError
from medsim.server.security import audit
from medsim.server.similar import app_settings
from medsim.server.state import LRU, Service

PARAMETERS = ("query", "hit", "study_uid", "series_uid", "size")
FEATURE_CACHE = 64  # feature maps (512 x 14 x 14 float32, 400 kB each) kept per server


def blueprint() -> Blueprint:
    bp = Blueprint("explain", __name__)
    bp.add_url_rule("/explain", view_func=explain, methods=["GET"])
    return bp


class _State:
    """One per service: the float32 explainer (loaded on first use) and the feature maps of recent images."""

    def __init__(self):
        self.lock = threading.Lock()
        self.explainer: Explainer | None = None
        self.error: str | None = None
        self.features = LRU(FEATURE_CACHE)


_STATES_LOCK = threading.Lock()


def _state(service: Service) -> _State:
    """The service's explain state (kept on the service, so it goes with it)."""
    with _STATES_LOCK:
        state = getattr(service, "_explain_state", None)
        if state is None:
            state = _State()
            service._explain_state = state
        return state


def _explainer(service: Service, state: _State) -> Explainer:
    with state.lock:
        if state.explainer is None and state.error is None:
            try:
                state.explainer = Explainer.for_bundle(service.bundle)
            except ExplainError as exc:
                state.error = str(exc)
        if state.error is not None:
            raise ApiError(422, "not-explainable", state.error)
        return state.explainer


def explain():
    service: Service = current_app.extensions["medsim"]
    with service.pinned():
        return _explain(service)


def _explain(service: Service):
    started = time.perf_counter()
    args = _parameters()
    audit(query=args["query"], hit=args["hit"])
    hit_case = service.case(args["hit"])
    if hit_case is None:
        raise ApiError(404, "not-indexed", f"hit {args['hit']} is not indexed")
    state = _state(service)
    explainer = _explainer(service, state)
    query_case = service.case(args["query"])
    if query_case is None and (args.get("study_uid") is None or args.get("series_uid") is None):
        raise ApiError(404, "not-indexed", f"instance {args['query']} is not indexed; pass study_uid and series_uid "
                       "too so it can be fetched from the PACS")
    if query_case is None and service.pacs is None:
        raise ApiError(404, "not-indexed", f"instance {args['query']} is not indexed and no PACS is configured to "
                       "fetch it")
    query_features = _features(service, state, explainer, query_case, args)
    hit_features = _features(service, state, explainer, hit_case, args)
    result = explainer.explain(query_features, hit_features)
    indexed_score = None
    if query_case is not None:
        q, h = service.index.vector(query_case.sop_uid), service.index.vector(hit_case.sop_uid)
        if q is not None and h is not None:
            indexed_score = round(float(q @ h), 6)
    size = args.get("size") or app_settings().thumbnail_size
    scale = float(max(result.query_map.max(), result.hit_map.max(), 1e-12))  # one colour scale for both overlays
    return jsonify({
        "score": round(result.score, 6),
        "indexed_score": indexed_score,
        "model": {"name": service.index.meta.get("model_name"), "fingerprint": service.index.model_fingerprint,
                  "pooling": "gap", "precision": "float32"},
        "grid": list(result.hit_map.shape),
        "query": _side(args["query"], result.query_map, query_features, size, scale),
        "hit": _side(hit_case.sop_uid, result.hit_map, hit_features, size, scale),
        "took_ms": round(1000 * (time.perf_counter() - started), 1),
    })


def _side(sop_uid: str, values, features: Features, size: int, scale: float) -> dict:
    png = overlay_png(values, features.box, features.image_shape, longest=size, scale=scale)
    return {
        "sop_uid": sop_uid,
        "map": [[round(float(v), 7) for v in row] for row in values],
        "sum": round(float(values.sum()), 6),
        "letterbox": features.box.to_dict(),
        "image": {"rows": int(features.image_shape[0]), "columns": int(features.image_shape[1])},
        "overlay": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
    }


def _features(service: Service, state: _State, explainer: Explainer, case, args) -> Features:
    if case is not None:
        key = ("case", case.sop_uid, case.pixel_hash)
    else:
        key = ("pacs", args["study_uid"], args["series_uid"], args["query"])
    cached = state.features.get(key)
    if cached is not None:
        return cached
    if case is not None:
        radiograph = service.thumbnails._radiograph(case)  # the indexed image, checked against the catalog
    else:
        radiograph = service.fetch_radiograph(args["study_uid"], args["series_uid"], args["query"])
        if radiograph.sop_uid != args["query"]:
            raise ApiError(502, "pacs-error", f"the PACS returned instance {radiograph.sop_uid} for {args['query']}")
    with service.embed_lock:  # one network at a time (torch already uses every core)
        features = explainer.features(radiograph.pixels)
    state.features.put(key, features)
    return features


def _parameters() -> dict:
    unknown = sorted(name[:40] for name in request.args if name not in PARAMETERS)
    if unknown:
        raise ApiError(400, "unknown-field", f"unknown parameter(s) {unknown}; allowed: {list(PARAMETERS)}")
    repeated = sorted(name for name in request.args if len(request.args.getlist(name)) > 1)
    if repeated:
        raise ApiError(400, "invalid-parameter", f"parameter(s) {repeated} given more than once")
    args = request.args.to_dict()
    for name in ("query", "hit"):
        if not args.get(name):
            raise ApiError(400, "bad-request", "query and hit (SOP Instance UIDs) are required")
    for name in ("query", "hit", "study_uid", "series_uid"):
        value = args.get(name)
        if value is not None and not (is_uid(value) and not value.endswith("\n")):
            raise ApiError(400, "invalid-uid", f"{name} is not a DICOM UID (digits and dots, at most 64 characters): "
                           f"{value[:80]!r}")
    if args.get("size") is not None:
        try:
            size = int(args["size"])
        except ValueError:
            size = 0
        if not 32 <= size <= 1024:
            raise ApiError(400, "invalid-parameter", f"size must be an integer 32..1024, got {args['size'][:20]!r}")
        args["size"] = size
    return args

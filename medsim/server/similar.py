"""``POST /api/v1/similar``: the cases most similar to one image, from other patients by default.

The query image is named by UIDs (JSON) or uploaded (multipart ``file`` field, or a raw ``application/dicom`` body):

* JSON ``{"study_uid", "series_uid", "sop_uid", ...parameters}``: an indexed instance (found by SOP Instance UID)
  uses its stored vector; any other is fetched from the PACS by WADO-RS, read, preprocessed and embedded (its vector
  is then kept in a small cache, so asking again with other parameters is fast).
* Upload: a DICOM Part 10 file; parameters as form fields or in the query string.

Parameters: ``k`` (1..max_k), ``threshold`` (cosine, -1..1) or ``target_recall`` (0..1], ``include_same_patient``
(default false), ``group_by`` = ``study`` (default; one row per study: its best image) or ``image``, ``filters``
(an object, see :func:`medsim.search.parse_filters`; a JSON string in a form or query string): applied inside the
nearest-neighbour search, so k rows come back whenever k cases pass them; by default only cases of the query's own
view class (frontal/lateral) answer. See :mod:`medsim.operating_point` for how k and thresholds combine.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from urllib.parse import quote, urlencode

from flask import Blueprint, current_app, jsonify, request

from medsim import operating_point
from medsim.dicomweb import is_uid
from medsim.search import FilterError, QueryInfo, for_query, parse_filters
from medsim.server.errors import ApiError, error_response
from medsim.server.security import audit
from medsim.server.settings import Settings
from medsim.server.state import CachedQuery, ServerBusy, Service

UID_FIELDS = ("study_uid", "series_uid", "sop_uid")
PARAMETERS = ("k", "threshold", "target_recall", "include_same_patient", "group_by", "filters")
GROUP_BY = ("study", "image")


def app_settings() -> Settings:
    return current_app.config["MEDSIM_SETTINGS"]


def patient_ref(service: Service, patient_id: str | None) -> str | None:
    return service.patient_ref(patient_id, pseudonymize=app_settings().pseudonymize_patient_ids)


def blueprint() -> Blueprint:
    bp = Blueprint("similar", __name__)
    bp.add_url_rule("/similar", view_func=similar, methods=["POST"])
    bp.register_error_handler(ServerBusy, _busy)
    return bp


def _busy(exc: ServerBusy):
    response = error_response(503, "busy", exc.description)
    response.headers["Retry-After"] = str(exc.seconds)
    return response


def similar():
    service: Service = current_app.extensions["medsim"]
    with service.pinned():  # one index snapshot for the whole request: sizes, hits and operating point agree
        return _similar(service)


def _similar(service: Service, refine=None):
    """The answer to a /similar request; ``refine(vector, info) -> (vector, dict)`` moves the query vector first and
    its dict becomes the answer's ``refined`` (``POST /api/v1/feedback/refine``, :mod:`medsim.server.feedback`)."""
    settings = app_settings()
    started = time.perf_counter()
    mimetype = request.mimetype
    if mimetype == "application/json":
        body = _json_body()
        query = _query_string()
        from_query = parse_parameters(query, typed=False)
        twice = sorted(set(query) & set(body))
        if twice:
            raise ApiError(400, "invalid-parameter", f"{twice} given both in the query string and in the JSON body")
        params = {**from_query, **parse_parameters(body, typed=True)}
        uids = {name: body.get(name) for name in UID_FIELDS}
        audit(source="uids", **{k: v[:80] for k, v in uids.items() if isinstance(v, str)})
        op = _operating_point(service, settings, params)  # before any PACS fetch or embedding
        vector, info, source = _query_by_uids(service, uids)
    elif mimetype in ("multipart/form-data", "application/dicom"):
        if mimetype == "multipart/form-data":
            files, form = _multipart()
            upload = files.get("file")
            if upload is None:
                raise ApiError(400, "bad-request", "multipart upload needs the DICOM file in a field named 'file'")
            data = upload.read()
            query = _query_string()
            fields = {name: form.get(name) for name in form}
            twice = sorted(set(query) & set(fields))
            if twice:
                raise ApiError(400, "invalid-parameter", f"{twice} given both in the query string and in the form")
            fields.update(query)
        else:
            data = request.get_data()
            fields = _query_string()
        params = parse_parameters(fields, typed=False)
        audit(source="upload", upload_bytes=len(data))
        op = _operating_point(service, settings, params)
        vector, info, source = _query_by_upload(service, data)
    else:
        raise ApiError(415, "unsupported-media-type",
                       f"send application/json (UIDs), multipart/form-data or application/dicom (an upload), "
                       f"not {mimetype or 'a body without Content-Type'}")
    include_same_patient = params.get("include_same_patient", False)
    group_by = params.get("group_by", "study")
    filters = for_query(params.get("filters"), info.view)  # the default view filter: the query's own class
    refined = None
    if refine is not None:
        vector, refined = refine(vector, info)
    rows = rank(service, vector, info, op, group_by, include_same_patient, filters)
    audit(sop_uid=info.sop_uid, indexed=info.indexed, k=op.k, mode=op.mode, group_by=group_by,
          include_same_patient=include_same_patient, results=len(rows))
    return jsonify({
        "query": {"study_uid": info.study_uid, "series_uid": info.series_uid, "sop_uid": info.sop_uid,
                  "view": info.view, "indexed": info.indexed, "source": source,
                  "transfer_syntax": info.transfer_syntax or None,
                  "patient": service.patient_ref(info.patient_id, settings.pseudonymize_patient_ids)},
        "operating_point": op.to_dict(),
        "group_by": group_by,
        "include_same_patient": include_same_patient,
        "filters": filters.to_dict(),
        "model": {"name": service.index.meta.get("model_name"), "fingerprint": service.index.model_fingerprint},
        "results": [_row(service, settings, rank_, hit, images) for rank_, (hit, images) in enumerate(rows, 1)],
        "took_ms": round(1000 * (time.perf_counter() - started), 1),
        **({"refined": refined} if refined is not None else {}),
    })


# ---- input ---------------------------------------------------------------------------------------------------------


def _operating_point(service: Service, settings: Settings, params: dict) -> operating_point.OperatingPoint:
    try:
        return service.searcher.operating_point(k=params.get("k"), threshold=params.get("threshold"),
                                                target_recall=params.get("target_recall"),
                                                default_k=settings.default_k, max_k=settings.max_k)
    except operating_point.OperatingPointError as exc:
        raise ApiError(422, "operating-point", str(exc)) from None


MAX_JSON_BYTES = 64 * 1024


def _json_body() -> dict:
    if (request.content_length or 0) > MAX_JSON_BYTES:
        raise ApiError(413, "too-large", f"a JSON query is at most {MAX_JSON_BYTES} bytes")
    raw = request.get_data(cache=False)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed-json", f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "malformed-json", "request body is not a usable JSON object: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "malformed-json", "request body must be a JSON object")
    unknown = sorted(set(body) - set(UID_FIELDS) - set(PARAMETERS))
    if unknown:
        raise ApiError(400, "unknown-field", f"unknown field(s) {unknown}; allowed: "
                       f"{list(UID_FIELDS) + list(PARAMETERS)}")
    return body


def _query_string() -> dict:
    """The query-string parameters, each at most once."""
    repeated = sorted(name for name in request.args if len(request.args.getlist(name)) > 1)
    if repeated:
        raise ApiError(400, "invalid-parameter", f"parameter(s) {repeated} given more than once")
    return request.args.to_dict()


def _multipart():
    """(files, form) of a multipart body; every part must be named, and each name used once."""
    from werkzeug.exceptions import HTTPException

    try:
        files, form = request.files, request.form
    except HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - werkzeug's parser on a malformed body
        raise ApiError(400, "bad-request", f"malformed multipart body ({type(exc).__name__})") from None
    names = list(files.keys()) + list(form.keys())
    if any(not isinstance(name, str) or not name for name in names):
        raise ApiError(400, "bad-request", "every multipart part needs a name (Content-Disposition: form-data; "
                       "name=...)")
    repeated = sorted({name for name in names if len(files.getlist(name)) + len(form.getlist(name)) > 1})
    if repeated:
        raise ApiError(400, "bad-request", f"multipart part(s) {repeated} given more than once")
    return files, form


def parse_parameters(fields: dict, typed: bool) -> dict:
    """Validated query parameters. ``typed``: JSON values must have their JSON types; else strings are parsed."""
    max_k = app_settings().max_k
    params: dict = {}
    unknown = sorted(set(fields) - set(PARAMETERS) - (set(UID_FIELDS) if typed else set()))
    if unknown:
        raise ApiError(400, "unknown-field", f"unknown parameter(s) {unknown}; allowed: {list(PARAMETERS)}")

    def bad(name: str, expected: str):
        raise ApiError(400, "invalid-parameter", f"{name} must be {expected}, got {fields[name]!r}")

    if fields.get("k") is not None:
        value = fields["k"]
        if typed and (not isinstance(value, int) or isinstance(value, bool)):
            bad("k", f"an integer 1..{max_k}")
        try:
            value = int(value)
        except (TypeError, ValueError):
            bad("k", f"an integer 1..{max_k}")
        if not 1 <= value <= max_k:
            bad("k", f"an integer 1..{max_k}")
        params["k"] = value
    for name, low, high, include_low in (("threshold", -1.0, 1.0, True), ("target_recall", 0.0, 1.0, False)):
        if fields.get(name) is None:
            continue
        value = fields[name]
        if name == "threshold" and value == operating_point.NONE:
            params[name] = value
            continue
        expected = f"a number in {'[' if include_low else '('}{low:g}, {high:g}]" + (
            " or \"none\"" if name == "threshold" else "")
        if typed and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            bad(name, expected)
        try:
            value = float(value)
        except (TypeError, ValueError):
            bad(name, expected)
        if not ((low <= value if include_low else low < value) and value <= high):
            bad(name, expected)
        params[name] = value
    if fields.get("include_same_patient") is not None:
        value = fields["include_same_patient"]
        if isinstance(value, bool):
            params["include_same_patient"] = value
        elif not typed and str(value).lower() in ("true", "1", "yes"):
            params["include_same_patient"] = True
        elif not typed and str(value).lower() in ("false", "0", "no"):
            params["include_same_patient"] = False
        else:
            bad("include_same_patient", "true or false")
    if fields.get("group_by") is not None:
        if fields["group_by"] not in GROUP_BY:
            bad("group_by", "'study' or 'image'")
        params["group_by"] = fields["group_by"]
    if fields.get("filters") is not None:
        spec = fields["filters"]
        if not typed:
            try:
                spec = json.loads(spec) if isinstance(spec, str) and len(spec) <= 8192 else None
            except (ValueError, RecursionError):
                spec = None
            if not isinstance(spec, dict):
                bad("filters", "a JSON object")
        try:
            params["filters"] = parse_filters(spec)
        except FilterError as exc:
            raise ApiError(400, "invalid-parameter", str(exc)) from None
    return params


def _query_by_uids(service: Service, uids: dict):
    sop_uid = uids.get("sop_uid")
    if sop_uid is None:
        raise ApiError(400, "bad-request", "sop_uid is required (with study_uid and series_uid for instances that "
                       "are not indexed)")
    for name, value in uids.items():
        if value is not None and not (is_uid(value) and not value.endswith("\n")):  # is_uid's $ allows a final \n
            raise ApiError(400, "invalid-uid", f"{name} is not a DICOM UID (digits and dots, at most 64 characters): "
                           f"{str(value)[:80]!r}")
    case = service.case(sop_uid)
    if case is not None:
        for name in ("study_uid", "series_uid"):
            if uids.get(name) is not None and uids[name] != getattr(case, name):
                raise ApiError(409, "uid-mismatch", f"the indexed instance {sop_uid} belongs to {name} "
                               f"{getattr(case, name)}, not {uids[name]}")
        return (*service.indexed_query(case), "index")
    if uids.get("study_uid") is None or uids.get("series_uid") is None:
        raise ApiError(404, "not-indexed", f"instance {sop_uid} is not indexed; pass study_uid and series_uid too "
                       "so it can be fetched from the PACS")
    if service.pacs is None:
        raise ApiError(404, "not-indexed", f"instance {sop_uid} is not indexed and no PACS is configured to fetch it")
    key = (uids["study_uid"], uids["series_uid"], sop_uid)
    cached = service.vectors.get(key)
    if cached is None:
        radiograph = service.fetch_radiograph(*key)
        if radiograph.sop_uid != sop_uid:
            raise ApiError(502, "pacs-error", f"the PACS returned instance {radiograph.sop_uid} for {sop_uid}")
        cached = CachedQuery(*service.radiograph_query(radiograph))
        service.vectors.put(key, cached)
    return cached.vector, cached.info, "pacs"


def _query_by_upload(service: Service, data: bytes):
    if not data:
        raise ApiError(400, "bad-request", "the upload is empty")
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ApiError(415, "not-dicom", "the upload is not a DICOM Part 10 file (no DICM preamble)")
    return (*service.radiograph_query(service.radiograph_from_bytes(data)), "upload")


# ---- ranking -------------------------------------------------------------------------------------------------------


def rank(service: Service, vector, info: QueryInfo, op: operating_point.OperatingPoint, group_by: str,
         include_same_patient: bool, filters=None) -> list:
    """[(best hit, images of its study among the hits)] best first: up to op.k rows, each >= op.threshold.

    Asks the index for more neighbours until there are k rows (studies or images), the threshold cuts the list
    (fewer hits come back than were asked for), or the index has no more."""
    total = service.size
    fetch = min(total, op.k if group_by == "image" else op.k * 2)
    while True:
        kept = service.searcher.search(vector, info, op.with_k(fetch), include_same_patient, filters).hits
        if group_by == "study":
            studies: OrderedDict = OrderedDict()
            for hit in kept:
                best, count = studies.get(hit.case.study_uid, (hit, 0))
                studies[hit.case.study_uid] = (best, count + 1)
            rows = list(studies.values())
        else:
            rows = [(hit, 1) for hit in kept]
        if len(rows) >= op.k or len(kept) < fetch or fetch >= total:
            return rows[:op.k]
        fetch = min(total, fetch * 4)


def _row(service: Service, settings: Settings, rank_: int, hit, images: int) -> dict:
    case = hit.case
    return {
        "rank": rank_,
        "score": round(hit.score, 6),
        "study_uid": case.study_uid,
        "series_uid": case.series_uid,
        "sop_uid": case.sop_uid,
        "patient": service.patient_ref(case.patient_id, settings.pseudonymize_patient_ids),
        "labels": list(case.labels),
        "view": case.view,
        "matched_images": images,
        "thumbnail_url": thumbnail_url(service, case.sop_uid, settings),
        "viewer_url": viewer_url(service, case, settings),
    }


def url_prefix(settings: Settings) -> str:
    """The absolute root of URLs in responses: ``public_url`` when set (a server behind a proxy), else this request's
    own scheme, host and script root. Absolute, so thumbnails and links work from a viewer on another origin; the
    Host header was checked against the allowed hosts (medsim.server.security) before any handler ran."""
    return settings.public_url.rstrip("/") or request.url_root.rstrip("/")


def thumbnail_url(service: Service, sop_uid: str, settings: Settings | None = None) -> str:
    settings = settings or app_settings()
    prefix = url_prefix(settings)
    url = f"{prefix}/api/v1/cases/{_quote(sop_uid)}/thumbnail"
    if current_app.config["MEDSIM_TOKENS"]:
        ttl = settings.thumbnail_url_ttl
        expires = (int(time.time()) // ttl + 2) * ttl  # the same URL for a while, so browsers can cache it
        url += "?" + urlencode({"exp": expires, "sig": service.sign(sop_uid, expires)})
    return url


def viewer_url(service: Service, case, settings: Settings | None = None) -> str:
    settings = settings or app_settings()
    url = settings.viewer_url_template.format(study_uid=_quote(case.study_uid), series_uid=_quote(case.series_uid),
                                              sop_uid=_quote(case.sop_uid))
    if url.startswith("/") and not url.startswith("//"):
        url = url_prefix(settings) + url
    return url


def _quote(uid: str) -> str:
    return uid if is_uid(uid) else quote(uid, safe="")

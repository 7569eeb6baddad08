"""``POST /api/v1/cohort``: export a result list (the query and its hits, as the panel shows them) as CSV, or store
it in the PACS as a DICOM Key Object Selection document (:mod:`medsim.cohort`).

Body (JSON)::

    {"query": {"study_uid", "series_uid", "sop_uid"},   # as for /similar: indexed, or in the PACS
     "hits": ["<SOP Instance UID>", ...],              # best first, each indexed (1..MAX_HITS, no repeats)
     "filters": {...},                                 # optional: the filters the list was made with (recorded)
     "format": "csv" | "kos"}

The server trusts only the UIDs: study, series, view, findings and the patient pseudonym come from the index, and
each score is the cosine similarity of the hit's stored vector to the query's (recomputed here). ``csv`` answers a
``text/csv`` download. ``kos`` needs a PACS (``--pacs``): the document is stored there in the query's study (STOW-RS)
and the answer is 201 with its study, series and SOP Instance UIDs.
"""

from __future__ import annotations

import json

import numpy as np
from flask import Blueprint, Response, current_app, jsonify, request

from medsim.cohort import SERIES_DESCRIPTION, CohortError, make_cohort, store_kos, to_csv
from medsim.dicomweb import is_uid
from medsim.index import Hit
from medsim.search import FilterError, parse_filters
from medsim.server.errors import ApiError
from medsim.server.security import audit
from medsim.server.similar import MAX_JSON_BYTES, UID_FIELDS, _query_by_uids, patient_ref, viewer_url
from medsim.server.state import Service

FIELDS = ("query", "hits", "filters", "format")
FORMATS = ("csv", "kos")
MAX_HITS = 500


def blueprint() -> Blueprint:
    bp = Blueprint("cohort", __name__)
    bp.add_url_rule("/cohort", view_func=cohort, methods=["POST"])
    return bp


def cohort():
    service: Service = current_app.extensions["medsim"]
    with service.pinned():  # the hits and the query's vector from one index snapshot
        return _cohort(service)


def _cohort(service: Service):
    body = _body()
    fmt = body["format"]
    audit(cohort_format=fmt, sop_uid=body["query"]["sop_uid"], hits=len(body["hits"]))
    if fmt == "kos" and service.pacs is None:
        raise ApiError(409, "no-pacs", "the server has no PACS configured (--pacs), so a KOS cannot be stored; "
                       "export CSV instead")
    vector, info, _ = _query_by_uids(service, body["query"])
    query_vector = np.asarray(vector, dtype=np.float64)
    query_vector = query_vector / (np.linalg.norm(query_vector) or 1.0)  # never in place: it may be a cached vector
    hits = []
    for sop_uid in body["hits"]:
        case = service.case(sop_uid)
        if case is None:
            raise ApiError(404, "not-indexed", f"hit {sop_uid} is not indexed")
        hit_vector = np.asarray(service.index.vector(sop_uid), dtype=np.float64)
        hits.append(Hit(case, float(query_vector @ hit_vector / (np.linalg.norm(hit_vector) or 1.0))))
    indexed = service.case(info.sop_uid) if info.indexed else None
    members = make_cohort(info, indexed.labels if indexed else (), hits, lambda p: patient_ref(service, p),
                          model=service.index.meta.get("model_name") or "", filters=body["filters"])
    if fmt == "csv":
        response = Response(to_csv(members), mimetype="text/csv")
        response.headers["Content-Disposition"] = 'attachment; filename="medsim-cohort.csv"'
        return response
    try:
        stored = store_kos(service.pacs, members)
    except CohortError as exc:
        raise ApiError(409, exc.reason, str(exc)) from None
    audit(kos_sop_uid=stored.sop_uid)
    answer = jsonify({"study_uid": stored.study_uid, "series_uid": stored.series_uid, "sop_uid": stored.sop_uid,
                      "references": stored.references, "series_description": SERIES_DESCRIPTION,
                      "viewer_url": viewer_url(service, info)})
    answer.status_code = 201
    return answer


def _body() -> dict:
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported-media-type", "send the cohort as application/json")
    if (request.content_length or 0) > MAX_JSON_BYTES:
        raise ApiError(413, "too-large", f"a cohort request is at most {MAX_JSON_BYTES} bytes")
    try:
        body = json.loads(request.get_data(cache=False))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "malformed-json", "request body is not a usable JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "malformed-json", "request body must be a JSON object")
    unknown = sorted(str(name)[:40] for name in set(body) - set(FIELDS))
    if unknown:
        raise ApiError(400, "unknown-field", f"unknown field(s) {unknown}; allowed: {list(FIELDS)}")
    if body.get("format") not in FORMATS:
        raise ApiError(400, "invalid-parameter", f"format must be one of {list(FORMATS)}, got "
                       f"{str(body.get('format'))[:40]!r}")
    query = body.get("query")
    if not isinstance(query, dict) or set(query) - set(UID_FIELDS) or not query.get("sop_uid"):
        raise ApiError(400, "bad-request", f"query must be an object with sop_uid (and study_uid, series_uid for an "
                       f"image that is not indexed); allowed: {list(UID_FIELDS)}")
    hits = body.get("hits")
    if not isinstance(hits, list) or not 1 <= len(hits) <= MAX_HITS:
        raise ApiError(400, "bad-request", f"hits must be a list of 1..{MAX_HITS} SOP Instance UIDs, best first")
    for uid in hits:
        if not (is_uid(uid) and not uid.endswith("\n")):
            raise ApiError(400, "invalid-uid", f"hit is not a DICOM UID: {str(uid)[:80]!r}")
    if len(set(hits)) != len(hits) or query["sop_uid"] in hits:
        raise ApiError(400, "bad-request", "hits must not repeat a SOP Instance UID nor hold the query's")
    filters = body.get("filters")
    if filters is not None:
        try:
            filters = parse_filters(filters).to_dict()
        except FilterError as exc:
            raise ApiError(400, "invalid-parameter", str(exc)) from None
    return {"query": {name: query.get(name) for name in UID_FIELDS}, "hits": hits, "filters": filters or {},
            "format": body["format"]}

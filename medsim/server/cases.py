"""``/api/v1/cases/<sop_uid>``: one indexed case, and its thumbnail.

``GET /api/v1/cases/<sop_uid>`` returns the case's UIDs, labels, view and pseudonymous patient reference.
``GET /api/v1/cases/<sop_uid>/thumbnail`` returns a PNG (longest side ``thumbnail_size``), made from the indexed file
(or fetched from the PACS when the index holds a DICOMweb URL or the file has moved) and cached in memory and on disk.
The image must carry the case's SOP Instance UID and the catalog's pixel hash (409 ``source-mismatch`` otherwise, see
:class:`~medsim.server.state.Thumbnails`). Responses carry an ETag and may be cached privately by the browser.
"""

from __future__ import annotations

import hashlib

from flask import Blueprint, Response, current_app, jsonify, request

from medsim.dicomweb import is_uid
from medsim.server.errors import ApiError
from medsim.server.security import audit
from medsim.server.similar import patient_ref, thumbnail_url, viewer_url
from medsim.server.state import Service


def blueprint() -> Blueprint:
    bp = Blueprint("cases", __name__)
    bp.add_url_rule("/cases/<sop_uid>", view_func=case, methods=["GET"])
    bp.add_url_rule("/cases/<sop_uid>/thumbnail", view_func=thumbnail, methods=["GET"])
    return bp


def _case(service: Service, sop_uid: str):
    if not is_uid(sop_uid):
        raise ApiError(400, "invalid-uid", f"not a DICOM UID: {sop_uid[:80]!r}")
    audit(sop_uid=sop_uid)
    found = service.case(sop_uid)
    if found is None:
        raise ApiError(404, "not-indexed", f"instance {sop_uid} is not indexed")
    return found


def case(sop_uid: str):
    service: Service = current_app.extensions["medsim"]
    found = _case(service, sop_uid)
    return jsonify({
        "study_uid": found.study_uid, "series_uid": found.series_uid, "sop_uid": found.sop_uid,
        "patient": patient_ref(service, found.patient_id), "labels": list(found.labels), "view": found.view,
        "modality": found.modality, "thumbnail_url": thumbnail_url(service, found.sop_uid),
        "viewer_url": viewer_url(service, found),
    })


def thumbnail(sop_uid: str):
    service: Service = current_app.extensions["medsim"]
    found = _case(service, sop_uid)
    data = service.thumbnails.get(found)
    etag = hashlib.sha1(data).hexdigest()[:20]
    if etag in request.if_none_match:
        response = Response(status=304)
    else:
        response = Response(data, mimetype="image/png")
    response.set_etag(etag)
    response.headers["Cache-Control"] = "private, max-age=86400"
    return response

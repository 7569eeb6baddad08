"""``GET /healthz``: is the index loaded, is the PACS reachable. Open (no token), carries no patient data.

200 with ``"status": "ok"`` when the index is loaded and the PACS (if configured) answers; 200 with
``"status": "degraded"`` when the PACS does not answer (indexed queries still work); 503 when the index is unusable.
``index`` describes the snapshot being served (its size agrees with ``/api/v1/index`` and the cases resource): the
number of cases, the model, when the catalog was last updated and when the snapshot was loaded, and, when a newer
committed index could not be loaded, why.
"""

from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify

from medsim.server.state import Service


def blueprint() -> Blueprint:
    bp = Blueprint("health", __name__)
    bp.add_url_rule("/healthz", view_func=healthz, methods=["GET"])
    return bp


def healthz():
    service: Service = current_app.extensions["medsim"]
    try:
        with service.pinned() as snapshot:
            index = {"loaded": True, "cases": snapshot.count, "model": service.index.model_fingerprint,
                     "updated_at": snapshot.updated_at, "loaded_at": round(snapshot.loaded_at, 3)}
        if service.index.last_error:
            index["reload_error"] = service.index.last_error
    except Exception as exc:  # a broken catalog must show here, not crash the probe
        index = {"loaded": False, "error": f"{type(exc).__name__}: {exc}"}
    configured = service.pacs is not None
    reachable, detail = service.pacs_health() if configured else (False, "no PACS configured")
    pacs = {"configured": configured, "reachable": reachable, "detail": detail}
    status = "ok" if index["loaded"] and (reachable or not configured) else "degraded"
    if not index["loaded"]:
        status = "unavailable"
    response = jsonify({"status": status, "index": index, "pacs": pacs,
                        "uptime_s": round(time.time() - service.started_at, 1)})
    response.status_code = 503 if status == "unavailable" else 200
    response.headers["Cache-Control"] = "no-store"
    return response

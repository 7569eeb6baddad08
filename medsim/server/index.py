"""``GET /api/v1/index``: what the service searches: size, model, operating point and label vocabulary, all of the
index snapshot being served (a newer committed index is picked up without a restart; see ``state.ServedIndex``)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from medsim import operating_point
from medsim.server.similar import app_settings
from medsim.server.state import Service


def blueprint() -> Blueprint:
    bp = Blueprint("index", __name__)
    bp.add_url_rule("/index", view_func=index_info, methods=["GET"])
    return bp


def index_info():
    service: Service = current_app.extensions["medsim"]
    with service.pinned() as snapshot:  # size, statistics and operating point of one snapshot
        return _index_info(service, snapshot)


def _index_info(service: Service, snapshot):
    stats = snapshot.stats
    calibration = operating_point.public_view(snapshot.meta)
    return jsonify({
        "cases": stats["cases"],
        "studies": stats["studies"],
        "patients": stats["patients"],
        "model": {k: stats["model"][k] for k in ("name", "fingerprint", "dim")},
        "operating_point": {
            "calibrated": calibration is not None,
            "threshold": calibration.get("threshold") if calibration else None,
            "target_recall": calibration.get("target_recall") if calibration else None,
            "k": calibration.get("k") if calibration else None,
            "default_k": app_settings().default_k,
            "max_k": app_settings().max_k,
            "calibration": calibration,
        },
        "labels": stats["labels"],
        "label_vocabulary": sorted(stats["labels"]),
        "views": stats["views"],
        "created_at": stats["created_at"],
        "updated_at": stats["updated_at"],
        "removed": stats.get("removed", 0),
        "loaded_at": snapshot.loaded_at,
        "watch": _watch_view(snapshot.meta.get("watch")),
        "pacs_configured": service.pacs is not None,
    })


def _watch_view(state) -> dict | None:
    """What `medsim watch` stored about its position in the PACS (no URL: the PACS may be internal)."""
    if not isinstance(state, dict):
        return None
    return {k: state.get(k) for k in ("mode", "last_change", "study_date", "checked_at") if k in state}

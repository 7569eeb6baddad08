"""``/api/v1/feedback``: relevance votes (👍 / 👎) on the hits of a query, and the query refined by them.

* ``POST /api/v1/feedback`` ``{"query": SOP, "hit": SOP, "vote": "up" | "down" | "none"}`` (``study_uid`` and
  ``series_uid`` too when the query is not indexed, as for /similar): stores the caller's vote on ``hit`` as an answer
  to ``query`` (``none`` withdraws it), with who (the bearer token's client name; else the server's REMOTE_USER;
  else "anonymous"), when, the hit's score and the model's fingerprint, in the catalog (:mod:`medsim.feedback`) and
  in the audit record of the request. 201 with the vote; 404 for a hit that is not indexed or a query that cannot be
  found; 400 for a bad vote or UID; 409 ``read-only-index`` when the catalog cannot be written (or the server runs
  with ``feedback = false``).
* ``GET /api/v1/feedback?query=SOP``: the current votes on the hits of that query for the served model.
* ``POST /api/v1/feedback/refine``: the body and answer of ``POST /api/v1/similar``, with the query vector moved
  by the votes on that query (Rocchio, :data:`medsim.feedback.ROCCHIO`); ``refined`` says how many 👍 / 👎 hits
  moved it and with which parameters.
"""

from __future__ import annotations

import threading

from flask import Blueprint, current_app, g, jsonify, request

from medsim.dicomweb import is_uid
from medsim.feedback import VOTES, WITHDRAW, FeedbackError, FeedbackStore, net_votes, refine
from medsim.server import similar
from medsim.server.errors import ApiError, error_response
from medsim.server.security import audit
from medsim.server.state import Service

FIELDS = ("query", "hit", "vote", "study_uid", "series_uid")
MAX_BODY_BYTES = 4096


def blueprint() -> Blueprint:
    bp = Blueprint("feedback", __name__)
    bp.add_url_rule("/feedback", view_func=post_vote, methods=["POST"])
    bp.add_url_rule("/feedback", view_func=get_votes, methods=["GET"])
    bp.add_url_rule("/feedback/refine", view_func=post_refine, methods=["POST"])
    return bp


_STORES_LOCK = threading.Lock()


def _store(service: Service) -> FeedbackStore:
    """The service's vote store (kept on the service, so it goes with it)."""
    with _STORES_LOCK:
        store = getattr(service, "_feedback_store", None)
        if store is None:
            store = service._feedback_store = FeedbackStore(service.settings.index)
        return store


def who() -> str:
    """The voter: the authenticated client (bearer token name), else the identity the WSGI server vouches for."""
    client = g.get("client", "anonymous")
    if client not in ("anonymous", "signed-url"):
        return client
    return (request.remote_user or "anonymous")[:64]


def _uid(body: dict, name: str, required: bool) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, "bad-request", f"{name} (a SOP Instance UID) is required")
        return None
    if not isinstance(value, str) or not is_uid(value) or value.endswith("\n"):
        raise ApiError(400, "invalid-uid", f"{name} is not a DICOM UID (digits and dots, at most 64 characters): "
                       f"{str(value)[:80]!r}")
    return value


def _body() -> dict:
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported-media-type", "send the vote as application/json")
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise ApiError(413, "too-large", f"a vote is at most {MAX_BODY_BYTES} bytes")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "malformed-json", "the request body must be a JSON object")
    unknown = sorted(str(k)[:40] for k in body if k not in FIELDS)
    if unknown:
        raise ApiError(400, "unknown-field", f"unknown field(s) {unknown}; allowed: {list(FIELDS)}")
    return body


def post_vote():
    service: Service = current_app.extensions["medsim"]
    with service.pinned():
        return _post_vote(service)


def _post_vote(service: Service):
    body = _body()
    query, hit = _uid(body, "query", True), _uid(body, "hit", True)
    vote = body.get("vote")
    if not isinstance(vote, str) or (vote not in VOTES and vote != WITHDRAW):
        raise ApiError(400, "invalid-vote", f"vote must be \"up\", \"down\" or \"none\" (withdraw), got "
                       f"{str(vote)[:20]!r}")
    if query == hit:
        raise ApiError(400, "bad-request", "the hit is the query itself")
    audit(query=query, hit=hit, vote=vote)
    if not similar.app_settings().feedback:
        raise ApiError(409, "read-only-index", "this server keeps its index read-only (feedback = false): votes "
                       "are not stored")
    hit_vector = service.index.vector(hit)
    if hit_vector is None:
        raise ApiError(404, "not-indexed", f"hit {hit} is not indexed")
    uids = {"sop_uid": query, "study_uid": _uid(body, "study_uid", False),
            "series_uid": _uid(body, "series_uid", False)}
    query_vector, _, _ = similar._query_by_uids(service, uids)  # indexed, recently asked, or fetched from the PACS
    score = round(float(query_vector @ hit_vector), 6)
    user = who()
    try:
        stored = _store(service).vote(user=user, query_sop_uid=query, hit_sop_uid=hit, vote=vote, score=score,
                                      model_fingerprint=service.index.model_fingerprint)
    except FeedbackError as exc:
        if exc.read_only:
            raise ApiError(409, "read-only-index", str(exc)) from None
        busy = error_response(503, "busy", str(exc))  # a build-index transaction held the catalog past the wait
        busy.headers["Retry-After"] = "1"
        return busy
    audit(score=score, voter=user)
    return jsonify({"query": query, "hit": hit, "vote": vote, "user": user, "score": score,
                    "voted_at": stored.voted_at if stored else None,
                    "model": {"fingerprint": service.index.model_fingerprint},
                    **_counts(service, query)}), 201 if stored else 200


def _counts(service: Service, query: str) -> dict:
    up, down = net_votes(_votes(service, query))
    return {"up": len(up), "down": len(down)}


def _votes(service: Service, query: str):
    try:
        return _store(service).votes(query_sop_uid=query, model_fingerprint=service.index.model_fingerprint)
    except FeedbackError as exc:
        raise ApiError(503, "feedback-unavailable", str(exc)) from None


def get_votes():
    service: Service = current_app.extensions["medsim"]
    unknown = sorted(name[:40] for name in request.args if name != "query")
    if unknown:
        raise ApiError(400, "unknown-field", f"unknown parameter(s) {unknown}; allowed: ['query']")
    query = _uid(request.args.to_dict(), "query", True)
    audit(query=query)
    votes = _votes(service, query)
    return jsonify({"query": query, "model": {"fingerprint": service.index.model_fingerprint},
                    "votes": [{k: v for k, v in vote.to_dict().items() if k not in ("query_sop_uid",
                                                                                     "model_fingerprint")}
                              for vote in votes],
                    **_counts(service, query)})


def post_refine():
    service: Service = current_app.extensions["medsim"]
    with service.pinned():
        return similar._similar(service, refine=lambda vector, info: _refine(service, vector, info))


def _refine(service: Service, vector, info):
    result = refine(vector, _votes(service, info.sop_uid), service.index.vector)
    audit(refined_up=result.up, refined_down=result.down)
    return result.vector, result.to_dict()

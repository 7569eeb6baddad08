"""Which results a query returns: the top k, cut at a similarity threshold, the same way as `medsim query`.

* nothing: the index's calibrated operating point (``medsim calibrate``; the threshold for its target list
  recall@k), with k = the k it was calibrated for unless the request gives one; an index without calibration
  returns the plain top k;
* ``threshold``: results with cosine score >= threshold (at most k);
* ``target_recall``: the threshold the index's calibration curve gives for that list recall (at most k);
* ``threshold: "none"``: the plain top k, ignoring a calibrated operating point (like ``--no-threshold``).

Thresholds come from :meth:`medsim.search.Searcher.operating_point` (and so :mod:`medsim.calibrate`); this module
only names the mode and picks k.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from medsim.errors import MedsimError

NONE = "none"
# What GET /api/v1/index shows of a stored operating point (not its data section: it names server-side paths).
PUBLIC_KEYS = ("threshold", "target_recall", "k", "definition", "relevance", "relevance_text",
               "include_same_patient", "calibration", "check", "precision_paid", "curve", "created_at",
               "model_fingerprint", "model_name")


@dataclass(frozen=True)
class OperatingPoint:
    mode: str  # calibrated | threshold | target_recall | top-k
    k: int
    threshold: float | None = None
    target_recall: float | None = None
    source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class OperatingPointError(ValueError):
    """A request that the index's calibration cannot answer, or contradictory parameters."""


def stored(meta: dict) -> dict | None:
    from medsim.calibrate import META_KEY

    op = meta.get(META_KEY)
    return op if isinstance(op, dict) and op else None


def public_view(meta: dict) -> dict | None:
    op = stored(meta)
    return None if op is None else {key: op[key] for key in PUBLIC_KEYS if key in op}


def resolve(searcher, *, k: int | None, threshold, target_recall: float | None, default_k: int,
            max_k: int) -> OperatingPoint:
    """The operating point of one request. ``threshold`` is a number, ``"none"`` or None (not given)."""
    if threshold is not None and target_recall is not None:
        raise OperatingPointError("pass either threshold or target_recall, not both")
    if threshold == NONE:
        return OperatingPoint("top-k", k or default_k, source="request (threshold: none)")
    try:
        op = searcher.operating_point(threshold, target_recall)
    except MedsimError as exc:
        raise OperatingPointError(str(exc)) from None
    calibrated = stored(searcher.index.meta)
    if op is None:
        return OperatingPoint("top-k", k or default_k, source="index not calibrated")
    if threshold is not None:
        mode = "threshold"
    elif target_recall is not None:
        mode = "target_recall"
    else:
        mode = "calibrated"
    if k is None:
        k = int(calibrated.get("k") or default_k) if calibrated and mode != "threshold" else default_k
    return OperatingPoint(mode, min(k, max_k), threshold=float(op["threshold"]),
                          target_recall=op.get("target_recall"), source=op.get("source", ""))

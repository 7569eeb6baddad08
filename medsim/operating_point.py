"""Operating points: which results a query returns, as one resolved object per query.

An index may store a calibrated operating point (``medsim calibrate`` writes it under :data:`META_KEY`: a threshold
for a target list recall@k plus the recall -> threshold curve). A request then asks for

* nothing: the stored operating point, with k = the k it was calibrated for unless the request gives one; an index
  without calibration returns the plain top k;
* ``threshold``: results with cosine score >= threshold (at most k);
* ``target_recall``: the threshold the stored curve gives for that list recall (at most k);
* ``threshold="none"`` (:data:`NONE`): the plain top k, ignoring a stored operating point.

:func:`resolve` turns a request into an :class:`OperatingPoint` once; search, the CLI and the server use that object.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from medsim.errors import MedsimError

META_KEY = "operating_point"
NONE = "none"
# What GET /api/v1/index shows of a stored operating point (not its data section: it names server-side paths).
PUBLIC_KEYS = ("threshold", "target_recall", "k", "definition", "relevance", "relevance_text",
               "include_same_patient", "calibration", "check", "precision_paid", "curve", "created_at",
               "model_fingerprint", "model_name")


# A threshold calibrated on fewer labeled queries than this is reported with a warning (issue 15): its recall is an
# estimate with a wide interval (on 16 queries a "90 %-recall threshold" can miss far more than 10 %).
MIN_CALIBRATION_QUERIES = 200


class OperatingPointError(MedsimError, ValueError):
    """A request that the index's calibration cannot answer, or contradictory parameters."""


@dataclass(frozen=True)
class OperatingPoint:
    """The resolved cut of one query: at most ``k`` results, each with score >= ``threshold`` (None: no cut)."""

    mode: str  # calibrated | threshold | target_recall | top-k
    k: int
    threshold: float | None = None
    target_recall: float | None = None
    source: str = ""
    calibrated_k: int | None = None  # the k a stored calibration's recall refers to
    definition: str = ""
    calibrated_on: dict | None = None  # {"queries", "patients"} a calibrated threshold was fitted on
    model: str = ""  # the model the calibration was made with

    @property
    def warning(self) -> str | None:
        """Why the threshold's recall is not to be trusted as stated, if it is not."""
        if self.calibrated_on is None:
            return None
        queries = self.calibrated_on.get("queries")
        if not isinstance(queries, int):
            return "the number of labeled queries this threshold was calibrated on is not recorded"
        if queries < MIN_CALIBRATION_QUERIES:
            return (f"calibrated on only {queries} labeled queries (fewer than {MIN_CALIBRATION_QUERIES}): the "
                    f"{round(100 * (self.target_recall or 0))} % recall is a rough estimate")
        return None

    def to_dict(self) -> dict:
        """The API's view (``operating_point`` of a /similar response)."""
        return {"mode": self.mode, "k": self.k, "threshold": self.threshold, "target_recall": self.target_recall,
                "source": self.source, "calibrated_on": self.calibrated_on, "model": self.model or None,
                "warning": self.warning}

    def threshold_summary(self) -> dict | None:
        """The CLI's view (``medsim query --json``): None for plain top-k, else the threshold and where it came from."""
        if self.threshold is None:
            return None
        if self.mode == "threshold":
            return {"threshold": self.threshold, "source": self.source}
        return {"threshold": self.threshold, "source": self.source, "target_recall": self.target_recall,
                "k": self.calibrated_k, "definition": self.definition, "calibrated_on": self.calibrated_on,
                "warning": self.warning}

    def with_k(self, k: int) -> "OperatingPoint":
        return replace(self, k=k)


def stored(meta: dict) -> dict | None:
    """The operating point stored in an index's metadata, or None."""
    op = meta.get(META_KEY)
    return op if isinstance(op, dict) and op else None


def public_view(meta: dict) -> dict | None:
    op = stored(meta)
    if op is None:
        return None
    view = {key: op[key] for key in PUBLIC_KEYS if key in op}
    view["calibrated_on"] = calibrated_on(op)
    warning = OperatingPoint("calibrated", 0, target_recall=op.get("target_recall"),
                             calibrated_on=view["calibrated_on"]).warning
    view["warning"] = warning
    return view


def calibrated_on(op: dict) -> dict:
    """{"queries", "patients"} of the labeled queries a stored operating point was calibrated on (None if unknown)."""
    data = op.get("data") if isinstance(op.get("data"), dict) else {}
    out = {}
    for key, name in (("queries", "calibration_queries"), ("patients", "calibration_patients")):
        value = data.get(name)
        out[key] = value if isinstance(value, int) and not isinstance(value, bool) else None
    return out


def threshold_for_recall(op: dict | None, target_recall: float | None = None) -> float:
    """The similarity threshold for a target list recall, from a stored operating point ``op``.

    target_recall None: the stored operating point's own threshold. Otherwise the highest stored threshold whose
    calibrated list recall is at least the target (conservative: the recall reached is >= the target). Raises
    OperatingPointError when there is no operating point or the target is out of range.
    """
    if not op:
        raise OperatingPointError("no calibrated operating point stored with this index; run `medsim calibrate` "
                                  "first")
    if target_recall is None or abs(float(target_recall) - float(op["target_recall"])) < 1e-12:
        return float(op["threshold"])
    target = float(target_recall)
    if not 0.0 < target <= 1.0:
        raise OperatingPointError(f"target recall must be in (0, 1], got {target}")
    curve = op.get("curve") or {}
    levels = np.asarray(curve.get("target_recall", []), dtype=np.float64)
    thresholds = np.asarray(curve.get("threshold", []), dtype=np.float64)
    if levels.size == 0:
        raise OperatingPointError("the stored operating point has no recall curve; re-run `medsim calibrate`")
    reachable = np.flatnonzero(levels >= target - 1e-12)
    if reachable.size == 0:
        return float(thresholds[np.argmax(levels)])
    return float(thresholds[reachable[np.argmin(levels[reachable])]])


def resolve(meta: dict, *, k: int | None = None, threshold: float | str | None = None,
            target_recall: float | None = None, default_k: int = 10, max_k: int | None = None) -> OperatingPoint:
    """The operating point of one request against an index with metadata ``meta``.

    ``threshold`` is a number, :data:`NONE` or None (not given); ``k`` None means the calibrated k (or
    ``default_k``); ``max_k`` caps k."""
    if threshold is not None and target_recall is not None:
        raise OperatingPointError("pass either threshold or target_recall, not both")
    calibrated = stored(meta)
    cap = (lambda n: min(n, max_k)) if max_k else (lambda n: n)
    if threshold == NONE:
        return OperatingPoint("top-k", cap(k or default_k), source="request (threshold: none)")
    if threshold is not None:
        return OperatingPoint("threshold", cap(k or default_k), threshold=float(threshold),
                              source="requested threshold")
    if target_recall is None and calibrated is None:
        return OperatingPoint("top-k", cap(k or default_k), source="index not calibrated")
    value = threshold_for_recall(calibrated, target_recall)
    mode, source = (("target_recall", "requested target recall") if target_recall is not None
                    else ("calibrated", "stored operating point"))
    return OperatingPoint(mode, cap(k or int(calibrated.get("k") or default_k)), threshold=value,
                          target_recall=float(target_recall if target_recall is not None
                                              else calibrated["target_recall"]),
                          source=source, calibrated_k=calibrated["k"], definition=calibrated["definition"],
                          calibrated_on=calibrated_on(calibrated),
                          model=str(calibrated.get("model_name") or meta.get("model_name") or ""))

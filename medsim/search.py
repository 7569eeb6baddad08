"""Search: an index plus the model that built it. Used by `medsim query` and the server.

The query's own patient is excluded by default (researchers look for *other* patients' cases). A query image that is
already indexed (same SOP Instance UID, or same file) uses its stored vector, so it costs no decoding or embedding.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from medsim import operating_point
from medsim.dicom import ChestPolicy, Radiograph
from medsim.errors import MedsimError, ModelMismatch
from medsim.index import (
    FINDINGS_MODES,
    SEXES,
    VIEW_CLASSES,
    Case,
    CaseFilter,
    CaseIndex,
    Hit,
    view_class,
)
from medsim.ingest import read_any
from medsim.operating_point import OperatingPoint
from medsim.preprocess import prepare

SCORE_TOLERANCE = 1e-6  # float32 rounding of hnswlib's distances must not drop a case that sits on the threshold


@dataclass
class QueryInfo:
    """The query as understood."""

    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str | None
    view: str
    indexed: bool
    transfer_syntax: str = ""  # of the query's DICOM file, when known (the viewer cannot draw some, e.g. Deflated)


@dataclass
class SearchResult:
    query: QueryInfo
    hits: list[Hit]
    include_same_patient: bool
    operating_point: OperatingPoint
    filters: CaseFilter = field(default_factory=CaseFilter)

    def to_dict(self) -> dict:
        return {
            "query": asdict(self.query),
            "include_same_patient": self.include_same_patient,
            "filters": self.filters.to_dict(),
            "operating_point": self.operating_point.threshold_summary(),
            "results": [
                {"rank": rank, "score": round(hit.score, 6), "sop_uid": hit.case.sop_uid,
                 "series_uid": hit.case.series_uid, "study_uid": hit.case.study_uid,
                 "patient_id": hit.case.patient_id, "labels": list(hit.case.labels), "view": hit.case.view,
                 "path": hit.case.source_path}
                for rank, hit in enumerate(self.hits, 1)
            ],
        }


class Searcher:
    """Answers queries against one index with the one model whose vectors it holds."""

    def __init__(self, index: CaseIndex, model: str | None = None, policy: ChestPolicy = ChestPolicy()):
        self.index = index
        self.policy = policy
        self._model_spec = model
        self._bundle = None
        self._embedder = None

    @classmethod
    def open(cls, index_path: str | Path, model: str | None = None) -> "Searcher":
        return cls(CaseIndex.open(index_path), model=model)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def bundle(self):
        """The index's model bundle, loaded on first need and checked against the index's fingerprint."""
        if self._bundle is None:
            self._bundle = bundle_for_index(self.index, self._model_spec)
        return self._bundle

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = self.bundle.embedder()
        return self._embedder

    def embed(self, radiograph: Radiograph) -> np.ndarray:
        return self.embedder.embed_prepared([prepare(radiograph.pixels, self.bundle.preprocess)])[0]

    def operating_point(self, **request) -> OperatingPoint:
        """The request's operating point against this index (see :func:`medsim.operating_point.resolve`)."""
        return operating_point.resolve(self.index.meta, **request)

    def indexed_query(self, case: Case, patient_id: str | None = None, view: str = "") -> tuple[np.ndarray, QueryInfo]:
        """An indexed image as a query: its stored vector, no decoding or embedding."""
        info = QueryInfo(case.sop_uid, case.series_uid, case.study_uid, patient_id or case.patient_id,
                         case.view or view, indexed=True,
                         transfer_syntax=str(case.attributes.get("transfer_syntax") or ""))
        return self.index.vector(case.sop_uid), info

    def radiograph_query(self, radiograph: Radiograph, patient_id: str | None = None,
                         embed=None) -> tuple[np.ndarray, QueryInfo]:
        """A decoded image as a query: the stored vector when its SOP Instance UID is indexed, else its embedding
        (``embed``: the function that embeds it; default :meth:`embed`)."""
        known = self.index.get(radiograph.sop_uid)
        if known is not None:
            return self.indexed_query(known, patient_id or radiograph.patient_id, radiograph.view)
        info = QueryInfo(radiograph.sop_uid, radiograph.series_uid, radiograph.study_uid,
                         patient_id or radiograph.patient_id, radiograph.view, indexed=False,
                         transfer_syntax=radiograph.transfer_syntax or "")
        return (embed or self.embed)(radiograph), info

    def file_query(self, path: str | Path, patient_id: str | None = None) -> tuple[np.ndarray, QueryInfo]:
        """A file as a query: the stored vector when the file (or its SOP Instance UID) is indexed."""
        path = Path(path)
        if not path.exists():
            raise MedsimError(f"query file {path} does not exist")
        known = self.index.get_by_path(str(path.resolve()))
        if known is not None:
            return self.indexed_query(known, patient_id)
        return self.radiograph_query(read_any(path, policy=self.policy), patient_id)

    def search(self, vector: np.ndarray, info: QueryInfo, op: OperatingPoint,
               include_same_patient: bool = False, filters: CaseFilter | None = None) -> SearchResult:
        """The top ``op.k`` cases of other patients (unless ``include_same_patient``) that pass ``filters``, cut at
        ``op.threshold``. The filters apply inside the nearest-neighbour search (k come back whenever k cases pass
        them); without a view filter, only cases of the query's own view class answer (:func:`for_query`)."""
        filters = for_query(filters, info.view)
        hits = self.index.search(
            vector, k=op.k,
            exclude_patient=None if include_same_patient else info.patient_id,
            exclude_sop_uid=info.sop_uid,
            case_filter=filters if filters else None,
        )
        if op.threshold is not None:
            cut = op.threshold - SCORE_TOLERANCE
            hits = [hit for hit in hits if hit.score >= cut]
        return SearchResult(query=info, hits=hits, include_same_patient=include_same_patient, operating_point=op,
                            filters=filters)


# ---- filters -------------------------------------------------------------------------------------------------------

class FilterError(MedsimError):
    """A filter that cannot be applied (wrong type or value); the API answers 400."""


FILTER_FIELDS = ("view", "sex", "age", "findings", "modality", "study_date")
VIEW_CHOICES = (*VIEW_CLASSES, "any")


def for_query(filters: CaseFilter | None, query_view: str) -> CaseFilter:
    """``filters`` with the default view filter filled in when none was asked for: the query's own view class. A
    frontal query gets frontal cases (and cases of unknown view, which cannot be told apart), never laterals; a
    lateral query lateral (and unknown) ones; a query of unknown view any view."""
    filters = CaseFilter() if filters is None else filters
    if filters.views is not None:
        return filters
    own = view_class(query_view)
    if own == "unknown":
        return filters
    return replace(filters, views=(own, "unknown"))


def parse_filters(spec) -> CaseFilter:
    """A :class:`CaseFilter` from the API's ``filters`` object (or the CLI's flags), checked:

    ``view``: "frontal" | "lateral" | "unknown" | "any" or a list of those (default: the query's own class);
    ``sex``: "F" | "M" | "O"; ``age``: {"min": years, "max": years} (either may be left out) or "40-60";
    ``findings``: a list (any of them), or {"any": [...]} / {"all": [...]}; ``modality``: "CR" or a list;
    ``study_date``: {"from": "YYYY-MM-DD", "to": "YYYY-MM-DD"} (YYYYMMDD too; either may be left out)."""
    if spec is None:
        return CaseFilter()
    if not isinstance(spec, dict):
        raise FilterError(f"filters must be an object with any of {list(FILTER_FIELDS)}")
    unknown = sorted(str(k)[:40] for k in spec if k not in FILTER_FIELDS)
    if unknown:
        raise FilterError(f"unknown filter(s) {unknown}; allowed: {list(FILTER_FIELDS)}")
    out: dict = {}
    view = spec.get("view")
    if view is not None:
        views = [view] if isinstance(view, str) else view
        if not isinstance(views, list) or not views or not all(isinstance(v, str) for v in views):
            raise FilterError(f"filters.view must be one of {list(VIEW_CHOICES)} or a list of them")
        views = [v.strip().lower() for v in views]
        bad = [v for v in views if v not in VIEW_CHOICES]
        if bad:
            raise FilterError(f"filters.view: unknown view class {bad[0][:40]!r}; use {list(VIEW_CHOICES)}")
        out["views"] = VIEW_CLASSES if "any" in views else tuple(v for v in VIEW_CLASSES if v in views)
    sex = spec.get("sex")
    if sex is not None:
        if not isinstance(sex, str) or sex.strip().upper()[:1] not in SEXES or len(sex.strip()) not in (1, 4, 5, 6):
            raise FilterError("filters.sex must be 'F', 'M' or 'O'")
        word = sex.strip().upper()
        if len(word) > 1 and word not in ("MALE", "FEMALE", "OTHER"):
            raise FilterError("filters.sex must be 'F', 'M' or 'O'")
        out["sex"] = word[0]
    age = spec.get("age")
    if age is not None:
        out["age_min"], out["age_max"] = _age_range(age)
    findings = spec.get("findings")
    if findings is not None:
        mode = "any"
        if isinstance(findings, dict):
            if len(findings) != 1 or next(iter(findings)) not in FINDINGS_MODES:
                raise FilterError("filters.findings must be a list, or {\"any\": [...]} or {\"all\": [...]}")
            mode, findings = next(iter(findings.items()))
        if isinstance(findings, str):
            findings = [findings]
        if (not isinstance(findings, list) or not findings or len(findings) > 50
                or not all(isinstance(f, str) and f.strip() and len(f) <= 200 for f in findings)):
            raise FilterError("filters.findings must list 1 to 50 finding names")
        out["findings"] = tuple(f.strip() for f in findings)
        out["findings_mode"] = mode
    modality = spec.get("modality")
    if modality is not None:
        modalities = [modality] if isinstance(modality, str) else modality
        if (not isinstance(modalities, list) or not modalities or len(modalities) > 20
                or not all(isinstance(m, str) and re.fullmatch(r"[A-Za-z0-9_ ]{1,16}", m) for m in modalities)):
            raise FilterError("filters.modality must be a DICOM modality such as 'CR' or 'DX', or a list of them")
        out["modalities"] = tuple(m.strip().upper() for m in modalities)
    dates = spec.get("study_date")
    if dates is not None:
        if not isinstance(dates, dict) or not dates or set(dates) - {"from", "to"}:
            raise FilterError("filters.study_date must be {\"from\": \"YYYY-MM-DD\", \"to\": \"YYYY-MM-DD\"} "
                              "(either may be left out)")
        out["date_from"] = _date(dates.get("from"), "from")
        out["date_to"] = _date(dates.get("to"), "to")
        if out["date_from"] and out["date_to"] and out["date_from"] > out["date_to"]:
            raise FilterError("filters.study_date: 'from' is after 'to'")
    return CaseFilter(**out)


def _age_range(age) -> tuple[float | None, float | None]:
    if isinstance(age, str):
        match = re.fullmatch(r"\s*(\d{1,3}(?:\.\d+)?)?\s*-\s*(\d{1,3}(?:\.\d+)?)?\s*", age)
        if not match or match.groups() == (None, None):
            raise FilterError(f"filters.age must be a range such as '40-60', '40-' or '-60', got {age[:40]!r}")
        low, high = (float(v) if v is not None else None for v in match.groups())
    elif isinstance(age, dict) and age and not set(age) - {"min", "max"}:
        low, high = age.get("min"), age.get("max")
        for value in (low, high):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value <= 200):
                raise FilterError("filters.age.min and filters.age.max must be numbers of years, 0..200")
    else:
        raise FilterError("filters.age must be {\"min\": years, \"max\": years} (either may be left out) or "
                          "'40-60'")
    if low is not None and high is not None and low > high:
        raise FilterError("filters.age: min is above max")
    return (float(low) if low is not None else None), (float(high) if high is not None else None)


def _date(value, which: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-?\d{2}-?\d{2}", value):
        raise FilterError(f"filters.study_date.{which} must be a date YYYY-MM-DD or YYYYMMDD")
    import datetime

    digits = value.replace("-", "")
    try:
        datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise FilterError(f"filters.study_date.{which}: {value!r} is not a calendar date") from None
    return digits


def bundle_for_index(index: CaseIndex, model: str | None = None):
    """Load the bundle that made the index: ``model`` if given, else the path recorded in the index, else a
    built-in bundle of the recorded name. Refuses any bundle whose fingerprint differs from the index's."""
    from medsim.model import ModelBundle, resolve_bundle

    recorded = index.meta.get("model_path", "")
    if model is not None:
        bundle = resolve_bundle(model)
    elif recorded and Path(recorded).exists():
        bundle = ModelBundle.load(recorded)
    else:
        try:
            bundle = resolve_bundle(index.meta["model_name"])
        except MedsimError:
            raise MedsimError(
                f"the model that built {index.path} ({index.meta['model_name']}, {index.model_fingerprint}) is not "
                f"at {recorded or 'its recorded path'}; pass --model with that bundle"
            ) from None
    if bundle.fingerprint != index.model_fingerprint:
        raise ModelMismatch(
            f"model {bundle.name} ({bundle.fingerprint}) did not build index {index.path} "
            f"(built with {index.meta['model_name']}, {index.model_fingerprint}); use that model or rebuild the index"
        )
    return bundle

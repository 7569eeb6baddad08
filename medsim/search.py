"""Search: an index plus the model that built it. Used by `medsim query` and the server.

The query's own patient is excluded by default (researchers look for *other* patients' cases). A query image that is
already indexed (same SOP Instance UID, or same file) uses its stored vector, so it costs no decoding or embedding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medsim import operating_point
from medsim.dicom import ChestPolicy, Radiograph
from medsim.errors import MedsimError, ModelMismatch
from medsim.index import Case, CaseIndex, Hit
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


@dataclass
class SearchResult:
    query: QueryInfo
    hits: list[Hit]
    include_same_patient: bool
    operating_point: OperatingPoint

    def to_dict(self) -> dict:
        return {
            "query": asdict(self.query),
            "include_same_patient": self.include_same_patient,
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
                         case.view or view, indexed=True)
        return self.index.vector(case.sop_uid), info

    def radiograph_query(self, radiograph: Radiograph, patient_id: str | None = None,
                         embed=None) -> tuple[np.ndarray, QueryInfo]:
        """A decoded image as a query: the stored vector when its SOP Instance UID is indexed, else its embedding
        (``embed``: the function that embeds it; default :meth:`embed`)."""
        known = self.index.get(radiograph.sop_uid)
        if known is not None:
            return self.indexed_query(known, patient_id or radiograph.patient_id, radiograph.view)
        info = QueryInfo(radiograph.sop_uid, radiograph.series_uid, radiograph.study_uid,
                         patient_id or radiograph.patient_id, radiograph.view, indexed=False)
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
               include_same_patient: bool = False) -> SearchResult:
        """The top ``op.k`` cases of other patients (unless ``include_same_patient``), cut at ``op.threshold``."""
        hits = self.index.search(
            vector, k=op.k,
            exclude_patient=None if include_same_patient else info.patient_id,
            exclude_sop_uid=info.sop_uid,
        )
        if op.threshold is not None:
            cut = op.threshold - SCORE_TOLERANCE
            hits = [hit for hit in hits if hit.score >= cut]
        return SearchResult(query=info, hits=hits, include_same_patient=include_same_patient, operating_point=op)


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

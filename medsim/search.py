"""Search: an index plus the model that built it. Used by `medsim query` and the server.

The query's own patient is excluded by default (researchers look for *other* patients' cases). A query image that is
already indexed (same SOP Instance UID, or same file) uses its stored vector, so it costs no decoding or embedding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medsim.dicom import ChestPolicy, Radiograph
from medsim.errors import MedsimError, ModelMismatch
from medsim.index import CaseIndex, Hit
from medsim.ingest import read_any
from medsim.preprocess import prepare

NO_THRESHOLD = float("-inf")  # pass as ``threshold`` for plain top-k, ignoring a stored operating point
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
    operating_point: dict | None = None  # the threshold applied (see Searcher.operating_point); None: no threshold

    def to_dict(self) -> dict:
        return {
            "query": asdict(self.query),
            "include_same_patient": self.include_same_patient,
            "operating_point": self.operating_point,
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

    def embed(self, radiograph: Radiograph) -> np.ndarray:
        if self._embedder is None:
            self._embedder = self.bundle.embedder()
        return self._embedder.embed_prepared([prepare(radiograph.pixels, self.bundle.preprocess)])[0]

    def operating_point(self, threshold: float | None = None, target_recall: float | None = None) -> dict | None:
        """The similarity threshold a query applies: ``threshold`` if given (``NO_THRESHOLD`` for none), else the one
        for ``target_recall`` from the index's calibrated curve, else the index's stored operating point (see
        :mod:`medsim.calibrate`), else None (plain top-k)."""
        from medsim.calibrate import META_KEY, threshold_for_recall

        stored = self.index.meta.get(META_KEY)
        if threshold is not None:
            if threshold == NO_THRESHOLD:
                return None
            return {"threshold": float(threshold), "source": "requested threshold"}
        if target_recall is not None:
            return {"threshold": threshold_for_recall(self.index, target_recall), "source": "requested target recall",
                    "target_recall": float(target_recall), "k": stored["k"], "definition": stored["definition"]}
        if stored:
            return {"threshold": float(stored["threshold"]), "source": "stored operating point",
                    "target_recall": stored["target_recall"], "k": stored["k"], "definition": stored["definition"]}
        return None

    def query_file(self, path: str | Path, k: int = 10, patient_id: str | None = None,
                   include_same_patient: bool = False, threshold: float | None = None,
                   target_recall: float | None = None) -> SearchResult:
        path = Path(path)
        if not path.exists():
            raise MedsimError(f"query file {path} does not exist")
        known = self.index.get_by_path(str(path.resolve()))
        if known is not None:
            info = QueryInfo(known.sop_uid, known.series_uid, known.study_uid, patient_id or known.patient_id,
                             known.view, indexed=True)
            return self.query_vector(self.index.vector(known.sop_uid), info, k, include_same_patient,
                                     threshold=threshold, target_recall=target_recall)
        radiograph = read_any(path, policy=self.policy)
        return self.query_radiograph(radiograph, k=k, patient_id=patient_id,
                                     include_same_patient=include_same_patient, threshold=threshold,
                                     target_recall=target_recall)

    def query_radiograph(self, radiograph: Radiograph, k: int = 10, patient_id: str | None = None,
                         include_same_patient: bool = False, threshold: float | None = None,
                         target_recall: float | None = None) -> SearchResult:
        known = self.index.get(radiograph.sop_uid)
        info = QueryInfo(radiograph.sop_uid, radiograph.series_uid, radiograph.study_uid,
                         patient_id or radiograph.patient_id or (known.patient_id if known else None),
                         radiograph.view, indexed=known is not None)
        vector = self.index.vector(known.sop_uid) if known is not None else self.embed(radiograph)
        return self.query_vector(vector, info, k, include_same_patient, threshold=threshold,
                                 target_recall=target_recall)

    def query_vector(self, vector: np.ndarray, info: QueryInfo, k: int = 10,
                     include_same_patient: bool = False, threshold: float | None = None,
                     target_recall: float | None = None) -> SearchResult:
        """Top-k cases, then only those with score >= the operating point's threshold (see operating_point)."""
        operating_point = self.operating_point(threshold, target_recall)
        hits = self.index.search(
            vector, k=k,
            exclude_patient=None if include_same_patient else info.patient_id,
            exclude_sop_uid=info.sop_uid,
        )
        if operating_point is not None:
            cut = operating_point["threshold"] - SCORE_TOLERANCE
            hits = [hit for hit in hits if hit.score >= cut]
        return SearchResult(query=info, hits=hits, include_same_patient=include_same_patient,
                            operating_point=operating_point)


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

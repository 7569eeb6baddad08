"""Calibrated, recall-oriented similarity thresholds (`medsim calibrate`), stored with the index.

Why not pairwise recall: with relevance "shares a finding label" a large share of all case pairs is relevant, so a
threshold that keeps 90 % of all relevant *pairs* keeps most pairs of any kind, and pairwise precision sinks to the
base rate for every method. That number says nothing about the list a user reads.

What the threshold targets instead, **list recall@k**: a search shows each query's top k cases of other patients;
the threshold then drops the hits that score below it. List recall = of the relevant cases that were in those top-k
lists, the share that stay above the threshold (pooled over all calibration queries). Its price is reported beside
it: list precision (the share of the kept hits that are relevant), the empty rate (queries left with no hit) and
the hits kept per query, and, for comparison with the method paper, the pairwise precision/recall over all pairs at
the same threshold.

The threshold is chosen on labeled queries of one set of patients and checked on queries of the other patients
(split by a hash of the patient id), so the reported figures are for patients it was not fitted on. The whole
recall -> threshold curve is stored too, so :func:`medsim.operating_point.threshold_for_recall` answers another
target without recomputation.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from medsim.errors import MedsimError
from medsim.evaluate import metrics as M
from medsim.files import json_safe
from medsim.index import CaseIndex
from medsim.ingest import LabelTable
from medsim.operating_point import META_KEY
from medsim.search import bundle_for_index
DEFINITION = (
    "list recall@k: of the relevant cases among each query's top-k results (other patients' cases, ranked by "
    "similarity), the share whose similarity is >= the threshold, pooled over the calibration queries; list "
    "precision: the share of the results kept above the threshold that are relevant; empty rate: the share of "
    "queries left with no result"
)
RELEVANCE_TEXT = {
    "shares": "shares at least one label with the query (No Finding counts as a label)",
    "same-set": "has exactly the query's label set",
}


def relevance_text(mode: str) -> str:
    if mode.startswith("finding:"):
        return f"both query and case have finding {mode.split(':', 1)[1]}"
    return RELEVANCE_TEXT.get(mode, mode)


def patient_fold(patients, n_folds: int = 2, salt: str = "medsim-calibrate") -> np.ndarray:
    """A fold number per item from a hash of its patient id (items without one: of their position)."""
    out = np.empty(len(patients), dtype=np.int64)
    for i, p in enumerate(patients):
        key = f"{salt}\0{p}" if p else f"{salt}\0\0item-{i}"
        out[i] = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % n_folds
    return out


class _Lists:
    """Top-k lists and pairwise counts of a set of queries against a gallery, computed in query chunks."""

    def __init__(self, query_vectors, gallery_vectors, query_ids, gallery_ids, query_patients, gallery_patients,
                 query_labels, gallery_labels, relevance: str, k: int, include_same_patient: bool,
                 chunk: int = 512):
        self.args = (query_vectors, gallery_vectors, query_ids, gallery_ids, query_patients, gallery_patients,
                     query_labels, gallery_labels)
        self.relevance = relevance
        self.include_same_patient = include_same_patient
        self.chunk = chunk
        tops, rels = [], []
        for _, scores, valid, relevant in self._chunks():
            top = M.rank_topk(scores, valid, k)
            tops.append(top.scores)
            rels.append(np.take_along_axis(relevant, top.indices, axis=1) & top.filled)
        self.top_scores = np.concatenate(tops) if tops else np.zeros((0, k))
        self.top_relevant = np.concatenate(rels) if rels else np.zeros((0, k), dtype=bool)

    def _chunks(self):
        qv, gv, qid, gid, qp, gp, ql, gl = self.args
        for start in range(0, len(qv), self.chunk):
            stop = min(start + self.chunk, len(qv))
            scores = qv[start:stop] @ gv.T
            valid = ~M.exclusion_mask(qid[start:stop], gid, qp[start:stop], gp, self.include_same_patient)
            relevant = M.relevance_matrix(ql[start:stop], gl, self.relevance)
            yield slice(start, stop), scores, valid, relevant

    def pair_counts(self, threshold) -> dict:
        out = {"tp": [], "fp": [], "tn": [], "fn": []}
        for _, scores, valid, relevant in self._chunks():
            for key, value in M.pair_counts_at(scores, relevant, valid, threshold).items():
                out[key].append(value)
        return {key: np.concatenate(v) if v else np.zeros(0) for key, v in out.items()}


def _summary(lists: _Lists, rows: np.ndarray, threshold: float, k: int) -> dict:
    scores, relevant = lists.top_scores[rows], lists.top_relevant[rows]
    at = M.list_metrics(M.list_counts_at(scores, relevant, threshold))
    without = M.list_metrics(M.list_counts_at(scores, relevant, -np.inf))
    counts = lists.pair_counts(threshold)
    pair = M.binary_metrics(*(float(counts[key][rows].sum()) for key in ("tp", "fp", "tn", "fn")))
    positives = pair["tp"] + pair["fn"]
    total = positives + pair["fp"] + pair["tn"]
    return {
        "n_queries": int(len(scores)),
        "list_recall": at["list_recall"],
        "list_precision": at["list_precision"],
        "empty_rate": at["empty_rate"],
        "any_relevant_kept_rate": at["any_relevant_kept_rate"],
        "kept_per_query": at["kept_per_query"],
        "dropped_irrelevant_share": at["dropped_irrelevant_share"],
        f"precision_at_{k}_without_threshold": without["list_precision"],
        "pairwise": {key: pair[key] for key in ("accuracy", "precision", "recall", "f1")},
        "pairwise_base_rate": positives / total if total else float("nan"),
    }


def calibrate_vectors(vectors, ids, patients, labels, *, target_recall: float = 0.9, k: int = 10,
                      relevance: str = "shares", include_same_patient: bool = False, check_fraction: float = 0.5,
                      query_mask=None, salt: str = "medsim-calibrate") -> dict:
    """Calibrate a threshold on embedding vectors (rows L2-normalised; cosine similarity).

    Every labeled item is in the gallery; queries are the labeled items (``query_mask`` narrows them, e.g. to a
    model's validation patients), split by patient into a calibration part (threshold chosen there) and a check
    part of ``check_fraction`` of the patients (figures reported there). Returns the operating-point dict.
    """
    if not 0.0 < target_recall <= 1.0:
        raise MedsimError(f"target recall must be in (0, 1], got {target_recall}")
    vectors = np.asarray(vectors, dtype=np.float32)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    ids = np.asarray(ids)
    patients = np.asarray([p or "" for p in patients], dtype=object)
    labels = [tuple(row) for row in labels]
    labeled = np.asarray([bool(row) for row in labels])
    if labeled.sum() < 2:
        raise MedsimError("calibration needs at least two labeled cases (pass --labels with the labels CSV)")
    gallery = np.flatnonzero(labeled)
    queries_mask = labeled.copy() if query_mask is None else (labeled & np.asarray(query_mask, dtype=bool))
    queries = np.flatnonzero(queries_mask)
    if len(queries) == 0:
        raise MedsimError("no labeled query cases to calibrate on")
    fold = np.zeros(len(queries), dtype=np.int64)
    if check_fraction > 0:
        buckets = patient_fold(patients[queries], 1000, salt)
        fold = (buckets < round(check_fraction * 1000)).astype(np.int64)  # 1 = check
        if fold.all() or not fold.any():
            fold[:] = 0
    calibration_rows = np.flatnonzero(fold == 0)
    check_rows = np.flatnonzero(fold == 1)
    lists = _Lists(vectors[queries], vectors[gallery], ids[queries], ids[gallery], patients[queries],
                   patients[gallery], [labels[i] for i in queries], [labels[i] for i in gallery], relevance, k,
                   include_same_patient)
    cal_scores, cal_relevant = lists.top_scores[calibration_rows], lists.top_relevant[calibration_rows]
    if not cal_relevant.any():
        raise MedsimError("no relevant case in any calibration query's top-k; nothing to calibrate on")
    threshold = M.list_threshold_for_recall(cal_scores, cal_relevant, target_recall)
    op = {
        "threshold": threshold,
        "target_recall": float(target_recall),
        "k": int(k),
        "definition": DEFINITION,
        "relevance": relevance,
        "relevance_text": relevance_text(relevance),
        "include_same_patient": bool(include_same_patient),
        "calibration": _summary(lists, calibration_rows, threshold, k),
        "check": _summary(lists, check_rows, threshold, k) if len(check_rows) else None,
        "curve": M.list_curve(cal_scores, cal_relevant),
        "data": {
            "queries": int(len(queries)),
            "calibration_queries": int(len(calibration_rows)),
            "calibration_patients": int(len(set(patients[queries][calibration_rows]))),
            "check_queries": int(len(check_rows)),
            "check_patients": int(len(set(patients[queries][check_rows]))),
            "gallery": int(len(gallery)),
            "unlabeled_not_used": int((~labeled).sum()),
            "check_fraction": float(check_fraction),
            "split": f"patients hashed with salt {salt!r}",
            "calibration_patients_sha256": hashlib.sha256(
                "\n".join(sorted(set(map(str, patients[queries][calibration_rows])))).encode()).hexdigest(),
        },
        "created_at": time.time(),
    }
    measured = op["check"] or op["calibration"]
    op["precision_paid"] = {
        "list_precision": measured["list_precision"],
        f"precision_at_{k}_without_threshold": measured[f"precision_at_{k}_without_threshold"],
        "pairwise_precision": measured["pairwise"]["precision"],
        "measured_on": "check patients" if op["check"] else "calibration patients",
    }
    return json_safe(op)


def validation_patients(bundle) -> list[str] | None:
    """The validation patients a bundle records (``split.validation_patients`` in its metadata), if any."""
    if bundle is None:
        return None
    try:
        meta = bundle.metadata
    except Exception:
        return None
    for holder in (meta, meta.get("extra") or {}, meta.get("training") or {}):
        split = holder.get("split") if isinstance(holder, dict) else None
        if isinstance(split, dict) and split.get("validation_patients"):
            return [str(p) for p in split["validation_patients"]]
    return None


def calibrate_index(index_path: str | Path, labels_csv: str | Path | None = None, *, target_recall: float = 0.9,
                    k: int = 10, relevance: str = "shares", include_same_patient: bool = False,
                    check_fraction: float = 0.5, store: bool = True, use_validation_split: bool = True) -> dict:
    """Calibrate the index's threshold for ``target_recall`` and (``store``) save it as its operating point."""
    index = CaseIndex.open(index_path, writable=store)
    try:
        cases = index.cases()
        ids, vectors = index.vectors()
        table = LabelTable.from_csv(labels_csv) if labels_csv else None
        labels, patients = [], []
        for case in cases:
            row = table.lookup(Path(case.source_path), case.sop_uid) if table else None
            labels.append(tuple(row.labels) if row is not None else (() if table else tuple(case.labels)))
            patients.append((row.patient_id if row is not None and row.patient_id else None) or case.patient_id)
        query_mask, notes = None, []
        if use_validation_split:
            bundle = None
            try:
                bundle = bundle_for_index(index)
            except MedsimError as exc:  # the bundle is optional here: only its split is read
                notes.append(f"model bundle not loaded ({type(exc).__name__}); no validation split applied")
            wanted = validation_patients(bundle)
            if wanted:
                wanted = set(wanted)
                query_mask = np.asarray([p in wanted for p in patients])
                notes.append(f"queries restricted to the model's {len(wanted)} validation patients "
                             f"({int(query_mask.sum())} cases)")
        op = calibrate_vectors(vectors, ids, patients, labels, target_recall=target_recall, k=k,
                               relevance=relevance, include_same_patient=include_same_patient,
                               check_fraction=check_fraction, query_mask=query_mask)
        op["model_fingerprint"] = index.model_fingerprint
        op["model_name"] = index.meta.get("model_name", "")
        op["data"].update({
            "labels": str(Path(labels_csv).resolve()) if labels_csv else "labels stored in the index",
            "index": str(Path(index_path).resolve()),
            "index_cases": len(cases),
            "index_updated_at": index.meta.get("updated_at"),
            "notes": notes,
        })
        if store:
            index.set_meta(META_KEY, op)
        return op
    finally:
        index.close()


def describe(op: dict) -> list[str]:
    """Human-readable lines about an operating point (what `medsim calibrate` prints)."""
    k = op["k"]
    lines = [f"threshold {op['threshold']:.4f} for target list recall@{k} {op['target_recall']:.2f} "
             f"(relevance: {op['relevance_text']})"]
    for name in ("calibration", "check"):
        part = op.get(name)
        if not part:
            continue
        lines.append(
            f"  {name} ({part['n_queries']} queries): list recall {_pct(part['list_recall'])}, list precision "
            f"{_pct(part['list_precision'])} (top-{k} precision without threshold "
            f"{_pct(part[f'precision_at_{k}_without_threshold'])}), {part['kept_per_query']:.1f} hits kept per "
            f"query, {_pct(part['empty_rate'])} of queries left empty; pairwise precision "
            f"{_pct(part['pairwise']['precision'])} / recall {_pct(part['pairwise']['recall'])} "
            f"(base rate {_pct(part['pairwise_base_rate'])})")
    for note in op.get("data", {}).get("notes", []):
        lines.append(f"  note: {note}")
    lines.append(f"  definition: {op['definition']}")
    return lines


def _pct(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.1f} %"

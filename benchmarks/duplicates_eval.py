"""Precision and recall of `medsim duplicates` on generated copies mixed into the development chest X-rays.

    .venv/bin/python benchmarks/duplicates_eval.py                       # all of ../shared/data/cxr, 150 bases
    .venv/bin/python benchmarks/duplicates_eval.py --limit 400 --bases 60  # smaller, quicker

Takes ``--bases`` real images (round-robin over the data's sources), makes ``--variants`` copies of each (cycling
through the kinds in VARIANT_KINDS: new UIDs, lossless re-encodes, header-only window change -> exact; resize, JPEG
re-compression, baked-in window/level, gamma, 12-bit DICOM with another window, combinations -> near-duplicate),
gives 10 % of the copies another patient ID (an identity error the report must call different-patient), mixes them
into the rest of the data (symbolic links, nothing copied), builds an index with `build_index` and runs
`find_duplicates` on it. A pair is a true duplicate when both images come from the same base image; everything
else (including different images of one patient, e.g. the hannover serial images) counts against precision.

Writes benchmarks/results/duplicates.json: counts, precision/recall (matched pairs and group co-membership), recall
per copy kind, the identity-error check, the false positives (relative paths and scores, no pixels) and a sweep
over the two near-duplicate thresholds. Generated images, the index and the HTML report stay under ``--work``
(default var/duplicates-eval, git-ignored). tests/test_duplicates.py uses the generator below on a small subset.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EXACT, NEAR = "exact", "near-duplicate"
# copy kind -> the match the finder should report between the copy and its base image
VARIANT_KINDS = {
    "dicom-new-uids": EXACT,  # same stored pixels in a DICOM file with fresh Study/Series/SOP UIDs
    "png-lossless": EXACT,  # re-encoded losslessly
    "dicom-rle-rewindow": EXACT,  # RLE DICOM whose header window differs: other display, same stored pixels
    "resize": NEAR,  # 40-75 % (upscaled 1.5-3x when the image is small)
    "jpeg": NEAR,  # re-compressed, quality 25-60
    "window": NEAR,  # window/level baked into the pixels, JPEG q90
    "gamma": NEAR,  # gamma 0.6-1.6 baked into the pixels
    "dicom-12bit-window": NEAR,  # 12-bit DICOM (stored values x16 + noise) displayed through a narrower window
    "combo": NEAR,  # resize 60 % + gamma 0.85 + JPEG q50
}
STRESS_KINDS = {"crop": NEAR}  # 3 % off each side and resized back: beyond the definition, reported apart
SWEEP_COSINES = (0.0, 0.8, 0.85, 0.9, 0.92, 0.95)
SWEEP_HAMMINGS = (8, 16, 24, 28, 32, 36, 40, 44, 48, 56)
IDENTITY_ERROR_EVERY = 10  # every 10th copy gets another patient's ID
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"


# ---- generating copies -------------------------------------------------------------------------------------------


def load_gray(path: str | Path) -> np.ndarray:
    """An 8-bit grayscale PNG/JPEG as the (H, W) uint8 array medsim decodes (same stored pixels, same pixel hash)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode != "L":
            raise ValueError(f"{path}: mode {image.mode}, the generator expects 8-bit grayscale")
        return np.asarray(image).copy()


def _write_if_changed(path: Path, data: bytes) -> Path:
    """Leave an identical file alone, so that re-running the generator does not make build-index re-read it."""
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    return path


def _save_image(array: np.ndarray, path: Path, quality: int | None = None) -> Path:
    from PIL import Image

    image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    if quality is None:
        image.save(buffer, format="PNG")
        return _write_if_changed(path.with_name(path.name + ".png"), buffer.getvalue())
    image.save(buffer, format="JPEG", quality=int(quality))
    return _write_if_changed(path.with_name(path.name + ".jpg"), buffer.getvalue())


def _resize(array: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    h, w = array.shape
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(array.astype(np.uint8)).resize(size, resample))


def write_dicom(stored: np.ndarray, path: Path, patient_id: str, bits_stored: int = 8,
                window: tuple[float, float] | None = None, rle: bool = False) -> Path:
    """A DX chest radiograph (MONOCHROME2) holding ``stored`` with new UIDs (derived from the file name, so that a
    re-run writes the same file)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    path = path.with_name(path.name + ".dcm")
    seed = path.name
    stored = np.ascontiguousarray(stored, dtype=np.uint8 if bits_stored <= 8 else np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[seed, "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, "series"])
    ds.PatientID = patient_id[:64]  # LO; labels.csv carries the full ID
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
    ds.PixelData = stored.tobytes()
    if rle:
        ds.compress(RLELossless, stored, generate_instance_uid=False)
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return _write_if_changed(path, buffer.getvalue())


def make_variant(kind: str, gray: np.ndarray, out_stem: Path, rng: np.random.Generator, patient_id: str) -> Path:
    """Write one copy of ``gray`` (uint8 (H, W)) of the given kind next to ``out_stem``; returns the file's path."""
    small = min(gray.shape) < 256
    x = gray.astype(np.float64)
    if kind == "dicom-new-uids":
        return write_dicom(gray, out_stem, patient_id)
    if kind == "png-lossless":
        return _save_image(gray, out_stem)
    if kind == "dicom-rle-rewindow":
        return write_dicom(gray, out_stem, patient_id, window=(float(rng.uniform(90, 140)),
                                                                float(rng.uniform(150, 200))), rle=True)
    if kind == "resize":
        scale = rng.uniform(1.5, 3.0) if small else rng.uniform(0.4, 0.75)
        return _save_image(_resize(gray, scale), out_stem)
    if kind == "jpeg":
        return _save_image(gray, out_stem, quality=int(rng.integers(25, 61)))
    if kind == "window":
        low, high = rng.uniform(10, 50), rng.uniform(190, 240)
        return _save_image((x - low) / (high - low) * 255.0, out_stem, quality=90)
    if kind == "gamma":
        gamma = float(rng.choice([rng.uniform(0.6, 0.85), rng.uniform(1.2, 1.6)]))
        return _save_image(255.0 * (x / 255.0) ** gamma, out_stem)
    if kind == "dicom-12bit-window":
        stored = np.clip(x * 16 + rng.normal(0, 4, x.shape), 0, 4095).astype(np.uint16)
        center, width = rng.uniform(1700, 2300), rng.uniform(2600, 3400)
        return write_dicom(stored, out_stem, patient_id, bits_stored=12, window=(center, width))
    if kind == "combo":
        resized = _resize(gray, 0.6 if not small else 2.0).astype(np.float64)
        return _save_image(255.0 * (resized / 255.0) ** 0.85, out_stem, quality=50)
    if kind == "crop":
        h, w = gray.shape
        dy, dx = max(1, round(0.03 * h)), max(1, round(0.03 * w))
        cropped = gray[dy:h - dy, dx:w - dx]
        from PIL import Image

        return _save_image(np.asarray(Image.fromarray(cropped).resize((w, h), Image.Resampling.BICUBIC)), out_stem)
    raise ValueError(f"unknown copy kind {kind!r}")


@dataclass
class Member:
    path: str  # absolute path in the evaluation folder
    rel: str  # path relative to the evaluation folder
    family: str  # base image (relative path in the data) this is, or is a copy of; '' for a distractor
    kind: str  # 'original' or a copy kind
    expected: str  # '' for originals, else exact | near-duplicate
    patient_id: str
    source: str
    labels: str
    identity_error: bool = False


@dataclass
class EvalSet:
    folder: Path
    members: list[Member] = field(default_factory=list)

    def by_path(self) -> dict[str, Member]:
        return {m.path: m for m in self.members}

    def positive_pairs(self, kinds=None) -> list[tuple[Member, Member]]:
        """(base, copy) pairs, optionally of some copy kinds only."""
        bases = {m.family: m for m in self.members if m.kind == "original" and m.family}
        return [(bases[m.family], m) for m in self.members
                if m.kind != "original" and (kinds is None or m.kind in kinds)]


def read_labels(data: Path) -> list[dict]:
    with open(data / "labels.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def choose_bases(rows: list[dict], n: int, seed: int, exclude_sources=()) -> list[dict]:
    """``n`` rows, round-robin over the sources (shuffled within each), so every source contributes."""
    rng = np.random.default_rng(seed)
    by_source: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["source"] not in exclude_sources:
            by_source[row["source"]].append(row)
    queues = {source: [group[i] for i in rng.permutation(len(group))] for source, group in sorted(by_source.items())}
    chosen: list[dict] = []
    while len(chosen) < n and any(queues.values()):
        for source in sorted(queues):
            if queues[source] and len(chosen) < n:
                chosen.append(queues[source].pop())
    return chosen


def build_eval_set(data: Path, folder: Path, bases: list[dict], distractors: list[dict], variants_per_base: int,
                   seed: int = 0, kinds=tuple(VARIANT_KINDS), stress_kinds=()) -> EvalSet:
    """Links to the base and distractor images, the generated copies, and labels.csv, all under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    folder = folder.resolve()
    rng = np.random.default_rng(seed)
    out = EvalSet(folder)
    kinds = list(kinds)
    copy_number = 0  # copies of the kinds in scope (stress copies never get another patient's ID)
    rows = []

    def link(row: dict, family: str) -> None:
        rel = Path("data") / row["path"]
        dest = folder / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.is_symlink() and not dest.exists():
            os.symlink((data / row["path"]).resolve(), dest)
        out.members.append(Member(str(dest), rel.as_posix(), family, "original", "",
                                  row["patient_id"], row["source"], row.get("labels", "")))

    for i, row in enumerate(bases):
        link(row, row["path"])
        gray = load_gray(data / row["path"])
        chosen = [kinds[(i * variants_per_base + j) % len(kinds)] for j in range(variants_per_base)]
        chosen += list(stress_kinds)
        for j, kind in enumerate(chosen):
            if kind not in stress_kinds:
                copy_number += 1
            identity_error = kind not in stress_kinds and copy_number % IDENTITY_ERROR_EVERY == 0
            patient = f"relabelled-{copy_number}" if identity_error else row["patient_id"]
            stem = folder / "copies" / row["source"] / f"{Path(row['path']).stem.replace('.', '_')}__{j}-{kind}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            path = make_variant(kind, gray, stem, rng, patient)
            expected = VARIANT_KINDS.get(kind) or STRESS_KINDS[kind]
            out.members.append(Member(str(path), path.relative_to(folder).as_posix(), row["path"], kind,
                                      expected, patient, row["source"], row.get("labels", ""), identity_error))
    for row in distractors:
        link(row, "")
    for m in out.members:
        rows.append({"path": m.rel, "labels": m.labels, "patient_id": m.patient_id, "source": m.source,
                     "copy_kind": m.kind})
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


# ---- scoring -----------------------------------------------------------------------------------------------------


def _prf(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "tp": tp, "fp": fp,
            "fn": fn}


def score(eval_set: EvalSet, report, index_path: Path, stress_kinds=()) -> dict:
    """Precision/recall of a DuplicateReport against the eval set's families (see the module docstring)."""
    from medsim.index import CaseIndex

    members = eval_set.by_path()
    with CaseIndex.open(index_path) as index:
        cases = index.cases()
        ids, vectors = index.vectors()
    case_of_path = {c.source_path: c for c in cases}
    member_of_id = {c.id: members.get(c.source_path) for c in cases}
    pixel_hash = {c.id: c.pixel_hash for c in cases}
    phash = {c.id: c.phash for c in cases}
    vector_of = dict(zip(ids.tolist(), vectors))

    def family(case_id):
        m = member_of_id.get(case_id)
        return m.family if m is not None and m.family else f"distractor:{case_id}"

    group_of, edges = {}, {}
    for g in report.groups:
        for c in g.cases:
            group_of[c.id] = g.number
        for p in g.pairs:
            edges[(p.a, p.b)] = p
    # matched pairs (edges): exact pairs count once per set of equal pixels (star edges), so score exact matches as
    # "same pixel hash" and near matches as edges
    edge_tp = sum(1 for a, b in edges if family(a) == family(b))
    edge_fp = [(a, b) for a, b in edges if family(a) != family(b)]
    group_pairs = set()
    for g in report.groups:
        for x, y in combinations(sorted(c.id for c in g.cases), 2):
            group_pairs.add((x, y))
    group_tp = sum(1 for a, b in group_pairs if family(a) == family(b))
    group_fp = len(group_pairs) - group_tp

    def found(base_id, copy_id, expected):
        a, b = min(base_id, copy_id), max(base_id, copy_id)
        if expected == EXACT:
            direct = bool(pixel_hash[a]) and pixel_hash[a] == pixel_hash[b] and a in group_of
        else:
            direct = (a, b) in edges and edges[(a, b)].kind == NEAR
        grouped = a in group_of and group_of.get(a) == group_of.get(b)
        return direct, grouped

    positives = eval_set.positive_pairs()
    per_kind = defaultdict(lambda: {"pairs": 0, "matched": 0, "grouped": 0})
    missed, positive_scores = [], []
    direct_hits = grouped_hits = 0
    headline = [p for p in positives if p[1].kind not in stress_kinds]
    for base, copy in positives:
        bid, cid = case_of_path[base.path].id, case_of_path[copy.path].id
        direct, grouped = found(bid, cid, copy.expected)
        stats = per_kind[copy.kind]
        stats["pairs"] += 1
        stats["matched"] += direct
        stats["grouped"] += grouped
        cosine = float(np.dot(vector_of[bid], vector_of[cid]))
        distance = _hamming(phash[bid], phash[cid])
        positive_scores.append({"kind": copy.kind, "cosine": cosine, "hamming": distance})
        if copy.kind not in stress_kinds:
            direct_hits += direct
            grouped_hits += grouped
            if not direct:
                missed.append({"base": base.rel, "copy": copy.rel, "kind": copy.kind, "grouped": grouped,
                               "cosine": round(cosine, 4), "phash_distance": distance})
    for stats in per_kind.values():
        stats["recall"] = round(stats["matched"] / stats["pairs"], 4)
    groups_by_number = {g.number: g for g in report.groups}
    identity = [(case_of_path[base.path].id, case_of_path[copy.path].id)
                for base, copy in headline if copy.identity_error]
    identity_flagged = sum(1 for bid, cid in identity
                           if bid in group_of and group_of[bid] == group_of.get(cid)
                           and groups_by_number[group_of[bid]].patients == "different-patient")

    # different original images of one patient: never exact; how many look alike enough to be near-duplicates
    originals = [c for c in cases if (m := member_of_id.get(c.id)) is not None and m.kind == "original"]
    by_patient = defaultdict(list)
    for c in originals:
        if c.patient_id:
            by_patient[c.patient_id].append(c)
    same_patient_pairs = [(x, y) for group in by_patient.values() for x, y in combinations(group, 2)]
    same_patient_exact = sum(1 for x, y in same_patient_pairs if x.pixel_hash == y.pixel_hash)
    same_patient_near = sum(1 for x, y in same_patient_pairs
                            if (min(x.id, y.id), max(x.id, y.id)) in edges)

    false_positives = []
    for a, b in edge_fp:
        p = edges[(a, b)]
        ma, mb = member_of_id.get(a), member_of_id.get(b)
        false_positives.append({
            "a": ma.rel if ma else str(a), "b": mb.rel if mb else str(b), "kind": p.kind, "patients": p.patients,
            "cosine": p.cosine, "phash_distance": p.hamming,
            "sources": sorted({ma.source if ma else "?", mb.source if mb else "?"})})
    # the same false positives seen as pairs of distinct original images (a copy counts as its original): what a
    # reviewer has to look at; some are real duplicates or follow-ups already in the data
    original_patient = {m.family or m.rel: m.patient_id for m in eval_set.members if m.kind == "original"}
    distinct: dict[tuple[str, str], dict] = {}
    for a, b in edge_fp:
        ma, mb = member_of_id.get(a), member_of_id.get(b)
        fa, fb = (ma.family or ma.rel) if ma else str(a), (mb.family or mb.rel) if mb else str(b)
        key = tuple(sorted((fa, fb)))
        p = edges[(a, b)]
        entry = distinct.setdefault(key, {
            "images": list(key), "edges": 0, "min_phash_distance": p.hamming, "max_cosine": p.cosine,
            "patients": "same-patient" if original_patient.get(key[0], key[0]) == original_patient.get(key[1], key[1])
            else "different-patient"})
        entry["edges"] += 1
        entry["min_phash_distance"] = min(entry["min_phash_distance"], p.hamming)
        entry["max_cosine"] = max(entry["max_cosine"], p.cosine)
    distinct_pairs = sorted(distinct.values(), key=lambda e: (e["min_phash_distance"], -e["max_cosine"]))
    n_positive = len(headline)
    return {
        "pairs": {"positive_pairs": n_positive, "matched": _prf(edge_tp, len(edge_fp), 0) | {
            "recall": round(direct_hits / max(1, n_positive), 4)},
            "grouped": _prf(group_tp, group_fp, 0) | {"recall": round(grouped_hits / max(1, n_positive), 4)}},
        "per_kind": dict(sorted(per_kind.items())),
        "identity_errors": {"copies_with_other_patient_id": len(identity), "flagged_different_patient":
                            identity_flagged},
        "same_patient_different_images": {"pairs": len(same_patient_pairs), "called_exact": same_patient_exact,
                                          "called_near_duplicate": same_patient_near},
        "distinct_image_pairs_matched": {"count": len(distinct_pairs),
                                         "by_patients": dict(Counter(e["patients"] for e in distinct_pairs)),
                                         "pairs": distinct_pairs},
        "false_positives": false_positives,
        "missed": missed,
        "positive_scores": positive_scores,
    }


def _hamming(a: str, b: str) -> int | None:
    if not a or not b:
        return None
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def sweep(eval_set: EvalSet, index_path: Path, neighbours: int, cosines, hammings, stress_kinds=()) -> list[dict]:
    """Matched-pair precision/recall of near-duplicates over a grid of (min_cosine, max_hamming), from the same
    k-NN candidates the finder examines (exact pairs left out: they need no threshold)."""
    from medsim.index import CaseIndex

    members = eval_set.by_path()
    with CaseIndex.open(index_path) as index:
        cases = {c.id: c for c in index.cases()}
        ids, vectors = index.vectors()
        labels, sims = index.neighbours(vectors, neighbours + 1)
    fam = {}
    for cid, c in cases.items():
        m = members.get(c.source_path)
        fam[cid] = m.family if m is not None and m.family else f"d{cid}"
    candidates = {}
    for q, row_labels, row_sims in zip(ids.tolist(), labels.tolist(), sims.tolist()):
        for n, s in zip(row_labels, row_sims):
            if n == q or n < 0:
                continue
            key = (min(q, n), max(q, n))
            if cases[key[0]].pixel_hash == cases[key[1]].pixel_hash:
                continue
            candidates[key] = (s, _hamming(cases[key[0]].phash, cases[key[1]].phash))
    case_of_path = {c.source_path: c.id for c in cases.values()}
    near_positives = set()
    for base, copy in eval_set.positive_pairs():
        if copy.expected == NEAR and copy.kind not in stress_kinds:
            a, b = case_of_path[base.path], case_of_path[copy.path]
            near_positives.add((min(a, b), max(a, b)))
    rows = []
    for c in cosines:
        for h in hammings:
            chosen = [k for k, (s, d) in candidates.items() if s >= c and d is not None and d <= h]
            tp_all = sum(1 for a, b in chosen if fam[a] == fam[b])
            fp = len(chosen) - tp_all
            found = sum(1 for k in chosen if k in near_positives)
            precision = tp_all / len(chosen) if chosen else 1.0
            recall = found / len(near_positives) if near_positives else 1.0
            rows.append({"min_cosine": c, "max_hamming": h, "precision": round(precision, 4),
                         "recall": round(recall, 4), "fp": fp, "near_pairs_found": found})
    return rows


def distribution(values) -> dict:
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(values):
        return {}
    q = np.percentile(values, [0, 1, 5, 50, 95, 99, 100])
    return {k: round(float(v), 4) for k, v in zip(("min", "p1", "p5", "median", "p95", "p99", "max"), q)}


def negative_nearest(index_path: Path, eval_set: EvalSet) -> dict:
    """Cosine and pHash distance of each image's nearest neighbour that is NOT a copy of it (the hardest negative)."""
    from medsim.index import CaseIndex

    members = eval_set.by_path()
    with CaseIndex.open(index_path) as index:
        cases = {c.id: c for c in index.cases()}
        ids, vectors = index.vectors()
        labels, sims = index.neighbours(vectors, 12)
    fam = {cid: (members[c.source_path].family or f"d{cid}") if c.source_path in members else f"d{cid}"
           for cid, c in cases.items()}
    cos, ham, ham_all = [], [], []
    for q, row_labels, row_sims in zip(ids.tolist(), labels.tolist(), sims.tolist()):
        for n, s in zip(row_labels, row_sims):
            if n != q and n >= 0 and fam[n] != fam[q]:
                cos.append(s)
                ham.append(_hamming(cases[q].phash, cases[n].phash))
                break
        for n in row_labels:
            if n != q and n >= 0 and fam[n] != fam[q]:
                ham_all.append(_hamming(cases[q].phash, cases[n].phash))
    return {"nearest_negative_cosine": distribution(cos), "nearest_negative_phash_distance": distribution(ham),
            "phash_distance_of_negatives_among_12_nn": distribution(ham_all)}


# ---- main --------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    from medsim.build import build_index
    from medsim.duplicates import Thresholds, find_duplicates, write_csv, write_html
    from medsim.ingest import LabelTable
    from medsim.model import resolve_bundle

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cxr")
    parser.add_argument("--work", type=Path, default=ROOT / "var" / "duplicates-eval")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "duplicates.json")
    parser.add_argument("--bases", type=int, default=150)
    parser.add_argument("--variants", type=int, default=4, help="copies per base image (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="at most this many original images in all (bases + distractors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-cosine", type=float, default=Thresholds().min_cosine)
    parser.add_argument("--max-hamming", type=int, default=Thresholds().max_hamming)
    parser.add_argument("--neighbours", type=int, default=Thresholds().neighbours)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--html", action="store_true", help="also write WORK/duplicates.html")
    args = parser.parse_args(argv)

    rows = read_labels(args.data)
    bases = choose_bases(rows, args.bases, args.seed)
    taken = {r["path"] for r in bases}
    rest = [r for r in rows if r["path"] not in taken]
    if args.limit:
        rng = np.random.default_rng(args.seed + 1)
        rest = [rest[i] for i in sorted(rng.permutation(len(rest))[: max(0, args.limit - len(bases))])]
    name = f"set-{args.seed}-{args.bases}x{args.variants}-{len(rest)}"
    folder = args.work / name
    eval_set = build_eval_set(args.data, folder, bases, rest, args.variants, seed=args.seed,
                              stress_kinds=tuple(STRESS_KINDS))
    index_path = args.work / f"index-{name}"
    bundle = resolve_bundle("imagenet")
    build = build_index(folder, index_path, bundle, labels=LabelTable.from_csv(folder / "labels.csv"),
                        workers=args.workers, progress=True)
    thresholds = Thresholds(args.min_cosine, args.max_hamming, args.neighbours)
    report = find_duplicates(index_path, thresholds)
    write_csv(report, args.work / f"{name}-duplicates.csv")
    if args.html:
        write_html(report, args.work / f"{name}-duplicates.html")
    scores = score(eval_set, report, index_path, stress_kinds=tuple(STRESS_KINDS))
    by_kind = defaultdict(list)
    for s in scores.pop("positive_scores"):
        by_kind[s["kind"]].append(s)
    result = {
        "command": "benchmarks/duplicates_eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": "../shared/data/cxr", "model": bundle.name, "model_fingerprint": bundle.fingerprint,
        "thresholds": {"min_cosine": thresholds.min_cosine, "max_hamming": thresholds.max_hamming,
                       "neighbours": thresholds.neighbours},
        "images": {"originals": sum(1 for m in eval_set.members if m.kind == "original"),
                   "bases": len(bases), "copies": sum(1 for m in eval_set.members if m.kind != "original"),
                   "copies_by_kind": dict(Counter(m.kind for m in eval_set.members if m.kind != "original")),
                   "indexed": build.total_cases, "build_failures": len(build.failures),
                   "sources_of_bases": dict(Counter(r["source"] for r in bases))},
        "finder": report.counts(),
        **scores,
        "positive_score_distribution": {kind: {"cosine": distribution(s["cosine"] for s in v),
                                               "phash_distance": distribution(s["hamming"] for s in v)}
                                        for kind, v in sorted(by_kind.items())},
        "negatives": negative_nearest(index_path, eval_set),
        "sweep": sweep(eval_set, index_path, args.neighbours, SWEEP_COSINES, SWEEP_HAMMINGS,
                       stress_kinds=tuple(STRESS_KINDS)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    pairs = result["pairs"]
    print(f"{pairs['positive_pairs']} generated (base, copy) pairs among {result['images']['indexed']} images; "
          f"matched pairs: precision {pairs['matched']['precision']:.4f} recall {pairs['matched']['recall']:.4f}; "
          f"groups: precision {pairs['grouped']['precision']:.4f} recall {pairs['grouped']['recall']:.4f}; "
          f"finder {report.seconds:.1f} s")
    for kind, stats in result["per_kind"].items():
        print(f"  {kind:<20} recall {stats['recall']:.3f} ({stats['matched']}/{stats['pairs']})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

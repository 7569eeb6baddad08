"""Training data: labeled images, their label vocabulary, a seeded patient-disjoint split, a data fingerprint.

A training set is every PNG/JPEG/DICOM file under an images folder that has a row with labels in a labels CSV
(see :class:`medsim.ingest.LabelTable`: ``path`` relative to the CSV's folder and/or ``sop_uid``; ``labels``
``|``-separated, "No Finding" = normal; ``patient_id``; optional ``source``). Files are identified by the sha256 of
their content, so caches and fingerprints survive moving the folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsim.errors import MedsimError
from medsim.files import sha256_file
from medsim.ingest import LabelTable, walk

NORMAL_LABEL = "No Finding"
# Spellings of "no finding" in other label files; compared after normalise_label().
_NORMAL_SYNONYMS = {"nofinding", "normal", "nofindings", "none", "negative", "nothing"}


class TrainDataError(MedsimError):
    """The training data cannot be used (no labeled images, missing files, ...)."""


class VocabularyError(TrainDataError):
    """A labels file uses labels that a model's vocabulary cannot map."""


@dataclass(frozen=True)
class TrainRecord:
    path: str  # absolute
    rel_path: str  # relative to the images folder (posix)
    sha256: str  # of the file's content
    labels: tuple[str, ...]
    patient_id: str
    source: str = ""
    view: str = ""
    license: str = ""


@dataclass
class TrainSet:
    root: str
    labels_csv: str
    records: list[TrainRecord]
    vocabulary: list[str]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def targets(self, vocabulary: Sequence[str] | None = None) -> np.ndarray:
        """(N, L) float32 multi-hot over ``vocabulary`` (default: the set's own)."""
        vocabulary = list(vocabulary or self.vocabulary)
        column = {label: i for i, label in enumerate(vocabulary)}
        out = np.zeros((len(self.records), len(vocabulary)), dtype=np.float32)
        for i, record in enumerate(self.records):
            for label in record.labels:
                out[i, column[label]] = 1.0
        return out

    def fingerprint(self) -> str:
        """sha256 over every image's relative path, content hash, labels and patient: changes when the data do."""
        digest = hashlib.sha256()
        for r in sorted(self.records, key=lambda r: r.rel_path):
            digest.update(f"{r.rel_path}\0{r.sha256}\0{'|'.join(r.labels)}\0{r.patient_id}\0{r.source}\n".encode())
        return digest.hexdigest()

    def summary(self) -> dict:
        return {
            "images": len(self.records),
            "patients": len({r.patient_id for r in self.records}),
            "sources": dict(sorted(Counter(r.source for r in self.records).items())),
            "labels": dict(sorted(Counter(l for r in self.records for l in r.labels).items())),
        }


def _dicom_sop_uid(path: Path) -> str | None:
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return str(ds.get("SOPInstanceUID", "")) or None
    except Exception:  # not DICOM, or unreadable: no SOP UID to match on
        return None


def load_train_set(images: str | Path, labels_csv: str | Path, *, label_map: Mapping[str, str] | None = None
                   ) -> TrainSet:
    """Every labeled image under ``images``. Rows without a patient id count as a patient of their own (so they
    can never leak across the split); ``label_map`` renames labels (after the CSV is read) before anything else."""
    root = Path(images).expanduser().resolve()
    if not root.is_dir():
        raise TrainDataError(f"images folder {images} does not exist")
    labels_csv = Path(labels_csv).expanduser()
    if not labels_csv.is_file():
        raise TrainDataError(f"labels file {labels_csv} does not exist")
    table = LabelTable.from_csv(labels_csv)
    csv_resolved = labels_csv.resolve()
    files, _ = walk(root)
    records, unlabeled, no_patient = [], 0, 0
    for file in files:
        if file.resolve() == csv_resolved or file.suffix.lower() in (".csv", ".md", ".txt", ".json", ".npy"):
            continue
        row = table.lookup(file)
        if row is None and table.by_sop_uid:
            row = table.lookup(file, _dicom_sop_uid(file))
        if row is None or not row.labels:
            unlabeled += 1
            continue
        labels = tuple(sorted({(label_map or {}).get(label, label) for label in row.labels}))
        rel = file.relative_to(root).as_posix()
        patient = row.patient_id
        if not patient:
            no_patient += 1
            patient = f"file:{rel}"
        attributes = dict(row.attributes)
        records.append(TrainRecord(path=str(file), rel_path=rel, sha256=sha256_file(file), labels=labels,
                                   patient_id=patient, source=attributes.get("source", ""), view=row.view,
                                   license=attributes.get("license", attributes.get("licence", ""))))
    if not records:
        raise TrainDataError(f"no labeled images under {images} (labels file {labels_csv}): the labels file needs "
                             f"a 'path' (relative to its folder) or 'sop_uid' column and non-empty 'labels'")
    notes = []
    if unlabeled:
        notes.append(f"{unlabeled} file(s) under {images} have no labels row (or empty labels): not used")
    if no_patient:
        notes.append(f"{no_patient} labeled image(s) have no patient_id: each counts as a patient of its own")
    vocabulary = sorted({label for r in records for label in r.labels})
    return TrainSet(str(root), str(labels_csv.resolve()), records, vocabulary, notes)


# ---------------------------------------------------------------------------------------------------------------------
# vocabulary


def normalise_label(label: str) -> str:
    """Case, spaces, underscores, hyphens and punctuation do not matter: 'Pleural_Thickening' ~ 'pleural thickening'."""
    key = re.sub(r"[^0-9a-z+]", "", label.lower())
    return "nofinding" if key in _NORMAL_SYNONYMS else key


def map_vocabulary(model_vocabulary: Sequence[str], labels: Iterable[str],
                   label_map: Mapping[str, str] | None = None, *, what: str = "the model") -> dict[str, str]:
    """Map each label of a labels file onto ``model_vocabulary``: explicitly (``label_map``), exactly, or by
    :func:`normalise_label` ("Pleural thickening" -> "Pleural_Thickening", "normal" -> "No Finding").

    Raises ``VocabularyError`` naming every label that cannot be mapped, and what to do about it.
    """
    model_vocabulary = list(model_vocabulary)
    by_key: dict[str, list[str]] = defaultdict(list)
    for name in model_vocabulary:
        by_key[normalise_label(name)].append(name)
    label_map = dict(label_map or {})
    mapping, unknown, ambiguous = {}, [], []
    for label in sorted(set(labels)):
        target = label_map.get(label, label)
        if target in model_vocabulary:
            mapping[label] = target
            continue
        candidates = by_key.get(normalise_label(target), [])
        if len(candidates) == 1:
            mapping[label] = candidates[0]
        elif candidates:
            ambiguous.append(f"{label} ({' or '.join(candidates)})")
        else:
            unknown.append(label)
    if unknown or ambiguous:
        problems = []
        if unknown:
            problems.append(f"not in its vocabulary: {', '.join(unknown)}")
        if ambiguous:
            problems.append(f"ambiguous: {', '.join(ambiguous)}")
        raise VocabularyError(
            f"the labels file uses labels that {what} cannot map ({'; '.join(problems)}). Its vocabulary is "
            f"{', '.join(model_vocabulary) or '(empty)'}. Map them with --label-map OLD=NEW (or a JSON file), or "
            f"train a new model from ImageNet (without --resume/--init)")
    return mapping


def parse_label_map(items: Sequence[str] | None) -> dict[str, str]:
    """``["Pleural effusion=Effusion", "labels.json"]`` -> {old: new}; a .json file holds such an object."""
    out: dict[str, str] = {}
    for item in items or ():
        path = Path(item).expanduser()
        if item.endswith(".json") and path.is_file():
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise TrainDataError(f"label map {item} must be a JSON object {{\"old\": \"new\"}}")
            out.update({str(k): str(v) for k, v in data.items()})
            continue
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise TrainDataError(f"label map entry {item!r}: use OLD=NEW or a .json file")
        out[old.strip()] = new.strip()
    return out


def remap(train_set: TrainSet, mapping: Mapping[str, str], vocabulary: Sequence[str]) -> TrainSet:
    """The set with its labels renamed by ``mapping`` and ``vocabulary`` as its vocabulary."""
    records = [TrainRecord(r.path, r.rel_path, r.sha256, tuple(sorted({mapping[l] for l in r.labels})),
                           r.patient_id, r.source, r.view, r.license) for r in train_set.records]
    return TrainSet(train_set.root, train_set.labels_csv, records, list(vocabulary), list(train_set.notes))


# ---------------------------------------------------------------------------------------------------------------------
# split


@dataclass(frozen=True)
class Split:
    seed: int
    validation_fraction: float
    train_patients: tuple[str, ...]
    validation_patients: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"seed": self.seed, "validation_fraction": self.validation_fraction, "method":
                "patients grouped by patient_id (across sources), shuffled with the seed within strata of "
                "(main source, most common label set); the first round(fraction x n) of each stratum validate",
                "validation_patients": list(self.validation_patients), "train_patients": list(self.train_patients)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Split":
        return cls(int(data["seed"]), float(data.get("validation_fraction", 0.0)),
                   tuple(data["train_patients"]), tuple(data["validation_patients"]))

    def keeping_sides(self, earlier: "Split") -> "Split":
        """This split with every patient that ``earlier`` (the split of the bundle a run starts from, ``--init``)
        knows kept on its side there: a refined model is never validated on patients its starting model trained
        on, and it validates on the same patients, so the two compare paired. Patients new to ``earlier`` keep the
        side this split gave them."""
        trained, validated = set(earlier.train_patients), set(earlier.validation_patients)
        drawn = set(self.validation_patients)
        patients = set(self.train_patients) | drawn
        val = {p for p in patients if p in validated or (p not in trained and p in drawn)}
        return Split(self.seed, self.validation_fraction, tuple(sorted(patients - val)), tuple(sorted(val)))

    def indices(self, records: Sequence[TrainRecord]) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) record indices; images of patients in neither list are left out."""
        train, val = set(self.train_patients), set(self.validation_patients)
        tr = [i for i, r in enumerate(records) if r.patient_id in train]
        va = [i for i, r in enumerate(records) if r.patient_id in val]
        return np.asarray(tr, dtype=np.int64), np.asarray(va, dtype=np.int64)


def patient_split(records: Sequence[TrainRecord], validation_fraction: float = 0.2, seed: int = 0) -> Split:
    """A seeded, patient-disjoint split, stratified by each patient's main source and label set so that every
    source (and NIH in particular) has validation patients. A patient's images stay together whatever source
    they come from (``patient_id`` is the only key)."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError("validation_fraction must be in (0, 1)")
    by_patient: dict[str, list[TrainRecord]] = defaultdict(list)
    for r in records:
        by_patient[r.patient_id].append(r)
    if len(by_patient) < 2:
        raise TrainDataError(f"a patient-disjoint split needs at least 2 patients, got {len(by_patient)}")
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for patient in sorted(by_patient):
        rs = by_patient[patient]
        source = Counter(r.source for r in rs).most_common(1)[0][0]
        labelset = Counter("|".join(r.labels) for r in rs).most_common(1)[0][0]
        strata[(source, labelset)].append(patient)
    # Rare label sets are pooled per source, so tiny strata do not all round to zero validation patients.
    merged: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (source, labelset), patients in strata.items():
        merged[(source, labelset if len(patients) >= 5 else "*")].extend(patients)
    rng = np.random.default_rng(seed)
    train, val = [], []
    carry = 0.0  # keeps the overall fraction right across many small strata
    for key in sorted(merged):
        patients = sorted(merged[key])
        rng.shuffle(patients)
        exact = validation_fraction * len(patients) + carry
        n_val = int(np.floor(exact + 0.5))
        n_val = min(n_val, len(patients) - (1 if len(patients) > 1 else 0))
        carry = exact - n_val
        val.extend(patients[:n_val])
        train.extend(patients[n_val:])
    if not val:
        val.append(train.pop())
    if not train:
        train.append(val.pop())
    return Split(seed, validation_fraction, tuple(sorted(train)), tuple(sorted(val)))


@dataclass
class SplitSet:
    """A training set and its split: what one run trains on (``train_idx``) and validates on (``val_idx``)."""

    train_set: TrainSet
    split: Split
    train_idx: np.ndarray
    val_idx: np.ndarray

    @classmethod
    def of(cls, train_set: TrainSet, split: Split) -> "SplitSet":
        train_idx, val_idx = split.indices(train_set.records)
        return cls(train_set, split, train_idx, val_idx)

    @property
    def vocabulary(self) -> list[str]:
        return list(self.train_set.vocabulary)

    @property
    def validation_records(self) -> list[TrainRecord]:
        return [self.train_set.records[i] for i in self.val_idx]

    def leaving_out(self, rules: Sequence[str]) -> "SplitSet":
        """The same split with the training images that match a rule (``source=NAME`` or ``label=NAME``) left out
        of training; validation is untouched, so runs with and without them are compared on the same queries."""
        return self._training_where(~self._matching(rules, "--leave-out"))

    def training_on(self, rules: Sequence[str]) -> "SplitSet":
        """The same split training only on the training images that match one of the rules (``source=NAME`` or
        ``label=NAME``): the second stage of a two-stage recipe (docs/model-card.md), validation untouched."""
        return self._training_where(self._matching(rules, "--train-on"))

    def _matching(self, rules: Sequence[str], option: str) -> np.ndarray:
        """Which training images match any of ``rules``; a malformed rule, or one that matches no training image
        (a typo, another folder's source), is an error that names the values there are."""
        records = [self.train_set.records[i] for i in self.train_idx]
        any_hit = np.zeros(len(records), dtype=bool)
        for rule in rules:
            key, sep, value = rule.partition("=")
            if not sep or key not in ("source", "label") or not value:
                raise TrainDataError(f"{option} {rule!r}: use source=NAME or label=NAME")
            hit = np.array([(r.source == value) if key == "source" else (value in r.labels) for r in records])
            if not hit.any():
                values = sorted({r.source for r in records} if key == "source" else set(self.vocabulary))
                raise TrainDataError(f"{option} {rule!r} matches no training image; the {key}s are: "
                                     f"{', '.join(values)}")
            any_hit |= hit
        return any_hit

    def _training_where(self, keep: np.ndarray) -> "SplitSet":
        return SplitSet(self.train_set, self.split, self.train_idx[keep], self.val_idx)

    def label_frequency(self) -> dict[str, float]:
        """Share of training images with each label of the vocabulary."""
        frequency = self.train_set.targets(self.vocabulary)[self.train_idx].mean(0).tolist()
        return dict(zip(self.vocabulary, frequency))

"""The evaluation set: labeled images under a folder, joined with a labels CSV (see medsim.ingest.LabelTable)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsim.errors import MedsimError
from medsim.ingest import LabelTable, read_any, walk


@dataclass(frozen=True)
class EvalItem:
    path: str  # absolute
    rel_path: str  # relative to the images folder (posix)
    labels: tuple[str, ...]
    patient_id: str | None
    source: str = ""
    view: str = ""


@dataclass
class EvalSet:
    root: str
    items: list[EvalItem]
    labels_csv: str = ""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[tuple[str, ...]]:
        return [item.labels for item in self.items]

    @property
    def patients(self) -> list[str | None]:
        return [item.patient_id for item in self.items]

    @property
    def sources(self) -> list[str]:
        return [item.source for item in self.items]

    @property
    def vocabulary(self) -> list[str]:
        return sorted({label for item in self.items for label in item.labels})

    def fingerprint(self) -> str:
        """Changes when the set of images, their files or their labels change."""
        digest = hashlib.sha256()
        for item in self.items:
            try:
                stat = os.stat(item.path)
                size, mtime = stat.st_size, int(stat.st_mtime)
            except OSError:
                size, mtime = -1, -1
            digest.update(f"{item.rel_path}\0{size}\0{mtime}\0{'|'.join(item.labels)}\0{item.patient_id}\n".encode())
        return digest.hexdigest()[:16]

    def subset(self, keep, note: str | None = None) -> "EvalSet":
        keep = list(keep)
        mask = np.zeros(len(self.items), dtype=bool)
        mask[keep] = True
        items = [item for item, k in zip(self.items, mask) if k]
        return EvalSet(self.root, items, self.labels_csv, self.notes + ([note] if note else []))

    def only_patients(self, patients, why: str) -> "EvalSet":
        wanted = {str(p) for p in patients}
        keep = [i for i, item in enumerate(self.items) if item.patient_id in wanted]
        return self.subset(keep, f"{why}: {len(keep)} of {len(self.items)} images ({len(wanted)} patients listed)")

    def pixels(self, i: int) -> np.ndarray:
        """Display-ready pixels (H, W) float32 in [0, 1] of item i."""
        return read_any(self.items[i].path, root=self.root).pixels


def _stable_rank(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_eval_set(images: str | Path, labels_csv: str | Path, *, sources=None, limit: int | None = None) -> EvalSet:
    """Every labeled PNG/JPEG/DICOM file under ``images`` that has a row in ``labels_csv``.

    sources: keep only rows of these ``source`` values. limit: at most this many images, drawn deterministically
    (by a hash of the patient id) round-robin across sources, so a small set still covers every source.
    """
    root = Path(images).resolve()
    if not root.is_dir():
        raise MedsimError(f"images folder {images} does not exist")
    table = LabelTable.from_csv(labels_csv)
    files, _ = walk(root)
    csv_path = str(Path(labels_csv).resolve())
    items, unlabeled = [], 0
    for file in files:
        if str(file.resolve()) == csv_path or file.suffix.lower() in (".csv", ".md", ".txt", ".json"):
            continue
        row = table.lookup(file)
        if row is None:
            unlabeled += 1
            continue
        if not row.labels:
            unlabeled += 1
            continue
        attributes = dict(row.attributes)
        items.append(EvalItem(
            path=str(file), rel_path=file.relative_to(root).as_posix(), labels=tuple(row.labels),
            patient_id=row.patient_id, source=attributes.get("source", ""), view=row.view,
        ))
    notes = []
    if unlabeled:
        notes.append(f"{unlabeled} file(s) under {images} have no labels row (or empty labels) and are not evaluated")
    if sources:
        wanted = set(sources)
        items = [item for item in items if item.source in wanted]
        notes.append(f"sources restricted to {', '.join(sorted(wanted))}")
    if not items:
        raise MedsimError(f"no labeled images under {images} (labels: {labels_csv})")
    if limit is not None and limit < len(items):
        by_source: dict[str, list[EvalItem]] = {}
        for item in sorted(items, key=lambda it: (_stable_rank(str(it.patient_id)), it.rel_path)):
            by_source.setdefault(item.source, []).append(item)
        queues = [by_source[s] for s in sorted(by_source)]
        chosen = []
        while len(chosen) < limit:
            for queue in queues:
                if queue and len(chosen) < limit:
                    chosen.append(queue.pop(0))
        items = sorted(chosen, key=lambda it: it.rel_path)
        notes.append(f"limited to {limit} images, drawn round-robin across sources")
    return EvalSet(str(root), items, csv_path, notes)

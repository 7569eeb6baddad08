"""`medsim train --feedback FILE`: the viewer's relevance votes (``medsim feedback export``) as extra training pairs.

Which training image a vote's SOP Instance UID names: the UID that ``build-index`` gives that image -- a DICOM
file's SOPInstanceUID, a PNG/JPEG's pseudo-UID from its path under the folder (so train with ``--images`` = the
folder that was indexed). A vote is reported and skipped when either of its images is not among the training images,
or is in the validation split (votes must not leak into the numbers that pick the best epoch). Several users' votes
on one (query, hit) count by the sign of their sum; a tie drops the pair.

Each training step adds :data:`PAIRS_PER_STEP` voted pairs (drawn at random, seeded) to the batch: both images join
the batch as ordinary training items (so every objective sees them), and the ``feedback`` term (weight
``--feedback-weight``) pulls a 👍 pair together (``1 - cos``) and pushes a 👎 pair below :data:`MARGIN`
(``max(0, cos - MARGIN)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsim.feedback import read_csv
from medsim.ingest import image_kind, pseudo_uid
from medsim.train.data import SplitSet, _dicom_sop_uid
from medsim.train.datasets import INPUT

PAIRS_PER_STEP = 8
MARGIN = 0.5


def sop_uid_of(path: str, rel_path: str) -> str | None:
    """The SOP Instance UID build-index gives the image at ``path`` (``rel_path`` under the indexed folder)."""
    kind = image_kind(Path(path))
    if kind == "dicom":
        return _dicom_sop_uid(Path(path))
    return pseudo_uid("sop", rel_path) if kind in ("png", "jpeg") else None


@dataclass
class FeedbackPairs:
    """Voted pairs of training images: (record index a, record index b, +1 / -1)."""

    pairs: np.ndarray  # (P, 3) int64
    skipped_unknown: int = 0  # votes naming an image that is not a training image
    skipped_validation: int = 0  # votes touching the validation split

    @classmethod
    def load(cls, path: str | Path, data: SplitSet, say: Callable[[str], None] = print) -> "FeedbackPairs":
        votes = read_csv(path)
        records = data.train_set.records
        by_sop = {}
        for i, r in enumerate(records):
            sop = sop_uid_of(r.path, r.rel_path)
            if sop:
                by_sop[sop] = i
        validation = {int(i) for i in data.val_idx}
        totals: dict[tuple[int, int], int] = {}
        unknown = in_validation = 0
        for v in votes:
            a, b = by_sop.get(v.query_sop_uid), by_sop.get(v.hit_sop_uid)
            if a is None or b is None:
                unknown += 1
            elif a in validation or b in validation:
                in_validation += 1
            else:
                key = (min(a, b), max(a, b))
                totals[key] = totals.get(key, 0) + v.vote
        pairs = np.asarray([(a, b, 1 if t > 0 else -1) for (a, b), t in sorted(totals.items()) if t],
                           dtype=np.int64).reshape(-1, 3)
        up = int((pairs[:, 2] > 0).sum())
        say(f"feedback {Path(path).name}: {len(votes)} votes -> {len(pairs)} pairs ({up} 👍, {len(pairs) - up} 👎); "
            f"skipped {unknown} whose images are not training images, {in_validation} touching the validation split")
        return cls(pairs, unknown, in_validation)

    def __len__(self) -> int:
        return len(self.pairs)


class FeedbackBatches:
    """Adds voted pairs to each training batch: ``extend(x, targets)`` -> (x, targets) with ``targets["pairs"]``
    (rows of the two images in the batch, and the vote)."""

    def __init__(self, pairs: FeedbackPairs, train_ds, train_idx, seed: int = 0):
        position = {int(i): n for n, i in enumerate(train_idx)}  # record index -> dataset item
        self.pairs = pairs.pairs
        self.items = np.asarray([(position[int(a)], position[int(b)]) for a, b, _ in self.pairs],
                                dtype=np.int64).reshape(-1, 2)
        self.dataset = train_ds
        self.rng = np.random.default_rng(seed)

    def extend(self, x: torch.Tensor, targets: dict) -> tuple[torch.Tensor, dict]:
        if not len(self.pairs):
            return x, targets
        chosen = self.rng.choice(len(self.pairs), size=min(PAIRS_PER_STEP, len(self.pairs)), replace=False)
        ends = np.concatenate([self.items[chosen, 0], self.items[chosen, 1]])
        items = [self.dataset[int(i)] for i in ends]
        extra = torch.stack([torch.as_tensor(item[INPUT]) for item in items]).to(x.device, x.dtype)
        n, p = len(x), len(chosen)
        out = dict(targets)
        for key, value in (("labels", [item["labels"] for item in items]),
                           ("patient", [item["patient"] for item in items]),
                           ("index", [item["index"] for item in items]),
                           ("source", [item["source"] for item in items])):
            if key in targets:
                add = torch.as_tensor(np.asarray(value)).to(targets[key].device, targets[key].dtype)
                out[key] = torch.cat([targets[key], add])
        rows = torch.arange(p, device=x.device)
        out["pairs"] = torch.stack([n + rows, n + p + rows,
                                    torch.as_tensor(self.pairs[chosen, 2], device=x.device)], dim=1)
        return torch.cat([x, extra.to(memory_format=torch.channels_last) if x.dim() == 4 else extra]), out


def feedback_loss(emb: torch.Tensor, pairs: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    """Mean over the voted pairs: ``1 - cos`` for a 👍 pair, ``max(0, cos - margin)`` for a 👎 pair."""
    if pairs is None or not len(pairs):
        return emb.sum() * 0.0
    cos = (emb[pairs[:, 0]] * emb[pairs[:, 1]]).sum(dim=1)
    up = pairs[:, 2] > 0
    return torch.where(up, 1.0 - cos, (cos - margin).clamp_min(0.0)).mean()

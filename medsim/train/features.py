"""The frozen trunk and its activation cache.

VGG-16 blocks 1-4 (``features[:24]``, up to and including pool4) stay at their ImageNet weights on CPU, so their
output for an image never changes: it is computed once per image and *view* and stored under
``medsim_home()/train-cache`` as float16 (512 x 14 x 14 for 224 px input, 200 kB). Training then runs only the
trainable tail (block 5 or part of it, pooling, projection) -- 7-25x less compute per step than the whole network.

Views: view 0 is the image as ``build-index`` will see it. Views 1..K are fixed random augmentations, drawn with
MONAI transforms from a seed derived from the file's content hash, the view number and the augmentation seed, so
every run (and a resumed run) sees the same augmented images (:class:`medsim.train.transforms.TrunkInputd`): small
rotation, isotropic scale, translation, gamma/contrast and brightness changes of the radiograph -- nothing that
changes a finding (no flips: laterality matters; no crops that cut off lung bases or apices; no elastic warps of the
heart or mediastinum). Training draws one view per image per epoch and applies a further small random
rotation/shift/scale to the cached activation maps (:class:`medsim.train.transforms.RandFeatureJitter` on the 14 x 14
feature grid), so augmentation still varies from epoch to epoch.

Keys: a cache folder is named by the trunk's weights, the preprocessing, the cut layer and the augmentation
settings; a file by its content sha256 and view. Files are written atomically, so an interrupted run keeps what it
finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from medsim.model.bundle import canonical_json
from medsim.model.network import state_dict_content_sha256
from medsim.preprocess import PreprocessSpec
from medsim.train.transforms import AugmentSpec, TrunkInputd

CACHE_FORMAT = 1
POOL4_END = 24  # vgg16().features[:24]: blocks 1-4 with pool4


class TrunkCache:
    """Frozen ``features[:cut]`` activations on disk, one float16 .npy per (image content, view)."""

    def __init__(self, root: Path, trunk: torch.nn.Module, spec: PreprocessSpec, aug: AugmentSpec, cut: int,
                 trunk_id: str):
        self.trunk = trunk.eval()
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        self.spec = spec
        self.aug = aug
        self.cut = cut
        base = {"format": CACHE_FORMAT, "trunk": trunk_id, "cut": cut, "preprocess": spec.to_dict()}
        # View 0 (no augmentation) does not depend on the augmentation settings: its own folder.
        self.clean_dir = self._folder(Path(root), base)
        self.aug_dir = self._folder(Path(root), {**base, "augment": aug.to_dict()})

    @staticmethod
    def _folder(root: Path, doc: dict) -> Path:
        folder = root / hashlib.sha256(canonical_json(doc).encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "cache.json"
        if not meta.exists():
            meta.write_text(json.dumps(doc, indent=2) + "\n")
        return folder

    @classmethod
    def for_features(cls, root: Path, features: torch.nn.Sequential, spec: PreprocessSpec, aug: AugmentSpec,
                     cut: int = POOL4_END) -> "TrunkCache":
        trunk = features[:cut]
        return cls(root, trunk, spec, aug, cut, state_dict_content_sha256(trunk.state_dict())[:16])

    def file(self, sha256: str, view: int) -> Path:
        return (self.clean_dir if view == 0 else self.aug_dir) / sha256[:2] / f"{sha256}_v{view}.npy"

    def missing(self, items: Sequence[Mapping]) -> list[dict]:
        return [dict(it) for it in items if not self.file(it["sha256"], int(it["view"])).is_file()]

    def fill(self, items: Sequence[Mapping], *, device: str | torch.device = "cpu", batch_size: int = 16,
             progress: Callable[[int, int, float], None] | None = None, root: str | None = None) -> int:
        """Compute and store what is missing for ``items`` ({"path", "sha256", "view"}); returns how many."""
        from monai.data import DataLoader, Dataset

        todo = self.missing(items)
        if not todo:
            return 0
        dataset = Dataset(data=[{**item, "input": item["path"]} for item in todo],
                          transform=TrunkInputd("input", self.spec, self.aug, root))
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                            collate_fn=_collate_inputs)
        device = torch.device(device)
        trunk = self.trunk.to(device)
        done, t0 = 0, time.perf_counter()
        with torch.inference_mode():
            for batch in loader:
                x = batch["input"].to(device).contiguous(memory_format=torch.channels_last)
                y = trunk(x).to("cpu", torch.float16).contiguous().numpy()
                for sha, view, act in zip(batch["sha256"], batch["view"], y):
                    _atomic_save(self.file(sha, int(view)), act)
                done += len(y)
                if progress is not None:
                    progress(done, len(todo), time.perf_counter() - t0)
        return done


def _collate_inputs(batch: list[dict]) -> dict:
    return {"input": torch.stack([b["input"] for b in batch]), "sha256": [b["sha256"] for b in batch],
            "view": [int(b["view"]) for b in batch]}


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)

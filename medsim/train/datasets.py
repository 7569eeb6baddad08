"""The MONAI datasets of a run: one item per training / validation image, its network input under :data:`INPUT`.

* Cached activations (``--train-layers`` conv5_x or none): the frozen trunk's pool4 maps of every image and view
  are computed once (:class:`medsim.train.features.TrunkCache`); a ``CacheDataset`` holds them after any frozen
  block-5 layers, and training picks one view per image and epoch.
* Images (``--train-layers all``): a ``CacheDataset`` of letterboxed radiographs, augmented on the fly (training)
  and preprocessed as the bundle does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from medsim.evaluate.metrics import source_family
from medsim.files import medsim_home
from medsim.preprocess import PreprocessSpec
from medsim.train.data import SplitSet
from medsim.train.features import POOL4_END, TrunkCache
from medsim.train.transforms import (
    AugmentSpec,
    BundlePreprocessd,
    LoadLetterboxd,
    LoadViewsd,
    PickViewd,
    RandPickViewd,
    RandRadiographAugmentd,
)

INPUT = "input"  # the key of the network's input in an item; the others: "index", "labels", "patient", "source"


def cache_root() -> Path:
    """Where the frozen trunk's activations are cached, for all runs."""
    return medsim_home() / "train-cache"


def source_families(data: SplitSet) -> list[str]:
    """The source families of a training set, sorted (their position is an item's "source")."""
    return sorted({source_family(r.source or "") for r in data.train_set.records})


def _items(data: SplitSet) -> tuple[list[dict], list[dict]]:
    """Training and validation items without their input: record index, multi-hot labels, patient number, source
    family number."""
    records = data.train_set.records
    targets = data.train_set.targets(data.vocabulary)
    codes = {p: i for i, p in enumerate(sorted({r.patient_id for r in records}))}
    families = {f: i for i, f in enumerate(source_families(data))}

    def items(indices):
        return [{"index": int(i), "labels": targets[i], "patient": codes[records[i].patient_id],
                 "source": families[source_family(records[i].source or "")]} for i in indices]

    return items(data.train_idx), items(data.val_idx)


def build_datasets(data: SplitSet, *, spec: PreprocessSpec, base_features: torch.nn.Sequential, start: int,
                   views: int, seed: int, device: torch.device, progress: bool, say: Callable[[str], None],
                   timings: dict[str, float]):
    """(training, validation) ``CacheDataset``s; ``start`` is the first trainable module of ``vgg16().features``,
    ``views`` the augmented views per training image besides the original. Adds its timings to ``timings``."""
    from monai.data import CacheDataset
    from monai.transforms import Compose

    records = data.train_set.records
    train_items, val_items = _items(data)
    aug = AugmentSpec(seed=seed)

    if start < POOL4_END:  # full (or deeper) fine-tuning on images, augmented on the fly
        for item in train_items + val_items:
            item[INPUT] = records[item["index"]].path
        load = LoadLetterboxd(INPUT, spec.image_size, data.train_set.root)
        prepare = BundlePreprocessd(INPUT, spec)
        train_ds = CacheDataset(train_items, Compose([load, RandRadiographAugmentd(INPUT, aug), prepare]),
                                cache_rate=1.0, num_workers=1, progress=progress, copy_cache=False)
        val_ds = CacheDataset(val_items, Compose([load, prepare]), cache_rate=1.0, num_workers=1, progress=progress,
                              copy_cache=False)
        return train_ds, val_ds

    # cached pool4 activations
    t0 = time.perf_counter()
    cache = TrunkCache.for_features(cache_root(), base_features, spec, aug, POOL4_END)
    wanted = [{"path": records[i].path, "sha256": records[i].sha256, "view": v}
              for i in data.train_idx for v in range(views + 1)]
    wanted += [{"path": records[i].path, "sha256": records[i].sha256, "view": 0} for i in data.val_idx]
    missing = len(cache.missing(wanted))
    if missing:
        say(f"frozen VGG-16 blocks 1-4: computing {missing} of {len(wanted)} activation maps "
            f"(cached in {cache.clean_dir.parent} for later runs)")
        last = [0.0]

        def report(done, total, seconds):
            if progress and (seconds - last[0] > 30 or done == total):
                last[0] = seconds
                say(f"  activations {done}/{total}  {seconds:.0f} s  ({seconds / max(done, 1):.2f} s/image)")

        cache.fill(wanted, device=device, progress=report, root=data.train_set.root)
    timings["activation_cache_seconds"] = time.perf_counter() - t0
    for item in train_items:
        item[INPUT] = [str(cache.file(records[item["index"]].sha256, v)) for v in range(views + 1)]
    for item in val_items:
        item[INPUT] = [str(cache.file(records[item["index"]].sha256, 0))]
    frozen = base_features[POOL4_END:start].eval() if start > POOL4_END else None
    for p in (frozen.parameters() if frozen is not None else ()):
        p.requires_grad_(False)
    t0 = time.perf_counter()
    if frozen is not None:
        say(f"running the frozen layers {POOL4_END}..{start - 1} of block 5 once over "
            f"{len(train_items) * (views + 1) + len(val_items)} activation maps")
    load = LoadViewsd(INPUT, frozen, device=device if device.type != "cpu" else None)  # frozen layers on the device
    train_ds = CacheDataset(train_items, Compose([load, RandPickViewd(INPUT)]), cache_rate=1.0,
                            num_workers=1, progress=False, copy_cache=False)
    val_ds = CacheDataset(val_items, Compose([load, PickViewd(INPUT, 0)]), cache_rate=1.0,
                          num_workers=1, progress=False, copy_cache=False)
    timings["dataset_cache_seconds"] = time.perf_counter() - t0
    return train_ds, val_ds

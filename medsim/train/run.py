"""`medsim train`: fine-tune VGG-16 on labeled chest radiographs with MONAI, write a model bundle.

Pipeline (CPU default; see docs/model-card.md for what was tried and why):

1. Data: labeled images (:mod:`medsim.train.data`), a seeded patient-disjoint split, the label vocabulary.
2. Frozen trunk: VGG-16 blocks 1-4 at ImageNet weights; their pool4 activations are computed once per image and
   augmented view and cached on disk (:mod:`medsim.train.features`).
3. Datasets: MONAI ``CacheDataset`` over the cached activations (deterministic part: load the views, run any frozen
   block-5 layers; random part: pick a view, MONAI ``RandAffined`` on the activation grid).
4. Engine: MONAI ``SupervisedTrainer`` / ``SupervisedEvaluator`` with ``ValidationHandler`` (validation retrieval
   mAP@10 every epoch), ``CheckpointSaver`` (last epoch, for --resume; best validation mAP@10), ``CheckpointLoader``
   (resume), ``EarlyStopHandler`` and ``LrScheduleHandler``.
5. Bundle: the best checkpoint as an ``EmbeddingNet`` (VGG-16 features[:30] + GAP + linear projection + L2) with the
   preprocessing used in training, the vocabulary, split, data fingerprint, hyper-parameters, validation metrics
   (and the ImageNet baseline's on the same split), the classifier head and the code version.

``--train-layers all`` fine-tunes the whole network on images (augmented on the fly); meant for ``--device cuda``.
"""

from __future__ import annotations

import base64
import copy
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Randomizable, Transform

from medsim.errors import MedsimError
from medsim.train.data import (
    Split,
    TrainDataError,
    TrainSet,
    load_train_set,
    map_vocabulary,
    patient_split,
    remap,
)
from medsim.model.quantize import save_calibration
from medsim.train.features import POOL4_END, AugmentSpec, TrunkCache, augment_transform
from medsim.train.objectives import (
    RetrievalLoss,
    RetrievalNet,
    cosine_schedule_lambda,
    init_projection,
    parse_objective,
)
from medsim.train.validation import headline, paired_difference, retrieval_report

log = logging.getLogger("medsim.train")

RUN_FORMAT = 1
FEATURES_END = 30  # conv5_3 + ReLU: the embedding layer
# --train-layers: the first trainable module of vgg16().features
TRAIN_LAYERS = {"all": 0, "conv5_1": 24, "conv5_2": 26, "conv5_3": 28, "none": 30}
K = 10


class TrainError(MedsimError):
    """Training cannot start or continue."""


@dataclass
class TrainConfig:
    images: str
    labels: str
    out: str
    work_dir: str | None = None
    name: str = "vgg16-cxr-finetuned"
    objective: str = "bce+supcon"
    train_layers: str = "conv5_3"
    pooling: str = "gap"
    embedding_dim: int = 512
    epochs: int = 12
    patience: int = 4
    batch_size: int = 64
    lr: float = 1e-4  # trainable VGG-16 layers
    head_lr: float = 1e-3  # projection and classifier
    weight_decay: float = 1e-4
    temperature: float = 0.1
    views: int = 1  # augmented views per training image, besides the original
    int8_check: bool = True  # write int8 calibration images and check int8 against fp32 on the validation split
    feature_augment: float = 0.5  # probability of a random shift/scale of the activation grid
    validation_fraction: float = 0.2
    seed: int = 0
    select: str = "all"  # which validation mAP@10 picks the best epoch: all | nih | mean
    init: str | None = None  # start from this bundle instead of ImageNet (its vocabulary must map)
    label_map: dict = field(default_factory=dict)
    device: str = "cpu"
    workers: int = 0
    max_steps_per_epoch: int | None = None  # tests and smoke runs

    # what must match for --resume (the rest may change: out, epochs, device, ...)
    RESUME_KEYS = ("objective", "train_layers", "pooling", "embedding_dim", "batch_size", "lr", "head_lr",
                   "weight_decay", "temperature", "views", "feature_augment", "validation_fraction", "seed",
                   "select", "init")

    def hyperparameters(self) -> dict:
        return {k: getattr(self, k) for k in self.RESUME_KEYS + ("epochs", "patience", "max_steps_per_epoch")}


@dataclass
class TrainResult:
    bundle_path: str
    fingerprint: str
    best_epoch: int
    epochs_run: int
    validation: dict
    baseline: dict
    wall_seconds: float
    run_dir: str
    history: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def code_version() -> dict:
    """medsim's version and, when it runs from a git checkout, the commit and whether the tree was modified."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        out = {"medsim": version("medsim")}
    except PackageNotFoundError:
        out = {"medsim": "unknown"}
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "medsim"],
                                   capture_output=True, text=True, timeout=10)
            out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _encode_tensor(t: torch.Tensor) -> dict:
    a = t.detach().to("cpu", torch.float32).contiguous().numpy()
    return {"dtype": "float32", "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode()}


def decode_tensor(d: Mapping) -> torch.Tensor:
    a = np.frombuffer(base64.b64decode(d["base64"]), dtype=np.float32).reshape(d["shape"])
    return torch.from_numpy(a.copy())


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _clean(obj):
    """JSON-safe: NaN -> None, numpy -> python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if not np.isfinite(v) else round(v, 6)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def default_work_dir(out: str | Path) -> Path:
    out = Path(out).expanduser()
    return out.parent / f".{out.name}.train"


# ---------------------------------------------------------------------------------------------------------------------
# MONAI transforms for the cached-activation datasets


class LoadViewsd(Transform):
    """Deterministic (a MONAI ``Transform``, so ``CacheDataset`` caches its output): {"views": [npy paths]} -> {"views": (V, C, h, w) float16 array}, after running the frozen
    block-5 layers (``frozen``, may be empty) on them."""

    def __init__(self, frozen: torch.nn.Module | None):
        self.frozen = frozen

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        views = np.stack([np.load(p) for p in d["views"]])
        if self.frozen is not None and len(self.frozen):
            with torch.inference_mode():
                views = self.frozen(torch.from_numpy(views).float()).to(torch.float16).numpy()
        d["views"] = views
        return d


class RandPickViewd(Randomizable):
    """Random (training) or fixed view 0 (validation): {"views"} -> {"feat": (C, h, w) float32 tensor}."""

    def __init__(self, random: bool):
        self.random = random

    def randomize(self, data=None) -> None:
        self._view = int(self.R.randint(data)) if self.random else 0

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        views = d.pop("views")
        self.randomize(len(views))
        d["feat"] = torch.from_numpy(np.asarray(views[self._view], dtype=np.float32))
        return d


class FeatureJitter:
    """Batched random affine warp of activation grids (MONAI ``AffineTransform``, one call per batch): with
    probability ``prob`` per image a small rotation, isotropic scale and shift by up to ``shift_cells`` grid cells;
    otherwise the identity. Applied to training batches of cached activations only."""

    def __init__(self, prob: float, seed: int, rotate_degrees: float = 5.0, scale: float = 0.06,
                 shift_cells: float = 1.0):
        from monai.networks.layers import AffineTransform

        self.prob = float(prob)
        self.rotate = np.radians(rotate_degrees)
        self.scale = scale
        self.shift_cells = shift_cells
        self.generator = torch.Generator().manual_seed(seed)
        self.warp = AffineTransform(normalized=True, mode="bilinear", padding_mode="zeros", align_corners=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.prob <= 0 or x.dim() != 4:
            return x
        n, g = x.shape[0], self.generator
        on = (torch.rand(n, generator=g) < self.prob).float()
        angle = (torch.rand(n, generator=g) * 2 - 1) * self.rotate * on
        s = 1 + (torch.rand(n, generator=g) * 2 - 1) * self.scale * on
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * on[:, None] * self.shift_cells * 2.0 / x.shape[-1]
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = s * torch.cos(angle)
        theta[:, 0, 1] = -s * torch.sin(angle)
        theta[:, 1, 0] = s * torch.sin(angle)
        theta[:, 1, 1] = s * torch.cos(angle)
        theta[:, :, 2] = shift
        return self.warp(x, theta.to(x.device, x.dtype))


class LoadLetterboxd(Transform):
    """Deterministic (full fine-tuning; cached by ``CacheDataset``): {"path"} -> {"img": (1, h, w) float32, longest side = image size}."""

    def __init__(self, size: int, root: str):
        from monai.transforms import Resize

        self.root = root
        self.resize = Resize(spatial_size=size, size_mode="longest", mode="area")

    def __call__(self, data: Mapping) -> dict:
        from medsim.train.features import load_radiograph

        d = dict(data)
        out = self.resize(load_radiograph(d["path"], self.root)[None].astype(np.float32))
        d["img"] = np.asarray(out.detach().cpu().numpy() if torch.is_tensor(out) else out, dtype=np.float32)
        return d


class RandAugmentPrepared(Randomizable):
    """Full fine-tuning: {"img"} -> {"feat"}: random image-level augmentation (training only) and the bundle's
    preprocessing."""

    def __init__(self, spec, aug: AugmentSpec, train: bool):
        self.prepare = spec.transform()
        self.aug = aug
        self.train = train

    def randomize(self, data=None) -> None:
        self._seed = int(self.R.randint(2**31 - 1))

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        img = d.pop("img")
        if self.train:
            self.randomize()
            t = augment_transform(self.aug, img.shape[-2:])
            t.set_random_state(self._seed)
            out = t(img)
            img = np.asarray(out.detach().cpu().numpy() if torch.is_tensor(out) else out, dtype=np.float32)
        d["feat"] = torch.from_numpy(np.ascontiguousarray(self.prepare(img[0]), dtype=np.float32))
        return d


# ---------------------------------------------------------------------------------------------------------------------
# the run


class Trainer:
    """One training run: set up (or resume) in ``work_dir``, train, write the bundle."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, restart: bool = False, overwrite: bool = False,
                 progress: bool = True, say: Callable[[str], None] = _say,
                 on_epoch: Callable[[dict], None] | None = None):
        self.config = copy.deepcopy(config)
        self.resume = resume
        self.restart = restart
        self.overwrite = overwrite
        self.progress = progress
        self.say = say
        self.on_epoch = on_epoch  # called with each epoch's history row once its checkpoint is written
        self.out = Path(config.out).expanduser()
        self.work_dir = Path(config.work_dir).expanduser() if config.work_dir else default_work_dir(self.out)
        if config.train_layers not in TRAIN_LAYERS:
            raise TrainError(f"--train-layers must be one of {', '.join(TRAIN_LAYERS)}")
        self.start = TRAIN_LAYERS[config.train_layers]
        self.weights = parse_objective(config.objective)
        if config.select not in ("all", "nih", "mean"):
            raise TrainError("--select must be all, nih or mean")
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA device is available to torch on this machine")
        self.timings: dict[str, float] = {}

    # ----------------------------------------------------------------- setup
    def _check_out(self) -> None:
        from medsim.model.bundle import BUNDLE_JSON

        if (self.out / BUNDLE_JSON).exists() and not self.overwrite:
            raise TrainError(f"a model bundle already exists at {self.out}; pass --overwrite to replace it")
        if self.out.exists() and not (self.out / BUNDLE_JSON).exists() and any(self.out.iterdir()):
            raise TrainError(f"{self.out} exists and is not a model bundle; choose another --out")

    def _base_bundle(self):
        from medsim.model import ModelBundle, imagenet_bundle, resolve_bundle

        if self.config.init:
            bundle = resolve_bundle(self.config.init)
        else:
            bundle = imagenet_bundle("gap")
        if bundle.architecture != "vgg16" or bundle.network_config["layer"]["name"] != "conv5_3":
            raise TrainError(f"can only fine-tune VGG-16 conv5_3 bundles, not {bundle.name}")
        assert isinstance(bundle, ModelBundle)
        return bundle

    def _prepare_run(self) -> None:
        cfg = self.config
        run_json = self.work_dir / "run.json"
        existing = json.loads(run_json.read_text()) if run_json.is_file() else None
        if existing and not self.resume and not self.restart:
            done = existing.get("status") == "finished"
            raise TrainError(f"a {'finished' if done else 'previous'} training run is at {self.work_dir} "
                             f"(epoch {existing.get('last_epoch', 0)}): pass --resume to continue it (or to re-write "
                             f"its bundle), or --restart to discard it")
        self._check_out()
        if existing and self.restart:
            shutil.rmtree(self.work_dir)
            existing = None
        self.resume = self.resume and not self.restart
        if self.resume and existing is None and not self.restart:
            self.say(f"nothing to resume at {self.work_dir}: starting a new run")
            self.resume = False
        if existing is not None:
            if int(existing.get("format", 0)) != RUN_FORMAT:
                raise TrainError(f"training run {self.work_dir} has another format; --restart it")
            old = existing["config"]
            changed = [k for k in TrainConfig.RESUME_KEYS if old.get(k) != getattr(cfg, k)]
            if changed:
                raise TrainError(f"--resume: the run at {self.work_dir} was started with other settings "
                                 f"({', '.join(f'{k}={old.get(k)!r}, now {getattr(cfg, k)!r}' for k in changed)}); "
                                 f"use the same settings or --restart")
        self.existing = existing
        self.work_dir.mkdir(parents=True, exist_ok=True)

        # data
        t0 = time.perf_counter()
        train_set = load_train_set(cfg.images, cfg.labels, label_map=cfg.label_map)
        for note in train_set.notes:
            self.say(f"note: {note}")
        self.base = self._base_bundle()
        if existing is not None:
            vocabulary = existing["label_vocabulary"]
            mapping = map_vocabulary(vocabulary, train_set.vocabulary, what=f"the training run at {self.work_dir}")
            train_set = remap(train_set, mapping, vocabulary)
            split = Split.from_dict(existing["split"])
            if existing["data_fingerprint"] != train_set.fingerprint():
                raise TrainError(f"--resume: the run at {self.work_dir} was started on other images or labels "
                                 f"(data fingerprint {existing['data_fingerprint'][:12]}, now "
                                 f"{train_set.fingerprint()[:12]}); --restart to train on these, or give another "
                                 f"--work-dir")
        else:
            if self.base.label_vocabulary:
                mapping = map_vocabulary(self.base.label_vocabulary, train_set.vocabulary,
                                         what=f"model bundle {self.base.name} ({self.base.fingerprint})")
                train_set = remap(train_set, mapping, self.base.label_vocabulary)
            split = patient_split(train_set.records, cfg.validation_fraction, cfg.seed)
        self.train_set: TrainSet = train_set
        self.split = split
        self.vocabulary = list(train_set.vocabulary)
        self.train_idx, self.val_idx = split.indices(train_set.records)
        if len(self.train_idx) == 0 or len(self.val_idx) < 2:
            raise TrainDataError(f"the split leaves {len(self.train_idx)} training and {len(self.val_idx)} "
                                 f"validation images: more labeled patients are needed")
        self.timings["data_seconds"] = time.perf_counter() - t0
        s = train_set.summary()
        self.say(f"data: {s['images']} labeled images, {s['patients']} patients, {len(self.vocabulary)} labels; "
                 f"split (seed {split.seed}): {len(self.train_idx)} training images "
                 f"({len(split.train_patients)} patients), {len(self.val_idx)} validation images "
                 f"({len(split.validation_patients)} patients)")
        if existing is None:
            _write_json(self.work_dir / "run.json", {
                "format": RUN_FORMAT, "status": "running", "created_at": _now(), "config": asdict(cfg),
                "label_vocabulary": self.vocabulary, "split": split.to_dict(),
                "data_fingerprint": train_set.fingerprint(), "base_bundle": {"name": self.base.name,
                                                                             "fingerprint": self.base.fingerprint},
                "last_epoch": 0,
            })
        self.run_json = self.work_dir / "run.json"

    def _update_run(self, **changes) -> None:
        data = json.loads(self.run_json.read_text())
        data.update(changes)
        _write_json(self.run_json, data)

    # ----------------------------------------------------------------- datasets
    def _items(self, indices: np.ndarray, targets: np.ndarray, patient_codes: np.ndarray) -> list[dict]:
        return [{"index": int(i), "labels": targets[i], "patient": int(patient_codes[i])} for i in indices]

    def _datasets(self):
        from monai.data import CacheDataset
        from monai.transforms import Compose

        cfg = self.config
        records = self.train_set.records
        targets = self.train_set.targets(self.vocabulary)
        codes = {p: i for i, p in enumerate(sorted({r.patient_id for r in records}))}
        patient_codes = np.asarray([codes[r.patient_id] for r in records], dtype=np.int64)
        train_items = self._items(self.train_idx, targets, patient_codes)
        val_items = self._items(self.val_idx, targets, patient_codes)
        spec = self.base.preprocess
        aug = AugmentSpec(seed=cfg.seed)

        if self.start < POOL4_END:  # full (or deeper) fine-tuning on images, augmented on the fly
            for item in train_items + val_items:
                item["path"] = records[item["index"]].path
            load = LoadLetterboxd(spec.image_size, self.train_set.root)
            train_ds = CacheDataset(train_items, Compose([load, RandAugmentPrepared(spec, aug, True)]),
                                    cache_rate=1.0, num_workers=1, progress=self.progress, copy_cache=False)
            val_ds = CacheDataset(val_items, Compose([load, RandAugmentPrepared(spec, aug, False)]),
                                  cache_rate=1.0, num_workers=1, progress=self.progress, copy_cache=False)
            return train_ds, val_ds

        # cached pool4 activations
        t0 = time.perf_counter()
        cache = TrunkCache.for_features(self.cache_root(), self.base_features, spec, aug, POOL4_END)
        wanted = [{"path": records[i].path, "sha256": records[i].sha256, "view": v}
                  for i in self.train_idx for v in range(cfg.views + 1)]
        wanted += [{"path": records[i].path, "sha256": records[i].sha256, "view": 0} for i in self.val_idx]
        missing = len(cache.missing(wanted))
        if missing:
            self.say(f"frozen VGG-16 blocks 1-4: computing {missing} of {len(wanted)} activation maps "
                     f"(cached in {cache.clean_dir.parent} for later runs)")
            last = [0.0]

            def progress(done, total, seconds):
                if self.progress and (seconds - last[0] > 30 or done == total):
                    last[0] = seconds
                    self.say(f"  activations {done}/{total}  {seconds:.0f} s  "
                             f"({seconds / max(done, 1):.2f} s/image)")

            cache.fill(wanted, device=self.device, progress=progress, root=self.train_set.root)
        self.timings["activation_cache_seconds"] = time.perf_counter() - t0
        for item in train_items:
            sha = records[item["index"]].sha256
            item["views"] = [str(cache.file(sha, v)) for v in range(cfg.views + 1)]
        for item in val_items:
            item["views"] = [str(cache.file(records[item["index"]].sha256, 0))]
        frozen = self.base_features[POOL4_END:self.start].eval() if self.start > POOL4_END else None
        for p in (frozen.parameters() if frozen is not None else ()):
            p.requires_grad_(False)
        t0 = time.perf_counter()
        if frozen is not None:
            self.say(f"running the frozen layers {POOL4_END}..{self.start - 1} of block 5 once over "
                     f"{len(train_items) * (cfg.views + 1) + len(val_items)} activation maps")
        train_ds = CacheDataset(train_items, Compose([LoadViewsd(frozen), RandPickViewd(True)]), cache_rate=1.0,
                                num_workers=1, progress=False, copy_cache=False)
        val_ds = CacheDataset(val_items, Compose([LoadViewsd(frozen), RandPickViewd(False)]), cache_rate=1.0,
                              num_workers=1, progress=False, copy_cache=False)
        self.timings["dataset_cache_seconds"] = time.perf_counter() - t0
        return train_ds, val_ds

    @staticmethod
    def cache_root() -> Path:
        from medsim.model import medsim_home

        return medsim_home() / "train-cache"

    # ----------------------------------------------------------------- network
    def _network(self, train_ds) -> RetrievalNet:
        cfg = self.config
        tail = copy.deepcopy(self.base_features[self.start:FEATURES_END])
        for p in tail.parameters():
            p.requires_grad_(True)
        base_proj = self.base_state.get("projection.weight")
        if base_proj is not None and base_proj.shape[0] == cfg.embedding_dim:
            proj = torch.nn.Linear(base_proj.shape[1], cfg.embedding_dim)
            with torch.no_grad():
                proj.weight.copy_(base_proj)
                proj.bias.copy_(self.base_state["projection.bias"])
        else:
            pooled = None
            if cfg.embedding_dim != 512:
                pooled = self._pooled_sample(train_ds, tail)
            proj = init_projection(cfg.embedding_dim, pooled)
        net = RetrievalNet(tail, {"type": "gap"} if cfg.pooling == "gap" else cfg.pooling, proj, len(self.vocabulary))
        classifier = self.base.extra.get("classifier")
        if classifier and classifier.get("vocabulary") == self.vocabulary:
            w = decode_tensor(classifier["weight"])
            if w.shape == net.class_weight.shape:
                with torch.no_grad():
                    net.class_weight.copy_(w)
                    net.class_bias.copy_(decode_tensor(classifier["bias"]))
        return net

    def _pooled_sample(self, dataset, tail, n: int = 1024) -> torch.Tensor:
        from medsim.model.network import build_pooling

        pool = build_pooling(self.config.pooling)
        out = []
        with torch.inference_mode():
            for i in range(0, min(n, len(dataset)), 64):
                x = torch.stack([dataset[j]["feat"] for j in range(i, min(i + 64, len(dataset), n))])
                out.append(pool(tail(x.to(self.device))).cpu())
        return torch.cat(out)

    # ----------------------------------------------------------------- embeddings for validation and the baseline
    def _embed(self, net_embed: Callable[[torch.Tensor], torch.Tensor], dataset) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(dataset), 64):
                x = torch.stack([dataset[j]["feat"] for j in range(i, min(i + 64, len(dataset)))]).to(self.device)
                out.append(net_embed(x).float().cpu().numpy())
        return np.concatenate(out)

    def _report(self, embeddings: np.ndarray) -> dict:
        records = [self.train_set.records[i] for i in self.val_idx]
        return retrieval_report(embeddings, [r.labels for r in records], [r.patient_id for r in records],
                                [r.source for r in records], k=K)

    def _baseline(self, val_ds) -> dict:
        return self._report(self._baseline_embeddings(val_ds))

    def _baseline_embeddings(self, val_ds) -> np.ndarray:
        """The ImageNet VGG-16 GAP embedding (the starting bundle's own, when --init) on the validation split."""
        import torch.nn.functional as F

        from medsim.model.network import load_network

        net = load_network(self.base.network_config, self.base_state).to(self.device).eval()
        frozen_tail = net.features[self.start:FEATURES_END] if self.start >= POOL4_END else net.features

        def embed(x):
            v = net.pool(frozen_tail(x))
            if net.projection is not None:
                v = net.projection(v)
            return F.normalize(v, dim=1)

        return self._embed(embed, val_ds)

    def select_value(self, report: dict) -> float:
        """The number that picks the best epoch; 0 when undefined (no validation query has a relevant case)."""
        all_ = report.get(f"mAP@{K}")
        nih = report.get("by_source", {}).get("nih", {}).get(f"mAP@{K}")
        if self.config.select == "all" or nih is None or not np.isfinite(nih):
            value = all_
        elif self.config.select == "nih":
            value = nih
        else:
            value = 0.5 * (float(all_) + float(nih))
        return float(value) if value is not None and np.isfinite(value) else 0.0

    # ----------------------------------------------------------------- train
    def run(self) -> TrainResult:
        from monai.utils import set_determinism

        started = time.perf_counter()
        self.started = started
        self.cpu_started = time.process_time()
        cfg = self.config
        set_determinism(seed=cfg.seed)
        self._prepare_run()
        self.wall_before = float((self.existing or {}).get("wall_seconds", 0.0))
        self.base_state = self.base.state_dict()
        from medsim.model.network import load_network

        base_net = load_network(self.base.network_config, self.base_state)
        self.base_features = base_net.features
        train_ds, val_ds = self._datasets()

        baseline = (self.existing or {}).get("baseline")
        if baseline is None:
            t0 = time.perf_counter()
            baseline = self._baseline(val_ds)
            self._update_run(baseline=baseline)
            self.timings["baseline_seconds"] = time.perf_counter() - t0
        h = headline(baseline)
        self.say(f"baseline ({self.base.name}) on the validation split: mAP@{K} {_fmt(h[f'mAP@{K}'])}, NIH "
                 f"{_fmt(h[f'nih_mAP@{K}'])}, break-even precision {_fmt(h['break_even_precision'])}")

        net = self._network(train_ds).to(self.device)
        history = self._train(net, train_ds, val_ds)

        # the best checkpoint -> bundle
        best_file = self.work_dir / "best.pt"
        if not best_file.is_file():
            raise TrainError(f"no best checkpoint in {self.work_dir} (did validation ever run?)")
        state = torch.load(best_file, map_location="cpu", weights_only=True)
        # ignite saves a lone object's state flat, beside the saver's own "checkpointer" state
        net.load_state_dict(state["network"] if "network" in state else
                            {k: v for k, v in state.items() if k != "checkpointer"})
        net.eval()
        t0 = time.perf_counter()
        embeddings = self._embed(net.embed, val_ds)
        final = self._report(embeddings)
        records = [self.train_set.records[i] for i in self.val_idx]
        final["vs_baseline"] = paired_difference(
            embeddings, self._baseline_embeddings(val_ds), [r.labels for r in records],
            [r.patient_id for r in records], [r.source for r in records], k=K, seed=cfg.seed)
        self.timings["final_validation_seconds"] = time.perf_counter() - t0
        best_epoch = max(history, key=lambda r: (r["select"], -r["epoch"]))["epoch"] if history else 0
        wall = self.wall_before + time.perf_counter() - started
        self.timings["cpu_seconds_this_invocation"] = time.process_time() - self.cpu_started
        bundle = self._write_bundle(net, val_ds, final, baseline, history, best_epoch, wall)
        self._update_run(status="finished", bundle=str(self.out), bundle_fingerprint=bundle.fingerprint,
                         wall_seconds=wall)
        self.say(f"wrote model bundle {bundle.name} ({bundle.fingerprint}) to {bundle.path}: best epoch "
                 f"{best_epoch}, validation mAP@{K} {_fmt(final.get(f'mAP@{K}'))} (baseline "
                 f"{_fmt(baseline.get(f'mAP@{K}'))}), NIH {_fmt(headline(final)[f'nih_mAP@{K}'])} (baseline "
                 f"{_fmt(headline(baseline)[f'nih_mAP@{K}'])}); {wall / 60:.1f} min")
        for name, d in final["vs_baseline"].items():
            self.say(f"  {name}: mAP@{K} {d[f'delta_mAP@{K}']:+.3f} vs the baseline (95 % patient-bootstrap interval "
                     f"{_fmt(d['ci95'][0])} .. {_fmt(d['ci95'][1])}, {d['queries']} queries)")
        return TrainResult(str(bundle.path), bundle.fingerprint, best_epoch, len(history), final, baseline,
                           wall, str(self.work_dir), history)

    def _train(self, net: RetrievalNet, train_ds, val_ds) -> list[dict]:
        from ignite.engine import Events
        from ignite.metrics import Metric
        from monai.data import DataLoader
        from monai.engines import SupervisedEvaluator, SupervisedTrainer
        from monai.handlers import (
            CheckpointLoader,
            CheckpointSaver,
            EarlyStopHandler,
            LrScheduleHandler,
            ValidationHandler,
        )

        cfg = self.config
        trainer_ref = {}
        outer = self

        class RetrievalMAP(Metric):
            """Validation retrieval mAP@10 (the selection value); the full report goes to ``outer.last_report``."""

            def reset(self):
                self._emb, self._idx = [], []

            def update(self, output):
                emb, idx = output
                self._emb.append(emb.detach().float().cpu())
                self._idx.append(idx.detach().cpu())

            def compute(self):
                emb = torch.cat(self._emb).numpy()
                idx = torch.cat(self._idx).numpy()
                position = {int(v): n for n, v in enumerate(outer.val_idx)}
                if sorted(position[int(i)] for i in idx) != list(range(len(outer.val_idx))):
                    raise RuntimeError("validation did not see every validation image once")
                ordered = np.empty_like(emb)
                ordered[[position[int(i)] for i in idx]] = emb
                emb = ordered
                outer.last_report = outer._report(emb)
                return outer.select_value(outer.last_report)

        jitter = FeatureJitter(cfg.feature_augment, cfg.seed) if self.start >= POOL4_END else None

        def prepare_train_batch(batchdata, device=None, non_blocking=False, **kwargs):
            x, targets = prepare_batch(batchdata, device, non_blocking)
            return (jitter(x) if jitter is not None else x), targets

        def prepare_batch(batchdata, device=None, non_blocking=False, **kwargs):
            x = batchdata["feat"]
            x = (x.as_tensor() if hasattr(x, "as_tensor") else x).to(device, non_blocking=non_blocking)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            targets = {"labels": torch.as_tensor(batchdata["labels"]).float().to(device),
                       "patient": torch.as_tensor(batchdata["patient"]).long().to(device),
                       "index": torch.as_tensor(batchdata["index"]).long().to(device)}
            return x, targets

        g = torch.Generator()
        g.manual_seed(cfg.seed)
        train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_ds) >
                                  cfg.batch_size, num_workers=cfg.workers, generator=g)
        val_loader = DataLoader(val_ds, batch_size=128, shuffle=False, num_workers=0)

        tail_params = [p for p in net.tail.parameters() if p.requires_grad]
        head_params = list(net.projection.parameters()) + [net.class_weight, net.class_bias]
        groups = [{"params": head_params, "lr": cfg.head_lr}]
        if tail_params:
            groups.insert(0, {"params": tail_params, "lr": cfg.lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule_lambda(cfg.epochs, 1))
        loss = RetrievalLoss(self.weights, cfg.temperature).to(self.device)
        self.label_frequency = self.train_set.targets(self.vocabulary)[self.train_idx].mean(0).tolist()

        epoch_length = None
        if cfg.max_steps_per_epoch:
            epoch_length = min(len(train_loader), int(cfg.max_steps_per_epoch))
        evaluator = SupervisedEvaluator(
            device=self.device, val_data_loader=val_loader, network=net, prepare_batch=prepare_batch,
            key_val_metric={"val_select": RetrievalMAP(output_transform=lambda o: (o["pred"]["embedding"],
                                                                                  o["label"]["index"]))},
            decollate=False, amp=False,
        )
        trainer = SupervisedTrainer(
            device=self.device, max_epochs=cfg.epochs, train_data_loader=train_loader, network=net,
            optimizer=optimizer, loss_function=loss, prepare_batch=prepare_train_batch, decollate=False,
            epoch_length=epoch_length, amp=self.device.type == "cuda",
        )
        trainer_ref["t"] = trainer
        for engine in (trainer, evaluator):
            engine.logger.setLevel(logging.WARNING)

        with warnings.catch_warnings():  # MONAI passes ignite's deprecated min_delta/cumulative_delta names
            warnings.simplefilter("ignore", DeprecationWarning)
            early = EarlyStopHandler(patience=cfg.patience, score_function=lambda e: e.state.metrics["val_select"],
                                     trainer=trainer, min_delta=1e-4, epoch_level=True)
        best_saver = CheckpointSaver(save_dir=str(self.work_dir), save_dict={"network": net}, save_key_metric=True,
                                     key_metric_name="val_select", key_metric_n_saved=1,
                                     key_metric_filename="best.pt", key_metric_save_state=True)
        last_saver = CheckpointSaver(save_dir=str(self.work_dir), save_dict={
            "trainer": trainer, "network": net, "optimizer": optimizer, "lr_scheduler": scheduler,
            "early_stop": early._handler}, save_interval=1, n_saved=1, epoch_level=True, file_prefix="last")

        history: list[dict] = []
        history_file = self.work_dir / "history.json"
        if self.resume:
            last = _latest_checkpoint(self.work_dir)
            if last is None:
                self.say("no checkpoint to resume from yet: starting from epoch 1")
            else:
                epoch = _checkpoint_epoch(last)
                CheckpointLoader(load_path=str(last), load_dict={
                    "trainer": trainer, "network": net, "optimizer": optimizer, "lr_scheduler": scheduler,
                    "early_stop": early._handler}, map_location=self.device).attach(trainer)
                best = self.work_dir / "best.pt"
                if best.is_file():
                    best_saver.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["checkpointer"])
                if history_file.is_file():
                    history = [r for r in json.loads(history_file.read_text()) if r["epoch"] <= epoch]
                self.say(f"resuming {self.work_dir} after epoch {epoch} of {cfg.epochs}")

        # order matters: validate, then record / stop / checkpoint with the new numbers
        ValidationHandler(interval=1, validator=evaluator, epoch_level=True).attach(trainer)
        best_saver.attach(evaluator)
        early.attach(evaluator)
        LrScheduleHandler(lr_scheduler=scheduler, print_lr=False, epoch_level=True).attach(trainer)

        state = {"loss_sum": 0.0, "steps": 0, "t0": time.perf_counter(), "parts": {}}

        @trainer.on(Events.EPOCH_STARTED)
        def _epoch_started(engine):
            state.update(loss_sum=0.0, steps=0, t0=time.perf_counter(), parts={},
                         lr=[g["lr"] for g in optimizer.param_groups])

        @trainer.on(Events.ITERATION_COMPLETED)
        def _iteration(engine):
            state["loss_sum"] += float(engine.state.output["loss"].detach())
            state["steps"] += 1
            for k, v in loss.last.items():
                state["parts"][k] = state["parts"].get(k, 0.0) + v

        @trainer.on(Events.EPOCH_COMPLETED)
        def _record(engine):
            report = self.last_report
            h = headline(report)
            steps = max(1, state["steps"])
            row = {"epoch": engine.state.epoch, "loss": state["loss_sum"] / steps,
                   "loss_parts": {k: v / steps for k, v in state["parts"].items()},
                   "select": evaluator.state.metrics["val_select"], f"val_mAP@{K}": h[f"mAP@{K}"],
                   f"val_nih_mAP@{K}": h[f"nih_mAP@{K}"], "val_break_even_precision": h["break_even_precision"],
                   "val_by_source": {s: r.get(f"mAP@{K}") for s, r in report.get("by_source", {}).items()},
                   "lr": state["lr"], "seconds": time.perf_counter() - state["t0"]}
            history.append(row)
            best = max(history, key=lambda r: (r["select"], -r["epoch"]))
            _write_json(history_file, history)
            self._update_run(last_epoch=engine.state.epoch,
                             wall_seconds=self.wall_before + time.perf_counter() - self.started)
            self.say(f"epoch {row['epoch']:>2}/{cfg.epochs}  loss {row['loss']:.4f}  val mAP@{K} "
                     f"{_fmt(row[f'val_mAP@{K}'])}  NIH {_fmt(row[f'val_nih_mAP@{K}'])}  break-even P "
                     f"{_fmt(row['val_break_even_precision'])}  best {best['select']:.3f} (epoch {best['epoch']})  "
                     f"{row['seconds']:.0f} s")

        last_saver.attach(trainer)  # after _record: the checkpoint holds the early-stopping state of this epoch

        if self.on_epoch is not None:
            trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: self.on_epoch(history[-1]))

        t0 = time.perf_counter()
        if self.resume and _latest_checkpoint(self.work_dir) is not None and \
                _checkpoint_epoch(_latest_checkpoint(self.work_dir)) >= cfg.epochs:
            self.say("the run had already finished its epochs: writing the bundle from its best checkpoint")
        else:
            self.say(f"training {cfg.train_layers if self.start < FEATURES_END else 'the projection head only'}"
                     f" (+ projection {cfg.embedding_dim}-d, objective {cfg.objective}) for up to {cfg.epochs} "
                     f"epochs of {epoch_length or len(train_loader)} steps on {self.device}")
            trainer.run()
        self.timings["train_seconds"] = time.perf_counter() - t0
        return history

    # ----------------------------------------------------------------- bundle
    def _write_bundle(self, net: RetrievalNet, val_ds, final: dict, baseline: dict, history: list,
                      best_epoch: int, wall: float):
        from medsim.model import ModelBundle
        from medsim.model.network import features_to_network_state_dict

        cfg = self.config
        state = {k: v for k, v in self.base_state.items() if k.startswith("features.")}
        tail_state = net.tail.state_dict()
        for key, value in tail_state.items():  # a slice of vgg16().features keeps the original module indices
            state[f"features.{key}"] = value.detach().clone()
        state = features_to_network_state_dict(state)
        state["projection.weight"] = net.projection.weight.detach().clone()
        state["projection.bias"] = net.projection.bias.detach().clone()
        projection = {"type": "linear", "in_dim": 512, "out_dim": cfg.embedding_dim, "bias": True}
        licences = sorted({r.license for r in self.train_set.records} - {""})
        from medsim.model.weights import VGG16_CITATION

        provenance = {
            "source": f"VGG-16 ({self.base.name}, {self.base.fingerprint}) fine-tuned by `medsim train` on "
                      f"{len(self.train_idx)} labeled chest radiographs ({self.train_set.labels_csv})",
            "licence": "derived from the starting weights (" + str(self.base.provenance.get("licence")) +
                       ") and the training data" + (": " + " | ".join(licences) if licences else ""),
            "citation": VGG16_CITATION,
            "base_bundle": self.base.name, "base_fingerprint": self.base.fingerprint,
        }
        extra = {
            "training": {
                "objective": cfg.objective, "objective_weights": self.weights, "train_layers": cfg.train_layers,
                "first_trainable_module": self.start, "hyperparameters": self.config.hyperparameters(),
                "augmentation": {"image_views": AugmentSpec(seed=cfg.seed).to_dict(), "views_per_image":
                                 cfg.views + 1, "feature_grid": {"prob": cfg.feature_augment, "shift_cells": 1,
                                                                 "scale": 0.06, "rotate_degrees": 5.0}},
                "best_epoch": best_epoch, "epochs_run": len(history), "history": history,
                "device": str(self.device), "torch_threads": torch.get_num_threads(),
                "wall_seconds": wall, "timings": self.timings, "selection": f"validation mAP@{K} ({cfg.select})",
                "label_frequency_train": dict(zip(self.vocabulary, getattr(self, "label_frequency", []))),
            },
            "data": {"fingerprint": self.train_set.fingerprint(), "images_folder": self.train_set.root,
                     "labels_csv": self.train_set.labels_csv, **self.train_set.summary(),
                     "notes": self.train_set.notes},
            "split": self.split.to_dict(),
            "validation": {"model": final, "baseline": {"bundle": self.base.name,
                                                       "fingerprint": self.base.fingerprint, **baseline},
                           "relevance": "shares at least one label; the query's own patient excluded"},
            "classifier": {"type": "cosine", "scale": net.scale, "vocabulary": self.vocabulary,
                           "weight": _encode_tensor(torch.nn.functional.normalize(net.class_weight, dim=1)),
                           "bias": _encode_tensor(net.class_bias)},
            "code_version": code_version(),
        }
        extra["consistency_check"] = self._consistency(state, projection, net, val_ds)
        calibration = None
        if cfg.int8_check:
            calibration, extra["int8"] = self._int8_check(state, projection)
        bundle = ModelBundle.create(self.out, state, name=cfg.name, preprocess=self.base.preprocess,
                                    pooling=cfg.pooling, projection=projection, provenance=provenance,
                                    label_vocabulary=self.vocabulary, extra=_clean(extra),
                                    overwrite=self.overwrite or self.out.exists())
        if calibration is not None:
            save_calibration(bundle.path, calibration.pixels)
        return bundle

    def _int8_check(self, state: dict, projection: dict, n_calibration: int = 32):
        """Calibration images for the int8 mode (seeded training images, across sources) and its check: validation
        mAP@10 with int8 against float32, both through the bundle's ``Embedder`` from the pixels, as build-index
        embeds. int8 becomes the bundle's default (on CPUs with VNNI) only if it loses at most MAX_MAP_LOSS."""
        import hashlib

        from medsim.model.bundle import Embedder
        from medsim.model.network import load_network, network_config
        from medsim.model.quantize import MAX_MAP_LOSS, Int8Calibration, display_pixels
        from medsim.preprocess import prepare
        from medsim.train.features import load_radiograph

        t0 = time.perf_counter()
        spec, root = self.base.preprocess, self.train_set.root
        rng = np.random.default_rng(self.config.seed)
        chosen = rng.choice(np.asarray(self.train_idx), size=min(n_calibration, len(self.train_idx)), replace=False)
        prepared = np.stack([prepare(load_radiograph(self.train_set.records[i].path, root), spec).array
                             for i in sorted(chosen)])
        pixels = display_pixels(prepared, spec)
        calibration = Int8Calibration(pixels=pixels, sha256=hashlib.sha256(pixels.tobytes()).hexdigest(), check={})
        config = network_config("vgg16", "conv5_3", self.config.pooling, projection)
        images = [load_radiograph(self.train_set.records[i].path, root) for i in self.val_idx]
        vectors = {}
        for mode in ("fp32", "int8"):
            embedder = Embedder(load_network(config, state), spec, mode=mode, int8=calibration)
            vectors[mode] = embedder.embed(images)
        scores = {mode: headline(self._report(v)) for mode, v in vectors.items()}
        cosine = np.sum(vectors["fp32"] * vectors["int8"], axis=1)
        delta = scores["int8"][f"mAP@{K}"] - scores["fp32"][f"mAP@{K}"]
        check = {"calibration_images": int(len(pixels)), "validation_images": len(images),
                 f"mAP@{K}_fp32": scores["fp32"][f"mAP@{K}"], f"mAP@{K}_int8": scores["int8"][f"mAP@{K}"],
                 f"delta_mAP@{K}": delta, f"nih_mAP@{K}_fp32": scores["fp32"][f"nih_mAP@{K}"],
                 f"nih_mAP@{K}_int8": scores["int8"][f"nih_mAP@{K}"],
                 "cosine_int8_to_fp32": {"min": float(cosine.min()), "mean": float(cosine.mean())},
                 "max_loss": MAX_MAP_LOSS, "default_ok": bool(delta >= -MAX_MAP_LOSS),
                 "seconds": time.perf_counter() - t0}
        self.say(f"int8 check on {len(images)} validation images: mAP@{K} {_fmt(check[f'mAP@{K}_int8'])} vs fp32 "
                 f"{_fmt(check[f'mAP@{K}_fp32'])} (delta {delta:+.4f}), min cosine {cosine.min():.4f}: int8 "
                 + ("is this bundle's default on CPUs with VNNI" if check["default_ok"] else
                    f"loses more than {MAX_MAP_LOSS} and is not its default"))
        return Int8Calibration(pixels=pixels, sha256=calibration.sha256, check=check), check

    def _consistency(self, state: dict, projection: dict, net: RetrievalNet, val_ds, n: int = 4) -> dict:
        """The bundle's network used as build-index uses it (pixels -> Embedder) must embed the validation images
        like the training path did (cached float16 activations -> trained tail): min cosine over a few images."""
        from medsim.model.bundle import Embedder
        from medsim.model.network import load_network, network_config
        from medsim.train.features import load_radiograph

        config = network_config("vgg16", "conv5_3", self.config.pooling, projection)
        embedder = Embedder(load_network(config, state), self.base.preprocess)
        records = [self.train_set.records[i] for i in self.val_idx[:n]]
        direct = embedder.embed([load_radiograph(r.path, self.train_set.root) for r in records])
        net.eval()
        with torch.inference_mode():
            x = torch.stack([val_ds[j]["feat"] for j in range(len(records))]).to(self.device)
            trained = net.embed(x).float().cpu().numpy()
        cos = float(np.min(np.sum(direct * trained, axis=1)))
        if cos < 0.99:
            raise TrainError(f"the bundle embeds the validation images differently from training (cosine {cos:.4f}): "
                             f"the preprocessing or weights were not carried over; this is a bug")
        return {"images": len(records), "min_cosine_bundle_vs_training_path": cos}


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _checkpoint_epoch(path: Path) -> int:
    m = re.search(r"epoch=(\d+)", path.name)
    return int(m.group(1)) if m else 0


def _latest_checkpoint(work_dir: Path) -> Path | None:
    files = [Path(p) for p in glob.glob(str(work_dir / "last_checkpoint_epoch=*.pt"))]
    return max(files, key=_checkpoint_epoch) if files else None


def train(config: TrainConfig, **kwargs) -> TrainResult:
    """Run (or resume) a training run and write its bundle; see :class:`Trainer`."""
    return Trainer(config, **kwargs).run()

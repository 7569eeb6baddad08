"""`medsim train`: fine-tune VGG-16 on labeled chest radiographs with MONAI, write a model bundle.

One run, stage by stage (CPU default; see docs/model-card.md for what was tried and why):

1. Run folder and data (:mod:`~medsim.train.workdir`, :mod:`~medsim.train.data`): a new run or the one to resume,
   the labeled images, a seeded patient-disjoint split, the label vocabulary.
2. Datasets (:mod:`~medsim.train.datasets`, :mod:`~medsim.train.transforms`, :mod:`~medsim.train.features`):
   VGG-16 blocks 1-4 stay at ImageNet weights; their pool4 activations are computed once per image and augmented
   view and cached on disk; MONAI ``CacheDataset``s hold them (``--train-layers all``: images, augmented on the fly).
3. Baseline: the starting bundle's validation retrieval (:mod:`~medsim.train.validation`).
4. Network (:mod:`~medsim.train.objectives`): the trainable tail, projection and classifier, from the starting bundle.
5. Training loop (:mod:`~medsim.train.loop`): MONAI's engines and handlers, validation mAP@10 every epoch.
6. Bundle (:mod:`~medsim.train.export`): the best checkpoint, its final validation, the int8 check.

``--train-layers all`` fine-tunes the whole network on images; meant for ``--device cuda``.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsim.model import ModelBundle, imagenet_bundle, resolve_bundle
from medsim.model.bundle import BUNDLE_JSON
from medsim.model.network import build_pooling, load_network
from medsim.train.config import FEATURES_END, SELECTIONS, TRAIN_LAYERS, TrainConfig, TrainError, TrainResult
from medsim.train.data import Split, SplitSet, TrainDataError, load_train_set, map_vocabulary, patient_split, remap
from medsim.train.datasets import INPUT, build_datasets, source_families
from medsim.train.export import write_bundle
from medsim.train.feedback import FeedbackBatches, FeedbackPairs
from medsim.train.features import POOL4_END
from medsim.train.objectives import RetrievalNet, decode_tensor, init_projection, parse_objective
from medsim.train.validation import K, fmt, headline, paired_difference, selection_score, validation_report
from medsim.train.workdir import RUN_FORMAT, RunFolder, default_work_dir, now

__all__ = ["TrainConfig", "TrainError", "TrainResult", "Trainer", "decode_tensor", "train"]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Trainer:
    """One training run: set up (or resume) in ``work_dir``, train, write the bundle."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, restart: bool = False, overwrite: bool = False,
                 restart_if_changed: bool = False,
                 progress: bool = True, say: Callable[[str], None] = _say,
                 on_epoch: Callable[[dict], None] | None = None):
        self.config = copy.deepcopy(config)
        self.resume = resume  # becomes False when there is nothing to resume (or --restart)
        self.restart = restart
        self.restart_if_changed = restart_if_changed  # --resume, but a run of other data or settings starts anew
        self.overwrite = overwrite
        self.progress = progress
        self.say = say
        self.on_epoch = on_epoch  # called with each epoch's history row once its checkpoint is written
        self.out = Path(config.out).expanduser()
        self.work_dir = Path(config.work_dir).expanduser() if config.work_dir else default_work_dir(self.out)
        self.folder = RunFolder(self.work_dir)
        if config.train_layers not in TRAIN_LAYERS:
            raise TrainError(f"--train-layers must be one of {', '.join(TRAIN_LAYERS)}")
        self.start = TRAIN_LAYERS[config.train_layers]  # first trainable module of vgg16().features
        parse_objective(config.objective)  # a bad --objective fails here, before any work
        if config.select not in SELECTIONS:
            raise TrainError(f"--select must be one of {', '.join(SELECTIONS)}")
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA device is available to torch on this machine")
        self.timings: dict[str, float] = {}  # seconds of each stage, stored in the bundle
        # set by run(), in this order:
        self.started: float | None = None  # time.perf_counter() when run() began
        self.existing: dict | None = None  # run.json of the run being resumed (None: a new run)
        self.base: ModelBundle | None = None  # the starting bundle (ImageNet VGG-16, or --init)
        self.data: SplitSet | None = None  # the labeled images, their vocabulary and split
        self.base_state: dict | None = None  # the starting bundle's weights
        self.base_features: torch.nn.Sequential | None = None  # its VGG-16 features (the frozen trunk's source)

    # ----------------------------------------------------------------- setup
    def _check_out(self) -> None:
        if (self.out / BUNDLE_JSON).exists() and not self.overwrite:
            raise TrainError(f"a model bundle already exists at {self.out}; pass --overwrite to replace it")
        if self.out.exists() and not (self.out / BUNDLE_JSON).exists() and any(self.out.iterdir()):
            raise TrainError(f"{self.out} exists and is not a model bundle; choose another --out")

    def _base_bundle(self) -> ModelBundle:
        bundle = resolve_bundle(self.config.init) if self.config.init else imagenet_bundle("gap")
        if bundle.architecture != "vgg16" or bundle.network_config["layer"]["name"] != "conv5_3":
            raise TrainError(f"can only fine-tune VGG-16 conv5_3 bundles, not {bundle.name}")
        assert isinstance(bundle, ModelBundle)
        return bundle

    def _open_run(self) -> dict | None:
        """The run to continue (its run.json) or None for a new one; refuses what the flags do not allow."""
        cfg = self.config
        existing = self.folder.read()
        if existing and not self.resume and not self.restart:
            done = existing.get("status") == "finished"
            raise TrainError(f"a {'finished' if done else 'previous'} training run is at {self.work_dir} "
                             f"(epoch {existing.get('last_epoch', 0)}): pass --resume to continue it (or to re-write "
                             f"its bundle), or --restart to discard it")
        self._check_out()
        if existing and self.restart:
            self.folder.discard()
            existing = None
        self.resume = self.resume and not self.restart
        if self.resume and existing is None and not self.restart:
            self.say(f"nothing to resume at {self.work_dir}: starting a new run")
            self.resume = False
        if existing is not None:
            if int(existing.get("format", 0)) != RUN_FORMAT:
                raise TrainError(f"training run {self.work_dir} has another format; --restart it")
            old = existing["config"]
            # a setting added after the run started: the run used what the code did before it existed
            changed = [k for k in TrainConfig.RESUME_KEYS
                       if old.get(k, TrainConfig.LEGACY.get(k)) != getattr(cfg, k)]
            if changed and self.restart_if_changed:
                self._start_anew(f"was started with other settings ({', '.join(changed)})")
                existing = None
            elif changed:
                raise TrainError(f"--resume: the run at {self.work_dir} was started with other settings "
                                 f"({', '.join(f'{k}={old.get(k)!r}, now {getattr(cfg, k)!r}' for k in changed)}); "
                                 f"use the same settings or --restart")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return existing

    def _start_anew(self, why: str) -> None:
        """--restart-if-changed: the run in the work folder ``why`` (other settings, data or starting bundle)."""
        self.say(f"the run at {self.work_dir} {why}: starting a new run")
        self.folder.discard()
        self.folder.path.mkdir(parents=True, exist_ok=True)
        self.existing = None
        self.resume = False

    def _load_data(self) -> SplitSet:
        """The labeled images in the vocabulary of the run (resumed) or of the starting bundle, and the split."""
        cfg, existing = self.config, self.existing
        train_set = load_train_set(cfg.images, cfg.labels, label_map=cfg.label_map)
        for note in train_set.notes:
            self.say(f"note: {note}")
        self.base = self._base_bundle()
        # the model input: the starting bundle's preprocessing, at --image-size when given
        if cfg.image_size is not None and not (64 <= cfg.image_size <= 1024 and cfg.image_size % 16 == 0):
            raise TrainError(f"--image-size {cfg.image_size}: use a multiple of 16 from 64 to 1024 (VGG-16 halves "
                             "the maps four times before conv5_3)")
        self.spec = replace(self.base.preprocess, image_size=cfg.image_size or self.base.preprocess.image_size)
        started_from = (existing or {}).get("base_bundle", {}).get("fingerprint")
        if started_from not in (None, self.base.fingerprint):  # --init names a bundle that has been re-trained since
            if not self.restart_if_changed:
                raise TrainError(f"--resume: the run at {self.work_dir} started from bundle {started_from}, "
                                 f"--init is now {self.base.fingerprint}; --restart to train from it")
            self._start_anew(f"started from another bundle ({started_from})")
            existing = None
        if existing is not None:
            try:
                vocabulary = existing["label_vocabulary"]
                mapping = map_vocabulary(vocabulary, train_set.vocabulary,
                                         what=f"the training run at {self.work_dir}")
                resumed = remap(train_set, mapping, vocabulary)
                same = existing["data_fingerprint"] == resumed.fingerprint()
            except TrainDataError:
                if not self.restart_if_changed:
                    raise
                same = False
            if not same and self.restart_if_changed:
                self._start_anew("was started on other images or labels")
                existing = None
            elif not same:
                raise TrainError(f"--resume: the run at {self.work_dir} was started on other images or labels "
                                 f"(data fingerprint {existing['data_fingerprint'][:12]}, now "
                                 f"{resumed.fingerprint()[:12]}); --restart to train on these, or give another "
                                 f"--work-dir")
            else:
                train_set = resumed
                split = Split.from_dict(existing["split"])
        if existing is None:
            if self.base.label_vocabulary:
                mapping = map_vocabulary(self.base.label_vocabulary, train_set.vocabulary,
                                         what=f"model bundle {self.base.name} ({self.base.fingerprint})")
                train_set = remap(train_set, mapping, self.base.label_vocabulary)
            split = patient_split(train_set.records, cfg.validation_fraction, cfg.seed)
            if self.base.extra.get("split"):
                split = split.keeping_sides(Split.from_dict(self.base.extra["split"]))
                self.say(f"--init {self.base.name}: patients of its split keep their side (its validation "
                         f"patients validate, its training patients train)")
        data = SplitSet.of(train_set, split)
        if cfg.train_on:
            before = len(data.train_idx)
            data = data.training_on(cfg.train_on)
            self.say(f"--train-on {', '.join(cfg.train_on)}: training on {len(data.train_idx)} of {before} training "
                     f"images (validation unchanged)")
        if cfg.leave_out:
            before = len(data.train_idx)
            data = data.leaving_out(cfg.leave_out)
            self.say(f"--leave-out {', '.join(cfg.leave_out)}: {before - len(data.train_idx)} of {before} training "
                     f"images left out of training (validation unchanged)")
        if len(data.train_idx) == 0 or len(data.val_idx) < 2:
            raise TrainDataError(f"the split leaves {len(data.train_idx)} training and {len(data.val_idx)} "
                                 f"validation images: more labeled patients are needed")
        s = train_set.summary()
        self.say(f"data: {s['images']} labeled images, {s['patients']} patients, {len(data.vocabulary)} labels; "
                 f"split (seed {split.seed}): {len(data.train_idx)} training images "
                 f"({len(split.train_patients)} patients), {len(data.val_idx)} validation images "
                 f"({len(split.validation_patients)} patients)")
        return data

    def _elapsed(self) -> float:
        """Wall seconds of the run so far, over all its invocations (--resume)."""
        return float((self.existing or {}).get("wall_seconds", 0.0)) + time.perf_counter() - self.started

    # ----------------------------------------------------------------- network
    def _network(self, train_ds) -> RetrievalNet:
        """The network at the start of training: the tail, projection and classifier of the starting bundle."""
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
            pooled = self._pooled_sample(train_ds, tail) if cfg.embedding_dim != 512 else None
            proj = init_projection(cfg.embedding_dim, pooled)
        net = RetrievalNet(tail, {"type": "gap"} if cfg.pooling == "gap" else cfg.pooling, proj,
                           len(self.data.vocabulary))
        net.load_classifier(self.base.extra.get("classifier"), self.data.vocabulary)
        if "adv" in parse_objective(cfg.objective):
            net.add_source_head(len(source_families(self.data)), cfg.adversary)
        return net

    def _pooled_sample(self, dataset, tail, n: int = 1024) -> torch.Tensor:
        pool = build_pooling(self.config.pooling)
        out = []
        with torch.inference_mode():
            for i in range(0, min(n, len(dataset)), 64):
                x = torch.stack([dataset[j][INPUT] for j in range(i, min(i + 64, len(dataset), n))])
                out.append(pool(tail(x.to(self.device))).cpu())
        return torch.cat(out)

    # ----------------------------------------------------------------- embeddings for validation and the baseline
    def _embed(self, net_embed: Callable[[torch.Tensor], torch.Tensor], dataset) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(dataset), 64):
                x = torch.stack([dataset[j][INPUT] for j in range(i, min(i + 64, len(dataset)))]).to(self.device)
                out.append(net_embed(x).float().cpu().numpy())
        return np.concatenate(out)

    def _report(self, embeddings: np.ndarray) -> dict:
        return validation_report(embeddings, self.data.validation_records)

    def _baseline_embeddings(self, val_ds) -> np.ndarray:
        """The ImageNet VGG-16 GAP embedding (the starting bundle's own, when --init) on the validation split."""
        net = load_network(self.base.network_config, self.base_state).to(self.device).eval()
        frozen_tail = net.features[self.start:FEATURES_END] if self.start >= POOL4_END else net.features

        def embed(x):
            v = net.pool(frozen_tail(x))
            if net.projection is not None:
                v = net.projection(v)
            return F.normalize(v, dim=1)

        return self._embed(embed, val_ds)

    # ----------------------------------------------------------------- the run
    def run(self) -> TrainResult:
        from monai.utils import set_determinism

        from medsim.train.loop import (
            fit,  # needs pytorch-ignite: imported only to train
        )

        self.started = time.perf_counter()
        cpu_started = time.process_time()
        cfg = self.config
        set_determinism(seed=cfg.seed)
        self.existing = self._open_run()
        t0 = time.perf_counter()
        self.data = data = self._load_data()
        pairs = FeedbackPairs.load(cfg.feedback, data, self.say) if cfg.feedback else None  # before any slow step
        self.timings["data_seconds"] = time.perf_counter() - t0
        if self.existing is None:
            self.folder.create({
                "format": RUN_FORMAT, "status": "running", "created_at": now(), "config": asdict(cfg),
                "label_vocabulary": data.vocabulary, "split": data.split.to_dict(),
                "data_fingerprint": data.train_set.fingerprint(), "base_bundle": {"name": self.base.name,
                                                                                  "fingerprint": self.base.fingerprint},
                "last_epoch": 0,
            })
        self.base_state = self.base.state_dict()
        self.base_features = load_network(self.base.network_config, self.base_state).features
        train_ds, val_ds = build_datasets(data, spec=self.spec, base_features=self.base_features,
                                          start=self.start, views=cfg.views, seed=cfg.seed, device=self.device,
                                          progress=self.progress, say=self.say, timings=self.timings)

        baseline = (self.existing or {}).get("baseline")
        if baseline is None:
            t0 = time.perf_counter()
            baseline = self._report(self._baseline_embeddings(val_ds))
            self.folder.update(baseline=baseline)
            self.timings["baseline_seconds"] = time.perf_counter() - t0
        h = headline(baseline)
        self.say(f"baseline ({self.base.name}) on the validation split: mAP@{K} {fmt(h[f'mAP@{K}'])}, NIH "
                 f"{fmt(h[f'nih_mAP@{K}'])}, NIH per-finding {fmt(h[f'finding_mAP@{K}'])} (random "
                 f"{fmt(h[f'finding_random_mAP@{K}'])}), break-even precision {fmt(h['break_even_precision'])}")

        net = self._network(train_ds).to(self.device)
        t0 = time.perf_counter()
        history = fit(net, train_ds, val_ds, config=cfg, device=self.device, folder=self.folder, resume=self.resume,
                      val_idx=data.val_idx, report=self._report,
                      score=lambda report: selection_score(report, cfg.select), elapsed=self._elapsed, say=self.say,
                      on_epoch=self.on_epoch, label_frequency=list(data.label_frequency().values()),
                      feedback=FeedbackBatches(pairs, train_ds, data.train_idx, cfg.seed) if pairs else None)
        self.timings["train_seconds"] = time.perf_counter() - t0

        # the best checkpoint -> bundle
        if not self.folder.best_checkpoint.is_file():
            raise TrainError(f"no best checkpoint in {self.work_dir} (did validation ever run?)")
        state = torch.load(self.folder.best_checkpoint, map_location="cpu", weights_only=True)
        # ignite saves a lone object's state flat, beside the saver's own "checkpointer" state
        net.load_state_dict(state["network"] if "network" in state else
                            {k: v for k, v in state.items() if k != "checkpointer"})
        net.eval()
        t0 = time.perf_counter()
        embeddings = self._embed(net.embed, val_ds)
        final = self._report(embeddings)
        records = data.validation_records
        baseline_embeddings = self._baseline_embeddings(val_ds)
        final["vs_baseline"] = paired_difference(
            embeddings, baseline_embeddings, [r.labels for r in records],
            [r.patient_id for r in records], [r.source for r in records], k=K, seed=cfg.seed)
        # kept beside the checkpoints so that runs can be compared pairwise later (benchmarks/model_card.py)
        np.savez_compressed(self.work_dir / "validation_embeddings.npz", model=embeddings,
                            baseline=baseline_embeddings, paths=np.asarray([r.rel_path for r in records]),
                            labels=np.asarray(["|".join(r.labels) for r in records]),
                            patients=np.asarray([r.patient_id for r in records]),
                            sources=np.asarray([r.source for r in records]))
        self.timings["final_validation_seconds"] = time.perf_counter() - t0
        best_epoch = max(history, key=lambda r: (r["select"], -r["epoch"]))["epoch"] if history else 0
        wall = self._elapsed()
        self.timings["cpu_seconds_this_invocation"] = time.process_time() - cpu_started
        bundle = write_bundle(self.out, config=cfg, net=net, val_ds=val_ds, data=data, base=self.base,
                              spec=self.spec, base_state=self.base_state, final=final, baseline=baseline,
                              history=history, best_epoch=best_epoch, wall=wall, timings=self.timings, device=self.device,
                              overwrite=self.overwrite, say=self.say)
        self.folder.update(status="finished", bundle=str(self.out), bundle_fingerprint=bundle.fingerprint,
                           wall_seconds=wall)
        self.say(f"wrote model bundle {bundle.name} ({bundle.fingerprint}) to {bundle.path}: best epoch "
                 f"{best_epoch}, validation mAP@{K} {fmt(final.get(f'mAP@{K}'))} (baseline "
                 f"{fmt(baseline.get(f'mAP@{K}'))}), NIH {fmt(headline(final)[f'nih_mAP@{K}'])} (baseline "
                 f"{fmt(headline(baseline)[f'nih_mAP@{K}'])}); {wall / 60:.1f} min")
        hf = headline(final)
        self.say(f"  NIH per-finding macro mAP@{K} {fmt(hf[f'finding_mAP@{K}'])} (95 % interval "
                 f"{fmt((hf['finding_ci95'] or [None])[0])} .. {fmt((hf['finding_ci95'] or [None, None])[1])}), random "
                 f"{fmt(hf[f'finding_random_mAP@{K}'])}; same-source share of the top {K} {fmt(hf['same_source_cross'])}")
        for name, d in final["vs_baseline"].items():
            self.say(f"  {name}: mAP@{K} {d[f'delta_mAP@{K}']:+.3f} vs the baseline (95 % patient-bootstrap interval "
                     f"{fmt(d['ci95'][0])} .. {fmt(d['ci95'][1])}, {d['queries']} queries)")
        return TrainResult(str(bundle.path), bundle.fingerprint, best_epoch, len(history), final, baseline,
                           wall, str(self.work_dir), history, dict(self.timings))


def train(config: TrainConfig, **kwargs) -> TrainResult:
    """Run (or resume) a training run and write its bundle; see :class:`Trainer`."""
    return Trainer(config, **kwargs).run()

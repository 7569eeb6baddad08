"""From the trained network to a model bundle: the bundle's weights and metadata, the check that the bundle embeds
as training did, and the int8 calibration images with their check against float32.

The bundle is an ``EmbeddingNet`` (VGG-16 features[:30] + pooling + linear projection + L2) with the preprocessing
used in training, the vocabulary, split, data fingerprint, hyper-parameters, validation metrics (and the starting
bundle's on the same split), the classifier head and the code version (``extra``)."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from medsim.files import json_safe
from medsim.model import Embedder, ModelBundle
from medsim.model.network import features_to_network_state_dict, load_network, network_config
from medsim.model.quantize import MAX_MAP_LOSS, Int8Calibration, display_pixels, save_calibration
from medsim.model.weights import VGG16_CITATION
from medsim.preprocess import PreprocessSpec, prepare
from medsim.train.config import TRAIN_LAYERS, TrainConfig, TrainError
from medsim.train.data import SplitSet
from medsim.train.datasets import INPUT
from medsim.train.objectives import RetrievalNet, parse_objective
from medsim.train.transforms import AugmentSpec, load_radiograph
from medsim.train.validation import K, fmt, headline, validation_report


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


def bundle_state(net: RetrievalNet, base_state: Mapping[str, torch.Tensor]) -> dict:
    """The ``EmbeddingNet`` state dict: the starting bundle's VGG-16 features with the trained tail, and the trained
    projection."""
    state = {k: v for k, v in base_state.items() if k.startswith("features.")}
    for key, value in net.tail.state_dict().items():  # a slice of vgg16().features keeps the original module indices
        state[f"features.{key}"] = value.detach().clone()
    state = features_to_network_state_dict(state)
    state["projection.weight"] = net.projection.weight.detach().clone()
    state["projection.bias"] = net.projection.bias.detach().clone()
    return state


def write_bundle(out: Path, *, config: TrainConfig, net: RetrievalNet, val_ds, data: SplitSet, base: ModelBundle,
                 spec: PreprocessSpec, base_state: Mapping[str, torch.Tensor], final: dict, baseline: dict,
                 history: list[dict], best_epoch: int, wall: float, timings: dict, device: torch.device,
                 overwrite: bool, say: Callable[[str], None]) -> ModelBundle:
    """Write the bundle of ``net`` (the best checkpoint), with the preprocessing it was trained with (``spec``), to
    ``out`` after checking that it embeds the validation images as training did; with ``config.int8_check`` also its
    int8 calibration images and check."""
    cfg = config
    state = bundle_state(net, base_state)
    projection = {"type": "linear", "in_dim": 512, "out_dim": cfg.embedding_dim, "bias": True}
    train_set = data.train_set
    licences = sorted({r.license for r in train_set.records} - {""})
    provenance = {
        "source": f"VGG-16 ({base.name}, {base.fingerprint}) fine-tuned by `medsim train` on "
                  f"{len(data.train_idx)} labeled chest radiographs ({train_set.labels_csv})",
        "licence": "derived from the starting weights (" + str(base.provenance.get("licence")) +
                   ") and the training data" + (": " + " | ".join(licences) if licences else ""),
        "citation": VGG16_CITATION,
        "base_bundle": base.name, "base_fingerprint": base.fingerprint,
    }
    extra = {
        "training": {
            "objective": cfg.objective, "objective_weights": parse_objective(cfg.objective),
            "train_layers": cfg.train_layers, "first_trainable_module": TRAIN_LAYERS[cfg.train_layers],
            "hyperparameters": cfg.hyperparameters(),
            "augmentation": {"image_views": AugmentSpec(seed=cfg.seed).to_dict(), "views_per_image": cfg.views + 1,
                             "feature_grid": {"prob": cfg.feature_augment, "shift_cells": 1, "scale": 0.06,
                                              "rotate_degrees": 5.0}},
            "best_epoch": best_epoch, "epochs_run": len(history), "history": history,
            "device": str(device), "torch_threads": torch.get_num_threads(),
            "wall_seconds": wall, "timings": timings,
            "selection": "the last epoch" if cfg.select == "last" else f"validation mAP@{K} ({cfg.select})",
            "label_frequency_train": data.label_frequency(),
        },
        "data": {"fingerprint": train_set.fingerprint(), "images_folder": train_set.root,
                 "labels_csv": train_set.labels_csv, **train_set.summary(), "notes": train_set.notes},
        "split": data.split.to_dict(),
        "validation": {"model": final, "baseline": {"bundle": base.name, "fingerprint": base.fingerprint, **baseline},
                       "relevance": "shares at least one label; the query's own patient excluded"},
        "classifier": net.classifier_json(data.vocabulary),
        "code_version": code_version(),
    }
    extra["consistency_check"] = consistency_check(state, projection, net, val_ds, data=data, spec=spec,
                                                   pooling=cfg.pooling, device=device)
    calibration = None
    if cfg.int8_check:
        calibration = int8_check(state, projection, data=data, spec=spec, pooling=cfg.pooling, seed=cfg.seed,
                                 say=say)
        extra["int8"] = calibration.check
    bundle = ModelBundle.create(out, state, name=cfg.name, preprocess=spec, pooling=cfg.pooling,
                                projection=projection, provenance=provenance, label_vocabulary=data.vocabulary,
                                extra=json_safe(extra), overwrite=overwrite or out.exists())
    if calibration is not None:
        save_calibration(bundle.path, calibration.pixels)
    return bundle


def int8_check(state: dict, projection: dict, *, data: SplitSet, spec: PreprocessSpec, pooling: str, seed: int,
               say: Callable[[str], None], n_calibration: int = 32) -> Int8Calibration:
    """Calibration images for the int8 mode (seeded training images, across sources) and its check (``.check``):
    validation mAP@10 with int8 against float32, both through the bundle's ``Embedder`` from the pixels, as
    build-index embeds. int8 becomes the bundle's default (on CPUs with VNNI) only if it loses at most
    MAX_MAP_LOSS."""
    t0 = time.perf_counter()
    root, records = data.train_set.root, data.train_set.records
    rng = np.random.default_rng(seed)
    chosen = rng.choice(np.asarray(data.train_idx), size=min(n_calibration, len(data.train_idx)), replace=False)
    prepared = np.stack([prepare(load_radiograph(records[i].path, root), spec).array for i in sorted(chosen)])
    pixels = display_pixels(prepared, spec)
    calibration = Int8Calibration(pixels=pixels, sha256=hashlib.sha256(pixels.tobytes()).hexdigest(), check={})
    config = network_config("vgg16", "conv5_3", pooling, projection)
    images = [load_radiograph(r.path, root) for r in data.validation_records]
    vectors = {}
    for mode in ("fp32", "int8"):
        embedder = Embedder(load_network(config, state), spec, mode=mode, int8=calibration)
        vectors[mode] = embedder.embed(images)
    scores = {mode: headline(validation_report(v, data.validation_records)) for mode, v in vectors.items()}
    cosine = np.sum(vectors["fp32"] * vectors["int8"], axis=1)
    delta = scores["int8"][f"mAP@{K}"] - scores["fp32"][f"mAP@{K}"]
    check = {"calibration_images": int(len(pixels)), "validation_images": len(images),
             f"mAP@{K}_fp32": scores["fp32"][f"mAP@{K}"], f"mAP@{K}_int8": scores["int8"][f"mAP@{K}"],
             f"delta_mAP@{K}": delta, f"nih_mAP@{K}_fp32": scores["fp32"][f"nih_mAP@{K}"],
             f"nih_mAP@{K}_int8": scores["int8"][f"nih_mAP@{K}"],
             "cosine_int8_to_fp32": {"min": float(cosine.min()), "mean": float(cosine.mean())},
             "max_loss": MAX_MAP_LOSS, "default_ok": bool(delta >= -MAX_MAP_LOSS),
             "seconds": time.perf_counter() - t0}
    say(f"int8 check on {len(images)} validation images: mAP@{K} {fmt(check[f'mAP@{K}_int8'])} vs fp32 "
        f"{fmt(check[f'mAP@{K}_fp32'])} (delta {delta:+.4f}), min cosine {cosine.min():.4f}: int8 "
        + ("is this bundle's default on CPUs with VNNI" if check["default_ok"] else
           f"loses more than {MAX_MAP_LOSS} and is not its default"))
    return Int8Calibration(pixels=pixels, sha256=calibration.sha256, check=check)


def consistency_check(state: dict, projection: dict, net: RetrievalNet, val_ds, *, data: SplitSet,
                      spec: PreprocessSpec, pooling: str, device: torch.device, n: int = 4) -> dict:
    """The bundle's network used as build-index uses it (pixels -> Embedder) must embed the validation images like
    the training path did (cached float16 activations -> trained tail): min cosine over a few images."""
    config = network_config("vgg16", "conv5_3", pooling, projection)
    embedder = Embedder(load_network(config, state), spec)
    records = data.validation_records[:n]
    direct = embedder.embed([load_radiograph(r.path, data.train_set.root) for r in records])
    net.eval()
    with torch.inference_mode():
        x = torch.stack([val_ds[j][INPUT] for j in range(len(records))]).to(device)
        trained = net.embed(x).float().cpu().numpy()
    cos = float(np.min(np.sum(direct * trained, axis=1)))
    if cos < 0.99:
        raise TrainError(f"the bundle embeds the validation images differently from training (cosine {cos:.4f}): "
                         f"the preprocessing or weights were not carried over; this is a bug")
    return {"images": len(records), "min_cosine_bundle_vs_training_path": cos}

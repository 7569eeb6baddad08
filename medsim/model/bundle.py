"""Model bundles: the weights of an embedding network together with everything needed to use them correctly.

A bundle is a directory::

    bundle.json   what the network is, how its input must be preprocessed, where the weights come from
    weights.pt    torch state dict of ``medsim.model.network.EmbeddingNet`` (float32)

bundle.json (format_version 1)::

    format_version      1
    name                e.g. "vgg16-imagenet-gap"
    fingerprint         16 hex digits: sha256 over the weights' content hash and the canonical JSON of architecture,
                        layer, pooling, projection, preprocess and embedding_dim. Vectors and indexes carry it; two
                        bundles with the same fingerprint embed identically.
    architecture        "vgg16"
    layer               {"name": "conv5_3", "features_end": 30}: vgg16().features[:30], conv5_3 after its ReLU
    embedding_dim       512 (or the projection's out_dim)
    pooling             {"type": "gap"} or {"type": "gem", "p": 3.0}; then L2 normalisation
    projection          null, or {"type": "linear", "in_dim": 512, "out_dim": D, "bias": true}
    preprocess          PreprocessSpec.to_dict(); preprocess_fingerprint is its short hash
    weights_file        "weights.pt"
    weights_sha256      sha256 of weights.pt as written (integrity check on load)
    weights_content_sha256  sha256 of the tensors (keys, dtypes, shapes, bytes): independent of torch's file format
    provenance          {"source", "licence", "citation", ...}
    label_vocabulary    [] (fine-tuned bundles: the labels of their classifier)
    created_at          UTC ISO 8601
    software            versions of medsim, torch, torchvision that wrote it
    extra               free-form metadata (conversion check, training details)

``Embedder`` is the only way from pixels to vectors: it preprocesses with the bundle's own spec and refuses inputs
prepared with any other.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsim.errors import MedsimError, ModelMismatch
from medsim.model.network import (
    EmbeddingNet,
    embedding_dim as _embedding_dim,
    load_network,
    network_config,
    state_dict_content_sha256,
)
from medsim.preprocess import PreparedImage, PreprocessSpec, prepare

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
WEIGHTS_FILE = "weights.pt"
FINGERPRINT_LENGTH = 16
REQUIRED_PROVENANCE = ("source", "licence", "citation")
_REQUIRED_KEYS = ("format_version", "name", "fingerprint", "architecture", "layer", "embedding_dim", "pooling",
                  "preprocess", "weights_sha256", "weights_content_sha256", "provenance")


class BundleError(MedsimError):
    """A model bundle is missing, unreadable, or cannot be written."""


class BundleIntegrityError(BundleError):
    """A bundle's files do not match its bundle.json (tampered, truncated, or edited by hand)."""


class BundleExistsError(BundleError, FileExistsError):
    """``ModelBundle.create`` found a bundle already at the target path."""


class PreprocessMismatch(ModelMismatch, ValueError):
    """An image was prepared with another model's preprocessing."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def compute_fingerprint(weights_content_sha256: str, config: Mapping[str, Any]) -> str:
    """Short hash identifying what a bundle computes: the weights' content and the canonical JSON of ``config``
    (architecture, layer, pooling, projection, preprocess, embedding_dim)."""
    keys = ("architecture", "layer", "pooling", "projection", "preprocess", "embedding_dim")
    payload = weights_content_sha256 + "\n" + canonical_json({k: config.get(k) for k in keys})
    return hashlib.sha256(payload.encode()).hexdigest()[:FINGERPRINT_LENGTH]


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _software() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("medsim", "torch", "torchvision"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def stack_prepared(images: Sequence[PreparedImage]) -> PreparedImage:
    """Stack prepared images of one spec into a single (N, 3, S, S) ``PreparedImage``."""
    images = list(images)
    if not images:
        raise ValueError("nothing to stack")
    fingerprints = {im.spec_fingerprint for im in images}
    if len(fingerprints) != 1:
        raise PreprocessMismatch(f"cannot stack images prepared with different specs: {sorted(fingerprints)}")
    arrays = [im.array if im.array.ndim == 4 else im.array[None] for im in images]
    return PreparedImage(array=np.ascontiguousarray(np.concatenate(arrays), dtype=np.float32),
                         spec_fingerprint=fingerprints.pop())


class ModelBundle:
    """A loaded, verified bundle. Use ``ModelBundle.load`` or ``ModelBundle.create``, not the constructor."""

    def __init__(self, path: Path, meta: dict):
        self._path = Path(path)
        self._meta = meta
        self._preprocess = PreprocessSpec.from_dict(meta["preprocess"])

    # ---------------------------------------------------------------- attributes
    @property
    def path(self) -> Path:
        return self._path

    @property
    def name(self) -> str:
        return self._meta["name"]

    @property
    def fingerprint(self) -> str:
        return self._meta["fingerprint"]

    @property
    def preprocess(self) -> PreprocessSpec:
        return self._preprocess

    @property
    def pooling(self) -> dict:
        return dict(self._meta["pooling"])

    @property
    def embedding_dim(self) -> int:
        return int(self._meta["embedding_dim"])

    @property
    def architecture(self) -> str:
        return self._meta["architecture"]

    @property
    def label_vocabulary(self) -> tuple[str, ...]:
        return tuple(self._meta.get("label_vocabulary", ()))

    @property
    def provenance(self) -> dict:
        return copy.deepcopy(self._meta["provenance"])

    @property
    def extra(self) -> dict:
        return copy.deepcopy(self._meta.get("extra", {}))

    @property
    def metadata(self) -> dict:
        """The whole of bundle.json (a copy)."""
        return copy.deepcopy(self._meta)

    @property
    def network_config(self) -> dict:
        m = self._meta
        return network_config(m["architecture"], m["layer"], m["pooling"], m.get("projection"))

    def __repr__(self) -> str:
        return f"ModelBundle(name={self.name!r}, fingerprint={self.fingerprint!r}, path='{self.path}')"

    # ---------------------------------------------------------------- load / create
    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelBundle":
        """Open the bundle directory ``path`` (or its bundle.json) and verify it: weights.pt present with the
        recorded sha256, fingerprint consistent with bundle.json."""
        path = Path(path).expanduser()
        if path.name == BUNDLE_JSON and path.is_file():
            path = path.parent
        meta_path = path / BUNDLE_JSON
        if not meta_path.is_file():
            raise BundleError(f"no model bundle at {path} (no {BUNDLE_JSON})")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{meta_path} is not readable JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise BundleError(f"{meta_path} is not a bundle description")
        missing = [k for k in _REQUIRED_KEYS if k not in meta]
        if missing:
            raise BundleError(f"{meta_path} lacks {', '.join(missing)}")
        if int(meta["format_version"]) > FORMAT_VERSION:
            raise BundleError(f"bundle {path} has format_version {meta['format_version']}; this medsim reads up to "
                              f"{FORMAT_VERSION}: upgrade medsim")
        try:
            config = network_config(meta["architecture"], meta["layer"], meta["pooling"], meta.get("projection"))
            spec = PreprocessSpec.from_dict(meta["preprocess"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{meta_path}: invalid network or preprocess description: {exc}") from None
        if int(meta["embedding_dim"]) != _embedding_dim(config):
            raise BundleIntegrityError(f"{meta_path}: embedding_dim {meta['embedding_dim']} does not match the network "
                                       f"({_embedding_dim(config)})")
        expected = compute_fingerprint(meta["weights_content_sha256"],
                                       {**config, "preprocess": spec.to_dict(), "embedding_dim": meta["embedding_dim"]})
        if expected != meta["fingerprint"]:
            raise BundleIntegrityError(f"bundle {path}: fingerprint {meta['fingerprint']} does not match its contents "
                                       f"({expected}); bundle.json was edited: rebuild the bundle")
        bundle = cls(path, meta)
        bundle._read_weights()  # integrity of weights.pt
        return bundle

    def _read_weights(self) -> bytes:
        weights = self.path / WEIGHTS_FILE
        try:
            data = weights.read_bytes()
        except FileNotFoundError:
            raise BundleIntegrityError(f"bundle {self.path}: {weights.name} is missing; rebuild the bundle") from None
        except OSError as exc:
            raise BundleError(f"bundle {self.path}: cannot read {weights.name}: {exc}") from None
        if _sha256_bytes(data) != self._meta["weights_sha256"]:
            raise BundleIntegrityError(
                f"bundle {self.path}: {weights.name} does not match the sha256 recorded in {BUNDLE_JSON} "
                f"(tampered with or corrupt); rebuild the bundle"
            )
        return data

    @classmethod
    def create(cls, path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], *, name: str,
               preprocess: PreprocessSpec, pooling: str | Mapping, provenance: Mapping[str, Any],
               label_vocabulary: Iterable[str] = (), extra: Mapping[str, Any] | None = None,
               architecture: str = "vgg16", layer: str = "conv5_3", projection: Mapping | None = None,
               overwrite: bool = False) -> "ModelBundle":
        """Write a bundle atomically (a temporary directory beside ``path``, renamed into place) and load it.

        state_dict: of the ``EmbeddingNet`` described by architecture/layer/pooling/projection (keys
            "features.<i>.*", "projection.*"); checked strictly. See
            ``medsim.model.network.features_to_network_state_dict`` for plain VGG-16 state dicts.
        provenance: at least "source", "licence" and "citation".
        overwrite: replace an existing bundle at ``path``; otherwise ``BundleExistsError``.
        """
        path = Path(path).expanduser()
        if not name or not isinstance(name, str):
            raise ValueError("a bundle needs a name")
        if not isinstance(preprocess, PreprocessSpec):
            raise TypeError("preprocess must be a medsim.preprocess.PreprocessSpec")
        provenance = dict(provenance)
        absent = [k for k in REQUIRED_PROVENANCE if not provenance.get(k)]
        if absent:
            raise ValueError(f"provenance lacks {', '.join(absent)}")
        vocabulary = [str(label) for label in label_vocabulary]
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("label_vocabulary has duplicates")
        extra = dict(extra or {})
        config = network_config(architecture, layer, pooling, projection)

        state = {}
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state_dict[{key!r}] is not a tensor")
            value = value.detach().to("cpu")
            state[key] = (value.to(torch.float32) if value.is_floating_point() else value).contiguous().clone()
        try:
            load_network(config, state)
        except RuntimeError as exc:
            raise ValueError(f"state_dict does not fit the network {canonical_json(config)}: {exc}") from None

        buffer = io.BytesIO()
        torch.save(state, buffer)
        weights_bytes = buffer.getvalue()
        content_sha = state_dict_content_sha256(state)
        dim = _embedding_dim(config)
        meta = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "fingerprint": compute_fingerprint(content_sha,
                                               {**config, "preprocess": preprocess.to_dict(), "embedding_dim": dim}),
            "architecture": config["architecture"],
            "layer": config["layer"],
            "embedding_dim": dim,
            "pooling": config["pooling"],
            "projection": config["projection"],
            "preprocess": preprocess.to_dict(),
            "preprocess_fingerprint": preprocess.fingerprint,
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": _sha256_bytes(weights_bytes),
            "weights_content_sha256": content_sha,
            "provenance": provenance,
            "label_vocabulary": vocabulary,
            "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "software": _software(),
            "extra": extra,
        }
        try:
            meta_bytes = (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bundle metadata is not JSON-serialisable: {exc}") from None

        if path.exists() and not overwrite:
            raise BundleExistsError(f"a bundle already exists at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        old = None
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            _fsync_write(tmp / WEIGHTS_FILE, weights_bytes)
            _fsync_write(tmp / BUNDLE_JSON, meta_bytes)
            if path.exists() and overwrite:
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, old / "bundle")
            try:
                os.rename(tmp, path)
            except OSError as exc:
                if path.exists():  # someone else finished first
                    raise BundleExistsError(f"a bundle already exists at {path}") from exc
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return cls.load(path)

    # ---------------------------------------------------------------- use
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The verified weights (file sha256 and content hash both checked)."""
        data = self._read_weights()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if state_dict_content_sha256(state) != self._meta["weights_content_sha256"]:
            raise BundleIntegrityError(f"bundle {self.path}: the weights' content does not match "
                                       f"weights_content_sha256; rebuild the bundle")
        return state

    def network(self, device: str | torch.device = "cpu") -> EmbeddingNet:
        """The embedding network with the bundle's weights, in eval mode."""
        return load_network(self.network_config, self.state_dict()).to(device).eval()

    def int8_calibration(self):
        """The bundle's int8 calibration images and check (``medsim.model.quantize``), or None."""
        from medsim.model.quantize import Int8Calibration

        return Int8Calibration.load(self.path, self.extra.get("int8", {}))

    def embedder(self, device: str | torch.device = "cpu", batch_size: int = 16, mode: str | None = None
                 ) -> "Embedder":
        return Embedder(self.network(device), self.preprocess, device=device, batch_size=batch_size,
                        fingerprint=self.fingerprint, name=self.name, mode=mode,
                        int8=self.int8_calibration())


# Numeric modes of ``Embedder`` (docs/performance.md measures each: speed, and mAP@10 on the dev set):
#   fp32           float32, contiguous (NCHW) tensors: the reference
#   channels_last  float32 in oneDNN's channels-last (NHWC) layout: same numbers to ~1e-7, faster convolutions
#   bf16           bfloat16 autocast for the convolutions (channels-last), pooling and normalisation in float32;
#                  fast only where the CPU has native bf16 (AVX512-BF16 / AMX) or on a GPU
#   int8           int8 convolutions calibrated on the bundle's own images (``medsim.model.quantize``), CPU only;
#                  fast where the CPU has VNNI; only for bundles that carry calibration images (``medsim train``)
EMBED_MODES = ("fp32", "channels_last", "bf16", "int8")
EMBED_MODE_ENV = "MEDSIM_EMBED_MODE"


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively (CPU: AVX512-BF16 or AMX; CUDA: compute capability >= 8)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def default_embed_mode(device: str | torch.device = "cpu", int8_approved: bool = False) -> str:
    """The fastest mode that keeps retrieval quality (docs/performance.md): int8 on a CPU with VNNI when the bundle's
    own check approved it (mAP@10 within 0.005 of fp32), else bf16 where the device computes bf16 natively, else
    channels_last. ``$MEDSIM_EMBED_MODE`` (one of EMBED_MODES, or auto) overrides it."""
    from medsim.model.quantize import integer_dot_product_cpu

    env = os.environ.get(EMBED_MODE_ENV, "").strip().lower()
    if env and env != "auto":
        if env not in EMBED_MODES:
            raise ValueError(f"${EMBED_MODE_ENV}={env!r}: use one of {', '.join(EMBED_MODES)} or auto")
        return env
    if int8_approved and torch.device(device).type == "cpu" and integer_dot_product_cpu():
        return "int8"
    return "bf16" if native_bf16(device) else "channels_last"


class Embedder:
    """Pixels -> L2-normalised embeddings with one bundle's network and preprocessing.

    ``preprocess`` may run elsewhere (worker processes); ``embed_prepared`` checks that every input was prepared
    with this bundle's spec. Batched, under ``torch.inference_mode``; torch's global settings are left alone.
    mode: one of ``EMBED_MODES``; None or "auto": ``default_embed_mode(device)``.
    """

    def __init__(self, network: EmbeddingNet, spec: PreprocessSpec, *, device: str | torch.device = "cpu",
                 batch_size: int = 16, fingerprint: str = "", name: str = "", mode: str | None = None,
                 int8=None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = torch.device(device)
        self.int8 = int8  # medsim.model.quantize.Int8Calibration of the bundle, or None
        approved = bool(int8 is not None and int8.approved)
        automatic = mode in (None, "", "auto")
        self.mode = default_embed_mode(self.device, approved) if automatic else str(mode)
        if self.mode not in EMBED_MODES:
            raise ValueError(f"unknown embedding mode {mode!r}; known: {', '.join(EMBED_MODES)} or auto")
        # channels_last: oneDNN's faster convolution layout on CPU (same results to ~1e-7).
        self._memory_format = torch.contiguous_format if self.mode in ("fp32", "int8") else torch.channels_last
        self.network = network.to(self.device, memory_format=self._memory_format).eval()
        self._int8_features = None
        if self.mode == "int8":
            from medsim.model.quantize import quantized_features

            if self.device.type != "cpu":
                raise ValueError("the int8 mode runs on the CPU only; use bf16 on a GPU")
            if int8 is None:
                raise ValueError(f"model {name or '?'} carries no int8 calibration images (bundles written by "
                                 f"`medsim train` do); use channels_last or fp32")
            try:
                self._int8_features = quantized_features(self.network.features, int8, spec)
            except Exception as exc:
                if not automatic:
                    raise
                # e.g. a torch without the quantised kernels: the float path gives the same ranking
                log.warning("medsim: int8 is unavailable here (%s); embedding in float32 (channels-last)", exc)
                self.mode, self._memory_format = "channels_last", torch.channels_last
                self.network = self.network.to(memory_format=torch.channels_last)
        self.spec = spec
        self.spec_fingerprint = spec.fingerprint
        self.batch_size = int(batch_size)
        self.fingerprint = fingerprint
        self.name = name
        self._dtype = next(network.parameters()).dtype
        proj = network.projection
        self.embedding_dim = int(proj.out_features) if proj is not None else \
            int([m for m in network.features.modules() if isinstance(m, torch.nn.Conv2d)][-1].out_channels)

    def __repr__(self) -> str:
        return (f"Embedder(name={self.name!r}, fingerprint={self.fingerprint!r}, device='{self.device}', "
                f"mode={self.mode!r})")

    def describe(self) -> str:
        """One line for logs: mode, device, batch size and threads."""
        detail = {"fp32": "float32, contiguous", "channels_last": "float32, channels-last",
                  "bf16": "bfloat16 autocast, channels-last" + ("" if native_bf16(self.device) else
                                                                 ", emulated: no native bf16 on this device"),
                  "int8": "int8 convolutions calibrated on the bundle's images"}
        threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
        return f"{self.mode} ({detail[self.mode]}), {self.device}, batch {self.batch_size}{threads}"

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.mode == "int8":
            fmap = self._int8_features(batch)
        elif self.mode == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                fmap = self.network.forward_features(batch).float()
        else:
            return self.network(batch)
        v = self.network.pool(fmap)
        if self.network.projection is not None:
            v = self.network.projection(v)
        return torch.nn.functional.normalize(v, p=2.0, dim=1)

    def preprocess(self, pixels: np.ndarray) -> PreparedImage:
        """(H, W) display-ready pixels, float in [0, 1] -> ``PreparedImage`` for this embedder."""
        pixels = np.asarray(pixels)
        if pixels.ndim != 2:
            raise ValueError(f"expected a 2-D grayscale image (H, W), got shape {pixels.shape}")
        if not np.issubdtype(pixels.dtype, np.floating):
            raise ValueError(f"expected float pixels in [0, 1], got {pixels.dtype} (scale integer images to [0, 1] "
                             f"first, e.g. with medsim.dicom)")
        lo, hi = float(np.min(pixels)), float(np.max(pixels))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"expected pixels in [0, 1], got values in [{lo}, {hi}]")
        return prepare(pixels.astype(np.float32, copy=False), self.spec)

    def _check(self, image: PreparedImage) -> np.ndarray:
        if not isinstance(image, PreparedImage):
            raise TypeError(
                f"embed_prepared takes PreparedImage objects (from Embedder.preprocess or medsim.preprocess.prepare), "
                f"not {type(image).__name__}: a bare array does not say which preprocessing made it"
            )
        if image.spec_fingerprint != self.spec_fingerprint:
            raise PreprocessMismatch(
                f"image was prepared with preprocessing {image.spec_fingerprint}, but model {self.name or '?'} "
                f"({self.fingerprint}) needs {self.spec_fingerprint} ({self.spec}); prepare it with this "
                f"embedder's preprocess() or the bundle's spec"
            )
        size = self.spec.image_size
        array = image.array
        if array.shape[-3:] != (3, size, size) or array.ndim not in (3, 4):
            raise ValueError(f"prepared image has shape {array.shape}, expected (3, {size}, {size}) or "
                             f"(N, 3, {size}, {size})")
        return array if array.ndim == 4 else array[None]

    def embed_prepared(self, images: PreparedImage | Sequence[PreparedImage]) -> np.ndarray:
        """(N, D) float32 unit vectors for prepared images (a list, one image, or a stacked (N, 3, S, S) one)."""
        if isinstance(images, PreparedImage):
            images = [images]
        if isinstance(images, np.ndarray) or torch.is_tensor(images):
            self._check(images)  # raises TypeError with the explanation
        rows = [row for image in images for row in self._check(image)]
        out = np.empty((len(rows), self.embedding_dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                batch = torch.from_numpy(np.stack(rows[start:start + self.batch_size]).astype(np.float32, copy=False))
                batch = batch.to(self.device, self._dtype).contiguous(memory_format=self._memory_format)
                vectors = self._forward(batch)
                out[start:start + len(batch)] = vectors.to("cpu", torch.float32).numpy()
        return out

    def embed(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """Convenience: preprocess and embed (H, W) [0, 1] images, ``batch_size`` at a time."""
        if isinstance(images, np.ndarray) and images.ndim == 2:
            raise TypeError("embed takes a list of images; for one image use embed([pixels])")
        chunks, pending = [], []
        for pixels in images:
            pending.append(self.preprocess(pixels))
            if len(pending) == self.batch_size:
                chunks.append(self.embed_prepared(pending))
                pending = []
        if pending or not chunks:
            chunks.append(self.embed_prepared(pending))
        return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]

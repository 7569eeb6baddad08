"""``Embedder``: pixels -> L2-normalised vectors with one network and its preprocessing, in one of four numeric modes.

It is the only way from pixels to vectors: it preprocesses with its own ``PreprocessSpec`` and refuses inputs prepared
with any other (``PreprocessMismatch``). A bundle makes one with ``ModelBundle.embedder()``; this module knows nothing
of bundles (it takes a network, a spec and optionally the bundle's int8 calibration), so bundles may depend on it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from medsim.errors import MedsimError, ModelMismatch
from medsim.model.network import EmbeddingNet
from medsim.model.quantize import Int8Calibration, integer_dot_product_cpu, quantized_features
from medsim.preprocess import PreparedImage, PreprocessSpec, prepare

log = logging.getLogger(__name__)


class PreprocessMismatch(ModelMismatch, ValueError):
    """An image was prepared with another model's preprocessing."""


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
    env = os.environ.get(EMBED_MODE_ENV, "").strip().lower()
    if env and env != "auto":
        if env not in EMBED_MODES:
            raise ValueError(f"${EMBED_MODE_ENV}={env!r}: use one of {', '.join(EMBED_MODES)} or auto")
        return env
    if int8_approved and torch.device(device).type == "cpu" and integer_dot_product_cpu():
        return "int8"
    return "bf16" if native_bf16(device) else "channels_last"


class EmbedDeviceError(MedsimError, ValueError):
    """The device cannot embed in the mode asked for: no CUDA device visible to torch, or int8 off the CPU."""


def embedding_plan(device: str | torch.device = "cpu", int8_approved: bool = False, mode: str | None = None
                   ) -> tuple[torch.device, str]:
    """The device and numeric mode an ``Embedder`` runs in: one rule for a local build and a Ray embedding actor.

    mode None / "auto": ``default_embed_mode`` (on a GPU: bf16 from compute capability 8, else channels_last; int8 is
    CPU only). A CUDA device must be visible to torch: asked for a GPU, embedding never falls back to the CPU, which
    would run tens of times slower and in another numeric mode than the rest of the index."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise EmbedDeviceError(
            f"no CUDA device is visible to torch here (torch {torch.__version__}, "
            + (f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build")
            + ("" if visible is None else f", CUDA_VISIBLE_DEVICES={visible!r}")
            + "): install the NVIDIA driver and a CUDA build of torch, or embed on the CPU")
    chosen = default_embed_mode(device, int8_approved) if mode in (None, "", "auto") else str(mode)
    if chosen not in EMBED_MODES:
        raise ValueError(f"unknown embedding mode {mode!r}; known: {', '.join(EMBED_MODES)} or auto")
    if chosen == "int8" and device.type != "cpu":
        raise EmbedDeviceError(f"the int8 mode runs on the CPU only ({device} asked for); use bf16 on a GPU")
    return device, chosen


class Embedder:
    """Pixels -> L2-normalised embeddings with one bundle's network and preprocessing.

    ``preprocess`` may run elsewhere (worker processes); ``embed_prepared`` checks that every input was prepared
    with this bundle's spec. Batched, under ``torch.inference_mode``; torch's global settings are left alone.
    device and mode: as ``embedding_plan`` decides (mode None or "auto": ``default_embed_mode(device)``).
    """

    def __init__(self, network: EmbeddingNet, spec: PreprocessSpec, *, device: str | torch.device = "cpu",
                 batch_size: int = 16, fingerprint: str = "", name: str = "", mode: str | None = None,
                 int8: Int8Calibration | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        automatic = mode in (None, "", "auto")
        self.device, self.mode = embedding_plan(device, bool(int8 is not None and int8.approved), mode)
        # channels_last: oneDNN's faster convolution layout on CPU (same results to ~1e-7).
        self._memory_format = torch.contiguous_format if self.mode in ("fp32", "int8") else torch.channels_last
        self.network = network.to(self.device, memory_format=self._memory_format).eval()
        self._int8_features = None
        if self.mode == "int8":
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

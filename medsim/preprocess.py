"""Pixels -> model input tensor, with MONAI transforms.

The spec is part of a model bundle (see :mod:`medsim.model.bundle`): the same numbers that the weights were trained
with travel with them, so an image is never embedded with another model's preprocessing.

Input to every transform here is a display-ready radiograph: a 2-D float32 array in [0, 1], 0 = black, as produced by
:mod:`medsim.dicom` (modality LUT, VOI LUT/window and MONOCHROME1 inversion already applied).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model expects its input.

    image_size: the square side the image is letterboxed into (longest side resized, the rest zero-padded, so the
        anatomy keeps its aspect ratio).
    scale: multiplies the [0, 1] pixels (255 for models trained on 8-bit images).
    mean, std: per model input channel, applied after scaling; a grayscale image is replicated into all channels,
        so the channel order (``channel_order``) only decides which mean goes where.
    """

    image_size: int = 224
    scale: float = 255.0
    mean: tuple[float, float, float] = (103.939, 116.779, 123.68)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: str = "BGR"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        return cls(
            image_size=int(data["image_size"]),
            scale=float(data["scale"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            channel_order=str(data["channel_order"]),
        )

    @cached_property
    def fingerprint(self) -> str:
        """Short hash of the spec; a preprocessed tensor carries it so it cannot reach another model. Computed once
        per spec object (JSON + SHA-256 took 0.1 ms, paid per image by build-index workers)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def transform(self):
        """The MONAI pipeline: (H, W) float [0, 1] -> (3, S, S) float32 numpy array."""
        from monai.transforms import Compose, EnsureType, NormalizeIntensity, RepeatChannel

        return Compose(
            [
                *self._grey_steps(),
                RepeatChannel(repeats=3),
                NormalizeIntensity(
                    subtrahend=np.asarray(self.mean, dtype=np.float32),
                    divisor=np.asarray(self.std, dtype=np.float32),
                    channel_wise=True,
                ),
                EnsureType(data_type="numpy", dtype=np.float32, track_meta=False),
            ]
        )

    def grey_transform(self):
        """The pipeline up to the channels: (H, W) float [0, 1] -> (1, S, S) float32 numpy array, scaled, not yet
        normalised (:func:`channels` finishes it, bit for bit as :meth:`transform`)."""
        from monai.transforms import Compose, EnsureType

        return Compose([*self._grey_steps(), EnsureType(data_type="numpy", dtype=np.float32, track_meta=False)])

    def _grey_steps(self) -> list:
        from monai.transforms import EnsureChannelFirst, Resize, ScaleIntensityRange, SpatialPad

        size = self.image_size
        return [
            EnsureChannelFirst(channel_dim="no_channel"),
            Resize(spatial_size=size, size_mode="longest", mode="area"),
            SpatialPad(spatial_size=(size, size), mode="constant"),
            ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=0.0, b_max=self.scale),
        ]


# Keras "caffe" convention of the original Oxford VGG-16 weights: 0..255, BGR, mean-subtracted, no scaling by std.
CAFFE_VGG16 = PreprocessSpec()
# torchvision's ImageNet convention: 0..1, RGB, mean/std normalised.
TORCHVISION_IMAGENET = PreprocessSpec(
    scale=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channel_order="RGB"
)


def channels(grey: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(1, S, S) scaled grey -> (3, S, S) model input: the grey channel repeated and normalised per channel with the
    spec's mean and std, in float32 as MONAI's NormalizeIntensity does it (same bits; tests/test_preprocess.py)."""
    out = np.empty((3, *grey.shape[1:]), dtype=np.float32)
    for c, (mean, std) in enumerate(zip(spec.mean, spec.std)):
        np.divide(np.subtract(grey[0], np.float32(mean), dtype=np.float32), np.float32(std), out=out[c])
    return out


@dataclass(frozen=True)
class PreparedImage:
    """A model input tensor that remembers which preprocessing made it.

    Made by :func:`prepare`, it also keeps its grey channel and spec, and is pickled as those: a build-index worker
    sends a third of the bytes to the embedding process, which rebuilds the same array (:func:`channels`)."""

    array: np.ndarray  # (3, S, S) float32
    spec_fingerprint: str
    grey: np.ndarray | None = field(default=None, repr=False, compare=False)  # (1, S, S), before normalisation
    spec: PreprocessSpec | None = field(default=None, repr=False, compare=False)

    def __reduce__(self):
        if self.grey is None or self.spec is None:
            return PreparedImage, (self.array, self.spec_fingerprint)
        return _from_grey, (self.grey, self.spec)


def _from_grey(grey: np.ndarray, spec: PreprocessSpec) -> PreparedImage:
    return PreparedImage(channels(grey, spec), spec.fingerprint)


def unpadded(grey: np.ndarray, source_shape: tuple[int, int]) -> np.ndarray:
    """The image part of a letterboxed (1, S, S) grey channel made from an image of ``source_shape`` (H, W): the
    inverse of the pipeline's padding, with MONAI's arithmetic (Resize ``longest``: each side ``round(side * S /
    longest)``; SpatialPad symmetric: the smaller half before). A view, no copy."""
    size = grey.shape[-1]
    scale = size / max(source_shape)
    rows, cols = (round(side * scale) for side in source_shape)
    top, left = (size - rows) // 2, (size - cols) // 2
    return grey.reshape(grey.shape[-2:])[top:top + rows, left:left + cols]


_TRANSFORMS: dict[str, object] = {}


def prepare(pixels: np.ndarray, spec: PreprocessSpec) -> PreparedImage:
    """Run ``spec``'s transform on one display-ready image (the transform is built once per process)."""
    key = spec.fingerprint
    if key not in _TRANSFORMS:
        _TRANSFORMS[key] = spec.grey_transform()
    grey = np.ascontiguousarray(_TRANSFORMS[key](np.asarray(pixels, dtype=np.float32)), dtype=np.float32)
    return PreparedImage(array=channels(grey, spec), spec_fingerprint=key, grey=grey, spec=spec)

"""Pixels -> model input tensor, with MONAI transforms.

The spec is part of a model bundle (see :mod:`medsim.model.bundle`): the same numbers that the weights were trained
with travel with them, so an image is never embedded with another model's preprocessing.

Input to every transform here is a display-ready radiograph: a 2-D float32 array in [0, 1], 0 = black, as produced by
:mod:`medsim.dicom` (modality LUT, VOI LUT/window and MONOCHROME1 inversion already applied).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

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

    @property
    def fingerprint(self) -> str:
        """Short hash of the spec; a preprocessed tensor carries it so it cannot reach another model."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def transform(self):
        """The MONAI pipeline: (H, W) float [0, 1] -> (3, S, S) float32 numpy array."""
        from monai.transforms import (
            Compose,
            EnsureChannelFirst,
            EnsureType,
            NormalizeIntensity,
            RepeatChannel,
            Resize,
            ScaleIntensityRange,
            SpatialPad,
        )

        size = self.image_size
        return Compose(
            [
                EnsureChannelFirst(channel_dim="no_channel"),
                Resize(spatial_size=size, size_mode="longest", mode="area"),
                SpatialPad(spatial_size=(size, size), mode="constant"),
                ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=0.0, b_max=self.scale),
                RepeatChannel(repeats=3),
                NormalizeIntensity(
                    subtrahend=np.asarray(self.mean, dtype=np.float32),
                    divisor=np.asarray(self.std, dtype=np.float32),
                    channel_wise=True,
                ),
                EnsureType(data_type="numpy", dtype=np.float32, track_meta=False),
            ]
        )


# Keras "caffe" convention of the original Oxford VGG-16 weights: 0..255, BGR, mean-subtracted, no scaling by std.
CAFFE_VGG16 = PreprocessSpec()
# torchvision's ImageNet convention: 0..1, RGB, mean/std normalised.
TORCHVISION_IMAGENET = PreprocessSpec(
    scale=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channel_order="RGB"
)


@dataclass(frozen=True)
class PreparedImage:
    """A model input tensor that remembers which preprocessing made it."""

    array: np.ndarray  # (3, S, S) float32
    spec_fingerprint: str


_TRANSFORMS: dict[str, object] = {}


def prepare(pixels: np.ndarray, spec: PreprocessSpec) -> PreparedImage:
    """Run ``spec``'s transform on one display-ready image (the transform is built once per process)."""
    key = spec.fingerprint
    if key not in _TRANSFORMS:
        _TRANSFORMS[key] = spec.transform()
    array = _TRANSFORMS[key](np.asarray(pixels, dtype=np.float32))
    return PreparedImage(array=np.ascontiguousarray(array, dtype=np.float32), spec_fingerprint=key)

"""MONAI transforms of training: the augmentation of radiographs and what turns a dataset item into network input.

Dictionary transforms take ``keys`` (MONAI ``MapTransform``) and change the value under each key in place; random
ones are MONAI ``Randomizable`` (``set_random_state`` seeds them; a MONAI ``DataLoader``/``Compose`` does so from
the training seed). Deterministic ones may sit in the cached part of a ``CacheDataset``.

* Images (``--train-layers all``): :class:`LoadLetterboxd` -> :class:`RandRadiographAugmentd` (training only) ->
  :class:`BundlePreprocessd`.
* The frozen trunk's input for the activation cache (:mod:`medsim.train.features`): :class:`TrunkInputd`, whose
  augmented views are seeded by the item, so they are the same in every run.
* Cached activations: :class:`LoadViewsd` -> :class:`RandPickViewd` (training) or :class:`PickViewd` (validation),
  and on training batches :class:`RandFeatureJitter`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Resize, Transform
from monai.utils import MAX_SEED

from medsim.preprocess import PreprocessSpec


@dataclass(frozen=True)
class AugmentSpec:
    """Image-level augmentation of the cached views (radiograph in [0, 1], before letterboxing)."""

    rotate_degrees: float = 7.0
    scale: float = 0.08  # isotropic zoom in [1 - scale, 1 + scale]
    translate: float = 0.05  # fraction of the image side
    gamma: tuple[float, float] = (0.8, 1.25)
    brightness: float = 0.08  # additive shift, fraction of the range
    contrast: float = 0.10  # multiplicative, around the image mean
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gamma"] = list(self.gamma)
        return d


def load_radiograph(path: str, root: str | None = None) -> np.ndarray:
    """(H, W) float32 [0, 1] display-ready pixels, as `build-index` reads them."""
    from medsim.ingest import read_any

    return read_any(path, root=root).pixels


def augment_transform(aug: AugmentSpec, shape: tuple[int, int]):
    """The MONAI pipeline of one augmented view of an (H, W) = ``shape`` image: (1, H, W) [0, 1] -> same."""
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandAffine,
        RandScaleIntensityFixedMean,
        RandShiftIntensity,
        ScaleIntensityRange,
    )

    h, w = shape
    return Compose([
        RandAffine(prob=1.0, rotate_range=(math.radians(aug.rotate_degrees),), scale_range=(aug.scale, aug.scale),
                   translate_range=(aug.translate * h, aug.translate * w), padding_mode="zeros", mode="bilinear"),
        RandAdjustContrast(prob=1.0, gamma=aug.gamma),
        RandScaleIntensityFixedMean(prob=1.0, factors=aug.contrast),
        RandShiftIntensity(prob=1.0, offsets=aug.brightness),
        ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
    ])


def view_seed(sha256: str, view: int, aug_seed: int) -> int:
    """The seed of augmented view ``view`` of the image whose content hash is ``sha256``."""
    return int(hashlib.sha256(f"{sha256}:{view}:{aug_seed}".encode()).hexdigest()[:8], 16)


def _float32(array) -> np.ndarray:
    """A MONAI output (tensor or array) as a float32 numpy array."""
    return np.asarray(array.detach().cpu().numpy() if torch.is_tensor(array) else array, dtype=np.float32)


def _augment(aug: AugmentSpec, image: np.ndarray, seed: int) -> np.ndarray:
    """``augment_transform`` of a (1, H, W) image, seeded with ``seed``."""
    augment = augment_transform(aug, image.shape[-2:])
    augment.set_random_state(seed=seed)
    return _float32(augment(image.astype(np.float32)))


# ---------------------------------------------------------------------------------------------------------------------
# images


class LoadLetterboxd(MapTransform):
    """Deterministic: path under each key -> (1, h, w) float32 radiograph resized so its longest side is ``size``."""

    def __init__(self, keys: KeysCollection, size: int, root: str | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.root = root
        self.resize = Resize(spatial_size=size, size_mode="longest", mode="area")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _float32(self.resize(load_radiograph(d[key], self.root)[None].astype(np.float32)))
        return d


class RandRadiographAugmentd(Randomizable, MapTransform):
    """Random: the augmentation ``aug`` describes (:func:`augment_transform`) of the (1, h, w) image under each key;
    one draw per call, shared by the keys."""

    def __init__(self, keys: KeysCollection, aug: AugmentSpec, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.aug = aug
        self._seed = 0  # of the augmentation drawn by the last randomize()

    def randomize(self, data=None) -> None:
        self._seed = int(self.R.randint(2**31 - 1))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            d[key] = _augment(self.aug, d[key], self._seed)
        return d


class BundlePreprocessd(MapTransform):
    """Deterministic: the model bundle's preprocessing (``spec``) of the (1, h, w) image under each key -> (3, S, S)
    float32 tensor, the network's input."""

    def __init__(self, keys: KeysCollection, spec: PreprocessSpec, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.prepare = spec.transform()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.from_numpy(np.ascontiguousarray(self.prepare(d[key][0]), dtype=np.float32))
        return d


class TrunkInputd(MapTransform):
    """Deterministic: path under each key -> (3, S, S) float32 tensor for the frozen trunk, view ``data[view_key]``
    of the image: view 0 as build-index sees it, view k > 0 augmented with a seed derived from ``data[content_key]``
    (the file's sha256), k and the augmentation seed -- the same view in every run, so it may be cached."""

    def __init__(self, keys: KeysCollection, spec: PreprocessSpec, aug: AugmentSpec, root: str | None = None,
                 view_key: str = "view", content_key: str = "sha256", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.aug = aug
        self.root = root
        self.view_key = view_key
        self.content_key = content_key
        self.prepare = spec.transform()
        self.resize = Resize(spatial_size=spec.image_size, size_mode="longest", mode="area")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        view = int(d[self.view_key])
        for key in self.key_iterator(d):
            pixels = load_radiograph(d[key], self.root)
            if view > 0:
                # Augment at the model's scale (the spec's own letterbox resize, done first), not at full resolution:
                # the same view, 5-20x cheaper; the spec's Resize is then a no-op.
                small = _float32(self.resize(pixels[None].astype(np.float32)))
                pixels = _augment(self.aug, small, view_seed(d[self.content_key], view, self.aug.seed))[0]
            d[key] = torch.from_numpy(np.ascontiguousarray(self.prepare(pixels.astype(np.float32)), dtype=np.float32))
        return d


# ---------------------------------------------------------------------------------------------------------------------
# cached activations


class LoadViewsd(MapTransform):
    """Deterministic: list of .npy activation maps (one per view) under each key -> (V, C, h, w) float16 array, after
    the frozen block-5 layers ``frozen`` (None or empty: none)."""

    def __init__(self, keys: KeysCollection, frozen: torch.nn.Module | None = None, allow_missing_keys: bool = False,
                 device: str | torch.device | None = None):
        super().__init__(keys, allow_missing_keys)
        self.device = torch.device(device) if device is not None else None
        self.frozen = frozen.to(self.device) if frozen is not None and self.device is not None else frozen

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            views = np.stack([np.load(p) for p in d[key]])
            if self.frozen is not None and len(self.frozen):
                with torch.inference_mode():
                    x = torch.from_numpy(views).float()
                    if self.device is not None:
                        x = x.to(self.device)
                    views = self.frozen(x).to("cpu", torch.float16).numpy()
            d[key] = views
        return d


def _view(views: Sequence, index: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(views[index], dtype=np.float32))


class PickViewd(MapTransform):
    """Deterministic: (V, C, h, w) views under each key -> view ``view`` as a (C, h, w) float32 tensor."""

    def __init__(self, keys: KeysCollection, view: int = 0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.view = int(view)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _view(d[key], self.view)
        return d


class RandPickViewd(Randomizable, MapTransform):
    """Random: (V, C, h, w) views under each key -> one of them, drawn uniformly, as a (C, h, w) float32 tensor; one
    draw per call, shared by the keys (which must hold the same number of views)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self._view = 0  # drawn by the last randomize()

    def randomize(self, data: int) -> None:
        """``data``: the number of views."""
        self._view = int(self.R.randint(data))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if keys:
            self.randomize(len(d[keys[0]]))
        for key in keys:
            d[key] = _view(d[key], self._view)
        return d


class RandFeatureJitter(Randomizable, Transform):
    """Random, on a batch: affine warp of (N, C, h, w) activation grids (MONAI ``AffineTransform``, one call per
    batch): with probability ``prob`` per image a small rotation, isotropic scale and shift by up to ``shift_cells``
    grid cells; otherwise the identity. Other shapes pass unchanged.

    The parameters of a batch are drawn on tensors from a ``torch.Generator`` that ``set_random_state`` seeds (with
    ``seed``, or from ``state``)."""

    def __init__(self, prob: float = 0.5, rotate_degrees: float = 5.0, scale: float = 0.06, shift_cells: float = 1.0):
        from monai.networks.layers import AffineTransform

        self.prob = float(prob)
        self.rotate_degrees = float(rotate_degrees)
        self.scale = float(scale)
        self.shift_cells = float(shift_cells)
        self.generator = torch.Generator()
        self.warp = AffineTransform(normalized=True, mode="bilinear", padding_mode="zeros", align_corners=False)
        self._theta: torch.Tensor | None = None  # (N, 2, 3) affine matrices drawn by the last randomize()

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None
                         ) -> "RandFeatureJitter":
        super().set_random_state(seed=seed, state=state)
        if seed is not None:
            self.generator.manual_seed(int(seed) % MAX_SEED)
        elif state is not None:
            self.generator.manual_seed(int(self.R.randint(MAX_SEED)))
        return self

    def randomize(self, data: torch.Tensor) -> None:
        """``data``: the (N, C, h, w) batch the parameters are for."""
        n, g = data.shape[0], self.generator
        on = (torch.rand(n, generator=g) < self.prob).float()
        angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(self.rotate_degrees) * on
        s = 1 + (torch.rand(n, generator=g) * 2 - 1) * self.scale * on
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * on[:, None] * self.shift_cells * 2.0 / data.shape[-1]
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = s * torch.cos(angle)
        theta[:, 0, 1] = -s * torch.sin(angle)
        theta[:, 1, 0] = s * torch.sin(angle)
        theta[:, 1, 1] = s * torch.cos(angle)
        theta[:, :, 2] = shift
        self._theta = theta

    def __call__(self, data: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if self.prob <= 0 or data.dim() != 4:
            return data
        if randomize or self._theta is None:
            self.randomize(data)
        return self.warp(data, self._theta.to(data.device, data.dtype))

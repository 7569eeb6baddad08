"""The perceptual hash stored with each case at ingest (catalog column ``phash``) and read by ``medsim duplicates``.

256-bit pHash (the ``imagehash`` pHash with ``hash_size=16``: DCT of a 64x64 LANCZOS thumbnail, each of the 16x16
lowest frequencies against their median), as 64 hex digits. Core: needs only numpy, Pillow and imagehash, not OpenCV
(the evaluation baselines in :mod:`medsim.baselines` are what need OpenCV). :func:`perceptual_hash` is bit for bit
the hash that :class:`medsim.baselines.PerceptualHash` (``kind="phash"``, ``hash_size=16``) gives for the same
pixels: both turn the image into uint8 the same way (:func:`to_gray_uint8`) and call ``imagehash.phash``.

Which pixels are hashed is the catalog's *pHash method* (meta ``phash_method``), one per catalog, so ``medsim
duplicates`` never compares hashes of two methods:

* ``area-<S>`` (catalogs created since issue 14): the image area-resized so its longest side is S (the model input
  side), i.e. the grey channel that build-index prepares for the model anyway, without its padding
  (:func:`reduced_perceptual_hash`). A quarter of the time of hashing the whole image on 512-px radiographs, and on
  271 real images (dev set, sample and shared DICOMs) within 0-8 bits (mean 1.6) of the ``display`` hash
  (docs/performance.md).
* ``display`` (catalogs without the key, from before): the display pixels as read.
"""

from __future__ import annotations

import numpy as np

PHASH_SIZE = 16  # imagehash hash_size: 16 x 16 lowest DCT frequencies of a 64 x 64 thumbnail
PHASH_BITS = PHASH_SIZE * PHASH_SIZE
PHASH_HEX = PHASH_BITS // 4
PHASH_META_KEY = "phash_method"  # catalog meta: the method of every hash the catalog holds
LEGACY_METHOD = "display"  # a catalog without the key: hashes of the whole display image (before issue 14)


def reduced_method(image_size: int) -> str:
    """The method name of :func:`reduced_perceptual_hash` for a model input of ``image_size`` px."""
    return f"area-{int(image_size)}"


def to_gray_uint8(image: np.ndarray) -> np.ndarray:
    """A 2-D uint8 image: channels averaged, float values in [0, 1] scaled to 0-255 and rounded; uint8 kept.
    (The conversion of :func:`medsim.baselines.to_uint8` without resizing or CLAHE, which the pHash never used.)"""
    array = np.asarray(image)
    if array.ndim == 3:
        array = array.mean(axis=2)
    if array.dtype != np.uint8:  # in place on one float32 copy: half the time of three temporaries, same bytes
        scaled = np.multiply(array, np.float32(255.0), dtype=np.float32)
        np.rint(scaled, out=scaled)
        np.clip(scaled, 0, 255, out=scaled)
        array = scaled.astype(np.uint8)
    return np.ascontiguousarray(array)


def perceptual_hash(pixels: np.ndarray) -> str:
    """256-bit pHash of a display-ready image ((H, W) float in [0, 1] or uint8) as 64 hex digits.

    ``hash_size=16`` instead of the usual 8 (the evaluation baseline's): the 64-bit hash cannot tell apart the many
    near-identical radiographs of different children in the dev data (see docs/duplicates.md). Stored hashes of
    another length count as missing, so changing the size only costs re-reading the candidates' source files (or a
    re-ingest)."""
    return _phash_uint8(to_gray_uint8(pixels))


def _phash_uint8(gray: np.ndarray) -> str:
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(gray), hash_size=PHASH_SIZE).hash
    return np.packbits(np.asarray(bits, dtype=np.uint8).ravel()).tobytes().hex()


def reduced_perceptual_hash(image, source_shape: tuple[int, int]) -> str:
    """pHash of a prepared model input (a :class:`medsim.preprocess.PreparedImage` that still has its grey channel
    and spec) without its padding: the ``area-<image_size>`` method. ``source_shape``: the (H, W) it was made from.
    The grey values (0..spec.scale) are scaled to 0..255 in float32, which gives the same bits for the scales of 1
    and 255 that the bundles use. '' when it cannot be computed here (imagehash not installed, odd image): ``medsim
    duplicates`` then computes the missing hashes of candidate pairs from their source files."""
    from medsim.preprocess import unpadded

    try:
        content = unpadded(image.grey, source_shape)
        values = np.multiply(content, np.float32(255.0 / image.spec.scale), dtype=np.float32)
        np.rint(values, out=values)
        np.clip(values, 0, 255, out=values)
        return _phash_uint8(values.astype(np.uint8))
    except Exception:  # ingest never fails for the sake of a hash
        return ""


def perceptual_hash_by(method: str, pixels: np.ndarray) -> str:
    """The hash of display pixels ((H, W) float in [0, 1]) by a catalog's method (``medsim duplicates`` computes a
    missing hash from the source file this way, so it matches the catalog's others)."""
    if method == LEGACY_METHOD:
        return perceptual_hash(pixels)
    if not method.startswith("area-") or not method[5:].isdigit():
        raise ValueError(f"unknown pHash method {method!r}")
    from medsim.preprocess import PreprocessSpec, prepare

    return reduced_perceptual_hash(prepare(pixels, PreprocessSpec(image_size=int(method[5:]))), pixels.shape[:2])


def hamming(a: str, b: str) -> int:
    """Bits in which two hex hashes differ."""
    return int(bin(int(a, 16) ^ int(b, 16)).count("1"))

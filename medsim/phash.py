"""The perceptual hash stored with each case at ingest (catalog column ``phash``) and read by ``medsim duplicates``.

256-bit pHash (the ``imagehash`` pHash with ``hash_size=16``: DCT of a 64x64 LANCZOS thumbnail, each of the 16x16
lowest frequencies against their median) of the display pixels, as 64 hex digits. Core: needs only numpy, Pillow and
imagehash, not OpenCV (the evaluation baselines in :mod:`medsim.baselines` are what need OpenCV). Bit for bit the hash
that :class:`medsim.baselines.PerceptualHash` (``kind="phash"``, ``hash_size=16``) gives for the same pixels: both
turn the image into uint8 the same way (:func:`to_gray_uint8`) and call ``imagehash.phash``.
"""

from __future__ import annotations

import numpy as np

PHASH_SIZE = 16  # imagehash hash_size: 16 x 16 lowest DCT frequencies of a 64 x 64 thumbnail
PHASH_BITS = PHASH_SIZE * PHASH_SIZE
PHASH_HEX = PHASH_BITS // 4


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
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(to_gray_uint8(pixels)), hash_size=PHASH_SIZE).hash
    return np.packbits(np.asarray(bits, dtype=np.uint8).ravel()).tobytes().hex()


def perceptual_hash_or_empty(pixels: np.ndarray) -> str:
    """:func:`perceptual_hash`, or '' when it cannot be computed here (imagehash not installed, odd image);
    ``medsim duplicates`` then computes the missing hashes of candidate pairs from their source files."""
    try:
        return perceptual_hash(pixels)
    except Exception:  # ingest never fails for the sake of a hash
        return ""


def hamming(a: str, b: str) -> int:
    """Bits in which two hex hashes differ."""
    return int(bin(int(a, 16) ^ int(b, 16)).count("1"))

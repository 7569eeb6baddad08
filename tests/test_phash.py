"""The pHash stored at ingest (medsim.phash): core, without OpenCV, and bit for bit the evaluation baseline's
256-bit pHash (medsim.baselines.PerceptualHash, hash_size=16) on real chest X-rays and the sample DICOMs."""

import csv
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from conftest import ROOT, SAMPLE_DIR, SHARED_CXR, sample_manifest

from medsim.phash import PHASH_BITS, PHASH_HEX, hamming, perceptual_hash, perceptual_hash_or_empty, to_gray_uint8

NO_OPENCV = """
import sys
import numpy as np
import medsim.build, medsim.duplicates, medsim.phash
from medsim.phash import perceptual_hash, perceptual_hash_or_empty
image = np.random.default_rng(0).random((300, 240), dtype=np.float32)
assert len(perceptual_hash(image)) == 64 and perceptual_hash_or_empty(image) == perceptual_hash(image)
assert len(medsim.duplicates.perceptual_hash((image * 255).astype(np.uint8))) == 64
heavy = sorted(m for m in sys.modules if m == "cv2" or m.startswith("cv2.") or m == "medsim.baselines")
print("imported:", heavy)
assert not heavy, heavy
"""


def test_hash_at_ingest_never_imports_opencv():
    """build -> phash and duplicates need no OpenCV (only the `evaluate` extra does): a fresh interpreter that
    imports them and computes hashes has no cv2 module loaded."""
    done = subprocess.run([sys.executable, "-c", NO_OPENCV], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def _real_images(per_source: int = 2) -> list[tuple[str, np.ndarray]]:
    from medsim.dicom import ChestPolicy
    from medsim.ingest import read_any

    images = []
    if (SHARED_CXR / "labels.csv").exists():
        by_source = defaultdict(list)
        with open(SHARED_CXR / "labels.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                by_source[row["source"]].append(row["path"])
        for source in sorted(by_source):
            for path in by_source[source][:per_source]:
                images.append((path, read_any(SHARED_CXR / path).pixels))
    policy = ChestPolicy(any_body_part=True, any_modality=True)
    for f in sample_manifest()["files"]:
        if f["expected"] == "index":
            images.append((f["path"], read_any(SAMPLE_DIR / f["path"], policy=policy).pixels))
    return images


def test_bit_identical_to_the_baselines_phash_on_real_images():
    pytest.importorskip("cv2")
    from medsim.baselines import PerceptualHash

    images = _real_images()
    assert len(images) >= 10
    baseline = PerceptualHash("phash", hash_size=16).fit()
    for name, pixels in images:
        gray = np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)
        for image in (pixels, gray, np.stack([pixels] * 3, axis=2)):
            bits = baseline.transform([image])[0]
            expected = np.packbits(bits.astype(np.uint8)).tobytes().hex()
            assert perceptual_hash(image) == expected, name


def test_units():
    assert PHASH_BITS == 256 and PHASH_HEX == 64
    assert hamming("00", "ff") == 8 and hamming("0f" * 32, "0f" * 32) == 0
    image = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert to_gray_uint8(image).tolist() == [[0, 128, 255]]
    assert to_gray_uint8(np.array([[7, 200]], dtype=np.uint8)).tolist() == [[7, 200]]
    h = perceptual_hash(np.random.default_rng(1).random((64, 64)))
    assert len(h) == PHASH_HEX and bin(int(h, 16)).count("1") <= PHASH_BITS
    assert perceptual_hash_or_empty(np.zeros((2, 2, 2, 2))) == ""  # odd input: no hash, no exception

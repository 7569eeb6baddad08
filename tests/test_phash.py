"""The pHash stored at ingest (medsim.phash): core, without OpenCV; the ``display`` method bit for bit the evaluation
baseline's 256-bit pHash (medsim.baselines.PerceptualHash, hash_size=16) on real chest X-rays and the sample DICOMs;
the ``area-224`` method (issue 14) the hash of the prepared model input, within a few bits of the display hash."""

import csv
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from conftest import ROOT, SAMPLE_DIR, SHARED_CXR, sample_manifest

from medsim.phash import (LEGACY_METHOD, PHASH_BITS, PHASH_HEX, hamming, perceptual_hash, perceptual_hash_by,
                          reduced_method, reduced_perceptual_hash, to_gray_uint8)
from medsim.preprocess import CAFFE_VGG16, TORCHVISION_IMAGENET, prepare, unpadded

NO_OPENCV = """
import sys
sys.modules["cv2"] = None  # as if OpenCV were not installed: importing it raises ImportError (MONAI's is optional)
import numpy as np
import medsim.build, medsim.duplicates, medsim.phash
from medsim.phash import perceptual_hash, perceptual_hash_by
image = np.random.default_rng(0).random((300, 240), dtype=np.float32)
assert len(perceptual_hash(image)) == 64 and len(perceptual_hash_by("area-224", image)) == 64
assert len(medsim.duplicates.perceptual_hash((image * 255).astype(np.uint8))) == 64
heavy = sorted(m for m in sys.modules if m.startswith("cv2.") or m == "medsim.baselines")
print("imported:", heavy)
assert not heavy and sys.modules["cv2"] is None, heavy
"""


def test_hash_at_ingest_never_imports_opencv():
    """build -> phash and duplicates need no OpenCV (only the `evaluate` extra does): a fresh interpreter where
    OpenCV cannot be imported computes hashes by both methods (the area method runs MONAI, whose cv2 is optional)
    and has loaded neither cv2 nor the OpenCV baselines."""
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
    assert perceptual_hash_by(LEGACY_METHOD, image[0:1]) == perceptual_hash(image[0:1])
    with pytest.raises(ValueError):
        perceptual_hash_by("area-", image)
    odd = prepare(np.ones((8, 8), dtype=np.float32), CAFFE_VGG16)
    assert reduced_perceptual_hash(odd, (2, 2, 2)) == ""  # odd input: no hash, no exception


def test_unpadded_is_exactly_the_letterbox_content():
    """unpadded() inverts the pipeline's padding with MONAI's own rounding: on an all-white image of any shape the
    view holds every non-zero value and nothing else (tall, wide, square, tiny, odd sides, full resolution)."""
    for shape in [(512, 400), (400, 512), (224, 224), (64, 64), (7, 300), (301, 3), (3000, 2497), (513, 511)]:
        for spec in (CAFFE_VGG16, TORCHVISION_IMAGENET):
            grey = prepare(np.ones(shape, dtype=np.float32), spec).grey
            content = unpadded(grey, shape)
            assert content.size and (content > 0).all(), (shape, spec.scale)
            assert content.size == np.count_nonzero(grey), (shape, spec.scale)
            assert max(content.shape) == spec.image_size


def test_reduced_hash_is_the_model_inputs_and_near_the_display_hash_on_real_images():
    """area-224: the same bits from the caffe (0..255) and torchvision (0..1) inputs, and from
    perceptual_hash_by (what `medsim duplicates` computes for a missing hash); within a few of 256 bits of the
    display hash on real radiographs (measured on 271: mean 1.6, max 8; near-duplicate copies differ by <= 32,
    different images by >= 38, so one catalog keeps one method)."""
    images = _real_images(per_source=3)
    assert len(images) >= 30
    distances = []
    for name, pixels in images:
        caffe = reduced_perceptual_hash(prepare(pixels, CAFFE_VGG16), pixels.shape)
        assert len(caffe) == PHASH_HEX, name
        assert reduced_perceptual_hash(prepare(pixels, TORCHVISION_IMAGENET), pixels.shape) == caffe, name
        assert perceptual_hash_by(reduced_method(224), pixels) == caffe, name
        distances.append(hamming(caffe, perceptual_hash(pixels)))
    assert max(distances) <= 12 and np.mean(distances) <= 4, distances
    other = [hamming(reduced_perceptual_hash(prepare(a, CAFFE_VGG16), a.shape), perceptual_hash(b))
             for (_, a), (_, b) in zip(images, images[1:])]
    assert min(other) > 40, other  # a different image stays far away

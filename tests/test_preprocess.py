"""Preprocessing (medsim.preprocess): :func:`prepare` gives exactly the MONAI pipeline's tensor, and a prepared image
travels between processes as its grey channel (a third of the bytes) and arrives with the same bits."""

import csv
import pickle

import numpy as np
import pytest
from conftest import SAMPLE_DIR, SHARED_CXR

from medsim.preprocess import CAFFE_VGG16, TORCHVISION_IMAGENET, PreparedImage, PreprocessSpec, prepare

SPECS = [CAFFE_VGG16, TORCHVISION_IMAGENET, PreprocessSpec(image_size=256)]


def _real_images(n: int = 24) -> list[np.ndarray]:
    """Display-ready pixels of real radiographs: every k-th dev image (512 px JPEGs, 64 px PNGs) and sample DICOMs."""
    from medsim.ingest import read_any

    paths = []
    if (SHARED_CXR / "labels.csv").exists():
        with open(SHARED_CXR / "labels.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        paths += [SHARED_CXR / r["path"] for r in rows[::max(1, len(rows) // n)][:n]]
    paths += sorted(SAMPLE_DIR.rglob("*.dcm"))[:6]
    images = []
    for path in paths:
        try:
            images.append(read_any(path).pixels)
        except Exception:  # a sample file meant to be refused
            continue
    if len(images) < 6:
        pytest.skip("no real images here")
    return images


@pytest.mark.parametrize("spec", SPECS, ids=["caffe", "torchvision", "caffe-256"])
def test_prepare_is_the_monai_pipeline_bit_for_bit_and_so_is_its_pickle(spec):
    pipeline = spec.transform()
    for pixels in _real_images():
        expected = pipeline(pixels.astype(np.float32))
        prepared = prepare(pixels, spec)
        assert prepared.array.dtype == np.float32 and prepared.array.shape == (3, spec.image_size, spec.image_size)
        assert np.array_equal(prepared.array, expected)
        data = pickle.dumps(prepared)
        assert len(data) < 0.4 * expected.nbytes  # the grey channel, not three
        again = pickle.loads(data)
        assert np.array_equal(again.array, expected) and again.spec_fingerprint == spec.fingerprint


def test_a_prepared_image_made_elsewhere_pickles_whole():
    array = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    again = pickle.loads(pickle.dumps(PreparedImage(array, "abc")))
    assert np.array_equal(again.array, array) and again.spec_fingerprint == "abc"

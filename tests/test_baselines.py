"""Baselines: k-means, bag of visual words (tf-idf by hand, real chest X-rays), perceptual hashes, SURF status."""

import csv

import numpy as np
import pytest
from conftest import SHARED_CXR

pytest.importorskip("cv2")
pytest.importorskip("imagehash")

from medsim.baselines import (BagOfVisualWords, DetectorUnavailable, PerceptualHash, detector_status, kmeans,  # noqa: E402
                              make_detector, to_uint8)

CXR = SHARED_CXR


def _real_images(n=10):
    if not (CXR / "labels.csv").exists():
        pytest.skip("no ../shared/data/cxr")
    from medsim.ingest import read_any

    with open(CXR / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["source"] in ("nih", "kermany", "hannover")]
    rows = rows[:: max(1, len(rows) // n)][:n]
    return [read_any(CXR / r["path"]).pixels for r in rows]


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 0], [0, 10]], dtype=np.float32)
    x = np.concatenate([c + rng.normal(scale=0.3, size=(100, 2)) for c in centers]).astype(np.float32)
    found, inertia = kmeans(x, 3, seed=0)
    for c in centers:
        assert np.min(np.linalg.norm(found - c, axis=1)) < 0.2
    assert inertia < 300 * 0.3 ** 2 * 2 * 1.5


def test_tfidf_vectors_by_hand():
    # Two clusters of 2-d "descriptors"; image 0 has two words of cluster A, image 1 one of A and one of B.
    a, b = np.array([0.0, 0.0], np.float16), np.array([100.0, 100.0], np.float16)
    descriptors = [np.stack([a, a]), np.stack([a, b])]
    bow = BagOfVisualWords("sift", vocabulary_size=2)
    bow._fit_descriptors(descriptors)
    word_a = int(np.argmin(np.linalg.norm(bow.vocabulary_ - a.astype(np.float32), axis=1)))
    word_b = 1 - word_a
    # idf = ln((1 + n) / (1 + df)) + 1 with n = 2: df(A) = 2 -> 1; df(B) = 1 -> ln(3/2) + 1
    assert bow.idf_[word_a] == pytest.approx(1.0)
    assert bow.idf_[word_b] == pytest.approx(np.log(1.5) + 1.0)
    vectors = bow._vectors(bow._fit_counts)
    assert vectors[0, word_a] == pytest.approx(1.0) and vectors[0, word_b] == 0.0
    expected = np.array([0.5 * 1.0, 0.5 * (np.log(1.5) + 1.0)])
    expected /= np.linalg.norm(expected)
    assert vectors[1, word_a] == pytest.approx(expected[0], rel=1e-5)
    assert vectors[1, word_b] == pytest.approx(expected[1], rel=1e-5)
    assert BagOfVisualWords.similarity(vectors)[0, 1] == pytest.approx(expected[0], rel=1e-5)


@pytest.mark.parametrize("detector", ["sift", "orb"])
def test_bag_of_visual_words_on_real_chest_xrays(detector):
    images = _real_images(8)
    bow = BagOfVisualWords(detector, vocabulary_size=32, n_features=200, image_size=256)
    vectors = bow.fit_transform(images)
    assert vectors.shape == (8, 32) and bow.vocabulary_.shape[0] == 32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert bow.descriptors_per_image_ > 20
    # transform of the same images gives the same vectors as fit_transform (one extraction path)
    again = bow.transform(images[:3])
    assert np.allclose(again, vectors[:3], atol=1e-5)
    similarity = BagOfVisualWords.similarity(vectors)
    assert np.allclose(np.diag(similarity), 1.0, atol=1e-5)
    # a slightly brighter copy of an image is closer to it than the other images are
    brighter = np.clip(images[0] * 1.05 + 0.01, 0, 1)
    copy = bow.transform([brighter])[0]
    assert float(vectors[0] @ copy) > np.max(similarity[0, 1:])


def test_bag_of_visual_words_in_worker_processes_matches_in_process():
    images = _real_images(4)
    one = BagOfVisualWords("orb", vocabulary_size=16, n_features=100, image_size=256).fit(images)
    two = BagOfVisualWords("orb", vocabulary_size=16, n_features=100, image_size=256, n_jobs=2)
    two.vocabulary_, two.idf_ = one.vocabulary_, one.idf_
    assert np.allclose(one.transform(images), two.transform(images), atol=1e-6)


def test_unfitted_and_unknown_detectors():
    from medsim.errors import MedsimError

    with pytest.raises(MedsimError):
        BagOfVisualWords("sift").transform([np.zeros((32, 32))])
    with pytest.raises(ValueError):
        make_detector("harris")


def test_surf_is_either_real_or_reported_unavailable_with_the_reason():
    available, reason = detector_status("surf")
    if available:
        assert make_detector("surf") is not None
    else:
        with pytest.raises(DetectorUnavailable) as exc:
            make_detector("surf")
        assert "SURF" in str(exc.value)
        assert "patented" in reason or "non-free" in reason.lower() or "NONFREE" in reason or "no SURF" in reason
    assert detector_status("kaze")[0]  # the stand-in is always there with opencv-contrib


def test_perceptual_hash_similarity_by_hand():
    a = np.array([[1, 0, 1, 1], [1, 1, 0, 1]], dtype=bool)
    s = PerceptualHash.similarity(a)
    assert s[0, 1] == pytest.approx(1 - 2 / 4) and s[0, 0] == 1.0


@pytest.mark.parametrize("kind", ["phash", "dhash"])
def test_perceptual_hash_on_real_images(kind):
    images = _real_images(4)
    h = PerceptualHash(kind).fit(images)
    bits = h.transform(images + [np.clip(images[0] * 0.95 + 0.02, 0, 1)])
    assert bits.shape == (5, 64) and bits.dtype == bool and h.n_bits_ == 64
    s = PerceptualHash.similarity(bits)
    assert s[0, 4] >= 0.9  # a slightly darker copy keeps (almost) the same hash
    with pytest.raises(ValueError):
        PerceptualHash("ahash").fit()


def test_to_uint8_resizes_longest_side():
    image = np.linspace(0, 1, 64 * 32, dtype=np.float32).reshape(32, 64)
    out = to_uint8(image, image_size=128, clahe=False)
    assert out.shape == (64, 128) and out.dtype == np.uint8 and out.max() >= 250

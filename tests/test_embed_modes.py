"""Numeric modes of the Embedder (docs/performance.md): same vectors as float32 within tolerance, a default that
can be overridden, and build-index saying which mode it used."""

import numpy as np
import pytest

from medsim.model import imagenet_bundle
from medsim.model.embedder import (EMBED_MODE_ENV, EMBED_MODES, EmbedDeviceError, default_embed_mode, embedding_plan,
                                   native_bf16)
from medsim.model.convert import synthetic_radiograph

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle():
    return imagenet_bundle("gap")


@pytest.fixture(scope="module")
def images():
    return [synthetic_radiograph(300, seed=s) for s in range(3)]


def test_every_mode_gives_the_float32_vectors_within_tolerance(bundle, images):
    """The float modes; int8 needs a bundle's calibration images (tests/test_train.py checks it on real X-rays)."""
    reference = bundle.embedder(mode="fp32").embed(images)
    for mode in [m for m in EMBED_MODES if m != "int8"]:
        vectors = bundle.embedder(mode=mode, batch_size=2).embed(images)
        assert vectors.shape == (3, 512) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        cosine = np.sum(vectors * reference, axis=1)
        assert cosine.min() >= (0.9999 if mode == "bf16" else 0.999999), (mode, cosine)


def test_default_mode_and_its_override(bundle, monkeypatch):
    monkeypatch.delenv(EMBED_MODE_ENV, raising=False)
    expected = "bf16" if native_bf16("cpu") else "channels_last"
    assert default_embed_mode("cpu") == expected
    embedder = bundle.embedder()
    assert embedder.mode == expected and embedder.mode in embedder.describe()
    # int8 only for a bundle whose own check approved it, and only on a CPU with VNNI
    from medsim.model.quantize import integer_dot_product_cpu

    assert default_embed_mode("cpu", int8_approved=True) == ("int8" if integer_dot_product_cpu() else expected)
    assert default_embed_mode("cuda", int8_approved=True) != "int8"
    monkeypatch.setenv(EMBED_MODE_ENV, "fp32")
    assert bundle.embedder().mode == "fp32"
    assert bundle.embedder(mode="bf16").mode == "bf16"  # an explicit mode wins over the environment
    monkeypatch.setenv(EMBED_MODE_ENV, "auto")
    assert bundle.embedder().mode == expected
    monkeypatch.setenv(EMBED_MODE_ENV, "fp16")
    with pytest.raises(ValueError, match=EMBED_MODE_ENV):
        bundle.embedder()
    monkeypatch.delenv(EMBED_MODE_ENV)
    with pytest.raises(ValueError, match="unknown embedding mode"):
        bundle.embedder(mode="int4")


def test_one_device_and_mode_rule_for_a_local_build_and_a_ray_actor(bundle, monkeypatch):
    """``embedding_plan`` decides for every Embedder (a local build's, a Ray actor's). Asked for a GPU that torch
    cannot see, it fails with one line and never embeds on the CPU instead."""
    import torch

    monkeypatch.delenv(EMBED_MODE_ENV, raising=False)
    assert embedding_plan("cpu") == (torch.device("cpu"), default_embed_mode("cpu"))
    if not torch.cuda.is_available():
        for make in (lambda: embedding_plan("cuda"), lambda: bundle.embedder(device="cuda")):
            with pytest.raises(EmbedDeviceError, match=r"^no CUDA device is visible to torch here \(torch ") as err:
                make()
            assert "\n" not in str(err.value)
    # the GPU rules, with the CUDA queries answered as a GPU of each generation would (no GPU on this machine)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, mode in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 0), "channels_last")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert embedding_plan("cuda", int8_approved=True) == (torch.device("cuda"), mode)
    monkeypatch.setenv(EMBED_MODE_ENV, "int8")
    assert embedding_plan("cpu") == (torch.device("cpu"), "int8")
    with pytest.raises(EmbedDeviceError, match="the int8 mode runs on the CPU only"):
        embedding_plan("cuda")


def test_build_index_reports_the_mode_it_used(bundle, tmp_path):
    from PIL import Image

    from medsim.build import build_index

    folder = tmp_path / "images"
    folder.mkdir()
    for s in range(2):
        Image.fromarray((synthetic_radiograph(256, seed=s) * 255).astype(np.uint8)).save(folder / f"{s}.png")
    report = build_index(folder, tmp_path / "index", bundle, workers=0, progress=False)
    assert report.indexed == 2
    assert report.embed_mode.startswith(bundle.embedder().mode)
    lines = report.summary_lines()
    assert f"embedding mode: {report.embed_mode}" in lines and "images/s" in lines[-1]

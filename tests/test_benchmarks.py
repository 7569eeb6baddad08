"""The benchmark suite's own pieces (benchmarks/, docs/performance.md) at tiny sizes."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SHARED_CXR

sys.path.insert(0, str(ROOT))

from benchmarks import bench_search, report  # noqa: E402
from benchmarks.bench_embed import conv_macs, map_at_10  # noqa: E402


def test_vgg16_conv_flops_match_the_published_count():
    from medsim.model.network import vgg16_features

    macs = conv_macs(vgg16_features(30, device="meta"), 224)
    # 13 conv layers of VGG-16 at 224 px: 15.35 G multiply-adds (the often quoted 15.5 G includes the classifier)
    assert macs == 15_346_630_656


def test_search_pieces_recall_and_goal_check(tmp_path, monkeypatch):
    base, queries = bench_search.make_vectors(3000, 40)
    assert base.shape == (3000, 512) and np.allclose(np.linalg.norm(base, axis=1), 1, atol=1e-5)
    truth = bench_search.exact_topk(base, queries, chunk=1000)
    brute = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    assert bench_search.recall_at_k(truth, brute) == 1.0
    monkeypatch.setattr(bench_search, "WORK", tmp_path)
    result = bench_search.run(quick=True, sizes=[3000], n_queries=40)
    entry = result["sizes"][0]
    assert entry["exact"][0]["recall@10"] == 1.0
    assert [cfg["M"] for cfg in entry["hnswlib"]] == [16, 32]
    for cfg in entry["hnswlib"]:
        assert cfg["sweep"][-1]["recall@10"] >= 0.95 and cfg["memory_bytes_per_vector_rss"] > 2048
    assert result["goal"]["n"] == 3000 and "met" in result["goal"]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "search.json").write_text(json.dumps({"created_at": "now", **result}))
    page = report.write(results=tmp_path / "results", docs=tmp_path, plots=tmp_path / "images")
    text = page.read_text()
    assert "## 4. Search" in text and "3,000 vectors" in text and "Not run yet" in text
    assert (tmp_path / "images" / "perf-search.png").stat().st_size > 1000


def test_map_at_10_matches_medsim_evaluate_definition():
    from medsim.evaluate.data import EvalItem, EvalSet

    items = [EvalItem(path=f"/x/{i}", rel_path=str(i), labels=(lab,), patient_id=f"p{i}")
             for i, lab in enumerate("AABB")]
    eval_set = EvalSet("/x", items)
    vectors = np.eye(4, dtype=np.float32)
    vectors[1] = vectors[0] + 0.1 * vectors[1]
    vectors[3] = vectors[2] + 0.1 * vectors[3]
    assert map_at_10(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), eval_set) == pytest.approx(1.0)


@pytest.mark.skipif(not (SHARED_CXR / "labels.csv").exists(), reason="no ../shared/data/cxr")
def test_dicom_export_keeps_the_pixels(tmp_path):
    from benchmarks.bench_build import export_dicom
    from medsim.ingest import read_any

    info = export_dicom(SHARED_CXR, tmp_path / "export", limit=3)
    assert info["files"] == 3 and sum(info["by_transfer_syntax"].values()) == 3
    rows = (tmp_path / "export" / "labels.csv").read_text().splitlines()
    assert rows[0].startswith("path,sop_uid,labels,patient_id")
    for line in rows[1:]:
        rel = line.split(",")[0]
        original = SHARED_CXR / Path(rel).with_suffix(".jpg")
        if not original.exists():
            original = original.with_suffix(".png")
        exported = read_any(tmp_path / "export" / rel)
        assert exported.modality == "DX" and exported.reader == "pydicom"
        np.testing.assert_array_equal(exported.pixels, read_any(original).pixels)
    assert export_dicom(SHARED_CXR, tmp_path / "export", limit=3) == info  # cached

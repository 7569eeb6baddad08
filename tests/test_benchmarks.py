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


def test_full_resolution_section_and_goals_are_rendered(tmp_path):
    """Issue 14: results/decode_realistic.json and results/realistic_build.json become section 6 and goal rows."""
    results = tmp_path / "results"
    results.mkdir()
    machine = {"cpu": "test cpu", "logical_cpus": 2}
    decode = {"created_at": "now", "machine": machine, "load_average_before": [3.0], "load_average_after": [3.5],
              "export": {"files": 14, "bytes": 1e8, "megapixels_median": 6.5},
              "summary": [{"syntax": "j2k-lossless", "files_timed": 2, "megapixels_median": 6.5,
                           "decoder": "OpenJPEG (Pillow) resolution 1/4", "pylibjpeg_images_per_s": 1.0,
                           "pylibjpeg_megapixels_per_s": 6.5, "medsim_full_images_per_s": 0.8,
                           "medsim_reduced_images_per_s": 8.0}],
              "quality": {"bundle": "b", "mode": "m", "images": 14, "gallery": 10, "min_cosine": 0.997,
                          "mean_cosine": 0.999, "cosine_ok": True, "mAP@10_full": 0.5, "mAP@10_reduced": 0.499,
                          "mAP_delta": -0.001, "mAP_ok": True,
                          "per_syntax": {"j2k-lossless": {"images": 2, "min_cosine": 0.997, "mean_cosine": 0.998,
                                                          "mAP@10_full": 0.5, "mAP@10_reduced": 0.49}}}}
    build = {"created_at": "now", "machine": machine, "worker_baseline_rss_bytes": 300 * 2**20,
             "largest_image": {"rows": 3500, "columns": 2800, "stored_bytes": 3500 * 2800 * 2},
             "builds": {"j2k-lossless": {"indexed": 72, "images_per_s": 6.0, "steady_images_per_s": 7.0,
                                         "embed_only_images_per_s": 7.5, "decode_only_images_per_s": 8.0,
                                         "ratio_steady_to_min_embed_decode": 0.93, "ratio_steady_to_embed_only": 0.93,
                                         "peak_rss_main_bytes": 900 * 2**20, "peak_rss_worker_bytes": 400 * 2**20,
                                         "load_average_before": [3.0], "load_average_after": [3.2], "workers": 1,
                                         "mode": "channels_last"}}}
    (results / "decode_realistic.json").write_text(json.dumps(decode))
    (results / "realistic_build.json").write_text(json.dumps(build))
    text = report.write(results=results, docs=tmp_path, plots=tmp_path / "images").read_text()
    assert "## 6. Full-resolution PACS export (issue 14)" in text and "JPEG 2000 lossless" in text
    assert "OpenJPEG (Pillow) resolution 1/4" in text and "10.0×" in text
    assert "≥ 90 % of min(embed-only, decode-only) (JPEG 2000 lossless) | 93 %" in text
    assert "cosine reduced vs full ≥ 0.995" in text and "## 3. Build-index end to end" in text

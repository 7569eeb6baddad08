"""`medsim evaluate`, `medsim calibrate` and `medsim query` end to end on real chest X-rays (a small subset)."""

import json
import shutil

import pytest
from conftest import SHARED_CXR

pytest.importorskip("cv2")
pytest.importorskip("imagehash")
pytest.importorskip("matplotlib")

from medsim.cli import main  # noqa: E402

pytestmark = pytest.mark.slow
CXR = SHARED_CXR
N_IMAGES = 40


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    if not (CXR / "labels.csv").exists():
        pytest.skip("no ../shared/data/cxr")
    root = tmp_path_factory.mktemp("evaluate")
    out, cache = root / "report", root / "cache"
    code = main(["evaluate", "--images", str(CXR), "--labels", str(CXR / "labels.csv"),
                 "--methods", "cnn,sift,surf,orb,phash,dhash", "--out", str(out), "--cache", str(cache),
                 "--limit", str(N_IMAGES), "--vocabulary-size", "48", "--n-features", "300", "--image-size", "256",
                 "--bootstrap", "100", "--examples", "3", "--jobs", "2", "--no-progress", "--no-validation-split"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_report_has_every_method_and_number(evaluation):
    out, results = evaluation
    assert results["data"]["images"] == N_IMAGES
    assert len(results["data"]["sources"]) >= 5  # drawn round-robin across sources
    rows = {m["key"]: m for m in results["methods"]}
    assert {"cnn", "sift", "surf", "orb", "phash", "dhash"} <= set(rows)
    if not rows["surf"]["available"]:  # pip's OpenCV has no SURF: said so, and KAZE stands in as its own row
        assert "SURF" in rows["surf"]["unavailable_reason"]
        assert rows["kaze"]["available"] and rows["kaze"]["title"].startswith("KAZE")
        assert any("SURF is not available" in note for note in results["notes"])
    for key, m in rows.items():
        if not m["available"]:
            continue
        op, be = m["operating_point"], m["break_even"]
        for entry in [op[k] for k in ("accuracy", "precision", "recall", "f1", "list_recall", "list_precision")] + \
                [be[k] for k in ("accuracy", "precision", "recall", "f1")] + list(m["ranking"].values()):
            value, (lo, hi) = entry["value"], entry["ci95"]
            assert 0.0 <= value <= 1.0, key
            assert lo - 1e-9 <= hi, key
        assert abs(be["precision"]["value"] - be["recall"]["value"]) < 0.1
        assert set(m["ranking"]) >= {f"{n}@{k}" for n in ("P", "R", "mAP", "nDCG") for k in (1, 5, 10, 50)}
        assert len(m["p_at_k_curve"]) == min(50, N_IMAGES)  # k up to 50, or the gallery size
        assert m["per_source"] and m["per_finding"]
        assert len(m["examples"]) == 3
    assert rows["cnn"]["available"], rows["cnn"].get("unavailable_reason")
    assert rows["cnn"]["info"]["fingerprint"]
    protocol = results["protocol"]
    assert 0 < protocol["pairwise_base_rate"] < 1 and not protocol["include_same_patient"]


def test_html_report_is_self_contained(evaluation):
    out, _ = evaluation
    page = (out / "index.html").read_text()
    for needle in ("Paper-style table", "break-even", "list recall@10", "Per-finding", "Per-source",
                   "Example queries", "data:image/png;base64", "data:image/jpeg;base64", "Definitions"):
        assert needle in page, needle
    assert "http://" not in page and "https://" not in page  # nothing fetched from the internet
    for plot in ("pr_curves", "list_curves", "p_at_k", "per_finding", "per_source"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000


def test_rerun_uses_the_cache(evaluation, tmp_path):
    out, results = evaluation
    cache = out.parent / "cache"
    code = main(["evaluate", "--images", str(CXR), "--labels", str(CXR / "labels.csv"), "--methods", "sift,phash",
                 "--out", str(tmp_path / "again"), "--cache", str(cache), "--limit", str(N_IMAGES),
                 "--vocabulary-size", "48", "--n-features", "300", "--image-size", "256", "--bootstrap", "100",
                 "--no-progress",
                 "--relevance", "same-set", "--examples", "0", "--no-validation-split"])
    assert code == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert all(m["cached"] for m in again["methods"])
    assert again["protocol"]["relevance"] == "same-set"
    assert again["protocol"]["pairwise_base_rate"] < results["protocol"]["pairwise_base_rate"]


def test_calibrate_then_query_uses_the_operating_point(evaluation, tmp_path, capsys):
    _, results = evaluation
    cnn = next(m for m in results["methods"] if m["key"] == "cnn")
    index = tmp_path / "index"
    shutil.copytree(cnn["info"]["index"], index, ignore=shutil.ignore_patterns("lock"))
    capsys.readouterr()
    assert main(["calibrate", "--index", str(index), "--labels", str(CXR / "labels.csv"),
                 "--target-recall", "0.9", "-k", "5"]) == 0
    text = capsys.readouterr().out
    assert "target list recall@5 0.90" in text and "list precision" in text and "stored" in text
    from medsim.index import CaseIndex

    with CaseIndex.open(index) as opened:
        op = opened.meta["operating_point"]
        case = opened.cases()[0]
    assert op["k"] == 5 and op["data"]["queries"] == N_IMAGES
    assert main(["query", case.source_path, "--index", str(index), "-k", "5"]) == 0
    text = capsys.readouterr().out
    assert f"operating point: stored operating point: similarity >= {op['threshold']:.4f}" in text
    assert main(["query", case.source_path, "--index", str(index), "-k", "5", "--no-threshold", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["operating_point"] is None and len(plain["results"]) == 5

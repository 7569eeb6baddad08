"""The evaluation runner on a tiny synthetic image set: cross-fitted operating point, validation split, modes."""

import csv
import json

import numpy as np
import pytest

from medsim.evaluate import metrics as M
from medsim.evaluate import runner
from medsim.evaluate.data import load_eval_set
from medsim.evaluate.methods import MethodOutput, expand_methods

LABELS = [("A",), ("A",), ("B",), ("B",), ("A", "B"), ("No Finding",), ("No Finding",), ("A",), ("B",), ("A",),
          ("No Finding",), ("B",)]


@pytest.fixture
def tiny(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i, labels in enumerate(LABELS):
        path = tmp_path / "images" / f"{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(32, 32), dtype=np.uint8)).save(path)
        rows.append({"path": f"images/{i:02d}.png", "labels": "|".join(labels), "patient_id": f"p{i // 2}",
                     "source": "s1" if i < 6 else "s2"})
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path


def _config(tmp_path, **kw):
    base = dict(images=tmp_path / "images", labels=tmp_path / "labels.csv", out=tmp_path / "out",
                methods=("phash",), bootstrap=50, examples=2, progress=False, cache_dir=tmp_path / "cache",
                ks=(1, 5), min_finding_queries=2)
    base.update(kw)
    return runner.EvaluationConfig(**base)


def _scores(n, seed=1):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 4))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return (v @ v.T).astype(np.float32)


def test_operating_point_is_cross_fitted_across_patient_folds(tiny):
    es = load_eval_set(tiny / "images", tiny / "labels.csv")
    cfg = _config(tiny, list_k=3, target_recall=0.6)
    ctx = runner.Context(es, cfg)
    scores = _scores(len(es))
    out = runner.score_method(scores, ctx)
    top = M.rank_topk(scores, ctx.valid, ctx.depth)
    hits = np.take_along_axis(ctx.relevant, top.indices, axis=1) & top.filled
    thresholds = np.zeros(len(es))
    for f in (0, 1):
        other = ctx.fold != f
        t = M.list_threshold_for_recall(top.scores[other, :3], hits[other, :3], 0.6)
        assert out["operating_point"]["thresholds"][f"fold{f}"] == pytest.approx(t)
        thresholds[ctx.fold == f] = t
    expected = M.pairwise_metrics_at(scores, ctx.relevant, ctx.valid, thresholds)
    assert out["operating_point"]["precision"]["value"] == pytest.approx(expected["precision"], abs=1e-6)
    assert out["operating_point"]["recall"]["value"] == pytest.approx(expected["recall"], abs=1e-6)
    lm = M.list_metrics(M.list_counts_at(top.scores[:, :3], hits[:, :3], thresholds))
    assert out["operating_point"]["list_recall"]["value"] == pytest.approx(lm["list_recall"], abs=1e-6)
    # the folds group patients: both images of a patient are in one fold
    assert all(ctx.fold[2 * i] == ctx.fold[2 * i + 1] for i in range(len(es) // 2))
    # same-patient pairs are excluded
    assert not ctx.valid[0, 1] and not ctx.valid[0, 0] and ctx.valid[0, 2]
    be = M.break_even(M.sweep_counts(scores, ctx.relevant, ctx.valid).curve())
    assert out["break_even"]["f1"]["value"] == pytest.approx(be["f1"], abs=1e-6)
    assert set(out["per_source"]) == {"s1", "s2"} and "A" in out["per_finding"]


def test_finding_relevance_keeps_queries_with_the_finding(tiny):
    es = load_eval_set(tiny / "images", tiny / "labels.csv")
    ctx = runner.Context(es, _config(tiny, relevance="finding:B"))
    assert [es.labels[i] for i in ctx.queries] == [row for row in LABELS if "B" in row]
    assert ctx.relevant.shape == (len(ctx.queries), len(es))


def test_validation_split_of_the_bundle_restricts_every_method(tiny, monkeypatch):
    class FakeBundle:
        name, fingerprint = "fake", "f00"
        metadata = {"split": {"validation_patients": ["p0", "p1", "p2", "p3"]}}

    monkeypatch.setattr(runner, "resolve_cnn_bundle", lambda spec: FakeBundle())

    def fake_compute(spec, eval_set, options, bundle=None):
        return MethodOutput(spec, scores=_scores(len(eval_set), seed=len(spec.key)), info={"fake": True})

    monkeypatch.setattr(runner, "compute", fake_compute)
    results = runner.run_evaluation(_config(tiny, methods=("cnn:fake", "phash")))
    assert results["data"]["images"] == 8  # four validation patients, two images each
    assert any("validation patients" in note for note in results["data"]["notes"])
    page = (tiny / "out" / "index.html").read_text()
    assert "validation patients" in page
    saved = json.loads((tiny / "out" / "results.json").read_text())
    assert saved["wall_seconds_with_report"] >= saved["wall_seconds"]
    assert (tiny / "out" / "summary.md").read_text().startswith("8 images")


def test_method_names_expand_and_reject_unknown():
    from medsim.errors import MedsimError

    specs, _ = expand_methods(["phash", "hash", "orb"])
    assert [s.key for s in specs] == ["phash", "dhash", "orb"]
    with pytest.raises(MedsimError):
        expand_methods(["resnet"])


def test_nih_per_finding_macro_and_random_baseline_in_the_first_table(tmp_path):
    """NIH images (nih, nih2) with NIH findings, an RSNA image (never a query nor gallery of the NIH figure) and a
    kermany image: the macro equals metrics.finding_ap on the NIH images alone, and the report's first table shows
    it beside the random ranking."""
    from PIL import Image

    from medsim.evaluate.report import markdown_summary, write_report

    rows = [("nih", "Mass"), ("nih", "Mass"), ("nih2", "Mass|Effusion"), ("nih2", "Effusion"), ("nih", "Effusion"),
            ("nih", "No Finding"), ("rsna", "Mass"), ("kermany", "Effusion")]
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "labels", "patient_id", "source"])
        writer.writeheader()
        for i, (source, labels) in enumerate(rows):
            Image.fromarray(rng.integers(0, 255, size=(32, 32), dtype=np.uint8)).save(tmp_path / f"images/{i}.png")
            writer.writerow({"path": f"images/{i}.png", "labels": labels, "patient_id": f"p{i}", "source": source})
    es = load_eval_set(tmp_path / "images", tmp_path / "labels.csv")
    ctx = runner.Context(es, _config(tmp_path, min_finding_queries=2))
    scores = _scores(len(es), seed=3)
    out = runner.score_method(scores, ctx)
    nf = out["nih_findings"]
    nih = [i for i, s in enumerate(es.sources) if s in ("nih", "nih2")]
    lab = [es.labels[i] for i in nih]
    valid = ~M.exclusion_mask(np.arange(len(nih)), np.arange(len(nih)), [es.patients[i] for i in nih],
                              [es.patients[i] for i in nih])
    fa = M.finding_ap(M.rank_topk(scores[np.ix_(nih, nih)], valid, 10), lab, lab, valid, M.NIH_FINDINGS, k=10,
                      min_queries=2)
    assert sorted(nf["findings"]) == ["Effusion", "Mass"] and fa.findings == ["Effusion", "Mass"]
    assert nf["macro"] == pytest.approx(fa.macro(), abs=1e-6)
    assert nf["random_macro"] == pytest.approx(fa.random_macro(), abs=1e-6)
    assert nf["findings"]["Mass"]["queries"] == 3  # the RSNA Mass image is not a query
    assert "share" in out["same_source_cross"]
    results = {"created_at": "now", "command": "test", **ctx.summary(), "notes": [],
               "methods": [{"key": "phash", "title": "pHash", "family": "hash", "available": True, **out}]}
    results["data"]["items"] = [{"path": it.rel_path, "labels": list(it.labels), "patient_id": it.patient_id,
                                 "source": it.source} for it in es.items]
    md = markdown_summary(results)
    assert "NIH per-finding mAP@10 (macro) | random ranking" in md
    assert f"{fa.random_macro():.3f}" in md
    (tmp_path / "out").mkdir()
    write_report(results, tmp_path / "out", images_root=tmp_path)
    html = (tmp_path / "out" / "index.html").read_text()
    first_table = html.split("<table>")[1]
    assert "NIH per-finding mAP@10 (macro)" in first_table and f"{fa.random_macro():.3f}" in first_table

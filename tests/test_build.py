"""build-index, query and info end to end on the real sample PACS export and real chest X-ray JPEGs."""

import csv
import re
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from medsim.build import build_index
from medsim.cli import main
from medsim.index import CaseIndex
from medsim.ingest import LabelTable

from conftest import SAMPLE_DIR, SHARED_CXR, SHARED_DICOM, sample_manifest


def test_build_sorts_every_sample_file_into_its_outcome(sample_index):
    path, report = sample_index
    assert report.indexed == 16 and report.total_cases == 16
    # 3 non-image files of the sample + its manifest.json; the labels file given with --labels is not input
    assert dict(report.skipped) == {"not-an-image": 4, "not-chest-radiograph": 1, "duplicate-sop-uid": 1}
    assert dict(report.failed) == {"corrupt": 1}
    assert report.failures[0].path.endswith(next(f["path"] for f in sample_manifest()["files"]
                                                 if f["expected"] == "fail:corrupt"))
    assert "images/s" in report.summary_lines()[-1]
    with CaseIndex.open(path) as index:
        stats = index.stats()
        assert stats["patients"] == 15
        assert stats["labels"] == {"Bacterial": 8, "No Finding": 8, "Pneumonia": 8}
        expected = {f["sop_uid"]: f for f in sample_manifest()["files"] if f["expected"] == "index"}
        for case in index.cases():
            assert case.patient_id == expected[case.sop_uid]["patient_id"]
            assert "|".join(case.labels) == expected[case.sop_uid]["labels"]
            assert case.pixel_hash


def test_rerun_reads_only_new_files(sample_index, bundle, tmp_path):
    path, _ = sample_index
    copy = tmp_path / "index-copy"
    shutil.copytree(path, copy)
    report = build_index(SAMPLE_DIR, copy, bundle, labels=LabelTable.from_csv(SAMPLE_DIR / "labels.csv"),
                         workers=0, progress=False)
    assert report.indexed == 0 and report.unchanged == 23 and report.total_cases == 16
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(SHARED_DICOM / "nih_gcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm", extra / "x")
    report = build_index(extra, copy, bundle, workers=0, progress=False)
    assert report.indexed == 1 and report.total_cases == 17


@pytest.mark.slow
def test_killed_build_resumes_without_losing_or_repeating_work(tmp_path):
    index = tmp_path / "idx"
    cmd = [sys.executable, "-m", "medsim.cli", "build-index", str(SAMPLE_DIR), "--index", str(index),
           "--labels", str(SAMPLE_DIR / "labels.csv"), "--model", "imagenet", "--workers", "0", "--batch-size", "2",
           "--no-progress"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    committed = 0
    while time.time() < deadline and process.poll() is None:
        if (index / "catalog.sqlite").exists():
            try:
                db = sqlite3.connect(f"file:{index / 'catalog.sqlite'}?mode=ro", uri=True, timeout=1)
                committed = db.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
                db.close()
            except sqlite3.Error:
                committed = 0
            if committed >= 4:
                break
        time.sleep(0.05)
    assert process.poll() is None, "the build finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(cmd + ["--report", str(tmp_path / "report.json")], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["total_cases"] == 16
    assert 0 < report["indexed"] <= 16 - committed
    with CaseIndex.open(index) as reopened:
        assert len({c.sop_uid for c in reopened.cases()}) == 16
        assert reopened.search(reopened.vectors()[1][0], k=1, exclude_patient=None)[0].score > 0.999


def test_query_excludes_the_query_patient(sample_index, capsys):
    path, _ = sample_index
    rows = [r for r in csv.DictReader(open(SAMPLE_DIR / "labels.csv")) if r["expected"] == "index"]
    by_patient = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], []).append(row)
    first, second = next(v for v in by_patient.values() if len(v) == 2)
    assert main(["query", str(SAMPLE_DIR / first["path"]), "--index", str(path), "-k", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["query"]["indexed"] is True and result["query"]["patient_id"] == first["patient_id"]
    assert len(result["results"]) == 14  # 16 cases - the query patient's 2
    assert first["patient_id"] not in {r["patient_id"] for r in result["results"]}
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True)
    assert main(["query", str(SAMPLE_DIR / first["path"]), "--index", str(path), "-k", "20", "--json",
                 "--include-same-patient"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert second["sop_uid"] in {r["sop_uid"] for r in result["results"]}
    assert first["sop_uid"] not in {r["sop_uid"] for r in result["results"]}  # never the query itself


def test_query_of_a_file_that_is_not_indexed_embeds_it(sample_index, capsys):
    path, _ = sample_index
    siim = SHARED_DICOM / "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    assert main(["query", str(siim), "--index", str(path), "-k", "3"]) == 0
    out = capsys.readouterr().out
    ranked = [line for line in out.splitlines() if re.match(r"^\s+\d+\s+-?\d\.\d{3}\s", line)]
    assert "embedded now" in out and len(ranked) == 3


def test_info_prints_size_model_and_vocabulary(sample_index, capsys):
    path, _ = sample_index
    assert main(["info", "--index", str(path)]) == 0
    out = capsys.readouterr().out
    assert "16 images" in out and "15 patients" in out and "vgg16" in out.lower()
    assert "Pneumonia" in out and "skipped:not-an-image: 4" in out and "failed:corrupt: 1" in out


def test_an_index_refuses_another_model(sample_index, tmp_path, capsys):
    path, _ = sample_index
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    assert main(["build-index", str(SAMPLE_DIR), "--index", str(copy), "--model", "imagenet-gem",
                 "--no-progress"]) == 2
    assert "refusing vectors from model" in capsys.readouterr().err
    siim = SHARED_DICOM / "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    assert main(["query", str(siim), "--index", str(copy), "--model", "imagenet-gem"]) == 2
    assert "did not build index" in capsys.readouterr().err
    with CaseIndex.open(copy) as index:
        assert len(index) == 16


def test_image_folder_with_labels_indexes_the_same_way(bundle, tmp_path, capsys):
    rows = list(csv.DictReader(open(SHARED_CXR / "labels.csv")))
    picked = [r for r in rows if r["source"] == "kermany"][:6] + [r for r in rows if r["source"] == "nih"][:6]
    folder = tmp_path / "images"
    folder.mkdir()
    for row in picked:
        shutil.copy(SHARED_CXR / row["path"], folder / os.path.basename(row["path"]))
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        for row in picked:
            writer.writerow(dict(row, path=os.path.basename(row["path"])))
    index = tmp_path / "idx"
    assert main(["build-index", str(folder), "--index", str(index), "--labels", str(folder / "labels.csv"),
                 "--model", "imagenet", "--workers", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "indexed 12 new image(s)" in out and "skipped 0" in out  # the labels file is metadata, not input
    with CaseIndex.open(index) as idx:
        cases = {os.path.basename(c.source_path): c for c in idx.cases()}
        for row in picked:
            case = cases[os.path.basename(row["path"])]
            assert case.patient_id == row["patient_id"] and "|".join(case.labels) == row["labels"]
            assert case.attributes["source"] == row["source"] and case.sop_uid.startswith("2.25.")
    query = folder / os.path.basename(picked[0]["path"])
    assert main(["query", str(query), "--index", str(index), "-k", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["query"]["indexed"] is True and result["query"]["patient_id"] == picked[0]["patient_id"]
    assert all(r["patient_id"] != picked[0]["patient_id"] for r in result["results"])


def test_exit_status(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["build-index", str(empty), "--index", str(tmp_path / "i"), "--model", "imagenet",
                 "--no-progress"]) == 1
    assert main(["build-index", str(tmp_path / "missing"), "--index", str(tmp_path / "i2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["info", "--index", str(tmp_path / "nothing")]) == 2


def test_unreadable_folder_is_reported_and_the_rest_indexed(bundle, tmp_path, monkeypatch):
    """Permissions cannot deny root, so the folder's listing fails the way os.walk reports a denied folder."""
    source = tmp_path / "export"
    (source / "locked").mkdir(parents=True)
    (source / "open").mkdir()
    shutil.copy(SHARED_DICOM / "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
                source / "open" / "a")
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = build_index(source, tmp_path / "idx", bundle, workers=0, progress=False)
    assert report.indexed == 1
    assert dict(report.failed) == {"unreadable": 1}
    assert report.failures[0].path.endswith("locked") and "Permission denied" in report.failures[0].detail


def test_default_workers_size_up_hostile_files_without_reading_them(tmp_path):
    """default_workers() reads a few headers of the source before the workers start, in the main process: on the
    hostile corpus (deflate bombs, huge headers, lying lengths, truncations) it walks each file as the reader does
    (structure first), sizes up the sound ones, skips the rest, and never allocates what a file claims."""
    import tracemalloc

    from hostile_corpus import build_corpus

    from medsim.build import default_workers, estimated_worker_ms

    build_corpus(tmp_path / "hostile", non_utf8_name=False)
    files = sorted(str(p) for p in (tmp_path / "hostile").rglob("*") if p.is_file())
    tracemalloc.start()
    try:
        estimates = [estimated_worker_ms(f) for f in files]
        workers = default_workers(files, cores=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    sized = [ms for ms in estimates if ms is not None]
    assert len(files) > 100 and 0 < len(sized) < len(files)  # the valid ones sized, the broken ones left out
    assert all(0 <= ms < 10_000 for ms in sized) and workers in (1, 2)
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"

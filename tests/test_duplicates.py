"""`medsim duplicates` and `build-index --skip-duplicates` on real chest X-rays.

Copies are made from real images (sample_data/ DICOM and ../shared/data/cxr PNG/JPEG) by the generator in
benchmarks/duplicates_eval.py: new UIDs, lossless re-encodes, header-only window changes (exact: same stored pixels),
resizes, JPEG re-compression, baked-in window/level and gamma, 12-bit DICOM with another window, combinations
(near-duplicates); every 10th copy carries another patient's ID. One index (~280 images, >= 200 (original, copy)
pairs, plus serial images of two hannover patients: different images of one patient) serves most tests.
The full-data numbers come from the benchmark (docs/duplicates.md).
"""

import csv
import importlib.util
import json
import re
import shutil
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from medsim.build import build_index
from medsim.cli import main
from medsim.duplicates import (DIFFERENT_PATIENT, EXACT, NEAR, PHASH_HEX, SAME_PATIENT, UNKNOWN_PATIENT, Thresholds,
                               find_duplicates, hamming, patient_relation, perceptual_hash, write_csv, write_html)
from medsim.errors import SKIP_REASONS, MedsimError
from medsim.index import Case, CaseIndex
from medsim.ingest import LabelTable, read_any

from conftest import ROOT, SAMPLE_DIR, SHARED_CXR, sample_manifest

pytestmark = pytest.mark.slow
_spec = importlib.util.spec_from_file_location("duplicates_eval", ROOT / "benchmarks" / "duplicates_eval.py")
gen = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("duplicates_eval", gen)
_spec.loader.exec_module(gen)

N_BASES = 50
COPIES_PER_BASE = 4
HANNOVER_PATIENTS = 2
HANNOVER_IMAGES_PER_PATIENT = 8
SAMPLE_ORIGINALS = ("KERMANY-0CC42119", "KERMANY-3F1504E9", "KERMANY-D1849D79")  # JPEG-LL 16-bit M1, RLE, baseline
METRICS_FILE = ROOT / "test-output" / "duplicates-test-metrics.json"


@pytest.fixture(scope="module")
def bundle():
    from medsim.model import resolve_bundle

    return resolve_bundle("imagenet")


def _sample_copies(folder: Path) -> list[dict]:
    """Copies of a few sample DICOMs: new UIDs, decompressed (another transfer syntax), header-only rewindow
    (exact); resized and JPEG re-compressed display pixels (near). Plus the sample patient with two images."""
    import pydicom
    from pydicom.uid import generate_uid

    files = [f for f in sample_manifest()["files"] if f["expected"] == "index"]
    chosen = [f for f in files if f["patient_id"] in SAMPLE_ORIGINALS]
    chosen += [f for f in files if f["patient_id"] == "KERMANY-12917FD6"]  # two different images of one patient
    members = []
    rng = np.random.default_rng(3)
    for f in chosen:
        original = folder / "sample" / f["path"]
        original.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE_DIR / f["path"], original)
        members.append({"path": original, "family": f["path"], "kind": "original", "expected": "",
                        "patient_id": f["patient_id"]})
        if f["patient_id"] not in SAMPLE_ORIGINALS:
            continue
        stem = folder / "sample-copies" / f["patient_id"]
        stem.parent.mkdir(parents=True, exist_ok=True)

        def renewed(ds):
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            return ds

        ds = renewed(pydicom.dcmread(original))
        path = Path(f"{stem}-new-uids.dcm")
        ds.save_as(path)
        members.append({"path": path, "family": f["path"], "kind": "dicom-new-uids", "expected": EXACT})
        ds = renewed(pydicom.dcmread(original))
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        ds.WindowCenter, ds.WindowWidth = 0.4 * float(2 ** ds.BitsStored), 0.5 * float(2 ** ds.BitsStored)
        path = Path(f"{stem}-decompressed-rewindowed.dcm")
        ds.save_as(path)
        members.append({"path": path, "family": f["path"], "kind": "dicom-reencode-rewindow", "expected": EXACT})
        display = np.clip(np.rint(read_any(original).pixels * 255), 0, 255).astype(np.uint8)
        path = gen.write_dicom(gen._resize(display, 0.5), Path(f"{stem}-resized-capture"), f["patient_id"])
        members.append({"path": path, "family": f["path"], "kind": "resize", "expected": NEAR})
        path = gen.make_variant("jpeg", display, Path(f"{stem}-jpeg"), rng, f["patient_id"])
        members.append({"path": path, "family": f["path"], "kind": "jpeg", "expected": NEAR})
    return members


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, bundle):
    """One index over real originals, their generated copies and same-patient serial images."""
    folder = (tmp_path_factory.mktemp("duplicates") / "set").resolve()
    rows = gen.read_labels(SHARED_CXR)
    per_patient = defaultdict(list)
    for row in rows:
        if row["source"] == "hannover":
            per_patient[row["patient_id"]].append(row)
    serial_patients = sorted(per_patient, key=lambda p: -len(per_patient[p]))[:HANNOVER_PATIENTS]
    serial = [r for p in serial_patients for r in per_patient[p][:HANNOVER_IMAGES_PER_PATIENT]]
    bases = gen.choose_bases([r for r in rows if r["patient_id"] not in serial_patients], N_BASES, seed=7)
    eval_set = gen.build_eval_set(SHARED_CXR, folder, bases, serial, COPIES_PER_BASE, seed=7)
    sample = _sample_copies(folder)
    with open(folder / "labels.csv", "a", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        for m in sample:
            writer.writerow([m["path"].relative_to(folder).as_posix(), "", m.get("patient_id") or
                             next(s["patient_id"] for s in sample if s["family"] == m["family"]), "kermany", m["kind"]])
    for m in sample:
        eval_set.members.append(gen.Member(str(m["path"]), m["path"].relative_to(folder).as_posix(), m["family"],
                                           m["kind"], m["expected"], "", "sample", ""))
    index_path = folder.parent / "index"
    started = time.perf_counter()
    build = build_index(folder, index_path, bundle, labels=LabelTable.from_csv(folder / "labels.csv"), workers=1,
                        progress=False)
    build_seconds = time.perf_counter() - started
    assert not build.failures, build.failures
    report = find_duplicates(index_path)
    return {"folder": folder, "index": index_path, "eval_set": eval_set, "report": report, "build": build,
            "build_seconds": build_seconds, "serial_patients": serial_patients}


def _case_by_path(index_path):
    with CaseIndex.open(index_path) as index:
        return {c.source_path: c for c in index.cases()}


def _group_of(report):
    return {c.id: g for g in report.groups for c in g.cases}


# ---- the generated set -------------------------------------------------------------------------------------------


def test_generated_copies_are_found_with_precision_and_recall(dataset):
    eval_set, report = dataset["eval_set"], dataset["report"]
    scores = gen.score(eval_set, report, dataset["index"])
    scores.pop("positive_scores")
    pairs = scores["pairs"]
    METRICS_FILE.parent.mkdir(exist_ok=True)
    METRICS_FILE.write_text(json.dumps({"images": dataset["build"].total_cases,
                                        "build_seconds": round(dataset["build_seconds"], 1),
                                        "finder": report.counts(), **scores}, indent=1))
    print(f"\n{pairs['positive_pairs']} (original, copy) pairs among {dataset['build'].total_cases} images: "
          f"matched pairs precision {pairs['matched']['precision']:.3f} recall {pairs['matched']['recall']:.3f}; "
          f"groups precision {pairs['grouped']['precision']:.3f} recall {pairs['grouped']['recall']:.3f}; "
          f"per kind " + ", ".join(f"{k} {v['recall']:.2f}" for k, v in scores["per_kind"].items()))
    assert pairs["positive_pairs"] >= 200
    for kind, stats in scores["per_kind"].items():
        if gen.VARIANT_KINDS.get(kind) == EXACT or kind.startswith("dicom-new") or "rewindow" in kind:
            assert stats["recall"] == 1.0, (kind, stats)  # same stored pixels: always found, always exact
    assert pairs["matched"]["recall"] >= 0.93, scores["missed"]
    assert pairs["grouped"]["recall"] >= 0.95, scores["missed"]
    assert pairs["matched"]["precision"] >= 0.95, scores["false_positives"]
    assert pairs["grouped"]["precision"] >= 0.95, scores["false_positives"]


def test_exact_means_same_stored_pixels_and_same_patient_images_are_never_exact(dataset):
    report, cases = dataset["report"], _case_by_path(dataset["index"])
    by_id = {c.id: c for c in cases.values()}
    for g in report.groups:
        for p in g.pairs:
            if p.kind == EXACT:
                assert by_id[p.a].pixel_hash == by_id[p.b].pixel_hash
            else:
                assert by_id[p.a].pixel_hash != by_id[p.b].pixel_hash
                assert p.cosine >= report.thresholds.min_cosine and p.hamming <= report.thresholds.max_hamming
    # different images of one patient: the hannover serial images and the sample patient with two studies
    originals = [m for m in dataset["eval_set"].members if m.kind == "original"]
    by_patient = defaultdict(list)
    for m in originals:
        case = cases[m.path]
        by_patient[case.patient_id].append(case)
    multi = {p: v for p, v in by_patient.items() if len(v) > 1}
    assert set(dataset["serial_patients"]) <= set(multi) and "KERMANY-12917FD6" in multi
    exact_pairs = {(p.a, p.b) for g in report.groups for p in g.pairs if p.kind == EXACT}
    checked = 0
    for images in multi.values():
        for i, x in enumerate(images):
            for y in images[i + 1:]:
                checked += 1
                assert x.pixel_hash != y.pixel_hash
                assert (min(x.id, y.id), max(x.id, y.id)) not in exact_pairs
    assert checked >= 2 * 28


def test_each_match_is_labelled_with_the_patients_relation(dataset):
    eval_set, report = dataset["eval_set"], dataset["report"]
    cases, group_of = _case_by_path(dataset["index"]), _group_of(dataset["report"])
    mislabelled = [m for m in eval_set.members if m.identity_error]
    assert len(mislabelled) >= 15
    found = 0
    for m in mislabelled:  # a copy filed under another patient: when found, its group must say different-patient
        base = next(b for b in eval_set.members if b.kind == "original" and b.family == m.family)
        group = group_of.get(cases[m.path].id)
        if group is None or group is not group_of.get(cases[base.path].id):
            continue  # a missed copy (counted by the recall test)
        found += 1
        assert group.patients == DIFFERENT_PATIENT, m.rel
        assert any(p.patients == DIFFERENT_PATIENT for p in group.pairs)
    assert found >= 0.9 * len(mislabelled)
    for g in report.groups:
        for p in g.pairs:
            a, b = next(c for c in g.cases if c.id == p.a), next(c for c in g.cases if c.id == p.b)
            assert p.patients == patient_relation([a.patient_id, b.patient_id])
    assert {g.patients for g in report.groups} >= {SAME_PATIENT, DIFFERENT_PATIENT}
    # different-patient groups (worth a look) come first
    order = [g.patients == DIFFERENT_PATIENT for g in report.groups]
    assert order == sorted(order, reverse=True)


def test_cli_writes_csv_and_offline_html(dataset, tmp_path, capsys):
    out, page = tmp_path / "dups.csv", tmp_path / "dups.html"
    assert main(["duplicates", "--index", str(dataset["index"]), "--out", str(out), "--html", str(page),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"scanned \d+ case\(s\)", text) and "near-duplicate" in text and str(out) in text
    rows = list(csv.DictReader(open(out, newline="")))
    report = dataset["report"]
    assert len(rows) == len(report.pairs)
    assert {r["kind"] for r in rows} == {EXACT, NEAR}
    assert {r["patients"] for r in rows} <= {SAME_PATIENT, DIFFERENT_PATIENT, UNKNOWN_PATIENT}
    sizes = Counter(r["group"] for r in rows)
    assert all(int(r["group_size"]) >= 2 for r in rows) and len(sizes) == len(report.groups)
    html = page.read_text()
    n_images = sum(len(g.cases) for g in report.groups)
    assert html.count("src='data:image/jpeg;base64,") == n_images  # every thumbnail inline, from the source file
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", html)  # nothing fetched from elsewhere
    some = report.groups[0].cases[0]
    assert some.sop_uid in html and "P-" in html
    patient_ids = {c.patient_id for g in report.groups for c in g.cases if c.patient_id}
    assert not any(f">{p}<" in html or f" {p}<" in html for p in patient_ids)  # pseudonymous by default
    assert main(["duplicates", "--index", str(dataset["index"]), "--out", str(out), "--html", str(page),
                 "--show-patient-ids", "--html-max-groups", "3", "--min-cosine", "0.99", "--max-hamming", "2",
                 "--no-progress"]) == 0
    capsys.readouterr()
    html = page.read_text()
    assert "Showing the first 3 of" in html and html.count("<section") == 3
    strict = list(csv.DictReader(open(out, newline="")))
    assert 0 < len(strict) < len(rows)  # stricter thresholds: fewer near-duplicates, the exact ones stay
    assert all(r["kind"] == EXACT or (float(r["cosine"]) >= 0.99 and int(r["phash_distance"]) <= 2)
               for r in strict)
    assert main(["duplicates", "--index", str(dataset["index"]), "--out", str(out), "--max-hamming", "300"]) == 2
    assert "--max-hamming" in capsys.readouterr().err


def test_an_index_without_stored_phashes_still_works(dataset, tmp_path):
    """An index built before pHashes were stored: read-only it works (missing hashes of candidates are computed
    from the source files); opened for writing it gains the column (ALTER TABLE ADD COLUMN), rows kept."""
    old = tmp_path / "old-index"
    shutil.copytree(dataset["index"], old)
    db = sqlite3.connect(old / "catalog.sqlite")
    db.execute("ALTER TABLE cases DROP COLUMN phash")
    db.commit()
    db.close()
    report = find_duplicates(old)
    assert report.hashes_computed > 0 and report.unconfirmed == 0
    key = lambda r: sorted(tuple(sorted(c.sop_uid for c in g.cases)) for g in r.groups)  # noqa: E731
    assert key(report) == key(dataset["report"])
    with CaseIndex.open(old) as index:
        assert all(c.phash == "" for c in index.cases()[:5])
    with CaseIndex.open(old, writable=True) as index:
        n = len(index)
    db = sqlite3.connect(old / "catalog.sqlite")
    assert "phash" in {row[1] for row in db.execute("PRAGMA table_info(cases)")}
    assert db.execute("SELECT COUNT(*) FROM cases WHERE phash = ''").fetchone()[0] == n
    db.close()


def test_a_catalog_holds_hashes_of_one_method_and_both_methods_find_the_same_pairs(dataset, bundle, tmp_path):
    """Issue 14: a new catalog stores the pHash of the prepared model input (``area-224``) and records the method; a
    catalog from before (no method recorded) holds hashes of the whole display image and keeps them: a case added
    to it stores none, and the scan computes that one from its source file by the catalog's method. With the old
    hashes the scan finds the same groups as with the new ones."""
    from PIL import Image

    from medsim.build import read_for_index
    from medsim.dicom import ChestPolicy
    from medsim.phash import LEGACY_METHOD, PHASH_META_KEY, perceptual_hash_by

    policy = ChestPolicy(any_body_part=True, any_modality=True)
    assert dataset["report"].phash_method == "area-224" == dataset["report"].counts()["phash_method"]
    legacy = tmp_path / "legacy-index"
    shutil.copytree(dataset["index"], legacy)
    with CaseIndex.open(dataset["index"]) as index:
        assert index.meta[PHASH_META_KEY] == "area-224"
        cases = index.cases()
    db = sqlite3.connect(legacy / "catalog.sqlite")
    for case in cases:
        pixels = read_for_index(case.source_path, policy, 224).pixels
        if case.id % 10 == 0:  # the stored hash is the area method's of the pixels build-index read
            assert case.phash == perceptual_hash_by("area-224", pixels), case.source_path
        db.execute("UPDATE cases SET phash = ? WHERE id = ?", (perceptual_hash_by(LEGACY_METHOD, pixels), case.id))
    db.execute("DELETE FROM meta WHERE key = ?", (PHASH_META_KEY,))
    db.commit()
    db.close()
    before = find_duplicates(legacy)
    key = lambda r: sorted(tuple(sorted(c.sop_uid for c in g.cases)) for g in r.groups)  # noqa: E731
    assert before.phash_method == LEGACY_METHOD and before.hashes_computed == 0
    assert key(before) == key(dataset["report"])

    original = next(c for c in cases if c.source_path.endswith((".jpg", ".png")))
    gray = np.clip(np.rint(read_any(original.source_path).pixels * 255), 0, 255).astype(np.uint8)
    added = tmp_path / "added"
    added.mkdir()
    Image.fromarray(gen._resize(gray, 0.5)).save(added / "resized-copy.png")
    build_index(added, legacy, bundle, workers=0, progress=False)
    with CaseIndex.open(legacy) as index:
        assert PHASH_META_KEY not in index.meta
        new_case = next(c for c in index.cases() if c.source_path.endswith("resized-copy.png"))
    assert new_case.phash == ""  # not an area hash among display hashes
    after = find_duplicates(legacy)
    assert after.phash_method == LEGACY_METHOD and after.hashes_computed >= 1 and after.unconfirmed == 0
    pair = next(p for p in after.pairs if new_case.id in (p.a, p.b) and original.id in (p.a, p.b))
    assert pair.kind == NEAR
    assert pair.hamming == hamming(perceptual_hash(read_any(new_case.source_path).pixels),
                                   perceptual_hash(read_any(original.source_path).pixels))


# ---- build-index --skip-duplicates -------------------------------------------------------------------------------


def test_build_skip_duplicates_keeps_exact_copies_out_and_reports_them(dataset, tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    members = [m for m in dataset["eval_set"].members]
    base = next(m for m in members if m.kind == "original" and m.family and m.source != "sample")
    exact = [m for m in members if m.family == base.family and m.expected == EXACT]
    near = [m for m in members if m.family == base.family and m.expected == NEAR]
    assert exact and near
    sample_base = next(m for m in members if m.source == "sample" and m.kind == "original")
    sample_exact = next(m for m in members if m.family == sample_base.family and m.kind == "dicom-new-uids")
    for i, m in enumerate([base, *exact, near[0], sample_base, sample_exact]):
        shutil.copy(m.path, folder / f"{i:02d}-{Path(m.path).name}")
    index = tmp_path / "idx"
    assert main(["build-index", str(folder), "--index", str(index), "--model", "imagenet", "--workers", "0",
                 "--skip-duplicates", "--no-progress", "--report", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    n_dups = len(exact) + 1
    assert f"duplicate-pixels: {n_dups}" in out and out.count("DUPLICATE ") == n_dups
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["indexed"] == 3 and report["skipped"] == {"duplicate-pixels": n_dups}
    assert len(report["duplicates"]) == n_dups and all("same pixels as" in d["detail"] for d in report["duplicates"])
    assert "duplicate-pixels" in SKIP_REASONS
    with CaseIndex.open(index) as idx:
        assert len({c.pixel_hash for c in idx.cases()}) == len(idx) == 3
        ledger = idx.file_records("skipped")
        assert {r.reason for r in ledger} == {"duplicate-pixels"} and len(ledger) == n_dups
        assert all(len(c.phash) == PHASH_HEX for c in idx.cases())  # stored at ingest
    # a later run: a copy of something already indexed is skipped against the index
    later = tmp_path / "later"
    later.mkdir()
    shutil.copy(exact[0].path, later / "again")
    from medsim.model import resolve_bundle

    again = build_index(later, index, resolve_bundle("imagenet"), workers=0, progress=False, skip_duplicates=True)
    assert again.indexed == 0 and dict(again.skipped) == {"duplicate-pixels": 1}
    assert "indexed SOP" in again.duplicates[0].detail
    # without the flag the copy is indexed (and `medsim duplicates` reports it as exact)
    plain = build_index(later, tmp_path / "idx2", resolve_bundle("imagenet"), workers=0, progress=False)
    assert plain.indexed == 1 and not plain.skipped


# ---- scale and units ---------------------------------------------------------------------------------------------


def test_scan_uses_the_ann_index_in_batches_and_scales_linearly(tmp_path):
    """5,000 synthetic cases (random 64-d vectors and 256-bit pHashes) with planted exact and near copies: every planted
    pair found, nothing else, from batched queries of the ANN index without an N x N matrix (the timing at 250k
    cases is benchmarks/duplicates_scale.py)."""
    rng = np.random.default_rng(0)
    n, dim = 5_000, 64
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    hashes = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    pixel = [f"px{i}" for i in range(n)]
    planted_near, planted_exact = [], []
    for i in range(0, 600, 3):  # i+1: near copy of i (noise, 3 pHash bits flipped); i+2: exact copy of i
        vectors[i + 1] = vectors[i] + rng.normal(scale=0.05, size=dim)
        hashes[i + 1] = hashes[i]
        hashes[i + 1, 0] ^= 0b10101
        vectors[i + 2], hashes[i + 2], pixel[i + 2] = vectors[i], hashes[i], pixel[i]
        planted_near.append((i, i + 1))
        planted_exact.append((i, i + 2))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cases = [Case(sop_uid=f"1.2.{i}", series_uid="1.3", study_uid="1.4", patient_id=f"p{i % 1000}",
                  source_path=f"/nowhere/{i}.dcm", pixel_hash=pixel[i], phash=hashes[i].tobytes().hex())
             for i in range(n)]
    with CaseIndex.create(tmp_path / "idx", model_fingerprint="fp", model_name="synthetic", dim=dim, M=16,
                          ef_construction=64) as index:
        index.add(cases, vectors, "fp")
    started = time.perf_counter()
    report = find_duplicates(tmp_path / "idx", Thresholds(min_cosine=0.9, max_hamming=6), batch_size=512)
    seconds = time.perf_counter() - started
    print(f"\nscanned {n} synthetic cases in {seconds:.1f} s")
    sop = lambda i: f"1.2.{i}"  # noqa: E731
    found = {(p.kind, tuple(sorted((next(c.sop_uid for c in g.cases if c.id == p.a),
                                    next(c.sop_uid for c in g.cases if c.id == p.b)))))
             for g in report.groups for p in g.pairs}
    expected = {(NEAR, tuple(sorted((sop(a), sop(b))))) for a, b in planted_near}
    expected |= {(EXACT, tuple(sorted((sop(a), sop(b))))) for a, b in planted_exact}
    # the near copy is also a near-duplicate of the exact copy (same vector and hash as the original)
    expected |= {(NEAR, tuple(sorted((sop(b), sop(a + 2))))) for a, b in planted_near}
    assert found == expected
    assert len(report.groups) == 200 and all(len(g.cases) == 3 for g in report.groups)
    assert seconds < 60


def test_perceptual_hash_is_the_baselines_phash_and_survives_copies():
    from medsim.baselines import PerceptualHash

    image = read_any(SHARED_CXR / "images" / "nih" / "00000218_000.jpg").pixels
    h = perceptual_hash(image)
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    bits = PerceptualHash("phash", hash_size=16).fit().transform([image])[0]
    assert f"{int(''.join('1' if b else '0' for b in bits), 2):064x}" == h
    gray = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    default = Thresholds().max_hamming
    assert hamming(h, perceptual_hash(gen._resize(gray, 0.5))) <= default // 4
    assert hamming(h, perceptual_hash(np.clip(gray * 1.2 - 20, 0, 255).astype(np.uint8))) <= default // 4
    other = read_any(SHARED_CXR / "images" / "kermany" / "IM-0117-0001.jpg").pixels
    assert hamming(h, perceptual_hash(other)) > 2 * default


def test_units():
    assert hamming("0000000000000000", "000000000000000f") == 4
    assert patient_relation(["a", "a"]) == SAME_PATIENT
    assert patient_relation(["a", "b"]) == DIFFERENT_PATIENT
    assert patient_relation(["a", None]) == UNKNOWN_PATIENT
    assert patient_relation(["a", None, "b"]) == DIFFERENT_PATIENT
    with pytest.raises(MedsimError):
        Thresholds(max_hamming=257)
    with pytest.raises(MedsimError):
        Thresholds(min_cosine=1.5)
    with pytest.raises(MedsimError):
        Thresholds(neighbours=0)


def test_write_functions_on_an_empty_report(tmp_path):
    from medsim.duplicates import DuplicateReport

    report = DuplicateReport(index="x", thresholds=Thresholds(), cases=3)
    write_csv(report, tmp_path / "a.csv")
    assert open(tmp_path / "a.csv").read().startswith("group,group_size,")
    assert write_html(report, tmp_path / "a.html") == 0
    assert "0 groups" in (tmp_path / "a.html").read_text()


def test_html_escapes_what_the_index_holds(tmp_path):
    """The page comes from an autoescaping Jinja2 template: UIDs, labels and patient IDs are text, never markup."""
    from medsim.duplicates import DuplicateReport, Group, Pair

    cases = [Case(sop_uid=f"1.2.<b>{i}</b>", series_uid="1.3", study_uid="1.4'\"", patient_id="<script>p</script>",
                  source_path=f"/nowhere/{i}.dcm", labels=("A&B", "<i>x</i>"), view="PA", id=i) for i in (1, 2)]
    group = Group(1, cases, [Pair(1, 2, NEAR, SAME_PATIENT, 0.91234, 12)])
    report = DuplicateReport(index="<idx>", thresholds=Thresholds(), cases=2, groups=[group])
    assert write_html(report, tmp_path / "a.html", show_patient_ids=True) == 1
    page = (tmp_path / "a.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;p&lt;/script&gt;" in page
    assert "1.2.&lt;b&gt;1&lt;/b&gt;" in page and "A&amp;B, &lt;i&gt;x&lt;/i&gt;" in page and "&lt;idx&gt;" in page
    assert "<td>0.9123</td><td>12</td>" in page and "no thumbnail<br>ReadFailure" in page

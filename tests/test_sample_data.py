"""Checks for sample_data/build_sample_data.py and the PACS export it writes.

The builder takes ~5 s once its source wheel is cached (sample_data/.cache), so a
session-scoped fixture builds a fresh tree into a temporary folder.  If the wheel
can be neither found in the cache nor downloaded, an already-built, complete
sample_data/pacs_export is used instead; failing that, the tests are skipped.
"""

from __future__ import annotations

import base64
import csv
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

ROOT = Path(__file__).resolve().parents[1]
BUILDER_PATH = ROOT / "sample_data" / "build_sample_data.py"

REQUIRED_TS = {
    "1.2.840.10008.1.2",       # implicit VR LE
    "1.2.840.10008.1.2.1",     # explicit VR LE
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",     # RLE lossless
}
SOP_CLASS_FOR_MODALITY = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}


def _load_builder():
    spec = importlib.util.spec_from_file_location("medsim_build_sample_data", BUILDER_PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def builder():
    return _load_builder()


@pytest.fixture(scope="session")
def export(builder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "pacs_export"
    try:
        rc = builder.main(["--out", str(out), "--cache", str(builder.DEFAULT_CACHE)])
        assert rc == 0
        return out
    except RuntimeError as exc:  # wheel neither cached nor downloadable
        if builder.is_complete(builder.DEFAULT_OUT):
            return builder.DEFAULT_OUT
        pytest.skip(f"sample data cannot be built here: {str(exc).splitlines()[0]}")


@pytest.fixture(scope="session")
def rows(export) -> list[dict]:
    with (export / "labels.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def manifest(export) -> dict:
    return json.loads((export / "manifest.json").read_text())


@pytest.fixture(scope="session")
def indexed(export, rows):
    """(row, dataset) for every file expected to be indexed; pixel data decoded once."""
    out = []
    for r in rows:
        if r["expected"] == "index":
            ds = pydicom.dcmread(export / r["path"])
            ds.pixel_array  # decode now, cached on the dataset  # noqa: B018
            out.append((r, ds))
    return out


def _display(ds) -> np.ndarray:
    """Modality LUT -> VOI LUT sequence or first window -> [0,1] -> MONOCHROME1 inversion."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = ds.pixel_array
    if int(ds.SamplesPerPixel) == 3:
        img = arr.astype(np.float64).mean(axis=-1)
    else:
        img = apply_modality_lut(arr, ds)
        if img.dtype.kind == "f" and np.array_equal(img, np.round(img)):
            img = img.astype(np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = apply_voi_lut(img, ds).astype(np.float64)
    img = (img - img.min()) / (img.max() - img.min())
    if ds.PhotometricInterpretation == "MONOCHROME1":
        img = 1.0 - img
    return img


def _thumb(img01: np.ndarray, n: int = 32) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img01.astype(np.float32), mode="F").resize((n, n), Image.Resampling.BOX))


# ---------------------------------------------------------------------------


def test_labels_csv_shape(export, rows, builder):
    with (export / "labels.csv").open(newline="") as f:
        assert next(csv.reader(f)) == builder.CSV_COLUMNS
    assert {r["expected"] for r in rows} <= set(builder.EXPECTED_OUTCOMES)
    for r in rows:
        assert (export / r["path"]).is_file(), r["path"]
        assert not Path(r["path"]).is_absolute()
    assert len({r["path"] for r in rows}) == len(rows)


def test_sixteen_images_fifteen_patients(rows):
    idx = [r for r in rows if r["expected"] == "index"]
    assert len(idx) == 16
    assert len({r["patient_id"] for r in idx}) == 15
    assert len({r["sop_uid"] for r in idx}) == 16
    assert len({r["study_uid"] for r in idx}) == 16  # one study per image
    assert sorted(r["labels"] for r in idx) == ["No Finding"] * 8 + ["Pneumonia|Bacterial"] * 8
    assert all(r["source"] == "kermany" and r["view"] in ("AP", "PA") for r in idx)
    # the one patient with two images has two different studies
    per_patient: dict[str, set] = {}
    for r in idx:
        per_patient.setdefault(r["patient_id"], set()).add(r["study_uid"])
    assert sorted(len(s) for s in per_patient.values()) == [1] * 14 + [2]
    # some files with and some without the .dcm extension
    exts = {Path(r["path"]).suffix for r in idx}
    assert exts == {"", ".dcm"}


def test_headers_match_labels(indexed):
    for r, ds in indexed:
        assert ds.SOPInstanceUID == r["sop_uid"] == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.StudyInstanceUID == r["study_uid"]
        assert ds.SeriesInstanceUID == r["series_uid"]
        assert ds.PatientID == r["patient_id"]
        assert ds.PatientID.startswith("KERMANY-")
        assert "person" not in str(ds.PatientName).lower() and "normal" not in str(ds.PatientName).lower()
        assert ds.SOPClassUID == SOP_CLASS_FOR_MODALITY[ds.Modality]
        assert ds.BodyPartExamined == "CHEST"
        assert ds.ViewPosition == r["view"]
        assert ds.StudyDescription == "CHEST 1 VIEW"


def test_uids_are_deterministic(manifest, builder):
    for f in manifest["files"]:
        if f["expected"] == "index":
            name = f["original"]["file"]
            assert f["sop_uid"] == builder.stable_uid("sop", name)
            assert f["study_uid"] == builder.stable_uid("study", name)
            assert f["patient_id"] == builder.pseudo_patient_id(f["original"]["patient_key"])


def test_required_variants_present(indexed):
    ts = {str(ds.file_meta.TransferSyntaxUID) for _, ds in indexed}
    assert REQUIRED_TS <= ts, REQUIRED_TS - ts
    photometric = {ds.PhotometricInterpretation for _, ds in indexed}
    assert {"MONOCHROME1", "MONOCHROME2", "RGB"} <= photometric
    rgb = [ds for _, ds in indexed if ds.PhotometricInterpretation == "RGB"]
    assert all(ds.SamplesPerPixel == 3 for ds in rgb)
    assert {8, 12, 16} <= {int(ds.BitsStored) for _, ds in indexed}
    assert any(float(ds.get("RescaleSlope", 1)) != 1 or float(ds.get("RescaleIntercept", 0)) != 0
               for _, ds in indexed)
    assert any("VOILUTSequence" in ds for _, ds in indexed)
    assert any("WindowCenter" in ds and "WindowWidth" in ds for _, ds in indexed)
    assert any(int(ds.get("PixelRepresentation", 0)) == 1 for _, ds in indexed)


def test_lossless_round_trip(indexed, manifest, builder):
    by_path = {f["path"]: f for f in manifest["files"]}
    n = 0
    for r, ds in indexed:
        f = by_path[r["path"]]
        if f["variant_details"]["lossless"]:
            assert builder.stored_sha256(ds.pixel_array) == f["stored_sha256"], r["path"]
            n += 1
    assert n >= 13


def test_display_reproduces_original(indexed, manifest):
    by_path = {f["path"]: f for f in manifest["files"]}
    for r, ds in indexed:
        orig = by_path[r["path"]]["original"]
        assert ds.Rows == orig["rows"] and ds.Columns == orig["cols"]
        disp = _display(ds)
        thumb = np.frombuffer(base64.b64decode(orig["thumb32_uint8_b64"]), dtype=np.uint8).reshape(32, 32)
        corr = np.corrcoef(_thumb(disp).ravel(), thumb.ravel().astype(np.float64))[0, 1]
        assert corr > 0.99, (r["path"], corr)
        # brightness statistics of the display image match the original 8-bit JPEG
        assert abs(disp.mean() * 255 - orig["mean"]) < 2.0, r["path"]
        assert abs(disp.std() * 255 - orig["std"]) < 2.0, r["path"]


def test_skip_and_fail_files(export, rows):
    by_expected: dict[str, list[dict]] = {}
    for r in rows:
        by_expected.setdefault(r["expected"], []).append(r)
    assert len(by_expected["skip:not-an-image"]) >= 2
    assert len(by_expected["skip:not-chest-radiograph"]) == 1
    assert len(by_expected["skip:duplicate-sop-uid"]) == 1
    assert len(by_expected["fail:corrupt"]) == 1
    assert all(r["labels"] == "" for r in rows if r["expected"] != "index")

    kinds = set()
    for r in by_expected["skip:not-an-image"]:
        p = export / r["path"]
        try:
            ds = pydicom.dcmread(p)
        except pydicom.errors.InvalidDicomError:
            kinds.add("non-dicom")
            continue
        assert "PixelData" not in ds and ds.Modality == "SR"
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11"
        kinds.add("sr")
    assert kinds == {"non-dicom", "sr"}

    ct = pydicom.dcmread(export / by_expected["skip:not-chest-radiograph"][0]["path"])
    assert ct.Modality == "CT"

    dup = by_expected["skip:duplicate-sop-uid"][0]
    originals = [r for r in rows if r["expected"] == "index" and r["sop_uid"] == dup["sop_uid"]]
    assert len(originals) == 1
    assert (export / dup["path"]).read_bytes() == (export / originals[0]["path"]).read_bytes()
    assert originals[0]["path"] < dup["path"]  # the copy sorts after the original

    bad = export / by_expected["fail:corrupt"][0]["path"]
    assert by_expected["fail:corrupt"][0]["sop_uid"] not in {r["sop_uid"] for r in rows if r["expected"] == "index"}
    with pytest.raises(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmread(bad).pixel_array  # noqa: B018


def test_manifest_provenance(manifest):
    assert manifest["source"]["package"] == "pneumonia-model-package"
    assert manifest["source"]["version"] == "0.3.0"
    assert manifest["source"]["dataset_license"] == "CC BY 4.0"
    idx = [f for f in manifest["files"] if f["expected"] == "index"]
    assert len({f["original"]["sha256"] for f in idx}) == 16
    assert all(0 < f["original"]["mean"] < 255 and f["original"]["std"] > 10 for f in idx)


def test_rerun_is_a_no_op(export, builder, capsys):
    stamp = export / builder.STAMP_NAME
    before = stamp.stat().st_mtime_ns
    assert builder.main(["--out", str(export), "--cache", str(builder.DEFAULT_CACHE)]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert stamp.stat().st_mtime_ns == before

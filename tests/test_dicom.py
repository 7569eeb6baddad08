"""Reading real DICOM chest X-rays: every sample variant decodes to the original image; every bad file gets its reason."""

import base64
import csv
import shutil

import numpy as np
import pydicom
import pytest

from medsim.dicom import ChestPolicy, read_dicom
from medsim.errors import ReadFailure, SkipFile
from medsim.ingest import read_any

from conftest import SAMPLE_DIR, SHARED_DICOM, sample_manifest


def _thumb(pixels: np.ndarray, size: int = 32) -> np.ndarray:
    """Area-mean downsample to size x size, as the sample manifest's reference thumbnails."""
    from PIL import Image

    return np.asarray(Image.fromarray((pixels * 255).astype(np.float32)).resize((size, size), Image.BOX))


def _indexable():
    return [f for f in sample_manifest()["files"] if f["expected"] == "index"]


@pytest.mark.parametrize("entry", _indexable(), ids=lambda f: f["variant"])
def test_every_sample_variant_displays_like_the_original(entry):
    radiograph = read_dicom(SAMPLE_DIR / entry["path"])
    original = entry["original"]
    reference = np.frombuffer(base64.b64decode(original["thumb32_uint8_b64"]), dtype=np.uint8).reshape(32, 32)
    assert radiograph.pixels.shape == (original["rows"], original["cols"])
    assert radiograph.pixels.dtype == np.float32
    assert 0.0 <= radiograph.pixels.min() and radiograph.pixels.max() <= 1.0
    thumb = _thumb(radiograph.pixels)
    correlation = np.corrcoef(thumb.ravel(), reference.ravel().astype(np.float64))[0, 1]
    # MONOCHROME1 read without inversion would correlate near -1; wrong windows/rescale fall well below 0.98.
    assert correlation > 0.98, (entry["variant"], correlation)
    # Brightness survives the windowing within a few grey levels of the 8-bit original.
    assert abs(radiograph.pixels.mean() * 255 - original["mean"]) < 12, entry["variant"]
    assert radiograph.sop_uid == entry["sop_uid"] and radiograph.patient_id == entry["patient_id"]
    assert radiograph.body_part == "CHEST"


def test_sample_covers_the_required_variants():
    variants = " ".join(f["variant"] for f in _indexable())
    for needed in ("jpeg-baseline", "jpeg-lossless", "jpeg2000", "rle-lossless", "implicit-vr-le", "explicit-vr-le",
                   "MONOCHROME1", "MONOCHROME2", "RGB", "8bit", "12bit", "16bit", "voi-lut-seq", "window",
                   "rescale=2/-1024"):
        assert needed in variants, needed


@pytest.mark.parametrize(
    "entry", [f for f in sample_manifest()["files"] if f["expected"].split(":")[0] in ("skip", "fail")
              and f["expected"] != "skip:duplicate-sop-uid"], ids=lambda f: f["expected"])
def test_bad_and_foreign_files_get_their_reason(entry):
    kind, reason = entry["expected"].split(":")
    expected_error = SkipFile if kind == "skip" else ReadFailure
    with pytest.raises(expected_error) as info:
        read_any(SAMPLE_DIR / entry["path"])
    assert info.value.reason == reason
    assert len(str(info.value)) < 400  # one readable line, never a pixel buffer


def test_monochrome1_is_inverted_on_the_real_siim_pair():
    normal = read_dicom(SHARED_DICOM / "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    flipped = read_dicom(SHARED_DICOM / "siim_acr_FAKE_MONOCHROME1.dcm")
    assert flipped.photometric == "MONOCHROME1"
    np.testing.assert_allclose(flipped.pixels, 1.0 - normal.pixels, atol=1e-6)
    # A chest radiograph displays lungs dark and mediastinum bright: the centre column is brighter than the lungs.
    h, w = normal.pixels.shape
    centre = normal.pixels[h // 3: 2 * h // 3, w // 2 - w // 20: w // 2 + w // 20].mean()
    lungs = normal.pixels[h // 3: 2 * h // 3, w // 5: w // 3].mean()
    assert centre > lungs + 0.1


def test_real_dx_with_empty_body_part_is_a_chest_radiograph():
    radiograph = read_dicom(SHARED_DICOM / "nih_gcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm")
    assert radiograph.modality == "DX" and radiograph.body_part == ""
    assert radiograph.pixels.shape == (1024, 1024)
    assert 0.2 < radiograph.pixels.mean() < 0.8


def _copy_with(tmp_path, source, **changes):
    ds = pydicom.dcmread(source)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    out = tmp_path / "edited.dcm"
    ds.save_as(out)
    return out


def test_policy_decides_by_modality_and_body_part(tmp_path):
    siim = SHARED_DICOM / "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    knee = _copy_with(tmp_path, siim, BodyPartExamined="KNEE")
    with pytest.raises(SkipFile) as info:
        read_dicom(knee)
    assert info.value.reason == "not-chest-radiograph"
    assert read_dicom(knee, ChestPolicy(any_body_part=True)).body_part == "KNEE"
    capture = _copy_with(tmp_path, siim, Modality="SC", BodyPartExamined="CHEST")
    assert read_dicom(capture).modality == "SC"
    mr = _copy_with(tmp_path, siim, Modality="MR")
    with pytest.raises(SkipFile):
        read_dicom(mr)
    assert read_dicom(mr, ChestPolicy(any_modality=True)).modality == "MR"


def test_huge_image_is_refused_before_decoding(tmp_path):
    siim = SHARED_DICOM / "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    with pytest.raises(ReadFailure) as info:
        read_dicom(siim, ChestPolicy(max_pixels=1000 * 1000))
    assert info.value.reason == "too-large"


def test_multiframe_and_missing_decoder_are_unsupported(tmp_path):
    siim = SHARED_DICOM / "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    multi = _copy_with(tmp_path, siim, NumberOfFrames=2)
    with pytest.raises(SkipFile) as info:
        read_dicom(multi)
    assert info.value.reason == "unsupported"
    # An encapsulated transfer syntax that neither pydicom nor SimpleITK can decode (MPEG2 video).
    ds = pydicom.dcmread(siim)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    out = tmp_path / "mpeg.dcm"
    ds.save_as(out, enforce_file_format=True)
    with pytest.raises((SkipFile, ReadFailure)) as info:
        read_dicom(out)
    assert info.value.reason in ("unsupported", "decode-error")


def test_simpleitk_fallback_reads_what_pydicom_cannot(tmp_path, monkeypatch):
    """With pydicom's decoders unavailable, the SimpleITK path still produces the same display image."""
    siim = SHARED_DICOM / "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    expected = read_dicom(siim)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(lambda self: 1 / 0))
    fallback = read_dicom(siim)
    assert fallback.reader == "simpleitk"
    assert np.abs(fallback.pixels - expected.pixels).mean() < 0.01


def test_non_chest_ct_from_pydicom_is_skipped(tmp_path):
    ct = tmp_path / "ct"
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), ct)
    with pytest.raises(SkipFile) as info:
        read_any(ct)
    assert info.value.reason == "not-chest-radiograph"


def test_labels_rows_match_sample_files():
    rows = list(csv.DictReader(open(SAMPLE_DIR / "labels.csv")))
    indexable = [r for r in rows if r["expected"] == "index"]
    assert len(indexable) == 16 and len({r["patient_id"] for r in indexable}) == 15

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


# --- Issue 13, hostile files: the reader's part (the whole corpus is in test_hostile_files.py) ----------------------

NIH = SHARED_DICOM / "nih_gcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"
SIIM = SHARED_DICOM / "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def _save(ds, path):
    ds.save_as(path, enforce_file_format=True)
    return path


def _failure(path, policy=ChestPolicy()) -> ReadFailure:
    with pytest.raises(ReadFailure) as info:
        read_any(path, policy=policy)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    return info.value


def test_float_pixel_data_with_nan_or_inf_fails_and_finite_float_pixels_display(tmp_path):
    """Point 5: Float / Double Float Pixel Data holding NaN or +-Inf never reaches preprocessing."""
    from hostile_corpus import _Corpus, _float_ds

    corpus = _Corpus(tmp_path, SAMPLE_DIR, SHARED_DICOM, seed=5)
    for double in (False, True):
        for poison in (np.nan, np.inf, -np.inf):
            failure = _failure(_save(_float_ds(corpus, double, poison), tmp_path / "poisoned.dcm"))
            assert failure.reason == "corrupt" and "NaN or infinite" in failure.detail
        finite = read_dicom(_save(_float_ds(corpus, double, None), tmp_path / "finite.dcm"))
        assert np.isfinite(finite.pixels).all() and finite.pixels.shape == (1024, 1024)
        np.testing.assert_allclose(finite.pixels, read_dicom(NIH).pixels, atol=1e-6)  # min-max of the same values


@pytest.mark.parametrize("slope, intercept, window", [
    ("1e308", "0", None),                    # 255 x 1e308 overflows
    ("1e306", "1.79e308", None),             # slope and intercept together overflow
    ("1e308", "0", ("100", "200")),          # a window over an infinite range
])
def test_rescale_overflow_fails_as_corrupt(tmp_path, slope, intercept, window):
    ds = pydicom.dcmread(NIH)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    failure = _failure(_save(ds, tmp_path / "rescaled.dcm"))
    assert failure.reason == "corrupt" and "non-finite" in failure.detail


def test_value_range_wider_than_float64_fails_as_corrupt(tmp_path):
    """Every rescaled value is finite, max - min is not: the full-range display would divide by infinity."""
    source = next(SAMPLE_DIR / f["path"] for f in sample_manifest()["files"]
                  if f["variant"].startswith("explicit-vr-le 12bit-signed"))
    ds = pydicom.dcmread(source)
    ds.RescaleSlope, ds.RescaleIntercept = "8e304", "0"
    del ds.WindowCenter, ds.WindowWidth
    failure = _failure(_save(ds, tmp_path / "wide.dcm"))
    assert failure.reason == "corrupt" and "too wide" in failure.detail


@pytest.mark.parametrize("keyword, text", [("WindowWidth", b"inf     "), ("WindowCenter", b"nan     "),
                                           ("WindowWidth", b"1e400   "), ("RescaleSlope", b"inf     ")])
def test_non_finite_window_or_rescale_values_fail_as_corrupt(tmp_path, keyword, text):
    ds = pydicom.dcmread(NIH)
    ds.WindowCenter, ds.WindowWidth, ds.RescaleSlope, ds.RescaleIntercept = "100", "200", "1", "0"
    setattr(ds, keyword, "1.234567")
    path = _save(ds, tmp_path / "values.dcm")
    data = path.read_bytes()
    assert data.count(b"1.234567") == 1
    path.write_bytes(data.replace(b"1.234567", text))
    failure = _failure(path)
    assert failure.reason == "corrupt" and keyword in failure.detail and "finite" in failure.detail


def test_reader_output_is_checked_finite_at_the_end(monkeypatch):
    """Point 5: whatever the display pipeline returns, a Radiograph never carries NaN."""
    import medsim.dicom

    def poisoned(stored, ds, already_rescaled=False):
        out = np.zeros(stored.shape[:2], dtype=np.float32)
        out[0, 0] = np.nan
        return out

    monkeypatch.setattr(medsim.dicom, "to_display", poisoned)
    assert _failure(NIH).reason == "corrupt"


@pytest.mark.parametrize("source", [NIH, SIIM], ids=["implicit-native", "jpeg-baseline"])
def test_truncation_at_any_offset_is_corrupt(tmp_path, source):
    """Point 6: 48 cuts from the DICM prefix to the last byte all fail as corrupt (pydicom alone returns an empty or
    partial dataset for most of them, which read as 'not an image'); cuts inside the preamble are not DICOM."""
    data = source.read_bytes()
    path = tmp_path / "cut.dcm"
    for offset in sorted(set(np.linspace(132, len(data) - 1, 48).astype(int))):
        path.write_bytes(data[:offset])
        failure = _failure(path)
        assert failure.reason == "corrupt", (offset, failure)
    path.write_bytes(data[:131])
    with pytest.raises(SkipFile) as info:
        read_any(path)
    assert info.value.reason == "not-an-image"


def test_wrong_value_lengths_are_corrupt(tmp_path):
    from hostile_corpus import _with_length

    path = tmp_path / "length.dcm"
    for source, keyword, delta in ((NIH, "PixelData", 2), (NIH, "PixelData", -2), (NIH, "PatientID", 6),
                                   (SIIM, "PatientID", 4), (SIIM, "Rows", -2), (SIIM, "PixelData", 0)):
        path.write_bytes(_with_length(source.read_bytes(), keyword, delta))
        if delta == 0:
            assert read_any(path).sop_uid  # the helper itself changes nothing
            continue
        assert _failure(path).reason == "corrupt", (source.name, keyword, delta)


def test_deflated_dataset_is_inflated_within_its_limit():
    deflated = next(SAMPLE_DIR / f["path"] for f in sample_manifest()["files"]
                    if f["variant"].startswith("deflated-explicit-vr-le"))
    assert read_dicom(deflated).pixels.shape == (1225, 1632)
    failure = _failure(deflated, ChestPolicy(max_inflated_bytes=1_000_000))
    assert failure.reason == "too-large" and "inflates to more than 1000000 bytes" in failure.detail


def test_pixel_data_length_must_match_the_header_even_when_simpleitk_would_pad(tmp_path, monkeypatch):
    """Point 7: with pydicom unable to decode, SimpleITK used to pad short pixel data and index it."""
    ds = pydicom.dcmread(NIH)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    short = _save(ds, tmp_path / "short.dcm")
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(lambda self: 1 / 0))
    failure = _failure(short)
    assert failure.reason == "corrupt" and "holds 524288 bytes" in failure.detail
    assert read_dicom(NIH).reader == "simpleitk"  # the fallback itself still reads a consistent file


def test_simpleitk_fallback_is_used_only_when_it_matches_the_header(tmp_path, monkeypatch):
    """Point 7: an 8000 x 8000 JPEG frame under a 64 x 64 header. Refused by the frame-size check before decoding;
    with that check out of the way, the SimpleITK fallback's own size check still refuses it (before reading pixels)."""
    import medsim.dicom
    from hostile_corpus import _jpeg
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(SIIM)
    ds.Rows = ds.Columns = 64
    ds.PixelData = encapsulate([_jpeg((8000, 8000))])
    big = _save(ds, tmp_path / "big-frame.dcm")
    failure = _failure(big)
    assert failure.reason == "corrupt" and "JPEG frame is 8000x8000" in failure.detail
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(lambda self: 1 / 0))
    monkeypatch.setattr(medsim.dicom, "_check_pixel_data", lambda *args: None)
    failure = _failure(big)
    assert failure.reason == "corrupt" and "SimpleITK reads 8000x8000" in failure.detail


@pytest.mark.parametrize("changes", [{"BitsStored": 12}, {"HighBit": 15}, {"HighBit": 3}, {"BitsStored": 0},
                                     {"BitsAllocated": 12}, {"PixelRepresentation": 2},
                                     {"SamplesPerPixel": 3}, {"PhotometricInterpretation": "YBR_FULL"}],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_inconsistent_pixel_module_is_corrupt_up_front(tmp_path, changes, monkeypatch):
    """Point 7: refused from the header alone, so no reader (SimpleITK included) gets to guess."""
    ds = pydicom.dcmread(NIH)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    path = _save(ds, tmp_path / "bits.dcm")
    monkeypatch.setattr("medsim.dicom._decode", lambda *args: pytest.fail("decoded an inconsistent header"))
    assert _failure(path).reason == "corrupt"


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_multi_valued_uid_is_corrupt(tmp_path, keyword):
    """Point 14: UIDs have VM 1; two values are not stored as the text "['1.2.3', '4.5']" but refused."""
    ds = pydicom.dcmread(NIH)
    setattr(ds, keyword, ["1.2.3", "4.5"])
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    failure = _failure(_save(ds, tmp_path / "uids.dcm"))
    assert failure.reason == "corrupt" and "VM 1" in failure.detail and "1.2.3\\4.5" in failure.detail


def _windowed(tmp_path, centers, widths, function=None) -> np.ndarray:
    ds = pydicom.dcmread(NIH)
    ds.WindowCenter, ds.WindowWidth = centers, widths
    if function:
        ds.VOILUTFunction = function
    return read_dicom(_save(ds, tmp_path / "window.dcm")).pixels


def test_linear_window_narrower_than_1_is_ignored(tmp_path):
    """Point 14, PS3.3 C.11.2.1.2: a LINEAR Window Width < 1 is invalid; the next window, else the full range."""
    full_range = read_dicom(NIH).pixels  # the NIH image has no window
    assert len(np.unique(full_range)) > 100
    np.testing.assert_array_equal(_windowed(tmp_path, ["128"], ["0.5"]), full_range)
    np.testing.assert_array_equal(_windowed(tmp_path, ["128", "100"], ["0", "200"]),
                                  _windowed(tmp_path, ["100"], ["200"]))
    np.testing.assert_array_equal(_windowed(tmp_path, ["128"], ["0"], "SIGMOID"), full_range)  # SIGMOID needs > 0
    # Width 1 is valid for LINEAR and by its formula a threshold at the centre.
    stored = pydicom.dcmread(NIH).pixel_array
    np.testing.assert_array_equal(_windowed(tmp_path, ["128"], ["1"]), (stored >= 128).astype(np.float32))


def test_linear_exact_window_allows_widths_below_1(tmp_path):
    """PS3.3 C.11.2.1.3.2: LINEAR_EXACT needs width > 0 only, and uses it as is (formerly raised to 1)."""
    stored = pydicom.dcmread(NIH).pixel_array.astype(np.float64)
    expected = np.clip((stored - (128.1 - 0.25)) / 0.5, 0, 1).astype(np.float32)
    assert set(np.unique(expected)) >= {0.0, 1.0} and len(np.unique(expected)) == 3  # 128 -> 0.3 at width 0.5
    np.testing.assert_allclose(_windowed(tmp_path, ["128.1"], ["0.5"], "LINEAR_EXACT"), expected, atol=1e-6)

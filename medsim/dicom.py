"""Read a DICOM file into a display-ready radiograph, and decide whether it is a chest radiograph.

Display pipeline (DICOM PS3.3 C.11, PS3.4 N.2): stored values -> Modality LUT or Rescale Slope/Intercept -> VOI LUT
Sequence, else the first Window Center/Width, else the full data range -> MONOCHROME1 inverted -> float32 in [0, 1]
with 0 = black. RGB/YBR images become luminance. pydicom decodes first (with the pylibjpeg, openjpeg and gdcm plugins
for compressed transfer syntaxes); SimpleITK is the fallback reader when pydicom cannot decode the pixel data.

Which files are chest radiographs (see :class:`ChestPolicy`): Modality CR, DX, DR or RG with a chest or empty
BodyPartExamined, or a secondary capture (SC/OT) whose BodyPartExamined says chest. Everything else is skipped
unless the policy is widened.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsim.errors import ReadFailure, SkipFile

DICOM_MAGIC_OFFSET = 128
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
CAPTURE_MODALITIES = frozenset({"SC", "OT"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LUNG", "PORT CHEST", "TORAX", "THORAX_LUNG"})
DEFAULT_MAX_PIXELS = 100_000_000  # 10k x 10k; detector images are <= ~4.3k x 4.3k


@dataclass(frozen=True)
class ChestPolicy:
    """What ingest accepts. Defaults index chest radiographs only.

    any_body_part: accept radiographs (CR/DX/DR/RG) of any body part.
    any_modality: accept any single-frame 2-D image (e.g. secondary captures without a body part).
    max_pixels: refuse larger images before decoding them (guards memory).
    """

    any_body_part: bool = False
    any_modality: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS

    def check(self, modality: str, body_part: str) -> None:
        """Raise SkipFile(not-chest-radiograph) when the header says this is not for the index."""
        if self.any_modality:
            return
        is_chest = body_part in CHEST_BODY_PARTS
        if modality in RADIOGRAPH_MODALITIES:
            if is_chest or not body_part or self.any_body_part:
                return
            raise SkipFile("not-chest-radiograph", f"{modality} of body part {body_part!r}")
        if modality in CAPTURE_MODALITIES and is_chest:
            return
        raise SkipFile("not-chest-radiograph", f"modality {modality or 'missing'!r}, body part {body_part or 'missing'!r}")


@dataclass
class Radiograph:
    """A decoded image with the header facts the index keeps. ``pixels`` is (H, W) float32 in [0, 1]."""

    pixels: np.ndarray
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str | None
    modality: str = ""
    body_part: str = ""
    view: str = ""
    study_date: str = ""
    study_description: str = ""
    photometric: str = ""
    transfer_syntax: str = ""
    bits_stored: int = 8
    reader: str = "pydicom"
    pixel_hash: str = ""
    attributes: dict = field(default_factory=dict)


def is_dicom_file(path: Path) -> bool:
    """True when the file has the DICOM Part 10 preamble ("DICM" at byte 128)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(DICOM_MAGIC_OFFSET)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def pixel_hash(stored: np.ndarray) -> str:
    """Hash of the decoded stored pixel values and shape: equal for the same pixels under any encoding or UIDs."""
    h = hashlib.sha1(str(stored.shape).encode())
    h.update(np.ascontiguousarray(stored).tobytes())
    return h.hexdigest()


def read_header(path: Path):
    """Parse everything but the pixel data. Raises SkipFile/ReadFailure with a reason."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=False, defer_size="1 KB")
    except InvalidDicomError as exc:
        raise SkipFile("not-an-image", f"not a DICOM file ({exc})") from None
    except PermissionError as exc:
        raise ReadFailure("unreadable", str(exc)) from None
    except (EOFError, ValueError, KeyError, TypeError, OverflowError, IndexError) as exc:
        raise ReadFailure("corrupt", f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise ReadFailure("unreadable", str(exc)) from None


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


def read_dicom(path: str | Path, policy: ChestPolicy = ChestPolicy()) -> Radiograph:
    """Read, classify and decode one DICOM file. Raises SkipFile or ReadFailure with the reason."""
    path = Path(path)
    ds = read_header(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop_class = getattr(ds.get("SOPClassUID", None), "name", "") or _text(ds, "SOPClassUID")
        raise SkipFile("not-an-image", f"DICOM without pixel data ({sop_class or 'unknown SOP class'})")
    modality = _text(ds, "Modality").upper()
    body_part = _text(ds, "BodyPartExamined").upper()
    policy.check(modality, body_part)

    sop_uid = _text(ds, "SOPInstanceUID")
    if not sop_uid:
        raise ReadFailure("corrupt", "missing SOP Instance UID")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise SkipFile("unsupported", f"multi-frame image ({frames} frames)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ReadFailure("corrupt", f"image pixel module incomplete ({exc})") from None
    if rows * cols > policy.max_pixels:
        raise ReadFailure("too-large", f"{rows}x{cols} exceeds {policy.max_pixels} pixels")
    if samples not in (1, 3):
        raise SkipFile("unsupported", f"{samples} samples per pixel")

    stored, reader, rescaled = _decode(ds, path)
    photometric = _text(ds, "PhotometricInterpretation").upper()
    pixels = to_display(stored, ds, already_rescaled=rescaled)
    tsyntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    return Radiograph(
        pixels=pixels,
        sop_uid=sop_uid,
        series_uid=_text(ds, "SeriesInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        patient_id=_text(ds, "PatientID") or None,
        modality=modality,
        body_part=body_part,
        view=_text(ds, "ViewPosition").upper(),
        study_date=_text(ds, "StudyDate"),
        study_description=_text(ds, "StudyDescription"),
        photometric=photometric,
        transfer_syntax=str(tsyntax),
        bits_stored=int(ds.get("BitsStored", 8) or 8),
        reader=reader,
        pixel_hash=pixel_hash(stored),
    )


def _decode(ds, path: Path) -> tuple[np.ndarray, str, bool]:
    """Stored pixel values: pydicom first, SimpleITK as fallback. Returns (array, reader, rescale_applied)."""
    from pydicom.pixels import get_decoder

    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    pydicom_can = True
    if tsyntax is not None and tsyntax.is_compressed:
        try:
            pydicom_can = get_decoder(tsyntax).is_available
        except NotImplementedError:  # no decoder exists at all for this transfer syntax
            pydicom_can = False
    first_error = None
    if pydicom_can:
        try:
            # pydicom converts YBR to RGB by default, so colour images arrive as RGB.
            return np.asarray(ds.pixel_array), "pydicom", False
        except Exception as exc:  # decoders raise many types; any failure falls through to SimpleITK
            first_error = exc
    try:
        import SimpleITK as sitk

        image = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(image)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        # SimpleITK (GDCM) applies Rescale Slope/Intercept when it reads.
        return arr, "simpleitk", True
    except Exception as exc:
        if first_error is None and not pydicom_can:
            raise SkipFile("unsupported", f"no decoder for transfer syntax {tsyntax} ({tsyntax.name})") from None
        reason = "corrupt" if _looks_truncated(first_error or exc) else "decode-error"
        raise ReadFailure(reason, f"pydicom: {first_error}; SimpleITK: {str(exc).strip().splitlines()[-1]}") from None


def _looks_truncated(exc: BaseException) -> bool:
    text = str(exc).lower()
    words = ("length", "truncat", "end of", "eof", "too short", "missing", "not enough", "less than expected")
    return any(word in text for word in words)


def to_display(stored: np.ndarray, ds, already_rescaled: bool = False) -> np.ndarray:
    """Stored values -> (H, W) float32 in [0, 1], 0 = black, per the DICOM display pipeline."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    photometric = _text(ds, "PhotometricInterpretation").upper()
    if stored.ndim == 3:  # colour (pydicom hands RGB): ITU-R BT.601 luminance
        maximum = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
        gray = stored[..., 0] * 0.299 + stored[..., 1] * 0.587 + stored[..., 2] * 0.114
        return np.clip(gray / maximum, 0.0, 1.0).astype(np.float32)

    values = stored if already_rescaled else apply_modality_lut(stored, ds)
    values = np.asarray(values, dtype=np.float64)
    voi_sequence = ds.get("VOILUTSequence")
    if voi_sequence:
        # Output of a VOI LUT spans 0 .. 2**n - 1, n = third value of its LUT Descriptor (PS3.3 C.11.2.1.1).
        bits = int(voi_sequence[0].LUTDescriptor[2])
        values = np.asarray(apply_voi(np.rint(values).astype(np.int64), ds, index=0), dtype=np.float64)
        display = values / float(2**bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        display = _window(values, ds)
    else:
        low, high = float(values.min()), float(values.max())
        display = (values - low) / (high - low) if high > low else np.zeros_like(values)
    display = np.clip(display, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        display = 1.0 - display
    return display.astype(np.float32)


def _first(value) -> float:
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _window(values: np.ndarray, ds) -> np.ndarray:
    """The first Window Center/Width (PS3.3 C.11.2.1.2) mapped to [0, 1]."""
    center = _first(ds.WindowCenter)
    width = max(_first(ds.WindowWidth), 1.0)
    function = _text(ds, "VOILUTFunction").upper() or "LINEAR"
    if function == "LINEAR_EXACT":
        return (values - (center - width / 2)) / width
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    return (values - (center - 0.5)) / (width - 1.0) + 0.5 if width > 1 else (values >= center).astype(np.float64)

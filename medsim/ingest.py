"""Sources: walk a PACS export or an image folder, join a labels file, read any supported file.

A source folder may mix DICOM files (with or without a ``.dcm`` extension) and PNG/JPEG images. Files are recognised
by content, not by name: the DICOM preamble, or the PNG/JPEG signature. PNG/JPEG images get stable pseudo UIDs derived
from their path relative to the source folder, so the same dataset yields the same UIDs on every machine.

A labels file (CSV) adds what the images do not carry: ``path`` (relative to the CSV's folder) and/or ``sop_uid``
to match a row, then ``labels`` (``|``-separated findings), ``patient_id`` and ``view``; further columns (sex, age,
source, ...) are kept as case attributes.
"""

from __future__ import annotations

import csv
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsim.dicom import DEFAULT_MAX_PIXELS, ChestPolicy, Radiograph, is_dicom_file, pixel_hash, read_dicom
from medsim.errors import MedsimError, ReadFailure, SkipFile

IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg"}
UID_NAMESPACE = uuid.UUID("6f1c8a4e-0d57-4bfb-9d3e-6d65647369d0")
KNOWN_COLUMNS = {"path", "sop_uid", "labels", "patient_id", "view"}


class LabelsError(MedsimError):
    """A labels file that cannot be used."""


@dataclass(frozen=True)
class LabelRow:
    labels: tuple[str, ...] = ()
    patient_id: str | None = None
    view: str = ""
    attributes: tuple[tuple[str, str], ...] = ()


class LabelTable:
    """Rows of a labels CSV, found by absolute file path or by SOP Instance UID."""

    def __init__(self, by_path: dict[str, LabelRow], by_sop_uid: dict[str, LabelRow], source: str = ""):
        self.by_path = by_path
        self.by_sop_uid = by_sop_uid
        self.source = source

    @classmethod
    def empty(cls) -> "LabelTable":
        return cls({}, {})

    @classmethod
    def from_csv(cls, csv_path: str | Path) -> "LabelTable":
        csv_path = Path(csv_path)
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                columns = set(reader.fieldnames or ())
                if not columns & {"path", "sop_uid"}:
                    raise LabelsError(f"{csv_path}: needs a 'path' or 'sop_uid' column (has {sorted(columns)})")
                rows = list(reader)
        except OSError as exc:
            raise LabelsError(f"cannot read labels file {csv_path}: {exc}") from None
        base = csv_path.parent.resolve()
        by_path, by_uid = {}, {}
        for row in rows:
            entry = LabelRow(
                labels=tuple(v.strip() for v in (row.get("labels") or "").split("|") if v.strip()),
                patient_id=(row.get("patient_id") or "").strip() or None,
                view=(row.get("view") or "").strip().upper(),
                attributes=tuple((k, v) for k, v in row.items() if k not in KNOWN_COLUMNS and k and v not in (None, "")),
            )
            if row.get("path"):
                by_path[str((base / row["path"]).resolve())] = entry
            if row.get("sop_uid"):  # the first row of a UID wins: a later copy of the file must not relabel it
                by_uid.setdefault(row["sop_uid"].strip(), entry)
        return cls(by_path, by_uid, source=str(csv_path))

    def __len__(self) -> int:
        return max(len(self.by_path), len(self.by_sop_uid))

    def lookup(self, path: Path, sop_uid: str | None = None) -> LabelRow | None:
        row = self.by_path.get(str(Path(path).resolve()))
        if row is None and sop_uid:
            row = self.by_sop_uid.get(sop_uid)
        return row

    def apply(self, case) -> None:
        """Fill a case's labels, patient and view (and extra attributes) from its row, if it has one."""
        row = self.lookup(Path(case.source_path), case.sop_uid)
        if row is None:
            return
        case.labels = row.labels
        case.attributes.update(dict(row.attributes))
        if row.patient_id:
            case.patient_id = row.patient_id
        if row.view and not case.view:
            case.view = row.view

    def vocabulary(self) -> list[str]:
        rows = list(self.by_path.values()) + list(self.by_sop_uid.values())
        return sorted({label for row in rows for label in row.labels})


def walk(root: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """All regular files under root, sorted, and the folders that could not be read (with the reason)."""
    root = Path(root)
    files: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    if root.is_file():
        return [root], []

    def on_error(exc: OSError) -> None:
        unreadable.append((Path(exc.filename or root), exc.strerror or str(exc)))

    for folder, dirs, names in os.walk(root, onerror=on_error):
        dirs.sort()
        for name in names:
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if path.is_file():
                files.append(path)
    files.sort()
    return files, unreadable


def image_kind(path: Path) -> str | None:
    """'dicom', 'png', 'jpeg' or None, by file content."""
    if is_dicom_file(path):
        return "dicom"
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ReadFailure("unreadable", str(exc)) from None
    for signature, kind in IMAGE_SIGNATURES.items():
        if head.startswith(signature):
            return kind
    return None


def pseudo_uid(*parts: str) -> str:
    """A stable DICOM UID (2.25 form) for something that has none, e.g. a PNG file. A file name that is not UTF-8
    (surrogate-escaped by the file system layer) is named by its bytes, so every name has one UID."""
    name = "/".join(parts).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


def read_any(path: str | Path, root: str | Path | None = None, policy: ChestPolicy = ChestPolicy()) -> Radiograph:
    """Read a DICOM, PNG or JPEG file into a Radiograph. Raises SkipFile or ReadFailure with the reason, never
    another exception; a returned Radiograph's pixels are (H, W) float32, finite, in [0, 1]."""
    path = Path(path)
    try:
        kind = image_kind(path)
        if kind == "dicom":
            radiograph = read_dicom(path, policy)
        elif kind in ("png", "jpeg"):
            radiograph = read_image_file(path, root, max_pixels=policy.max_pixels)
        else:
            raise SkipFile("not-an-image", "neither DICOM (no DICM preamble) nor PNG/JPEG")
    except (SkipFile, ReadFailure):
        raise
    except MemoryError:
        raise ReadFailure("too-large", "out of memory while decoding") from None
    except Exception as exc:  # a reader bug must not escape as a traceback: one line with the reason
        raise ReadFailure("decode-error", f"unexpected {type(exc).__name__}: {exc}") from None
    pixels = radiograph.pixels
    if pixels.ndim != 2 or pixels.dtype != np.float32 or not np.isfinite(pixels).all() \
            or pixels.min(initial=0.0) < 0.0 or pixels.max(initial=0.0) > 1.0:
        raise ReadFailure("corrupt", f"decoded image {pixels.shape} {pixels.dtype} is not finite grey values in [0, 1]")
    return radiograph


def read_image_file(path: Path, root: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Radiograph:
    """A PNG/JPEG radiograph (8 or 16 bit, gray or colour) with pseudo UIDs from its path under root. Images larger
    than ``max_pixels`` fail as too-large before they are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ReadFailure("too-large", f"{height}x{width} exceeds {max_pixels} pixels")
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                stored = np.asarray(image, dtype=np.float64)
                maximum = 65535.0 if stored.max() > 255 else 255.0
            elif image.mode == "L":
                stored = np.asarray(image)
                maximum = 255.0
            else:
                stored = np.asarray(image.convert("L"))
                maximum = 255.0
    except Image.DecompressionBombError as exc:
        raise ReadFailure("too-large", str(exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ReadFailure("corrupt", f"{type(exc).__name__}: {exc}") from None
    pixels = np.array(stored, dtype=np.float32)  # scaled and clipped in place: the same float32 bits, no temporaries
    np.divide(pixels, np.float32(maximum), out=pixels)
    np.clip(pixels, 0.0, 1.0, out=pixels)
    relative = os.path.relpath(path, root) if root is not None else str(path.resolve())
    relative = Path(relative).as_posix()
    return Radiograph(
        pixels=pixels,
        sop_uid=pseudo_uid("sop", relative),
        series_uid=pseudo_uid("series", relative),
        study_uid=pseudo_uid("study", relative),
        patient_id=None,
        photometric="MONOCHROME2",
        bits_stored=16 if maximum > 255 else 8,
        reader="pillow",
        pixel_hash=pixel_hash(np.asarray(stored)),
    )


# ---- case attributes from the header ---------------------------------------------------------------------------------

MAX_AGE_YEARS = 150


def case_attributes(radiograph: Radiograph) -> dict:
    """The header facts a case keeps as attributes (catalog JSON; the search filters read sex, age and study_date):
    photometric, transfer syntax, study date and description, reader, and for DICOM ``sex`` (F/M/O, from PatientSex)
    and ``age`` in years (PatientAge such as 045Y, 006M or a bare 62, else the whole years between PatientBirthDate
    and StudyDate; the birth date itself is not kept). A labels file's sex/age columns override these
    (:meth:`LabelTable.apply`). Values that cannot be read are left out."""
    header = radiograph.attributes
    attributes = {
        "photometric": radiograph.photometric, "transfer_syntax": radiograph.transfer_syntax,
        "study_date": radiograph.study_date, "study_description": radiograph.study_description,
        "reader": radiograph.reader,
        "sex": patient_sex(header.get("PatientSex", "")),
        "age": patient_age(header.get("PatientAge", ""), header.get("PatientBirthDate", ""), radiograph.study_date),
    }
    return {k: v for k, v in attributes.items() if v not in ("", None)}


def patient_sex(text: str) -> str:
    """PatientSex (CS: M, F or O) as M/F/O; '' when absent or anything else."""
    value = text.strip().upper()
    return value if value in ("M", "F", "O") else ""


def patient_age(age: str, birth_date: str = "", study_date: str = "") -> float | int | None:
    """Age in years: PatientAge (AS, nnnD/W/M/Y; a bare number is taken as years, as some modalities write it), else
    from PatientBirthDate and StudyDate (YYYYMMDD). None when neither gives an age in [0, MAX_AGE_YEARS]."""
    text = age.strip().upper()
    if text[:-1].isdigit() and text[-1:] in ("D", "W", "M", "Y") or text.isdigit():
        number, unit = (int(text), "Y") if text.isdigit() else (int(text[:-1]), text[-1])
        years = {"Y": number, "M": number / 12, "W": number / 52, "D": number / 365}[unit]
        if 0 <= years <= MAX_AGE_YEARS:
            return years if unit == "Y" else round(years, 2)
    born, seen = _date(birth_date), _date(study_date)
    if born and seen:
        years = seen[0] - born[0] - ((seen[1], seen[2]) < (born[1], born[2]))
        if 0 <= years <= MAX_AGE_YEARS:
            return years
    return None


def _date(text: str) -> tuple[int, int, int] | None:
    """(year, month, day) of a DA value (YYYYMMDD; the old YYYY.MM.DD form too), or None."""
    import datetime

    digits = text.strip().replace(".", "").replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        day = datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None
    return day.year, day.month, day.day

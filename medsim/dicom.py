"""Read a DICOM file into a display-ready radiograph, and decide whether it is a chest radiograph.

Display pipeline (DICOM PS3.3 C.11, PS3.4 N.2): stored values -> Modality LUT or Rescale Slope/Intercept -> VOI LUT
Sequence, else the first valid Window Center/Width, else the full data range -> MONOCHROME1 inverted -> float32 in
[0, 1] with 0 = black. RGB/YBR images become luminance. pydicom decodes first (with the pylibjpeg, openjpeg and gdcm
plugins for compressed transfer syntaxes); SimpleITK is the fallback reader when pydicom cannot decode the pixel data,
and its result is used only when it has the rows, columns and samples the header declares.

Which files are chest radiographs (see :class:`ChestPolicy`): Modality CR, DX, DR or RG with a chest or empty
BodyPartExamined, or a secondary capture (SC/OT) whose BodyPartExamined says chest. Everything else is skipped
unless the policy is widened.

Hostile or broken files (issue 13). A file with the DICM preamble is DICOM; when it is broken it *fails* (``corrupt``),
it is never skipped as "not an image". Before pydicom parses it, :func:`check_structure` walks the data elements:
every declared length must fit in the file (truncation, wrong value lengths), sequences and encapsulated pixel data
must end with their delimiters, an explicit VR must be a real VR, the transfer syntax must be known (else skipped as
``unsupported``), and a Deflated Explicit VR Little Endian stream is inflated in bounded chunks and refused
(``too-large``) past the limits below, before anything large is allocated. Then the header must be consistent:
Bits Allocated 1 or a multiple of 8, 1 <= Bits Stored <= Bits Allocated, Bits Stored - 1 <= High Bit < Bits
Allocated, Pixel Representation 0/1, Samples per Pixel agreeing with the Photometric Interpretation, single-valued
SOP/Study/Series Instance UIDs (VM 1; a multi-valued UID is ``corrupt`` rather than guessed), whole numbers where
numbers are due (Number of Frames "x" is ``corrupt``), and finite numbers in Rescale Slope/Intercept and Window
Center/Width (text, NaN or infinity there is ``corrupt``). Native pixel data must have exactly the length Rows x
Columns x Samples x Bits Allocated / 8 declares (one pad byte allowed); encapsulated pixel data must hold a fragment,
and a JPEG / JPEG-LS / JPEG 2000 frame must have the rows, columns and components of the header (an 8000 x 8000
frame under a 64 x 64 header is refused before it is decoded). Float pixels and the Modality LUT output must be
finite. The result is checked last: (Rows, Columns) float32, finite, in [0, 1].

Reduced decoding (issue 14): ``read_dicom(path, min_side=N)`` returns an image whose short side is >= N, decoded at
that resolution where the codec allows it (JPEG 2000 resolution levels, JPEG DCT scaling, block means of memory-mapped
native pixels; see "Reduced decoding" below); build-index asks for 4 x the model input (medsim.build). Without ``min_side`` (query,
viewer, evaluation) the full image is returned as before. The frame-size check reads JPEG 2000 headers with OpenJPEG
(``openjpeg.get_parameters``) and JPEG headers with Pillow, falling back to the SOF segment for JPEG Lossless and
JPEG-LS (see :func:`jpeg_frame_size`).

Windows (PS3.3 C.11.2.1.2): a window whose width is out of range for its VOI LUT Function (LINEAR: width < 1;
LINEAR_EXACT and SIGMOID: width <= 0) is invalid and ignored: the next Window Center/Width pair is used, else the
full data range. A VOI LUT Sequence with an unusable LUT Descriptor is ignored the same way.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsim.errors import ReadFailure, SkipFile, short

DICOM_MAGIC_OFFSET = 128
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
CAPTURE_MODALITIES = frozenset({"SC", "OT"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LUNG", "PORT CHEST", "TORAX", "THORAX_LUNG"})

# --- Limits: how much a file may make the reader allocate. All of them live here. -----------------------------------
# Pixels of one frame (Rows x Columns); larger images fail as too-large before decoding. ChestPolicy.max_pixels.
DEFAULT_MAX_PIXELS = 100_000_000  # 10k x 10k; detector images are <= ~4.3k x 4.3k
# Bytes a Deflated Explicit VR Little Endian dataset may inflate to (a 10k x 10k 16-bit image is 200 MB).
# ChestPolicy.max_inflated_bytes.
DEFAULT_MAX_INFLATED_BYTES = 256 * 2**20
# ... and at most this many times the deflated bytes in the file once past MIN_INFLATE_ALLOWANCE: a radiograph
# deflates 2-4 : 1, a stream of zeros ~1000 : 1 (a "deflate bomb" of a few hundred KB inflating to hundreds of MB).
MAX_INFLATE_RATIO = 100
MIN_INFLATE_ALLOWANCE = 8 * 2**20
# Nesting of sequences the structure check follows (real files use a handful).
MAX_SEQUENCE_DEPTH = 32
# Bytes of the first compressed fragment read to find a JPEG SOF / JPEG 2000 SIZ marker (tables and APP segments
# come first and are small).
CODESTREAM_HEADER_BYTES = 256 * 1024


@dataclass(frozen=True)
class ChestPolicy:
    """What ingest accepts. Defaults index chest radiographs only.

    any_body_part: accept radiographs (CR/DX/DR/RG) of any body part.
    any_modality: accept any single-frame 2-D image (e.g. secondary captures without a body part).
    max_pixels: refuse larger images before decoding them (guards memory).
    max_inflated_bytes: refuse a deflated dataset that inflates to more (guards memory; see the limits above).
    """

    any_body_part: bool = False
    any_modality: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES

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
    attributes: dict = field(default_factory=dict)  # raw optional header texts (DEMOGRAPHICS) for ingest to parse
    reduction: int = 1  # the stored image was reduced by this factor per side before the LUTs (1: full resolution)
    decoder: str = ""  # how the pixels were decoded, e.g. "Pillow/OpenJPEG at 1/4" or "pydicom (gdcm)"


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
    h.update(np.ascontiguousarray(stored).reshape(-1).view(np.uint8))  # the array's bytes, without a copy
    return h.hexdigest()


# --- Structure check: walk the data elements before pydicom does ----------------------------------------------------

_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
_UID_TEXT = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass
class PixelElement:
    """Where the top-level pixel data element is: its keyword, defined length (None: undefined, i.e. encapsulated)
    and, when encapsulated, the (offset, length) of every item (basic offset table first) in the file."""

    keyword: str
    length: int | None
    items: list[tuple[int, int]] = field(default_factory=list)
    offset: int | None = None  # native pixel data: where its value starts in the file (None when deflated)


@dataclass
class Structure:
    """What :func:`check_structure` learnt: the transfer syntax ('' when the file meta has none), whether the
    dataset was deflated, the pixel data element (None: no pixel data) and how many top-level elements follow the
    file meta."""

    transfer_syntax: str = ""
    deflated: bool = False
    pixels: PixelElement | None = None
    elements: int = 0


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _FileStream:
    """Forward reads and skips over a file, with the position."""

    def __init__(self, fh, size: int):
        self.fh, self.size, self.pos = fh, size, fh.tell()

    def read(self, n: int) -> bytes:
        data = self.fh.read(n)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        n = min(n, self.size - self.pos)
        self.fh.seek(n, 1)
        self.pos += n
        return n


class _InflateStream:
    """Forward reads and skips over the inflated rest of a file, in bounded chunks; more than ``limit`` inflated
    bytes fail as too-large before they are ever held in memory."""

    CHUNK = 1 << 20

    def __init__(self, fh, compressed: int, limit: int):
        self.fh, self.compressed, self.limit = fh, compressed, limit
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self.buffer, self.pos, self.inflated = b"", 0, 0
        self.ended = False

    def _more(self) -> bool:
        if self.ended:
            return False
        data = self.inflater.unconsumed_tail or self.fh.read(64 * 1024)
        if not data:
            self.ended = True
            if not self.inflater.eof and self.inflated:
                raise ReadFailure("corrupt", f"deflated data ends early (after {self.inflated} inflated bytes)")
            return False
        try:
            out = self.inflater.decompress(data, self.CHUNK)
        except zlib.error as exc:
            raise ReadFailure("corrupt", f"deflated data cannot be inflated ({exc})") from None
        self.inflated += len(out)
        if self.inflated > self.limit:
            raise ReadFailure("too-large", f"deflated dataset of {self.compressed} bytes inflates to more than "
                                           f"{self.limit} bytes")
        if self.inflater.eof:
            self.ended = True
        self.buffer += out
        return True

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n and self._more():
            pass
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        done = 0
        while done < n:
            if not self.buffer and not self._more():
                break
            take = min(n - done, len(self.buffer))
            self.buffer = self.buffer[take:]
            done += take
        self.pos += done
        return done


class _Walker:
    """Follows the data elements of a dataset: lengths within the file, sequences and items closed by their
    delimiters, real VRs. Raises ReadFailure(corrupt) with where and what at the first inconsistency."""

    def __init__(self, stream, little_endian: bool):
        self.stream = stream
        self.endian = "<" if little_endian else ">"
        self.pixels: PixelElement | None = None
        self.elements = 0

    def _fail(self, what: str):
        raise ReadFailure("corrupt", what)

    def _read(self, n: int, what: str) -> bytes:
        start = self.stream.pos
        data = self.stream.read(n)
        if len(data) < n:
            self._fail(f"file ends inside {what} at byte {start} (truncated)")
        return data

    def _skip(self, n: int, what: str) -> None:
        start = self.stream.pos
        if self.stream.skip(n) < n:
            self._fail(f"{what} declares {n} bytes at byte {start}, the file ends first (truncated or wrong length)")

    def dataset(self, depth: int = 0, in_item: bool = False) -> None:
        implicit = None
        while True:
            start = self.stream.pos
            head = self.stream.read(8)
            if not head:
                if in_item:
                    self._fail("file ends inside a sequence item (truncated)")
                return
            if len(head) < 8:
                if depth == 0 and not head.strip(b"\0"):  # a few zero bytes of padding after the last element
                    return
                self._fail(f"file ends inside a data element header at byte {start} (truncated)")
            group, element = struct.unpack(self.endian + "HH", head[:4])
            tag = group << 16 | element
            if tag == _ITEM_END:
                if in_item:
                    return
                self._fail(f"item delimiter outside a sequence at byte {start}")
            if tag in (_ITEM, _SEQUENCE_END):
                self._fail(f"sequence item tag {_tag(tag)} outside a sequence at byte {start}")
            if implicit is None:  # as pydicom: each dataset's first element tells implicit from explicit VR
                implicit = not (0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B)
            vr = None
            if implicit:
                (length,) = struct.unpack(self.endian + "L", head[4:8])
            else:
                vr = head[4:6]
                if vr in _LONG_VRS:
                    (length,) = struct.unpack(self.endian + "L", self._read(4, f"the header of {_tag(tag)}"))
                elif vr in _SHORT_VRS:
                    (length,) = struct.unpack(self.endian + "H", head[6:8])
                else:
                    self._fail(f"invalid VR {vr!r} in element {_tag(tag)} at byte {start} (wrong length before it?)")
            if depth == 0:
                self.elements += 1
            keyword = PIXEL_TAGS.get(tag) if depth == 0 else None
            if length == _UNDEFINED:
                if vr is not None and vr not in (b"SQ", b"UN", b"OB", b"OW"):
                    self._fail(f"element {_tag(tag)} with VR {vr.decode('latin-1')} has undefined length")
                items = self.items(tag, depth, encapsulated=keyword is not None)
                if keyword:
                    self.pixels = PixelElement(keyword, None, items)
            else:
                if keyword:
                    offset = self.stream.pos if isinstance(self.stream, _FileStream) else None
                    self.pixels = PixelElement(keyword, length, offset=offset)
                self._skip(length, f"element {_tag(tag)}")

    def items(self, tag: int, depth: int, encapsulated: bool) -> list[tuple[int, int]]:
        """The items of an undefined-length sequence or of encapsulated pixel data, up to the sequence delimiter."""
        if depth >= MAX_SEQUENCE_DEPTH:
            self._fail(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} at {_tag(tag)}")
        found = []
        while True:
            start = self.stream.pos
            head = self._read(8, f"the items of {_tag(tag)}")
            item_group, item_element, length = struct.unpack(self.endian + "HHL", head)
            item_tag = item_group << 16 | item_element
            if item_tag == _SEQUENCE_END:
                return found
            if item_tag != _ITEM:
                self._fail(f"{_tag(item_tag)} where an item of {_tag(tag)} belongs, at byte {start} "
                           "(wrong length before it?)")
            if length == _UNDEFINED:
                if encapsulated:
                    self._fail(f"pixel data fragment of undefined length at byte {start}")
                self.dataset(depth + 1, in_item=True)
            else:
                found.append((self.stream.pos, length))
                self._skip(length, f"item of {_tag(tag)}")


def _file_meta(fh, size: int) -> str | None:
    """Walk the group 0002 elements after the preamble (explicit VR little endian; implicit VR tolerated, as pydicom
    does); return the transfer syntax."""
    fh.seek(DICOM_MAGIC_OFFSET + 4)
    transfer_syntax, implicit = None, None
    while True:
        start = fh.tell()
        head = fh.read(8)
        if len(head) < 8 or struct.unpack("<H", head[:2])[0] != 0x0002:
            if 0 < len(head) < 8 and head[:2] == b"\x02\x00":
                raise ReadFailure("corrupt", f"file ends inside the file meta information at byte {start}")
            fh.seek(start)
            return transfer_syntax
        element = struct.unpack("<H", head[2:4])[0]
        if implicit is None:
            implicit = not (0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B)
        vr = head[4:6]
        if implicit:
            (length,) = struct.unpack("<L", head[4:8])
        elif vr in _LONG_VRS:
            extra = fh.read(4)
            if len(extra) < 4:
                raise ReadFailure("corrupt", f"file ends inside the file meta information at byte {start}")
            (length,) = struct.unpack("<L", extra)
        elif vr in _SHORT_VRS:
            (length,) = struct.unpack("<H", head[6:8])
        else:
            raise ReadFailure("corrupt", f"invalid VR {vr!r} in file meta element (0002,{element:04X})")
        if length == _UNDEFINED or fh.tell() + length > size:
            raise ReadFailure("corrupt", f"file meta element (0002,{element:04X}) declares {length} bytes at byte "
                                         f"{start}, the file ends first (truncated or wrong length)")
        if element == 0x0010:
            transfer_syntax = fh.read(length).decode("ascii", "replace").strip("\0 ")
        else:
            fh.seek(length, 1)


def check_structure(path: str | Path, policy: ChestPolicy = ChestPolicy()) -> Structure:
    """Walk a Part 10 file's data elements without decoding them (see the module docstring).

    Raises ReadFailure(corrupt) for truncation or malformed lengths, ReadFailure(too-large) for a deflated dataset
    past the limits, SkipFile(unsupported) for an unknown transfer syntax."""
    from pydicom.uid import UID

    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            transfer_syntax = _file_meta(fh, size)
            little, deflated = True, False
            if transfer_syntax:
                if not _UID_TEXT.fullmatch(transfer_syntax):
                    raise ReadFailure("corrupt", f"Transfer Syntax UID {short(repr(transfer_syntax))[:80]} is not "
                                                 "a UID (wrong length in the file meta?)")
                uid = UID(transfer_syntax)
                if not uid.is_transfer_syntax:
                    raise SkipFile("unsupported", f"unknown transfer syntax {short(transfer_syntax)[:80]!r}")
                little, deflated = uid.is_little_endian, uid.is_deflated
            if deflated:
                compressed = size - fh.tell()
                limit = min(policy.max_inflated_bytes, max(MIN_INFLATE_ALLOWANCE, MAX_INFLATE_RATIO * compressed))
                stream = _InflateStream(fh, compressed, limit)
            else:
                stream = _FileStream(fh, size)
            walker = _Walker(stream, little)
            walker.dataset()
    except OSError as exc:
        raise ReadFailure("unreadable", str(exc)) from None
    return Structure(transfer_syntax or "", deflated, walker.pixels, walker.elements)


# --- Header ----------------------------------------------------------------------------------------------------------

def read_header(path: Path):
    """Parse everything but the pixel data. Raises SkipFile/ReadFailure with a reason."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=False, defer_size="1 KB")
    except InvalidDicomError as exc:
        if is_dicom_file(path):  # it says DICM: a broken DICOM file, not a foreign one
            raise ReadFailure("corrupt", f"malformed DICOM ({exc})") from None
        raise SkipFile("not-an-image", f"not a DICOM file ({exc})") from None
    except PermissionError as exc:
        raise ReadFailure("unreadable", str(exc)) from None
    except (EOFError, ValueError, KeyError, TypeError, OverflowError, IndexError, AttributeError,
            struct.error, UnicodeError, NotImplementedError) as exc:
        raise ReadFailure("corrupt", f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise ReadFailure("unreadable", str(exc)) from None


def _is_multi(value) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


def _value(ds, keyword: str):
    try:
        return ds.get(keyword, None)
    except Exception as exc:  # a value pydicom cannot convert (wrong length for its VR, ...)
        raise ReadFailure("corrupt", f"{keyword} cannot be read ({type(exc).__name__}: {exc})") from None


def _text(ds, keyword: str) -> str:
    value = _value(ds, keyword)
    if value is None:
        return ""
    if _is_multi(value):
        return "\\".join(str(v).strip() for v in value)  # as the value is encoded, not a Python list repr
    return str(value).strip()


def _uid(ds, keyword: str, label: str) -> str:
    """A UID attribute, which has VM 1: a multi-valued one is corrupt, not guessed from."""
    value = _value(ds, keyword)
    if value is None:
        return ""
    if _is_multi(value):
        if len(value) > 1:
            joined = "\\".join(map(str, value))
            raise ReadFailure("corrupt", f"{label} has {len(value)} values ({joined}); DICOM allows one (VM 1)")
        value = value[0] if len(value) else ""
    return str(value).strip()


def _int(ds, keyword: str, default: int | None = None) -> int:
    """A whole-number attribute (US, IS): missing -> default (or corrupt when required), anything else -> corrupt."""
    value = _value(ds, keyword)
    if value is None or value == "":
        if default is None:
            raise ReadFailure("corrupt", f"image pixel module incomplete ({keyword} missing)")
        return default
    if _is_multi(value):
        raise ReadFailure("corrupt", f"{keyword} has {len(value)} values; DICOM allows one")
    try:
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float):
            if not number.is_integer():
                raise ValueError
            number = int(number)
        return int(number)
    except (TypeError, ValueError, OverflowError):
        raise ReadFailure("corrupt", f"{keyword} is {short(repr(value))[:60]}, not a whole number") from None


def _numbers(ds, keyword: str, single: bool = False) -> list[float]:
    """A decimal attribute (DS) as finite floats; text, NaN or infinity is corrupt. [] when absent."""
    value = _value(ds, keyword)
    if value is None or value == "":
        return []
    values = list(value) if _is_multi(value) else [value]
    if single and len(values) > 1:
        raise ReadFailure("corrupt", f"{keyword} has {len(values)} values; DICOM allows one")
    out = []
    for item in values:
        try:
            number = float(item)
        except (TypeError, ValueError, OverflowError):
            raise ReadFailure("corrupt", f"{keyword} is {short(repr(str(item)))[:60]}, not a number") from None
        if not np.isfinite(number):
            raise ReadFailure("corrupt", f"{keyword} is {number}, not a finite number")
        out.append(number)
    return out


_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"})
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"})


@dataclass(frozen=True)
class Layout:
    """The pixel layout the header declares, checked for consistency."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    photometric: str

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, self.columns) if self.samples == 1 else (self.rows, self.columns, self.samples)


def _layout(ds, keyword: str, policy: ChestPolicy) -> Layout:
    """Rows, columns, samples and bits, consistent with each other and the pixel data element, or corrupt."""
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    samples = _int(ds, "SamplesPerPixel", 1)
    if rows < 1 or cols < 1:
        raise ReadFailure("corrupt", f"image of {rows}x{cols} pixels")
    if rows * cols > policy.max_pixels:
        raise ReadFailure("too-large", f"{rows}x{cols} exceeds {policy.max_pixels} pixels")
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if (photometric in _MONOCHROME and samples != 1) or (photometric in _COLOUR and samples != 3):
        raise ReadFailure("corrupt", f"Photometric Interpretation {photometric} with {samples} samples per pixel")
    if samples not in (1, 3):
        raise SkipFile("unsupported", f"{samples} samples per pixel")
    if samples == 3 and _int(ds, "PlanarConfiguration", 0) not in (0, 1):
        raise ReadFailure("corrupt", f"Planar Configuration {_int(ds, 'PlanarConfiguration', 0)}")
    allocated = _int(ds, "BitsAllocated")
    if keyword != "PixelData":
        needed = 32 if keyword == "FloatPixelData" else 64
        if allocated != needed:
            raise ReadFailure("corrupt", f"{keyword} with Bits Allocated {allocated} (must be {needed})")
        return Layout(rows, cols, samples, allocated, allocated, photometric)
    if allocated != 1 and (allocated % 8 or not 8 <= allocated <= 64):
        raise ReadFailure("corrupt", f"Bits Allocated {allocated} (must be 1 or a multiple of 8 up to 64)")
    stored = _int(ds, "BitsStored", allocated)
    if not 1 <= stored <= allocated:
        raise ReadFailure("corrupt", f"Bits Stored {stored} with Bits Allocated {allocated}")
    high_bit = _int(ds, "HighBit", stored - 1)
    if not stored - 1 <= high_bit < allocated:
        raise ReadFailure("corrupt", f"High Bit {high_bit} with Bits Stored {stored} and Bits Allocated {allocated}")
    if _int(ds, "PixelRepresentation", 0) not in (0, 1):
        raise ReadFailure("corrupt", f"Pixel Representation {_int(ds, 'PixelRepresentation', 0)} (must be 0 or 1)")
    return Layout(rows, cols, samples, allocated, stored, photometric)


def _is_image_like(ds) -> bool:
    """Header of an image (Image Pixel module, or an image storage SOP class): without pixel data it was cut."""
    if any(keyword in ds for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel")):
        return True
    for holder, keyword in ((ds, "SOPClassUID"), (getattr(ds, "file_meta", None), "MediaStorageSOPClassUID")):
        if holder is None:
            continue
        try:
            name = getattr(holder.get(keyword, None), "name", "") or ""
        except Exception:
            name = ""
        if "Image Storage" in name:
            return True
    return False


def read_dicom(path: str | Path, policy: ChestPolicy = ChestPolicy(), min_side: int | None = None) -> Radiograph:
    """Read, classify and decode one DICOM file. Raises SkipFile or ReadFailure with the reason, nothing else.

    min_side: decode at the resolution a model needs (see "Reduced decoding" below): the returned pixels may be
    smaller than the header's Rows x Columns, by an integer factor per side, but their short side stays >= min_side.
    None (default): full resolution."""
    try:
        return _read_dicom(Path(path), policy, min_side)
    except (SkipFile, ReadFailure):
        raise
    except MemoryError:
        raise ReadFailure("too-large", "out of memory while decoding") from None
    except Exception as exc:  # a malformed value tripping a library: still one line with the reason
        raise ReadFailure("corrupt", f"unexpected {type(exc).__name__}: {exc}") from None


def _read_dicom(path: Path, policy: ChestPolicy, min_side: int | None = None) -> Radiograph:
    if not is_dicom_file(path):
        raise SkipFile("not-an-image", "not a DICOM file (no DICM preamble)")
    structure = check_structure(path, policy)
    ds = read_header(path)
    pixel_keyword = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if pixel_keyword is None:
        if structure.elements == 0:
            raise ReadFailure("corrupt", "no data elements after the file meta information (truncated)")
        if _is_image_like(ds):
            raise ReadFailure("corrupt", "image header without pixel data (truncated)")
        sop_class = getattr(_value(ds, "SOPClassUID"), "name", "") or _text(ds, "SOPClassUID")
        raise SkipFile("not-an-image", f"DICOM without pixel data ({sop_class or 'unknown SOP class'})")
    modality = _text(ds, "Modality").upper()
    body_part = _text(ds, "BodyPartExamined").upper()
    policy.check(modality, body_part)

    sop_uid = _uid(ds, "SOPInstanceUID", "SOP Instance UID")
    if not sop_uid:
        raise ReadFailure("corrupt", "missing SOP Instance UID")
    series_uid = _uid(ds, "SeriesInstanceUID", "Series Instance UID")
    study_uid = _uid(ds, "StudyInstanceUID", "Study Instance UID")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames < 0:
        raise ReadFailure("corrupt", f"Number of Frames {frames}")
    if frames > 1:
        raise SkipFile("unsupported", f"multi-frame image ({frames} frames)")
    layout = _layout(ds, pixel_keyword, policy)
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        _numbers(ds, keyword, single=True)
    for keyword in ("WindowCenter", "WindowWidth"):
        _numbers(ds, keyword)
    _check_pixel_data(path, structure, layout)

    decoded = None
    if min_side:
        decoded = _decode_reduced(ds, path, structure, layout, min_side)
    if decoded is None:
        stored, reader, rescaled = _decode(ds, path, layout)
        decoded = Decoded(stored, reader, rescaled, pixel_hash(stored), 1, _describe_full(ds, reader))
        if min_side and stored.ndim == 2:  # no reduced decoder for this syntax: reduce the stored values before LUTs
            factor = min(layout.rows, layout.columns) // min_side
            if factor >= 2:
                decoded.stored, decoded.factor = block_mean(stored, factor), factor
                decoded.decoder += f", block mean 1/{factor}"
    stored = decoded.stored
    pixels = to_display(stored, ds, already_rescaled=decoded.rescaled)
    expected = reduced_shape(layout.rows, layout.columns, decoded.factor)
    if pixels.shape != expected or pixels.dtype != np.float32 or not np.isfinite(pixels).all():
        raise ReadFailure("corrupt", f"display image {pixels.shape} {pixels.dtype} does not match the header "
                                     f"({layout.rows}x{layout.columns}, reduced 1/{decoded.factor}: {expected}) or is "
                                     "not finite")
    tsyntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    return Radiograph(
        pixels=pixels,
        sop_uid=sop_uid,
        series_uid=series_uid,
        study_uid=study_uid,
        patient_id=_text(ds, "PatientID") or None,
        modality=modality,
        body_part=body_part,
        view=_text(ds, "ViewPosition").upper(),
        study_date=_text(ds, "StudyDate"),
        study_description=_text(ds, "StudyDescription"),
        photometric=layout.photometric,
        transfer_syntax=str(tsyntax),
        bits_stored=layout.bits_stored,
        reader=decoded.reader,
        pixel_hash=decoded.pixel_hash,
        reduction=decoded.factor,
        decoder=decoded.decoder,
        attributes=_optional_texts(ds, DEMOGRAPHICS),
    )


# Header attributes ingest turns into case attributes (medsim.ingest.case_attributes: sex, age); the birth date only
# serves to compute an age and is not kept.
DEMOGRAPHICS = ("PatientSex", "PatientAge", "PatientBirthDate")


def _optional_texts(ds, keywords) -> dict[str, str]:
    """The non-empty texts of optional attributes; one pydicom cannot read is left out, never a reason to fail."""
    out = {}
    for keyword in keywords:
        try:
            text = _text(ds, keyword)
        except ReadFailure:
            continue
        if text:
            out[keyword] = text
    return out


# --- Pixel data against the header -----------------------------------------------------------------------------------

def _check_pixel_data(path: Path, structure: Structure, layout: Layout) -> None:
    """Native: the length the header declares. Encapsulated: fragments, and a JPEG/J2K frame of the header's size."""
    from pydicom.uid import UID

    element = structure.pixels
    if element is None:  # pydicom found pixel data the walk did not (not at the top level): let pydicom decide
        return
    tsyntax = UID(structure.transfer_syntax) if structure.transfer_syntax else None
    encapsulated = bool(tsyntax is not None and tsyntax.is_encapsulated)
    if not encapsulated:
        if element.length is None:
            raise ReadFailure("corrupt", f"encapsulated pixel data under a native transfer syntax "
                                         f"({tsyntax or 'none declared'})")
        pixels = layout.rows * layout.columns * layout.samples
        expected = (pixels + 7) // 8 if layout.bits_allocated == 1 else pixels * layout.bits_allocated // 8
        if layout.photometric == "YBR_FULL_422":
            expected = expected // 3 * 2
        if element.length != expected and not (expected % 2 and element.length == expected + 1):
            raise ReadFailure("corrupt", f"{element.keyword} holds {element.length} bytes; {layout.rows}x"
                                         f"{layout.columns}x{layout.samples} at {layout.bits_allocated} bits needs "
                                         f"{expected}")
        return
    if element.keyword != "PixelData":
        raise ReadFailure("corrupt", f"{element.keyword} under an encapsulated transfer syntax ({tsyntax.name})")
    if element.length is not None:
        raise ReadFailure("corrupt", f"native pixel data under an encapsulated transfer syntax ({tsyntax.name})")
    fragments = element.items[1:]  # the first item is the basic offset table
    if not fragments or fragments[0][1] == 0:
        raise ReadFailure("corrupt", "encapsulated pixel data without a (non-empty) fragment")
    size = None
    if tsyntax.is_compressed and not structure.deflated:
        offset, length = fragments[0]
        with open(path, "rb") as fh:
            fh.seek(offset)
            head = fh.read(min(length, CODESTREAM_HEADER_BYTES))
        from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

        htj2k = ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")
        if tsyntax in JPEGTransferSyntaxes or tsyntax in JPEGLSTransferSyntaxes:
            size, kind = jpeg_frame_size(head), "JPEG"
        elif tsyntax in JPEG2000TransferSyntaxes or tsyntax in htj2k:
            size, kind = j2k_frame_size(head), "JPEG 2000"
    if size is not None:
        rows, cols, components = size
        if (rows and rows != layout.rows) or cols != layout.columns or components != layout.samples:
            raise ReadFailure("corrupt", f"{kind} frame is {rows}x{cols} with {components} component(s); the header "
                                         f"declares {layout.rows}x{layout.columns} with {layout.samples}")


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def _sof_frame_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG / JPEG-LS codestream's SOF segment; None when not found in ``data``.
    Rows may be 0 (defined later by a DNL segment). For the processes no library reads cheaply (see below)."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any SOF
            return None
        if marker in _SOF_MARKERS:
            if i + 10 > len(data):
                return None
            rows, cols = struct.unpack(">HH", data[i + 5:i + 9])
            return rows, cols, data[i + 9]
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def jpeg_frame_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) of a JPEG / JPEG-LS codestream; None when ``data`` holds no frame header.

    Baseline, extended 8-bit and progressive JPEG: Pillow's own header reader (libjpeg-turbo's markers, nothing
    decoded, ~0.5 ms). JPEG Lossless, 12/16-bit and JPEG-LS frames, which Pillow does not open: the SOF segment read
    here. libjpeg's ``get_parameters`` (pylibjpeg-libjpeg) would read them too, but it sets up a decoder for the
    whole frame whatever bytes it is given: 0.2 s for a 5.6 MP JPEG Lossless frame, 1.1 s for a 6.6 MP JPEG-LS frame
    (measured; more than decoding the frame with GDCM), so it is not used on the hot path."""
    if data[:2] != b"\xff\xd8":
        return None
    try:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            return image.size[1], image.size[0], len(image.getbands())
    except Exception:  # not a process Pillow opens: the SOF segment below
        pass
    return _sof_frame_size(data)


def j2k_frame_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) of a JPEG 2000 codestream (raw, or in a JP2 box), read by OpenJPEG's own header
    reader (pylibjpeg-openjpeg ``get_parameters``: the SIZ segment, nothing decoded); None when absent or unreadable."""
    if not (data.startswith(b"\xff\x4f\xff\x51") or data.startswith(b"\x00\x00\x00\x0cjP  ")):
        return None
    try:
        from openjpeg import get_parameters

        params = get_parameters(data)
    except Exception:
        return None
    return int(params["rows"]), int(params["columns"]), int(params["samples_per_pixel"])


# --- Reduced decoding (issue 14) --------------------------------------------------------------------------------------
#
# A model that sees 224 x 224 needs far less than a 3,000 x 2,500 radiograph: with ``min_side`` (build-index passes
# 4 x the model input), the stored values are decoded or reduced to an image whose short side is still >= min_side,
# *before* the Modality LUT, VOI LUT / window and MONOCHROME1 inversion, which then run unchanged on 4-25 times fewer
# pixels. How, per transfer syntax (measured in benchmarks/bench_decode.py; docs/performance.md):
#
#   native (uncompressed, little endian, 8/16 bit)  the pixel bytes memory-mapped, masked to Bits Stored as pydicom
#                                                  does, averaged over factor x factor blocks
#   JPEG 2000 (lossless and lossy)                 OpenJPEG (through Pillow) decodes a lower resolution level: the
#                                                  wavelet's low-pass band at 1/2, 1/4, 1/8 (no full decode at all);
#                                                  lossy (9/7): one level less than possible, plus a block mean
#   JPEG Baseline, 8 bit                           libjpeg-turbo (Pillow ``draft``) scales in the DCT domain: 1/2, 1/4,
#                                                  1/8
#   everything else (JPEG Lossless, JPEG-LS, RLE,  full decode with the fastest decoder measured for the syntax
#   12-bit JPEG, deflated, big endian)            (DECODER_PREFERENCE), then the same block mean
#
# Any remaining factor after a codec's power-of-two reduction is a block mean too. Averaging before a pointwise LUT
# is not bit-identical to averaging after it where a window clips; the preprocessing then area-resamples to 224 px
# anyway. The test (tests/test_fullres.py) and the benchmark check the embeddings: cosine >= 0.995 per image against
# the full decode, mAP@10 within 0.005. Colour images and anything a reduced decoder refuses take the full path.
#
# pixel_hash of a reduced decode: native data and every fully decoded syntax hash their full stored values exactly as
# a full decode does. A JPEG 2000 or JPEG Baseline frame decoded at a lower resolution (with build-index's 4 x 224 px:
# a short side >= 1,792 px) hashes its *encoded* frame ("frame:" prefix): equal for copies of the same file under any UIDs, but not
# across encodings; the same pixels exported once as JPEG 2000 and once uncompressed are then not an "exact" pair for
# ``medsim duplicates`` / ``--skip-duplicates`` but a near-duplicate (embedding + pHash). The price of not decoding
# the full image.

# Full decode: the pydicom decoding plugin to try first, per transfer syntax (fastest measured with identical output;
# others, then SimpleITK, follow when it fails). Lossless syntaxes give the same values with every decoder; for JPEG
# Baseline, Pillow (libjpeg-turbo, ISLOW IDCT) is bit-identical to GDCM, pydicom's first choice, on every baseline
# file of the sample and realistic exports, and 3-5 times faster (pylibjpeg-libjpeg differs by +-1: not used).
DECODER_PREFERENCE = {
    "1.2.840.10008.1.2.4.50": "pillow",     # JPEG Baseline 8 bit
    "1.2.840.10008.1.2.4.57": "pylibjpeg",  # JPEG Lossless process 14
    "1.2.840.10008.1.2.4.70": "pylibjpeg",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "gdcm",       # JPEG-LS lossless: CharLS in GDCM is ~3x libjpeg's JPEG-LS
    "1.2.840.10008.1.2.4.81": "gdcm",
    "1.2.840.10008.1.2.5": "pylibjpeg",     # RLE: pylibjpeg-rle (C) against pydicom's numpy RLE decoder
}
_J2K = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
_NATIVE_LE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
# JPEG Baseline is DCT-scaled whenever a reduction is asked for (factor >= 2). Images too small for a reduction are
# decoded in full (Pillow), which keeps the exact pixel_hash of their stored values.
MIN_JPEG_DCT_FACTOR = 2
MAX_J2K_LEVELS = 5  # lower resolution levels tried (1/2 .. 1/32); a codestream with fewer decomposition levels fails
                    # in the decoder and takes the full path


@dataclass
class Decoded:
    stored: np.ndarray
    reader: str
    rescaled: bool
    pixel_hash: str
    factor: int = 1
    decoder: str = ""


def reduced_shape(rows: int, columns: int, factor: int) -> tuple[int, int]:
    """Shape of an image reduced by ``factor`` per side: partial blocks at the edges count (ceil), as JPEG 2000
    resolution levels, JPEG DCT scaling and :func:`block_mean` all do."""
    return -(-rows // factor), -(-columns // factor)


def block_mean(stored: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each factor x factor block (edge blocks: of the pixels they have), float32, (ceil(r/f), ceil(c/f))."""
    if factor <= 1:
        return stored
    rows, cols = stored.shape
    total = stored[0::factor].astype(np.float32)
    for k in range(1, factor):
        part = stored[k::factor]
        total[:part.shape[0]] += part
    out = total[:, 0::factor].copy()
    for k in range(1, factor):
        part = total[:, k::factor]
        out[:, :part.shape[1]] += part
    row_counts = np.minimum(factor, rows - np.arange(0, rows, factor)).astype(np.float32)
    col_counts = np.minimum(factor, cols - np.arange(0, cols, factor)).astype(np.float32)
    out /= row_counts[:, None]
    out /= col_counts[None, :]
    return out


def _describe_full(ds, reader: str) -> str:
    if reader != "pydicom":
        return reader
    tsyntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    plugin = DECODER_PREFERENCE.get(tsyntax)
    return f"pydicom ({plugin} first)" if plugin else "pydicom"


def _decode_reduced(ds, path: Path, structure: Structure, layout: Layout, min_side: int) -> Decoded | None:
    """A reduced decode of a grey image whose short side is >= 2 x min_side (else None: full decode)."""
    factor = min(layout.rows, layout.columns) // min_side
    if factor < 2 or layout.samples != 1 or structure.pixels is None or structure.deflated \
            or structure.pixels.keyword != "PixelData" or layout.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    tsyntax = structure.transfer_syntax
    signed = _int(ds, "PixelRepresentation", 0) == 1
    if tsyntax in _NATIVE_LE and structure.pixels.offset is not None and layout.bits_allocated in (8, 16):
        return _native_reduced(path, structure.pixels, layout, signed, factor)
    if tsyntax in _J2K and not signed:
        return _j2k_reduced(ds, layout, factor)
    if tsyntax == _JPEG_BASELINE and layout.bits_allocated == 8 and factor >= MIN_JPEG_DCT_FACTOR:
        return _jpeg_reduced(ds, layout, factor)
    return None


def _native_reduced(path: Path, element: PixelElement, layout: Layout, signed: bool, factor: int) -> Decoded:
    dtype = np.dtype(("<i" if signed else "<u") + str(layout.bits_allocated // 8))
    stored = np.memmap(path, dtype=dtype, mode="r", offset=element.offset, shape=(layout.rows, layout.columns))
    try:
        if layout.bits_stored < layout.bits_allocated:  # as pydicom: unused high bits cleared / sign extended
            if signed:
                shift = layout.bits_allocated - layout.bits_stored
                stored = (np.asarray(stored) << shift) >> shift
            else:
                stored = np.bitwise_and(stored, dtype.type((1 << layout.bits_stored) - 1))
        stored = np.asarray(stored)  # a plain array (a view of the map when nothing was masked)
        return Decoded(block_mean(stored, factor), "pydicom", False, pixel_hash(stored), factor,
                       f"native memory map, block mean 1/{factor}")
    finally:
        del stored  # the map is closed when its last view goes


def _first_frame(ds) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _j2k_reduced(ds, layout: Layout, factor: int) -> Decoded | None:
    """OpenJPEG decodes resolution level r (1/2**r per side) of the codestream, through Pillow (pylibjpeg-openjpeg
    2.x has no reduce option); the rest of ``factor`` is a block mean."""
    import io

    from PIL import Image, ImageFile

    frame = _first_frame(ds)
    size = j2k_frame_size(frame[:CODESTREAM_HEADER_BYTES])
    if size is None or size != (layout.rows, layout.columns, 1):
        return None
    from openjpeg import get_parameters

    precision = int(get_parameters(frame)["precision"])
    if precision > 16 or precision > layout.bits_allocated:
        return None
    level = min(MAX_J2K_LEVELS, factor.bit_length() - 1)
    if str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.91" and level >= 2:
        # lossy (9/7) codestreams: the 9/7 low-pass at 1/4 and beyond is smoother than the area resampling of the
        # full image (embedding cosine down to 0.9952 on the realistic export); one level less plus a block mean
        # stays >= 0.9975, at about twice the decode time of the lower level
        level -= 1
    try:
        with Image.open(io.BytesIO(frame)) as image:
            power = 1 << level
            # Pillow rounds a reduced size half up; OpenJPEG's is ceil(size / 2**level) for an image at the origin.
            # Set the tile as Pillow's own ``reduce`` does, with OpenJPEG's size.
            width, height = reduced_shape(layout.columns, layout.rows, power)
            tile = image.tile[0]
            image._reduce = level
            image._size = (width, height)
            image.tile = [ImageFile._Tile(tile[0], (0, 0, width, height), tile[2],
                                          (tile[3][0], level, image.layers, tile[3][3], tile[3][4]))]
            ImageFile.ImageFile.load(image)
            array = np.array(image)
    except Exception:  # fewer decomposition levels than asked, an odd origin, a Pillow without OpenJPEG: full path
        return None
    if array.shape != reduced_shape(layout.rows, layout.columns, power):
        return None
    if array.dtype == np.uint16 and precision < 16:  # Pillow scales to 16 bits; back to the stored precision
        array >>= 16 - precision
    rest = factor // power
    stored = block_mean(array, rest) if rest >= 2 else array
    total = power * max(rest, 1)
    return Decoded(stored, "pydicom", False, _frame_hash(frame), total,
                   f"OpenJPEG (Pillow) resolution 1/{power}" + (f", block mean 1/{rest}" if rest >= 2 else ""))


def _jpeg_reduced(ds, layout: Layout, factor: int) -> Decoded | None:
    """libjpeg-turbo scales an 8-bit baseline JPEG in the DCT domain (Pillow ``draft``): 1/2, 1/4 or 1/8."""
    import io

    from PIL import Image

    frame = _first_frame(ds)
    power = 1 << min(3, factor.bit_length() - 1)
    want = reduced_shape(layout.rows, layout.columns, power)
    try:
        with Image.open(io.BytesIO(frame)) as image:
            if image.mode != "L" or image.size != (layout.columns, layout.rows):
                return None
            # draft() picks the largest scale whose output is at least the size asked for: ask for the floor
            image.draft("L", (layout.columns // power, layout.rows // power))
            array = np.array(image)
    except Exception:
        return None
    if array.shape != want:
        return None
    rest = factor // power
    stored = block_mean(array, rest) if rest >= 2 else array
    return Decoded(stored, "pydicom", False, _frame_hash(frame), power * max(rest, 1),
                   f"libjpeg-turbo (Pillow) DCT scaling 1/{power}" + (f", block mean 1/{rest}" if rest >= 2 else ""))


def _frame_hash(frame: bytes) -> str:
    return "frame:" + hashlib.sha1(frame).hexdigest()


# --- Decoding --------------------------------------------------------------------------------------------------------

def _decode(ds, path: Path, layout: Layout | None = None) -> tuple[np.ndarray, str, bool]:
    """Stored pixel values: pydicom first, SimpleITK as fallback. Returns (array, reader, rescale_applied).

    Either reader's result must have the header's shape (rows, columns[, samples]) and finite values."""
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
            arr = _pixel_array(ds, str(tsyntax) if tsyntax is not None else "")
        except MemoryError:
            raise
        except Exception as exc:  # decoders raise many types; any failure falls through to SimpleITK
            first_error = exc
        else:
            return _checked(arr, layout, "pydicom"), "pydicom", False
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size, components = tuple(reader.GetSize()), reader.GetNumberOfComponents()
    except Exception as exc:
        if first_error is None and not pydicom_can:
            raise SkipFile("unsupported", f"no decoder for transfer syntax {tsyntax} ({tsyntax.name})") from None
        reason = "corrupt" if _looks_truncated(first_error or exc) else "decode-error"
        raise ReadFailure(reason, f"pydicom: {first_error}; SimpleITK: {_last_line(exc)}") from None
    if layout is not None and (size[:2] != (layout.columns, layout.rows) or any(s != 1 for s in size[2:])
                               or components != layout.samples):
        raise ReadFailure("corrupt", f"pydicom: {first_error}; SimpleITK reads {'x'.join(map(str, size))} with "
                                     f"{components} component(s), the header declares {layout.columns}x{layout.rows}"
                                     f" with {layout.samples}")
    try:
        arr = sitk.GetArrayFromImage(reader.Execute())
    except MemoryError:
        raise
    except Exception as exc:
        reason = "corrupt" if _looks_truncated(first_error or exc) else "decode-error"
        raise ReadFailure(reason, f"pydicom: {first_error}; SimpleITK: {_last_line(exc)}") from None
    if arr.ndim >= 3 and arr.shape[0] == 1:
        arr = arr[0]
    # SimpleITK (GDCM) applies Rescale Slope/Intercept when it reads.
    return _checked(arr, layout, "SimpleITK"), "simpleitk", True


def _pixel_array(ds, tsyntax: str) -> np.ndarray:
    """ds.pixel_array, with the preferred plugin for the syntax first (DECODER_PREFERENCE) when it is available."""
    plugin = DECODER_PREFERENCE.get(tsyntax)
    if plugin:
        from pydicom.pixels import get_decoder

        try:
            if plugin in get_decoder(tsyntax).available_plugins:
                ds.pixel_array_options(decoding_plugin=plugin)
                return np.asarray(ds.pixel_array)
        except MemoryError:
            raise
        except Exception:  # the preferred plugin failed on this file: the others get their turn
            pass
        finally:
            ds.pixel_array_options(decoding_plugin="")
    return np.asarray(ds.pixel_array)


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def _checked(arr: np.ndarray, layout: Layout | None, reader: str) -> np.ndarray:
    """A decoded array with the header's shape and finite values, or ReadFailure(corrupt)."""
    if layout is not None and arr.shape != layout.shape:
        raise ReadFailure("corrupt", f"{reader} decoded {arr.shape}, the header declares {layout.shape}")
    if arr.dtype.kind == "f":
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise ReadFailure("corrupt", f"pixel data holds {bad} NaN or infinite value(s)")
    return arr


def _looks_truncated(exc: BaseException) -> bool:
    text = str(exc).lower()
    words = ("length", "truncat", "end of", "eof", "too short", "missing", "not enough", "less than expected")
    return any(word in text for word in words)


# --- Display ---------------------------------------------------------------------------------------------------------

def to_display(stored: np.ndarray, ds, already_rescaled: bool = False) -> np.ndarray:
    """Stored values -> (H, W) float32 in [0, 1], 0 = black, per the DICOM display pipeline.

    Raises ReadFailure(corrupt) when the Modality LUT / rescale yields non-finite values or an infinite range."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    photometric = _text(ds, "PhotometricInterpretation").upper()
    if stored.ndim == 3:  # colour (pydicom hands RGB): ITU-R BT.601 luminance
        maximum = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
        gray = stored[..., 0] * 0.299 + stored[..., 1] * 0.587 + stored[..., 2] * 0.114
        return np.clip(gray / maximum, 0.0, 1.0).astype(np.float32)

    try:
        with np.errstate(over="ignore", invalid="ignore"):
            values = stored if already_rescaled else apply_modality_lut(stored, ds)
            values = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, struct.error) as exc:
        raise ReadFailure("corrupt", f"Modality LUT cannot be applied ({type(exc).__name__}: {exc})") from None
    if not np.isfinite(values).all():
        raise ReadFailure("corrupt", "Modality LUT / Rescale Slope and Intercept give non-finite values "
                                     f"(slope {ds.get('RescaleSlope', 1)}, intercept {ds.get('RescaleIntercept', 0)})")
    display = _voi_lut(values, ds, apply_voi)
    if display is None:
        display = _first_valid_window(values, ds)
    if display is None:
        low, high = float(values.min()), float(values.max())
        if not np.isfinite(high - low):
            raise ReadFailure("corrupt", f"pixel value range [{low:g}, {high:g}] is too wide to display")
        display = (values - low) / (high - low) if high > low else np.zeros_like(values)
    display = np.clip(display, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        display = 1.0 - display
    return display.astype(np.float32)


def _voi_lut(values: np.ndarray, ds, apply_voi) -> np.ndarray | None:
    """The first VOI LUT of the VOI LUT Sequence, scaled to [0, 1]; None when absent or unusable."""
    voi_sequence = ds.get("VOILUTSequence")
    if not voi_sequence:
        return None
    try:
        # Output of a VOI LUT spans 0 .. 2**n - 1, n = third value of its LUT Descriptor (PS3.3 C.11.2.1.1).
        bits = int(voi_sequence[0].LUTDescriptor[2])
        if not 1 <= bits <= 16:
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            mapped = np.asarray(apply_voi(np.rint(values).astype(np.int64), ds, index=0), dtype=np.float64)
    except Exception:  # a malformed VOI LUT is ignored like an invalid window
        return None
    if not np.isfinite(mapped).all():
        return None
    return mapped / float(2**bits - 1)


def window_is_valid(width: float, function: str = "LINEAR") -> bool:
    """PS3.3 C.11.2.1.2: LINEAR needs Window Width >= 1; LINEAR_EXACT (C.11.2.1.3.2) and SIGMOID need > 0."""
    if not np.isfinite(width):
        return False
    return width > 0 if function in ("LINEAR_EXACT", "SIGMOID") else width >= 1


def _first_valid_window(values: np.ndarray, ds) -> np.ndarray | None:
    """The first valid Window Center/Width pair applied; None when there is none."""
    centers, widths = _numbers(ds, "WindowCenter"), _numbers(ds, "WindowWidth")
    function = _text(ds, "VOILUTFunction").upper() or "LINEAR"
    for center, width in zip(centers, widths):
        if window_is_valid(width, function):
            return _window(values, center, width, function)
    return None


def _window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """One Window Center/Width (PS3.3 C.11.2.1.2, C.11.2.1.3) mapped to [0, 1]; the width is valid for the function."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if function == "LINEAR_EXACT":
            return (values - (center - width / 2)) / width
        if function == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        if width > 1:
            return (values - (center - 0.5)) / (width - 1.0) + 0.5
        return (values >= center).astype(np.float64)

"""A corpus of hostile files for the reader (issue 13), built from the real sample DICOM files with pydicom.

``build_corpus(folder)`` writes the files and returns the manifest: one :class:`HostileFile` per file with its class,
a printable variant name and the outcomes it may end with: ``"indexed"``, ``"skipped:<reason>"`` or
``"failed:<reason>"`` (``"skipped:*"`` / ``"failed:*"`` accept any reason). Every file that is expected to be indexed
has its own SOP Instance UID, so a build over the whole folder gives the same outcome per file as reading it alone.

Classes (several variants each):

truncated         real files cut at many offsets (inside the preamble: not DICOM, skipped; from the DICM prefix on:
                  corrupt), several transfer syntaxes (implicit/explicit native, JPEG, JPEG 2000, RLE, deflated)
wrong-length      a data element's length field off by a few bytes or by far (meta, header, pixel data, fragments)
float-pixels      Float / Double Float Pixel Data holding NaN or +-Inf (corrupt); finite float images (indexed)
rescale-overflow  Rescale Slope 1e308, a range wider than float64, NaN / infinite slope or intercept
infinite-window   Window Center/Width infinite or NaN (corrupt)
short-pixels      native pixel data shorter than the header declares (SimpleITK would pad it)
bits              Bits Stored > Bits Allocated, High Bit out of range, Bits Allocated 12, Pixel Representation 2
samples-lie       Samples per Pixel that contradicts the photometric interpretation or the pixel data
frame-size-lie    a JPEG / JPEG 2000 frame of another size than the header, an 8000 x 8000 JPEG under 64 x 64
huge-header       9999 x 9999 (and 30000 x 30000) declared over a few bytes of pixel data
deflate-bomb      Deflated Explicit VR Little Endian files whose stream inflates to hundreds of MB
text-in-numbers   Window Center "abc", Number of Frames "x", Rescale Slope "abc" (corrupt); Instance Number "x"
                  (indexed: the reader does not use it)
unknown-ts        a transfer syntax UID nobody knows (skipped: unsupported)
ybr-in-mono       YBR pixel data (a 3-component JPEG) or a YBR photometric in a file that says MONOCHROME2
multi-uid         SOP / Study / Series Instance UID with two values (VM 1 attributes: corrupt)
narrow-window     LINEAR windows narrower than 1 (ignored: next window or min-max), LINEAR_EXACT 0.5 (valid)
byte-flips        random bytes flipped in pixel data (indexed), in the header or a JPEG stream (any clean outcome)
zero-byte         an empty file (not an image), a bare DICM preamble, DICM followed by noise (corrupt)
non-utf8-name     a valid file named b'\\xff\\xfe.dcm' (indexed by the reader; only with non_utf8_name=True)
valid             untouched copies of real files (indexed)
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]

INDEXED = ("indexed",)
CORRUPT = ("failed:corrupt",)
NOT_AN_IMAGE = ("skipped:not-an-image",)
TOO_LARGE = ("failed:too-large",)
UNSUPPORTED = ("skipped:unsupported",)
NON_FINITE = ("failed:corrupt", "failed:decode-error")
ANY = ("indexed", "skipped:*", "failed:*")

CLASSES = ("valid", "truncated", "wrong-length", "float-pixels", "rescale-overflow", "infinite-window", "short-pixels",
           "bits", "samples-lie", "frame-size-lie", "huge-header", "deflate-bomb", "text-in-numbers", "unknown-ts",
           "ybr-in-mono", "multi-uid", "narrow-window", "byte-flips", "zero-byte", "non-utf8-name")

NIH = "nih_gcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"  # implicit VR LE, 8 bit
SIIM = "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"  # JPEG baseline, 8 bit
NON_UTF8_NAME = b"\xff\xfe.dcm"


@dataclass(frozen=True)
class HostileFile:
    path: Path
    cls: str
    variant: str
    expected: tuple[str, ...]

    @property
    def non_utf8(self) -> bool:
        return os.fsencode(self.path.name) == NON_UTF8_NAME

    def allows(self, outcome: str) -> bool:
        """Whether ``outcome`` ("indexed", "skipped:<reason>", "failed:<reason>") is one this file may end with."""
        status = outcome.split(":")[0]
        return outcome in self.expected or f"{status}:*" in self.expected


class _Corpus:
    def __init__(self, out: Path, sample_dir: Path, shared_dicom: Path, seed: int):
        self.out = out
        self.files: list[HostileFile] = []
        self.rng = random.Random(seed)
        self.sources = _sources(sample_dir, shared_dicom)

    # -- writing ------------------------------------------------------------------------------------------------------

    def _path(self, cls: str, variant: str) -> Path:
        folder = self.out / cls
        folder.mkdir(parents=True, exist_ok=True)
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in variant)
        return folder / f"{len(self.files):03d}_{name}"

    def add_bytes(self, cls: str, variant: str, data: bytes, expected: tuple[str, ...]) -> Path:
        path = self._path(cls, variant)
        path.write_bytes(data)
        self.files.append(HostileFile(path, cls, variant, expected))
        return path

    def add_dataset(self, cls: str, variant: str, ds, expected: tuple[str, ...], fresh_uid: bool = True) -> Path:
        return self.add_bytes(cls, variant, dataset_bytes(ds, variant if fresh_uid else None), expected)

    def read(self, source: str):
        return pydicom.dcmread(self.sources[source])

    def raw(self, source: str) -> bytes:
        return self.sources[source].read_bytes()


def dataset_bytes(ds, fresh_uid_seed: str | None = None) -> bytes:
    """``ds`` as a Part 10 file; with a seed, under a new SOP Instance UID derived from it."""
    if fresh_uid_seed is not None:
        uid = generate_uid(entropy_srcs=["medsim-hostile", fresh_uid_seed])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _sources(sample_dir: Path, shared_dicom: Path) -> dict[str, Path]:
    """Real files to derive from: the two shared chest X-rays and one sample file per transfer syntax."""
    sources = {"nih": shared_dicom / NIH, "siim": shared_dicom / SIIM}
    manifest = json.loads((sample_dir / "manifest.json").read_text())
    wanted = {"j2k": "jpeg2000 12bit", "rle": "rle-lossless 8bit", "deflated": "deflated-explicit-vr-le",
              "explicit16": "explicit-vr-le 12bit-signed", "lossless": "jpeg-lossless-sv1 12bit",
              "baseline": "jpeg-baseline", "rgb": "explicit-vr-le 8bit RGB"}
    for key, prefix in wanted.items():
        entry = next(f for f in manifest["files"] if f["expected"] == "index" and f["variant"].startswith(prefix))
        sources[key] = sample_dir / entry["path"]
    for key, path in sources.items():
        if not path.is_file():
            raise FileNotFoundError(f"hostile corpus source {key}: {path}")
    return sources


def _element_offsets(data: bytes, keyword: str) -> tuple[int, int, int]:
    """(header start, length field offset, length field size) of a top-level element of a Part 10 file."""
    ds = pydicom.dcmread(io.BytesIO(data), defer_size=None)
    raw = ds.get_item(keyword)
    value_tell = raw.value_tell
    if raw.is_implicit_VR:
        return value_tell - 8, value_tell - 4, 4
    if raw.VR in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"):
        return value_tell - 12, value_tell - 4, 4
    return value_tell - 8, value_tell - 2, 2


def _meta_end(data: bytes) -> int:
    (group_length,) = struct.unpack("<L", data[140:144])  # (0002,0000) UL, value at 140
    return 144 + group_length


def _with_length(data: bytes, keyword: str, delta: int) -> bytes:
    _, at, size = _element_offsets(data, keyword)
    fmt = "<L" if size == 4 else "<H"
    (length,) = struct.unpack(fmt, data[at:at + size])
    return data[:at] + struct.pack(fmt, (length + delta) % (1 << (8 * size))) + data[at + size:]


def _patch(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and data.count(old) == 1, (old, new, data.count(old))
    return data.replace(old, new)


def _deflate_file(meta_ds, body_parts, out: Path) -> int:
    """A Deflated Explicit VR Little Endian Part 10 file from raw dataset byte chunks (streamed: nothing big is held
    in memory); returns the number of inflated bytes."""
    from pydicom.filewriter import write_file_meta_info
    from pydicom.filebase import DicomBytesIO

    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, meta_ds, enforce_standard=True)
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    inflated = 0
    with open(out, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        for part in body_parts:
            inflated += len(part)
            fh.write(compressor.compress(part))
        fh.write(compressor.flush())
    return inflated


def _zeros(total: int, chunk: int = 1 << 20):
    block = bytes(chunk)
    while total > 0:
        yield block[:min(chunk, total)]
        total -= chunk


def build_corpus(out: str | Path, sample_dir: str | Path | None = None, shared_dicom: str | Path | None = None,
                 *, non_utf8_name: bool = True, seed: int = 13) -> list[HostileFile]:
    """Write the hostile corpus into ``out`` (created; should be empty) and return its manifest."""
    from conftest import SAMPLE_DIR, SHARED_DICOM, sample_manifest

    if sample_dir is None:
        sample_manifest()  # builds the sample export when a fresh clone has none
    corpus = _Corpus(Path(out), Path(sample_dir or SAMPLE_DIR), Path(shared_dicom or SHARED_DICOM), seed)
    Path(out).mkdir(parents=True, exist_ok=True)
    for add in (_valid, _truncated, _wrong_length, _float_pixels, _rescale_overflow, _infinite_window, _short_pixels,
                _bits, _samples_lie, _frame_size_lie, _huge_header, _deflate_bomb, _text_in_numbers, _unknown_ts,
                _ybr_in_mono, _multi_uid, _narrow_window, _byte_flips, _zero_byte):
        add(corpus)
    if non_utf8_name:
        _non_utf8(corpus)
    return corpus.files


# -- the classes -------------------------------------------------------------------------------------------------------

def _valid(c: _Corpus) -> None:
    for key in ("nih", "siim", "j2k", "rle", "deflated", "lossless", "baseline"):
        c.add_bytes("valid", f"{key}-copy", c.raw(key), INDEXED)


def _truncated(c: _Corpus) -> None:
    for key in ("nih", "siim", "j2k", "rle", "deflated", "explicit16"):
        data = c.raw(key)
        meta_end = _meta_end(data)
        if key == "deflated":  # offsets inside the deflated stream
            inside = [meta_end + 3, meta_end + 200, len(data) // 3, len(data) // 2, len(data) - 40]
        else:
            pixel_start, _, _ = _element_offsets(data, "PixelData")
            inside = [c.rng.randrange(meta_end + 1, pixel_start), c.rng.randrange(meta_end + 1, pixel_start),
                      pixel_start, pixel_start + 6, pixel_start + 30, (pixel_start + len(data)) // 2]
        offsets = [100, 132, 150, meta_end - 5, meta_end] + inside + [len(data) - 8, len(data) - 2, len(data) - 1]
        for offset in sorted(set(offsets)):
            expected = NOT_AN_IMAGE if offset < 132 else CORRUPT
            c.add_bytes("truncated", f"{key}-cut-at-{offset}-of-{len(data)}", data[:offset], expected)


def _wrong_length(c: _Corpus) -> None:
    nih = c.raw("nih")
    for delta in (2, -2, -1000, 7):
        c.add_bytes("wrong-length", f"nih-pixeldata-length{delta:+d}", _with_length(nih, "PixelData", delta), CORRUPT)
    c.add_bytes("wrong-length", "nih-patientid-length+6", _with_length(nih, "PatientID", 6), CORRUPT)
    c.add_bytes("wrong-length", "nih-sopclass-length+100000", _with_length(nih, "SOPClassUID", 100000), CORRUPT)
    c.add_bytes("wrong-length", "nih-rows-length+2", _with_length(nih, "Rows", 2), CORRUPT)
    siim = c.raw("siim")
    c.add_bytes("wrong-length", "siim-patientid-length+4", _with_length(siim, "PatientID", 4), CORRUPT)
    c.add_bytes("wrong-length", "siim-rows-length-2", _with_length(siim, "Rows", -2), CORRUPT)
    c.add_bytes("wrong-length", "siim-studydate-length+0x100", _with_length(siim, "StudyDate", 0x100), CORRUPT)
    at = siim.index(b"\x02\x00\x10\x00UI") + 6  # Transfer Syntax UID in the file meta: swallows 2 bytes
    (length,) = struct.unpack("<H", siim[at:at + 2])
    c.add_bytes("wrong-length", "siim-meta-transfer-syntax-length+2",
                siim[:at] + struct.pack("<H", length + 2) + siim[at + 2:], CORRUPT)
    # encapsulated pixel data: the basic offset table item and the first fragment
    _, at, _ = _element_offsets(siim, "PixelData")
    value = at + 4
    bot_length = struct.unpack("<L", siim[value + 4:value + 8])[0]
    fragment = value + 8 + bot_length
    for name, where, delta in (("bot", value + 4, 4), ("fragment", fragment + 4, 10), ("fragment", fragment + 4, -10)):
        (length,) = struct.unpack("<L", siim[where:where + 4])
        c.add_bytes("wrong-length", f"siim-{name}-length{delta:+d}",
                    siim[:where] + struct.pack("<L", length + delta) + siim[where + 4:], CORRUPT)
    explicit = c.raw("explicit16")
    c.add_bytes("wrong-length", "explicit16-pixeldata-length-4", _with_length(explicit, "PixelData", -4), CORRUPT)


def _float_ds(c: _Corpus, double: bool, poison: float | None):
    ds = c.read("nih")
    values = ds.pixel_array.astype(np.float64 if double else np.float32) / 4.0
    if poison is not None:
        values.flat[c.rng.sample(range(values.size), 5)] = poison
    for keyword in ("PixelData", "BitsStored", "HighBit", "PixelRepresentation"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.BitsAllocated = 64 if double else 32
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if double:
        ds.DoubleFloatPixelData = values.tobytes()
    else:
        ds.FloatPixelData = values.tobytes()
    return ds


def _float_pixels(c: _Corpus) -> None:
    for double in (False, True):
        kind = "double" if double else "float"
        for poison, name in ((np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")):
            c.add_dataset("float-pixels", f"{kind}-{name}", _float_ds(c, double, poison), NON_FINITE)
        c.add_dataset("float-pixels", f"{kind}-finite", _float_ds(c, double, None), INDEXED)


def _rescale_overflow(c: _Corpus) -> None:
    for slope, intercept, name in (("1e308", "0", "slope-1e308"), ("1e306", "1.79e308", "slope-plus-intercept-inf")):
        ds = c.read("nih")
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        c.add_dataset("rescale-overflow", name, ds, NON_FINITE)
    # signed stored values -2048..2047: every rescaled value is finite, their range (max - min) is not
    ds = c.read("explicit16")
    ds.RescaleSlope, ds.RescaleIntercept = "8e304", "0"
    del ds.WindowCenter, ds.WindowWidth
    c.add_dataset("rescale-overflow", "range-wider-than-float64", ds, NON_FINITE)
    for keyword, text in (("RescaleSlope", b"nan     "), ("RescaleSlope", b"inf     "),
                          ("RescaleIntercept", b"1e999   ")):
        ds = c.read("nih")
        ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
        setattr(ds, keyword, "1.234567")
        data = _patch(dataset_bytes(ds, f"{keyword}-{text!r}"), b"1.234567", text)
        c.add_bytes("rescale-overflow", f"{keyword}-{text.strip().decode()}", data, NON_FINITE)


def _infinite_window(c: _Corpus) -> None:
    for center, width, name in ((b"inf     ", b"inf     ", "center-and-width-inf"),
                                (b"100     ", b"1e400   ", "width-1e400"),
                                (b"nan     ", b"200     ", "center-nan"),
                                (b"-inf    ", b"1e308   ", "center-minus-inf")):
        ds = c.read("nih")
        ds.WindowCenter, ds.WindowWidth = "1.234567", "7.654321"
        data = dataset_bytes(ds, name)
        data = _patch(_patch(data, b"1.234567", center), b"7.654321", width)
        c.add_bytes("infinite-window", name, data, NON_FINITE)
    ds = c.read("nih")  # a window over an infinite range: the rescale overflows first
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = "1e308", "0", "100", "200"
    c.add_dataset("infinite-window", "window-over-overflowing-rescale", ds, NON_FINITE)


def _short_pixels(c: _Corpus) -> None:
    ds = c.read("nih")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    c.add_dataset("short-pixels", "nih-half-the-pixel-data", ds, CORRUPT)
    ds = c.read("nih")
    ds.PixelData = ds.PixelData[:-1024 * 3]
    c.add_dataset("short-pixels", "nih-three-rows-short", ds, CORRUPT)
    ds = c.read("explicit16")
    ds.PixelData = ds.PixelData[:-2 * ds.Columns]
    c.add_dataset("short-pixels", "explicit16-one-row-short", ds, CORRUPT)
    ds = c.read("nih")
    ds.PixelData = ds.PixelData + bytes(4096)
    c.add_dataset("short-pixels", "nih-4096-bytes-too-many", ds, CORRUPT)


def _bits(c: _Corpus) -> None:
    for changes, name in (({"BitsStored": 12}, "bits-stored-12-of-8"), ({"HighBit": 15}, "high-bit-15-of-8"),
                          ({"HighBit": 3}, "high-bit-below-bits-stored"), ({"BitsStored": 0}, "bits-stored-0"),
                          ({"BitsAllocated": 12, "BitsStored": 12, "HighBit": 11}, "bits-allocated-12"),
                          ({"PixelRepresentation": 2}, "pixel-representation-2")):
        ds = c.read("nih")
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        c.add_dataset("bits", name, ds, CORRUPT)


def _samples_lie(c: _Corpus) -> None:
    for changes, name in (({"SamplesPerPixel": 3}, "nih-3-samples-monochrome2"),
                          ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB", "PlanarConfiguration": 0},
                           "nih-3-samples-rgb-with-gray-data"),
                          ({"SamplesPerPixel": 2}, "nih-2-samples")):
        ds = c.read("nih")
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        c.add_dataset("samples-lie", name, ds, CORRUPT)
    ds = c.read("rgb")
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    del ds.PlanarConfiguration
    c.add_dataset("samples-lie", "rgb-data-1-sample-header", ds, CORRUPT)
    ds = c.read("siim")
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    c.add_dataset("samples-lie", "siim-gray-jpeg-rgb-header", ds, CORRUPT)


def _jpeg(size: tuple[int, int], mode: str = "L") -> bytes:
    from PIL import Image

    image = Image.new(mode, size, 128 if mode == "L" else (120, 130, 140))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _frame_size_lie(c: _Corpus) -> None:
    ds = c.read("siim")
    ds.Rows = ds.Columns = 64
    c.add_dataset("frame-size-lie", "siim-1024-jpeg-under-64-header", ds, CORRUPT)
    ds = c.read("siim")
    ds.Rows = ds.Columns = 64
    ds.PixelData = encapsulate([_jpeg((8000, 8000))])
    c.add_dataset("frame-size-lie", "8000x8000-jpeg-under-64-header", ds, CORRUPT)
    ds = c.read("j2k")
    ds.Columns = ds.Columns - 1
    c.add_dataset("frame-size-lie", "j2k-one-column-less", ds, CORRUPT)
    ds = c.read("lossless")
    ds.Rows = ds.Rows + 10
    c.add_dataset("frame-size-lie", "jpeg-lossless-ten-rows-more", ds, CORRUPT)


def _huge_header(c: _Corpus) -> None:
    ds = c.read("nih")
    ds.Rows = ds.Columns = 9999
    ds.PixelData = b"\x80\x80"
    c.add_dataset("huge-header", "nih-9999x9999-over-2-bytes", ds, CORRUPT)
    ds = c.read("explicit16")
    ds.Rows = ds.Columns = 9999
    ds.PixelData = bytes(4096)
    c.add_dataset("huge-header", "explicit16-9999x9999-over-4096-bytes", ds, CORRUPT)
    ds = c.read("siim")
    ds.Rows = ds.Columns = 9999
    c.add_dataset("huge-header", "siim-9999x9999-over-a-1024-jpeg", ds, CORRUPT)
    ds = c.read("nih")
    ds.Rows = ds.Columns = 30000
    ds.PixelData = b"\x80\x80"
    c.add_dataset("huge-header", "nih-30000x30000-over-2-bytes", ds, TOO_LARGE)


def _deflate_bomb(c: _Corpus) -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    def header(rows: int, cols: int, bits: int, name: str) -> tuple[object, bytes]:
        ds = c.read("nih")
        del ds.PixelData
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, cols, bits, bits, bits - 1
        uid = generate_uid(entropy_srcs=["medsim-hostile", name])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, ds)
        return ds.file_meta, buffer.getvalue()

    def pixel_header(length: int) -> bytes:
        return struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length)

    for rows, cols, name in ((9999, 9999, "9999x9999-16bit-zeros-200MB"), (12800, 12800, "12800x12800-16bit-zeros")):
        meta, head = header(rows, cols, 16, name)
        length = rows * cols * 2
        path = c._path("deflate-bomb", name)
        _deflate_file(meta, [head, pixel_header(length), *_zeros(length)], path)
        c.files.append(HostileFile(path, "deflate-bomb", name, TOO_LARGE))
    meta, head = header(1024, 1024, 8, "garbage-zeros")
    path = c._path("deflate-bomb", "300MB-of-zeros-after-the-header")
    _deflate_file(meta, [head, *_zeros(300 * 2**20)], path)
    c.files.append(HostileFile(path, "deflate-bomb", "300MB-of-zeros-after-the-header",
                               ("failed:corrupt", "failed:too-large")))


def _text_in_numbers(c: _Corpus) -> None:
    for keyword, placeholder, text, expected in (("WindowCenter", "1.234567", b"abc     ", CORRUPT),
                                                 ("WindowWidth", "1.234567", b"12a     ", CORRUPT),
                                                 ("RescaleSlope", "1.234567", b"abc     ", CORRUPT),
                                                 ("NumberOfFrames", "+9876543", b"x       ", CORRUPT),
                                                 ("InstanceNumber", "+9876543", b"x       ", INDEXED)):
        ds = c.read("nih")
        if keyword == "WindowCenter":
            ds.WindowWidth = "200"
        if keyword == "WindowWidth":
            ds.WindowCenter = "100"
        if keyword == "RescaleSlope":
            ds.RescaleIntercept = "0"
        setattr(ds, keyword, placeholder)
        name = f"{keyword}-{text.strip().decode()}"
        c.add_bytes("text-in-numbers", name, _patch(dataset_bytes(ds, name), placeholder.encode(), text), expected)


def _unknown_ts(c: _Corpus) -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    for uid in ("1.2.3.4.5.6.7.8", "1.2.840.10008.1.2.4.999", "1.2.840.10008.5.1.4.1.1.1"):
        ds = c.read("nih")  # implicit VR little endian, written as such under a transfer syntax nobody knows
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["medsim-hostile", uid])
        ds.file_meta.TransferSyntaxUID = uid
        meta, body = DicomBytesIO(), DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        body.is_little_endian, body.is_implicit_VR = True, True
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        write_dataset(body, ds)
        c.add_bytes("unknown-ts", f"transfer-syntax-{uid}", bytes(128) + b"DICM" + meta.getvalue() + body.getvalue(),
                    UNSUPPORTED)


def _ybr_in_mono(c: _Corpus) -> None:
    ds = c.read("siim")
    ds.Rows, ds.Columns = 512, 512
    ds.PixelData = encapsulate([_jpeg((512, 512), "RGB")])  # a YCbCr JPEG, the header says MONOCHROME2
    c.add_dataset("ybr-in-mono", "ycbcr-jpeg-under-monochrome2", ds, CORRUPT)
    ds = c.read("nih")
    ds.PhotometricInterpretation = "YBR_FULL"
    c.add_dataset("ybr-in-mono", "ybr-full-photometric-1-sample", ds, CORRUPT)
    ds = c.read("siim")
    ds.PhotometricInterpretation = "YBR_FULL_422"
    c.add_dataset("ybr-in-mono", "siim-ybr-full-422-photometric-1-sample", ds, CORRUPT)


def _multi_uid(c: _Corpus) -> None:
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        ds = c.read("nih")
        base = generate_uid(entropy_srcs=["medsim-hostile", keyword])
        setattr(ds, keyword, [base, "1.2.3.4"])
        ds.file_meta.MediaStorageSOPInstanceUID = base if keyword == "SOPInstanceUID" else ds.SOPInstanceUID
        c.add_dataset("multi-uid", f"{keyword}-with-2-values", ds, CORRUPT, fresh_uid=keyword != "SOPInstanceUID")


def _narrow_window(c: _Corpus) -> None:
    for centers, widths, function, name in ((["128"], ["0.5"], None, "linear-width-0.5"),
                                            (["128", "100"], ["0", "200"], None, "linear-width-0-then-200"),
                                            (["128"], ["0.5"], "LINEAR_EXACT", "linear-exact-width-0.5"),
                                            (["128"], ["0"], "SIGMOID", "sigmoid-width-0"),
                                            (["128"], ["1"], None, "linear-width-1")):
        ds = c.read("nih")
        ds.WindowCenter, ds.WindowWidth = centers, widths
        if function:
            ds.VOILUTFunction = function
        c.add_dataset("narrow-window", name, ds, INDEXED)


def _flip(data: bytes, rng: random.Random, start: int, end: int, count: int) -> bytes:
    buffer = bytearray(data)
    for at in rng.sample(range(start, end), count):
        buffer[at] ^= 1 << rng.randrange(8)
    return bytes(buffer)


def _byte_flips(c: _Corpus) -> None:
    for i in range(3):
        ds = c.read("nih")
        name = f"nih-pixels-{i}"
        data = dataset_bytes(ds, name)
        start, _, _ = _element_offsets(data, "PixelData")
        c.add_bytes("byte-flips", name, _flip(data, c.rng, start + 8, len(data), 64), INDEXED)
    for key in ("nih", "siim", "j2k"):
        for i in range(3):
            ds = c.read(key)
            name = f"{key}-header-{i}"
            data = dataset_bytes(ds, name)
            start, _, _ = _element_offsets(data, "PixelData")
            c.add_bytes("byte-flips", name, _flip(data, c.rng, 132, start + 12, 6), ANY)
    for key in ("siim", "j2k", "rle"):
        for i in range(2):
            ds = c.read(key)
            name = f"{key}-compressed-stream-{i}"
            data = dataset_bytes(ds, name)
            start, _, _ = _element_offsets(data, "PixelData")
            c.add_bytes("byte-flips", name, _flip(data, c.rng, start + 64, len(data) - 16, 16),
                        ("indexed", "failed:corrupt", "failed:decode-error"))


def _zero_byte(c: _Corpus) -> None:
    c.add_bytes("zero-byte", "empty", b"", NOT_AN_IMAGE)
    c.add_bytes("zero-byte", "preamble-and-DICM-only", bytes(128) + b"DICM", CORRUPT)
    c.add_bytes("zero-byte", "DICM-then-noise", bytes(128) + b"DICM" + c.rng.randbytes(4096), CORRUPT)
    c.add_bytes("zero-byte", "noise-without-DICM", c.rng.randbytes(4096).replace(b"DICM", b"dicm"), NOT_AN_IMAGE)


def _non_utf8(c: _Corpus) -> None:
    folder = c.out / "non-utf8-name"
    folder.mkdir(parents=True, exist_ok=True)
    path = Path(os.fsdecode(os.path.join(os.fsencode(folder), NON_UTF8_NAME)))
    ds = c.read("siim")
    path.write_bytes(dataset_bytes(ds, "non-utf8-name"))
    c.files.append(HostileFile(path, "non-utf8-name", "siim-copy-named-ff-fe.dcm", INDEXED))


def build_non_utf8_corpus(out: str | Path, sample_dir: str | Path | None = None,
                          shared_dicom: str | Path | None = None) -> list[HostileFile]:
    """Only the non-UTF-8 file name case (a valid file named b'\\xff\\xfe.dcm'), in ``out``."""
    from conftest import SAMPLE_DIR, SHARED_DICOM, sample_manifest

    if sample_dir is None:
        sample_manifest()
    corpus = _Corpus(Path(out), Path(sample_dir or SAMPLE_DIR), Path(shared_dicom or SHARED_DICOM), seed=13)
    _non_utf8(corpus)
    return corpus.files


def summary(files: list[HostileFile]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in files:
        counts[f.cls] = counts.get(f.cls, 0) + 1
    return counts


if __name__ == "__main__":  # python tests/hostile_corpus.py OUT: write a corpus to look at
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    target = Path(sys.argv[1])
    if target.exists():
        shutil.rmtree(target)
    built = build_corpus(target)
    for f in built:
        print(f"{'|'.join(f.expected):40s} {f.cls:18s} {ascii(f.path.name)}")
    print(summary(built), len(built))

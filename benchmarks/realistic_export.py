"""A realistic PACS export of real chest X-rays, generated at set-up (never committed): full-resolution CR/DX DICOM.

What a hospital archive holds, as far as the dev data allows: computed and digital radiographs of 2,000-3,500 px on
the long side, 10-16 bits stored, MONOCHROME1 and MONOCHROME2, in every transfer syntax issue 14 names:

  uncompressed        Explicit VR Little Endian                       pydicom (native)
  jpeg-lossless       JPEG Lossless, Non-Hierarchical, First-Order Prediction (process 14 SV1)   GDCM
  jpeg-ls             JPEG-LS Lossless                                GDCM (CharLS inside GDCM)
  j2k-lossless        JPEG 2000 (Lossless Only), 6 resolution levels  pydicom -> pylibjpeg-openjpeg
  j2k-lossy           JPEG 2000, 9/7 wavelet, ratio 15:1              pydicom -> pylibjpeg-openjpeg
  rle                 RLE Lossless                                    pydicom -> pylibjpeg-rle
  jpeg-baseline       JPEG Baseline (process 1), 8 bit, quality 92    Pillow (libjpeg-turbo)

Pixels: the 512 px JPEGs of ../shared/data/cxr (real chest X-rays), **upsampled** to the target size with a Lanczos
filter (Pillow, in float), mapped to the file's bit depth, plus mild Gaussian detector noise (0.4 % of the range) so
that the codecs see noise rather than an unnaturally smooth upsampled image. About half the images are square
detectors (2,048-3,072 px), the other half portrait 35 x 43 cm cassettes (the source centre-cropped to 0.82:1 before
upsampling). MONOCHROME1 files store the inverted values (display is unchanged). Headers: CR or DX IODs with
manufacturer, imager pixel spacing, kVp, exposure, window centre/width (some with rescale, some without a window,
some with LINEAR_EXACT), view position, nested Patient/Study/Series folders with DICOM-compliant 8-character file IDs
and a DICOMDIR. Every 8th study is a PA + lateral pair: the second image is another image of the same patient (or
the same image mirrored when the patient has one) labelled LL -- the dev data has no real laterals.

    python -m benchmarks.realistic_export [--out var/bench/realistic] [--files 504] [--per-syntax N] [--jobs 2]

The tests use a slice (``--per-syntax 2``); the benchmarks the whole set. Output: the files, ``labels.csv`` (path,
labels, patient_id, view, syntax), ``export.json`` (per file: syntax, size, bits, photometric, encoder) and
``README.md`` saying all of the above.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

try:
    from benchmarks.common import WORK, say, shared_data
except ImportError:  # run as a script
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import WORK, say, shared_data

VERSION = 3
SYNTAXES = {  # name -> transfer syntax UID
    "uncompressed": "1.2.840.10008.1.2.1",
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",
    "jpeg-ls": "1.2.840.10008.1.2.4.80",
    "j2k-lossless": "1.2.840.10008.1.2.4.90",
    "j2k-lossy": "1.2.840.10008.1.2.4.91",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg-baseline": "1.2.840.10008.1.2.4.50",
}
BITS = {"uncompressed": (10, 12, 14, 16), "jpeg-lossless": (12, 14, 16), "jpeg-ls": (12, 16), "j2k-lossless": (12, 16),
        "j2k-lossy": (12, 14), "rle": (12, 16), "jpeg-baseline": (8,)}
CR, DX = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"
NAMESPACE = "medsim-realistic-export-v1"
DEFAULT_OUT = WORK / "realistic"


def uid(*parts) -> str:
    digest = int(hashlib.sha256(":".join(map(str, (NAMESPACE, *parts))).encode()).hexdigest()[:30], 16)
    return f"2.25.{digest}"


def _sources(cxr: Path) -> list[dict]:
    with open(cxr / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r.get("width") or 0) >= 256 and r["path"].endswith(".jpg")]
    return rows


def plan(cxr: Path, files: int, per_syntax: int | None = None, seed: int = 14) -> list[dict]:
    """Which source image becomes which file, at which size, depth and syntax (deterministic)."""
    rng = np.random.default_rng(seed)
    rows = _sources(cxr)
    by_patient: dict[str, list[dict]] = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], []).append(row)
    names = list(SYNTAXES)
    n = per_syntax * len(names) if per_syntax else files
    order = rng.permutation(len(rows))
    items, study = [], 0
    i = 0
    while len(items) < n:
        row = rows[int(order[i % len(order)])]
        i += 1
        syntax = names[len(items) % len(names)]
        study += 1
        pair = study % 8 == 0 and len(items) + 1 < n
        members = [row]
        if pair:
            others = [r for r in by_patient[row["patient_id"]] if r["path"] != row["path"]]
            members.append(others[0] if others else {**row, "mirror": True})
        for k, member in enumerate(members):
            square = bool(rng.random() < 0.5)
            long_side = int(rng.choice([2048, 2500, 2560, 2880, 3072])) if square else int(rng.integers(2000, 3501))
            bits = int(rng.choice(BITS[syntax]))
            items.append({
                "index": len(items), "source": member["path"], "mirror": bool(member.get("mirror")),
                "labels": member.get("labels", ""), "patient_id": row["patient_id"], "study": study, "series": k + 1,
                "view": "PA" if k == 0 else "LL", "syntax": syntax, "bits": bits, "square": square,
                "long_side": long_side, "monochrome1": bool(rng.random() < 0.35 and syntax != "jpeg-baseline"),
                "modality": "CR" if rng.random() < 0.4 else "DX",
                "window": str(rng.choice(["linear", "linear", "linear-exact", "none", "rescale"])),
                "noise_seed": int(rng.integers(2**31)),
            })
    return items[:n]


def stored_pixels(cxr: Path, item: dict) -> np.ndarray:
    """The upsampled, noised, quantised stored values of one item (uint8 or uint16, (rows, columns))."""
    from PIL import Image

    with Image.open(cxr / item["source"]) as im:
        gray = im.convert("L")
        if item["mirror"]:
            gray = gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        w, h = gray.size
        if not item["square"]:  # 35 x 43 cm portrait cassette: centre crop to 0.82:1 before upsampling
            cw = int(round(h * 0.82))
            left = (w - cw) // 2
            gray = gray.crop((left, 0, left + cw, h))
        w, h = gray.size
        scale = item["long_side"] / max(w, h)
        size = (int(round(w * scale)), int(round(h * scale)))
        big = np.asarray(gray.convert("F").resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    rng = np.random.default_rng(item["noise_seed"])
    big += rng.normal(0.0, 0.004, size=big.shape).astype(np.float32)
    top = 2 ** item["bits"] - 1
    values = np.clip(np.rint(np.clip(big, 0.0, 1.0) * top), 0, top)
    if item["monochrome1"]:
        values = top - values
    return values.astype(np.uint8 if item["bits"] <= 8 else np.uint16)


def _gdcm_encode(ds, ts_uid: str) -> bytes:
    from medsim.sample_data.build_sample_data import gdcm_encapsulate  # one GDCM encoder for both exports

    return gdcm_encapsulate(ds, ts_uid)


def dataset(item: dict, stored: np.ndarray):
    """The CR/DX dataset of one item, pixel data encoded in its transfer syntax. Returns (ds, encoder)."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000, JPEG2000Lossless, RLELossless

    sop_class = CR if item["modality"] == "CR" else DX
    sop = uid("sop", item["index"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID = uid("study", item["study"])
    ds.SeriesInstanceUID = uid("series", item["study"], item["series"])
    patient = item["patient_id"][:64]
    ds.PatientID, ds.PatientName = patient, f"ANON^{hashlib.sha1(patient.encode()).hexdigest()[:8].upper()}"
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.StudyDate, ds.StudyTime = f"2024{1 + item['study'] % 12:02d}{1 + item['study'] % 28:02d}", "101500"
    ds.SeriesDate, ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyDate, "101530"
    ds.AccessionNumber = f"A{item['study']:07d}"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(item["study"]), item["series"], 1
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.BodyPartExamined = item["modality"], "CHEST"
    ds.ViewPosition = item["view"]
    ds.PatientOrientation = ["P", "F"] if item["view"] == "PA" else ["A", "F"]
    ds.StudyDescription = "XR CHEST PA AND LATERAL" if item["series"] == 2 or item["study"] % 8 == 0 else "XR CHEST PA"
    ds.SeriesDescription = f"CHEST {item['view']}"
    ds.ProtocolName = "Chest"
    ds.Manufacturer = "medsim synthetic export"
    ds.ManufacturerModelName = "upsampled dev image"
    ds.InstitutionName = "Synthetic Hospital"
    ds.KVP, ds.ExposureTime, ds.XRayTubeCurrent = "125", "8", "320"
    ds.ImagerPixelSpacing = ["0.139", "0.139"] if item["square"] else ["0.15", "0.15"]
    ds.BurnedInAnnotation = "NO"
    if item["modality"] == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
    rows, cols = stored.shape
    bits = item["bits"]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if item["monochrome1"] else "MONOCHROME2"
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    top = 2**bits - 1
    lo, hi = np.percentile(stored[::8, ::8], (0.5, 99.5))
    if item["window"] in ("linear", "rescale"):
        if item["window"] == "rescale":
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "0.5", "-100", "US"
            lo, hi = lo * 0.5 - 100, hi * 0.5 - 100
        ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2:.1f}", f"{max(hi - lo, 2):.1f}"
        ds.VOILUTFunction = "LINEAR"
    elif item["window"] == "linear-exact":
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = f"{top / 2:.1f}", f"{top}", "LINEAR_EXACT"
    ds.PixelData = stored.tobytes()
    syntax, ts = item["syntax"], SYNTAXES[item["syntax"]]
    if syntax == "uncompressed":
        encoder = "pydicom (native)"
    elif syntax in ("jpeg-lossless", "jpeg-ls"):
        ds.PixelData = _gdcm_encode(ds, ts)
        ds["PixelData"].VR = "OB"
        meta.TransferSyntaxUID = ts
        encoder = "python-gdcm " + ("JPEGLosslessProcess14_1" if syntax == "jpeg-lossless" else "JPEGLSLossless")
    elif syntax == "j2k-lossless":
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        encoder = "pydicom -> pylibjpeg-openjpeg (reversible 5/3)"
    elif syntax == "j2k-lossy":
        ds.compress(JPEG2000, j2k_cr=[15], generate_instance_uid=False)
        encoder = "pydicom -> pylibjpeg-openjpeg (irreversible 9/7, 15:1)"
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_15444_1"
        ds.LossyImageCompressionRatio = "15"
    elif syntax == "rle":
        ds.compress(RLELossless, generate_instance_uid=False)
        encoder = "pydicom -> pylibjpeg-rle"
    elif syntax == "jpeg-baseline":
        buf = io.BytesIO()
        Image.fromarray(stored, mode="L").save(buf, format="JPEG", quality=92)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        meta.TransferSyntaxUID = ts
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
        encoder = "Pillow (libjpeg-turbo) quality 92"
    else:
        raise ValueError(syntax)
    return ds, encoder


def rel_path(item: dict) -> Path:
    """Patient/Study/Series/Image folders, DICOM file IDs (<= 8 upper-case characters per component)."""
    patient = "P" + hashlib.sha1(item["patient_id"].encode()).hexdigest()[:7].upper()
    return Path(patient) / f"ST{item['study']:06d}" / f"SE{item['series']:06d}" / f"IM{item['index']:06d}"


def _write_one(args) -> dict:
    cxr, out, item = args
    started = time.perf_counter()
    stored = stored_pixels(Path(cxr), item)
    ds, encoder = dataset(item, stored)
    target = Path(out) / rel_path(item)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return {"path": rel_path(item).as_posix(), "syntax": item["syntax"], "transfer_syntax": SYNTAXES[item["syntax"]],
            "rows": int(stored.shape[0]), "columns": int(stored.shape[1]), "bits_stored": item["bits"],
            "photometric": str(ds.PhotometricInterpretation), "modality": item["modality"], "view": item["view"],
            "window": item["window"], "source": item["source"], "mirrored": item["mirror"], "encoder": encoder,
            "bytes": target.stat().st_size, "sop_uid": str(ds.SOPInstanceUID), "labels": item["labels"],
            "patient_id": item["patient_id"], "seconds": round(time.perf_counter() - started, 2)}


def _dicomdir(out: Path, staging: Path, rows: list[dict]) -> str:
    """Move the files from ``staging`` into ``out`` through a pydicom FileSet, which writes the DICOMDIR and names
    the files as a PACS export does (PT000000/ST000000/SE000000/IM000000); each row's path is updated. Without a
    FileSet (an error), the files keep their staging names and the DICOMDIR is reported missing."""
    from pydicom.fileset import FileSet

    try:
        fs = FileSet()
        for row in rows:
            fs.add(staging / row["path"])
        fs.write(out)
        where = {inst.SOPInstanceUID: Path(inst.path).relative_to(out).as_posix() for inst in fs}
        for row in rows:
            row["path"] = where[row["sop_uid"]]
        shutil.rmtree(staging)
        return "written"
    except Exception as exc:  # a DICOMDIR is a courtesy of PACS exports; its absence is reported, not fatal
        for row in rows:
            target = out / row["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if (staging / row["path"]).exists():
                os.replace(staging / row["path"], target)
        shutil.rmtree(staging, ignore_errors=True)
        return f"not written: {type(exc).__name__}: {exc}"


README = """# Realistic PACS export (generated, never committed)

Written by `python -m benchmarks.realistic_export` on {date}: {n} DICOM files under nested Patient/Study/Series
folders with a DICOMDIR ({dicomdir}). **Not real full-resolution acquisitions:** each image is a real chest X-ray
from `../shared/data/cxr` (512 px JPEG) **upsampled** with a Lanczos filter to {sizes} px on the long side, mapped to
{bits} bits stored, with Gaussian noise of 0.4 % of the range added, MONOCHROME1 ({mono1} files, inverted values)
and MONOCHROME2. Portrait images were centre-cropped to 0.82:1 before upsampling. Laterals of PA + lateral studies
are another frontal image of the same patient (or the same image mirrored), labelled LL.

| syntax | transfer syntax UID | files | encoder |
|---|---|---|---|
{table}

The labels (`labels.csv`) are the dev set's labels of the source image. See `export.json` for every file.
"""


def generate(out: Path = DEFAULT_OUT, files: int = 504, per_syntax: int | None = None, jobs: int = 2,
             cxr: Path | None = None, force: bool = False) -> dict:
    """Write the export (incremental: an existing complete export of the same plan is kept)."""
    cxr = cxr or shared_data() / "cxr"
    out = Path(out).resolve()
    if not (cxr / "labels.csv").exists():
        raise FileNotFoundError(f"no dev set at {cxr}")
    items = plan(cxr, files, per_syntax)
    key = hashlib.sha256(json.dumps([VERSION, items], sort_keys=True).encode()).hexdigest()[:16]
    marker = out / "export.json"
    if marker.exists() and not force:
        done = json.loads(marker.read_text())
        if done.get("key") == key:
            return done
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    staging = out / "staging"
    work = [(str(cxr), str(staging), item) for item in items]
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            rows = []
            for row in pool.imap(_write_one, work, chunksize=2):
                rows.append(row)
                if len(rows) % 25 == 0:
                    say(f"realistic export: {len(rows)}/{len(work)}")
    else:
        rows = [_write_one(w) for w in work]
    dicomdir = _dicomdir(out, staging, rows)
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "labels", "patient_id", "view", "syntax", "sop_uid"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in writer.fieldnames})
    counts = {s: sum(r["syntax"] == s for r in rows) for s in SYNTAXES}
    encoders = {s: next((r["encoder"] for r in rows if r["syntax"] == s), "") for s in SYNTAXES}
    info = {"version": VERSION, "key": key, "files": len(rows), "by_syntax": counts, "dicomdir": dicomdir,
            "seconds": round(time.perf_counter() - started, 1), "bytes": sum(r["bytes"] for r in rows),
            "megapixels_median": float(np.median([r["rows"] * r["columns"] / 1e6 for r in rows])), "rows": rows}
    table = "\n".join(f"| {s} | {SYNTAXES[s]} | {counts[s]} | {encoders[s]} |" for s in SYNTAXES)
    sides = [max(r["rows"], r["columns"]) for r in rows]
    (out / "README.md").write_text(README.format(
        date=time.strftime("%Y-%m-%d"), n=len(rows), dicomdir=dicomdir, sizes=f"{min(sides)}-{max(sides)}",
        bits="/".join(map(str, sorted({r["bits_stored"] for r in rows}))),
        mono1=sum(r["photometric"] == "MONOCHROME1" for r in rows), table=table))
    marker.write_text(json.dumps(info, indent=1))
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--files", type=int, default=504)
    parser.add_argument("--per-syntax", type=int, help="only N files per syntax (the tests' slice)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    info = generate(args.out, args.files, args.per_syntax, args.jobs, force=args.force)
    say(f"{info['files']} files, {info['bytes'] / 1e9:.2f} GB, {info['seconds']} s; DICOMDIR {info['dicomdir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

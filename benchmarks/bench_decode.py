"""Benchmark 1, decode: images/s and megapixels/s per transfer syntax, pydicom against SimpleITK.

Files: the sample PACS export (sample_data/pacs_export, real chest X-rays in every transfer syntax, 0.6 to 2.5
megapixels) and, when it has been made, the JPEG Baseline DICOM export of ../shared/data/cxr (512 px) that
benchmark 3 writes to var/bench. Each file is decoded repeatedly from the page cache (the first, cold read is not
timed), one process, one thread; the figure per syntax is the median over its files of the per-file median time.

  pydicom    dcmread + Dataset.pixel_array (pylibjpeg / openjpeg / gdcm plugins as medsim uses them)
  SimpleITK  ReadImage + GetArrayFromImage (GDCM)
  medsim     medsim.dicom.read_dicom (header checks, decode, modality/VOI LUT, to display) + preprocess to the
             model's 224 px input: the per-image work of a build-index worker

    python -m benchmarks.bench_decode [--quick]
    python -m benchmarks.bench_decode --realistic [--quick] [--per-syntax N] [--no-quality]

--realistic (issue 14): the full-resolution export of benchmarks/realistic_export.py (real chest X-rays upsampled to
2,000-3,500 px, every transfer syntax a PACS holds). Per syntax, on its largest files: every full decoder (pydicom's
pylibjpeg, gdcm, numpy and pillow plugins, SimpleITK), medsim's full read + preprocessing, and medsim's reduced read
(``read_dicom(min_side=896)``: JPEG 2000 resolution levels, JPEG DCT scaling, block means of native data) +
preprocessing. Then the same-answers check: embeddings of reduced against full decode with the default model, cosine
per image (>= 0.995) and mAP@10 of both against a fixed gallery of dev images (within 0.005).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, SAMPLE, WORK, Timer, load_average, machine, say, write_result

GROUPS = {
    "1.2.840.10008.1.2": "uncompressed",
    "1.2.840.10008.1.2.1": "uncompressed",
    "1.2.840.10008.1.2.1.99": "deflated",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.90": "JPEG 2000",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE",
}
ORDER = ["uncompressed", "deflated", "JPEG Baseline", "JPEG Lossless SV1", "JPEG 2000", "RLE"]


def sample_files() -> list[Path]:
    manifest_path = SAMPLE / "manifest.json"
    if not manifest_path.exists():
        import subprocess
        import sys

        from benchmarks.common import ROOT

        subprocess.run([sys.executable, str(ROOT / "sample_data" / "build_sample_data.py"), "--out", str(SAMPLE)],
                       check=True)
    manifest = json.loads(manifest_path.read_text())
    return [SAMPLE / row["path"] for row in manifest["files"] if row["expected"] == "index"]


def export_files(limit: int) -> list[Path]:
    folder = WORK / "cxr-dicom"
    if not (folder / "export.json").exists():
        return []
    return sorted(folder.rglob("*.dcm"))[:limit]


def _decode_pydicom(path: Path):
    import pydicom

    return pydicom.dcmread(path).pixel_array


def _decode_sitk(path: Path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _decode_medsim(path: Path, spec):
    from medsim.dicom import read_dicom
    from medsim.preprocess import prepare

    return prepare(read_dicom(path).pixels, spec).array


def _time_file(fn, path: Path, min_seconds: float, max_reps: int) -> float:
    fn(path)  # warm: page cache, decoder imports
    times = []
    started = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - started < min_seconds):
        with Timer() as t:
            fn(path)
        times.append(t.seconds)
    return statistics.median(times)


# ---- issue 14: the realistic full-resolution export ---------------------------------------------------------------

REALISTIC_ORDER = ["uncompressed", "jpeg-lossless", "jpeg-ls", "j2k-lossless", "j2k-lossy", "rle", "jpeg-baseline"]
MIN_SIDE = 896  # what build-index asks for: 4 x the 224 px model input (medsim.build.REDUCED_MIN_SIDE_FACTOR)


def _plugin_decoder(plugin: str):
    def decode(path: Path):
        import pydicom

        ds = pydicom.dcmread(path)
        ds.pixel_array_options(decoding_plugin=plugin)
        return ds.pixel_array
    return decode


def _full_medsim(path: Path, spec):
    from medsim.dicom import read_dicom
    from medsim.preprocess import prepare

    return prepare(read_dicom(path).pixels, spec).array


def _reduced_medsim(path: Path, spec):
    from medsim.dicom import read_dicom
    from medsim.preprocess import prepare

    return prepare(read_dicom(path, min_side=MIN_SIDE).pixels, spec).array


def map_at_10_against(queries: np.ndarray, query_items, gallery: np.ndarray, gallery_items) -> float:
    """mAP@10 of ``queries`` ranked against themselves (leave-one-out) plus a fixed ``gallery``; own patient excluded,
    relevant = shares a label (as `medsim evaluate`). Used to compare two decodes of the same queries."""
    from medsim.evaluate import metrics as M

    vectors = np.concatenate([queries, gallery])
    items = list(query_items) + list(gallery_items)
    ids = np.arange(len(items))
    patients = [i.patient_id for i in items]
    labels = [i.labels for i in items]
    qids = ids[:len(queries)]
    valid = ~M.exclusion_mask(qids, ids, patients[:len(queries)], patients)
    relevant = M.relevance_matrix(labels[:len(queries)], labels, "shares")
    top = M.rank_topk(queries @ vectors.T, valid, 10)
    return M.mean_over_queries(M.ranking_metrics(top, relevant, valid, (10,))["mAP@10"])


def dev_gallery(bundle, n: int):
    """``n`` dev-set images (512 px, every k-th labelled one) as EvalItems and their vectors with ``bundle``'s default
    embedder: the fixed gallery that reduced and full decodes are both ranked against."""
    from medsim.evaluate.data import load_eval_set
    from medsim.ingest import read_any
    from medsim.preprocess import prepare

    from benchmarks.common import shared_data

    cxr = shared_data() / "cxr"
    eval_set = load_eval_set(cxr / "images" if (cxr / "images").is_dir() else cxr, cxr / "labels.csv")
    items = eval_set.items[::max(1, len(eval_set.items) // n)][:n]
    embedder = bundle.embedder(batch_size=16)
    vectors = embedder.embed_prepared([prepare(read_any(i.path).pixels, bundle.preprocess) for i in items])
    return items, vectors


def run_realistic(quick: bool = False, per_syntax: int | None = None, quality: bool = True,
                  quality_per_syntax: int | None = None) -> dict:
    """Per syntax of the realistic export: every decoder at full resolution, medsim full and reduced (read + LUTs +
    preprocessing to 224 px), and the embeddings of the reduced against the full decode."""
    import logging

    import pydicom
    import SimpleITK as sitk
    import torch

    from benchmarks.realistic_export import DEFAULT_OUT, generate
    from medsim.dicom import read_dicom
    from medsim.model import resolve_bundle

    warnings.filterwarnings("ignore")
    logging.getLogger("medsim.model").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    load_before = load_average()
    say("realistic export (generated once, var/bench/realistic)")
    info = generate(DEFAULT_OUT)
    rows = info["rows"]
    timed_per_syntax = per_syntax or (2 if quick else 6)
    min_seconds, max_reps = (0.0, 1) if quick else (0.5, 3)
    spec = resolve_bundle(None).preprocess
    decoders = {"pylibjpeg": _plugin_decoder("pylibjpeg"), "gdcm": _plugin_decoder("gdcm"),
                "pydicom-numpy": _plugin_decoder("pydicom"), "pillow": _plugin_decoder("pillow"),
                "simpleitk": _decode_sitk}
    timed = []
    for syntax in REALISTIC_ORDER:
        members = [r for r in rows if r["syntax"] == syntax]
        # the largest files of the syntax: the worst case for decoding and for memory
        for row in sorted(members, key=lambda r: -r["rows"] * r["columns"])[:timed_per_syntax]:
            path = DEFAULT_OUT / row["path"]
            entry = {k: row[k] for k in ("path", "syntax", "rows", "columns", "bits_stored", "photometric", "bytes")}
            entry["megapixels"] = round(row["rows"] * row["columns"] / 1e6, 3)
            for name, fn in decoders.items():
                try:
                    entry[f"{name}_ms"] = round(1000 * _time_file(fn, path, min_seconds, max_reps), 1)
                except Exception as exc:
                    entry[f"{name}_ms"] = None
                    entry[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:160]
            entry["medsim_full_ms"] = round(1000 * _time_file(lambda p: _full_medsim(p, spec), path, min_seconds,
                                                              max_reps), 1)
            entry["medsim_reduced_ms"] = round(1000 * _time_file(lambda p: _reduced_medsim(p, spec), path,
                                                                 min_seconds, max_reps), 1)
            reduced = read_dicom(path, min_side=MIN_SIDE)
            entry["reduced_shape"], entry["reduction"], entry["decoder"] = list(reduced.pixels.shape), \
                reduced.reduction, reduced.decoder
            timed.append(entry)
            say(f"decode {syntax:<14} {row['rows']}x{row['columns']} {row['bits_stored']} bit: "
                + ", ".join(f"{n} {entry[f'{n}_ms']}" for n in decoders)
                + f"; medsim full {entry['medsim_full_ms']} ms, reduced {entry['medsim_reduced_ms']} ms "
                  f"({reduced.decoder})")
    summary = []
    for syntax in REALISTIC_ORDER:
        members = [e for e in timed if e["syntax"] == syntax]
        if not members:
            continue
        out = {"syntax": syntax, "files_timed": len(members),
               "megapixels_median": round(statistics.median(e["megapixels"] for e in members), 2),
               "decoder": members[0]["decoder"]}
        for name in [*decoders, "medsim_full", "medsim_reduced"]:
            ms = [e[f"{name}_ms"] for e in members if e.get(f"{name}_ms")]
            if ms:
                out[f"{name}_images_per_s"] = round(1000 / statistics.median(ms), 2)
                out[f"{name}_megapixels_per_s"] = round(statistics.median(
                    e["megapixels"] / (e[f"{name}_ms"] / 1000) for e in members if e.get(f"{name}_ms")), 1)
        fastest = min(((n, out[f"{n}_images_per_s"]) for n in decoders if out.get(f"{n}_images_per_s")),
                      key=lambda t: -t[1], default=(None, None))
        out["fastest_full_decoder"] = fastest[0]
        summary.append(out)
    result = {"machine": machine(), "load_average_before": load_before, "export": {k: v for k, v in info.items()
                                                                                    if k != "rows"},
              "min_side": MIN_SIDE, "summary": summary, "files": timed,
              "settings": {"quick": quick, "timed_per_syntax": timed_per_syntax, "min_seconds_per_file": min_seconds,
                           "max_reps_per_file": max_reps, "pydicom": pydicom.__version__,
                           "method": "the largest files of each syntax; per file the median of repeated decodes "
                                     "(page cache warm, first read untimed), per syntax the median over its files; "
                                     "one process, one thread. medsim full/reduced = read_dicom (checks, decode, "
                                     "LUTs) + preprocessing to the model input"}}
    if quality:
        result["quality"] = quality_check(rows, quality_per_syntax or (24 if quick else None))
    result["load_average_after"] = load_average()
    return result


def quality_check(rows: list[dict], per_syntax: int | None = None, gallery: int = 240) -> dict:
    """Embeddings of the reduced against the full decode with the default bundle and mode: cosine per image, and
    mAP@10 of both as queries against each other + a fixed gallery of dev-set images."""
    import logging

    from benchmarks.realistic_export import DEFAULT_OUT
    from medsim.dicom import read_dicom
    from medsim.evaluate.data import EvalItem
    from medsim.model import resolve_bundle
    from medsim.preprocess import prepare

    logging.getLogger("medsim.model").setLevel(logging.ERROR)
    bundle = resolve_bundle(None)
    embedder = bundle.embedder(batch_size=16)
    chosen = []
    for syntax in REALISTIC_ORDER:
        members = [r for r in rows if r["syntax"] == syntax]
        chosen += members[:per_syntax] if per_syntax else members
    say(f"quality: {len(chosen)} files, full and reduced, {embedder.describe()}")
    full, reduced = [], []
    for i, row in enumerate(chosen):
        path = DEFAULT_OUT / row["path"]
        full.append(embedder.embed_prepared(prepare(read_dicom(path).pixels, bundle.preprocess))[0])
        reduced.append(embedder.embed_prepared(prepare(read_dicom(path, min_side=MIN_SIDE).pixels,
                                                       bundle.preprocess))[0])
        if i % 50 == 49:
            say(f"  {i + 1}/{len(chosen)}")
    full, reduced = np.stack(full), np.stack(reduced)
    cosine = np.sum(full * reduced, axis=1)
    items = [EvalItem(path=str(DEFAULT_OUT / r["path"]), rel_path=r["path"],
                      labels=tuple(x for x in r["labels"].split("|") if x), patient_id=r["patient_id"])
             for r in chosen]
    gallery_items, gallery_vectors = dev_gallery(bundle, gallery)
    map_full = map_at_10_against(full, items, gallery_vectors, gallery_items)
    map_reduced = map_at_10_against(reduced, items, gallery_vectors, gallery_items)
    per_syntax_out = {}
    for syntax in REALISTIC_ORDER:
        mask = np.array([r["syntax"] == syntax for r in chosen])
        if mask.any():
            per_syntax_out[syntax] = {"images": int(mask.sum()), "min_cosine": round(float(cosine[mask].min()), 5),
                                      "mean_cosine": round(float(cosine[mask].mean()), 5),
                                      "mAP@10_full": round(map_at_10_against(full[mask], [x for x, m in zip(
                                          items, mask) if m], gallery_vectors, gallery_items), 4),
                                      "mAP@10_reduced": round(map_at_10_against(reduced[mask], [x for x, m in zip(
                                          items, mask) if m], gallery_vectors, gallery_items), 4)}
    return {"bundle": bundle.name, "mode": embedder.describe(), "images": len(chosen), "gallery": len(gallery_items),
            "min_cosine": round(float(cosine.min()), 5), "mean_cosine": round(float(cosine.mean()), 5),
            "cosine_ok": bool(cosine.min() >= 0.995), "mAP@10_full": round(map_full, 5),
            "mAP@10_reduced": round(map_reduced, 5), "mAP_delta": round(map_reduced - map_full, 5),
            "mAP_ok": bool(abs(map_reduced - map_full) <= 0.005), "per_syntax": per_syntax_out}


def run(quick: bool = False, export_limit: int | None = None) -> dict:
    import pydicom
    import SimpleITK as sitk
    import torch

    from medsim.preprocess import CAFFE_VGG16

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # as in a build-index worker
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    load_before = load_average()
    min_seconds, max_reps = (0.2, 5) if quick else (1.0, 40)
    files = [("sample", p) for p in sample_files()]
    files += [("cxr-export", p) for p in export_files(export_limit or (8 if quick else 40))]
    rows = []
    for origin, path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        tsuid = str(ds.file_meta.TransferSyntaxUID)
        group = GROUPS.get(tsuid, tsuid)
        megapixels = int(ds.Rows) * int(ds.Columns) / 1e6
        row = {"file": path.relative_to(SAMPLE).as_posix() if origin == "sample" else path.name,
               "origin": origin, "syntax": group, "transfer_syntax": tsuid,
               "transfer_syntax_name": ds.file_meta.TransferSyntaxUID.name, "rows": int(ds.Rows),
               "columns": int(ds.Columns),
               "bits_allocated": int(ds.BitsAllocated), "photometric": str(ds.PhotometricInterpretation),
               "megapixels": round(megapixels, 3), "file_bytes": path.stat().st_size}
        for reader, fn in (("pydicom", _decode_pydicom), ("simpleitk", _decode_sitk),
                           ("medsim", lambda p: _decode_medsim(p, CAFFE_VGG16))):
            try:
                seconds = _time_file(fn, path, min_seconds, max_reps)
                row[f"{reader}_ms"] = round(1000 * seconds, 2)
            except Exception as exc:  # a reader that cannot decode this syntax is a result, not a crash
                row[f"{reader}_ms"] = None
                row[f"{reader}_error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
        say(f"decode {row['syntax']:<18} {row['rows']}x{row['columns']} pydicom {row['pydicom_ms']} ms, "
            f"SimpleITK {row['simpleitk_ms']} ms, medsim read+prepare {row['medsim_ms']} ms")

    summary = []
    for origin in ("sample", "cxr-export"):
        for group in ORDER + sorted({r["syntax"] for r in rows} - set(ORDER)):
            members = [r for r in rows if r["syntax"] == group and r["origin"] == origin]
            if not members:
                continue
            entry = {"syntax": group, "origin": origin, "files": len(members),
                     "megapixels_median": round(statistics.median(r["megapixels"] for r in members), 2)}
            for reader in ("pydicom", "simpleitk", "medsim"):
                ms = [r[f"{reader}_ms"] for r in members if r[f"{reader}_ms"] is not None]
                mps = [r["megapixels"] / (r[f"{reader}_ms"] / 1000) for r in members if r[f"{reader}_ms"]]
                entry[f"{reader}_images_per_s"] = round(1000 / statistics.median(ms), 1) if ms else None
                entry[f"{reader}_megapixels_per_s"] = round(statistics.median(mps), 1) if mps else None
                entry[f"{reader}_failed"] = len(members) - len(ms)
            summary.append(entry)
    return {
        "machine": machine(), "load_average_before": load_before, "load_average_after": load_average(),
        "settings": {"quick": quick, "min_seconds_per_file": min_seconds, "max_reps_per_file": max_reps,
                     "pydicom": pydicom.__version__, "simpleitk": sitk.Version.VersionString(),
                     "method": "median of repeated decodes per file (page cache warm, first read untimed), "
                               "median over the files of a syntax; one process, one thread"},
        "summary": summary, "files": rows,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--realistic", action="store_true", help="the full-resolution export (issue 14): writes "
                        "results/decode_realistic.json")
    parser.add_argument("--per-syntax", type=int, help="files timed per syntax (realistic; default 6, quick 2)")
    parser.add_argument("--no-quality", action="store_true", help="realistic: skip the embedding comparison")
    parser.add_argument("--quality-per-syntax", type=int, help="realistic: compare only N files per syntax")
    args = parser.parse_args(argv)
    if args.realistic:
        result = run_realistic(args.quick, args.per_syntax, not args.no_quality, args.quality_per_syntax)
        earlier = RESULTS / "decode_realistic.json"
        if args.no_quality and earlier.exists():  # keep the last same-answers check, saying when it was run
            before = json.loads(earlier.read_text())
            if before.get("quality"):
                result["quality"] = {"measured_at": before.get("created_at"), **before["quality"]}
        path = write_result("decode_realistic", result)
        say(f"wrote {path}")
        return 0
    path = write_result("decode", run(args.quick))
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

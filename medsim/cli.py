"""The `medsim` command: a thin layer over the pipeline modules. Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from medsim.errors import MedsimError

DEFAULT_INDEX = "cxr-index"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except MedsimError as exc:
        print(f"medsim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medsim: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsim",
        description="Similar-case retrieval for chest X-rays: index a PACS export, then find similar cases of "
        "other patients.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = sub.add_parser(
        "build-index",
        help="index the chest radiographs under a folder (DICOM, PNG, JPEG); re-runs add only what is new",
        description="Walk SOURCE, read every DICOM/PNG/JPEG file, keep chest radiographs (Modality CR/DX/DR/RG with "
        "a chest or empty BodyPartExamined, or SC/OT with a chest BodyPartExamined), embed them and add them to the "
        "index. A killed run resumes where it stopped. Exit status is non-zero only when the index holds nothing "
        "or could not be written.",
    )
    build.add_argument("source", type=Path, help="folder exported from PACS, or an image folder")
    build.add_argument("--index", type=Path, default=Path(DEFAULT_INDEX), help="index directory (default: %(default)s)")
    build.add_argument("--labels", type=Path, help="CSV with path and/or sop_uid, labels (|-separated), patient_id")
    _model_argument(build)
    build.add_argument("--workers", type=int, help="decoding processes (default: cores - 1; 0 decodes in-process)")
    build.add_argument("--batch-size", type=int, default=16, help="images per embedding batch (default: %(default)s)")
    build.add_argument("--any-body-part", action="store_true", help="also index radiographs of other body parts")
    build.add_argument("--any-modality", action="store_true", help="index every 2-D image, whatever its modality")
    build.add_argument("--max-pixels", type=int, help="refuse images with more pixels than this (default: 100M)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.add_argument("--report", type=Path, help="also write the build summary as JSON to this file")
    build.set_defaults(func=cmd_build_index)

    query = sub.add_parser("query", help="find the most similar cases of other patients for an image file",
                           description="Embed FILE with the index's model (or use its stored vector when FILE is "
                           "indexed) and print the k most similar cases, excluding the query's own patient.")
    query.add_argument("file", type=Path, help="DICOM, PNG or JPEG file")
    query.add_argument("--index", type=Path, default=Path(DEFAULT_INDEX), help="index directory (default: %(default)s)")
    query.add_argument("-k", type=int, default=10, help="number of results (default: %(default)s)")
    query.add_argument("--patient-id", help="the query's patient, when the file does not say (PNG/JPEG)")
    query.add_argument("--include-same-patient", action="store_true", help="keep the query patient's other images")
    query.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _model_argument(query, help_suffix=" (default: the model the index was built with)")
    query.set_defaults(func=cmd_query)

    info = sub.add_parser("info", help="size, model, creation time and label vocabulary of an index")
    info.add_argument("--index", type=Path, default=Path(DEFAULT_INDEX), help="index directory (default: %(default)s)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    return parser


def _model_argument(parser, help_suffix: str = "") -> None:
    parser.add_argument(
        "--model",
        help="model bundle directory, or 'imagenet' / 'imagenet-gem' (default: the fine-tuned bundle from "
        "`make model` when present, else ImageNet VGG-16)" + help_suffix,
    )


def cmd_build_index(args) -> int:
    from medsim.build import build_index
    from medsim.dicom import DEFAULT_MAX_PIXELS, ChestPolicy
    from medsim.ingest import LabelTable
    from medsim.model import resolve_bundle

    if not args.source.exists():
        raise MedsimError(f"source {args.source} does not exist")
    bundle = resolve_bundle(args.model)
    labels = LabelTable.from_csv(args.labels) if args.labels else LabelTable.empty()
    policy = ChestPolicy(any_body_part=args.any_body_part, any_modality=args.any_modality,
                         max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
    print(f"model: {bundle.name} ({bundle.fingerprint}); index: {args.index}", file=sys.stderr)
    report = build_index(args.source, args.index, bundle, labels=labels, policy=policy, workers=args.workers,
                         batch_size=args.batch_size, progress=not args.no_progress)
    for line in report.summary_lines():
        print(line)
    if args.report:
        args.report.write_text(json.dumps({
            "indexed": report.indexed, "unchanged": report.unchanged, "total_cases": report.total_cases,
            "skipped": dict(report.skipped), "failed": dict(report.failed),
            "failures": [{"path": f.path, "reason": f.reason, "detail": f.detail} for f in report.failures],
            "seconds": report.seconds, "images_per_second": report.images_per_second,
            "interrupted": report.interrupted, "model": bundle.name, "model_fingerprint": bundle.fingerprint,
        }, indent=2))
    if report.interrupted:
        return 130
    return 0 if report.total_cases > 0 else 1


def cmd_query(args) -> int:
    from medsim.search import Searcher

    with Searcher.open(args.index, model=args.model) as searcher:
        result = searcher.query_file(args.file, k=args.k, patient_id=args.patient_id,
                                     include_same_patient=args.include_same_patient)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    query = result.query
    print(f"query: {args.file}  patient {query.patient_id or 'unknown'}  "
          f"{'indexed (stored vector)' if query.indexed else 'embedded now'}"
          f"{'' if args.include_same_patient else '; same-patient cases excluded'}")
    if not result.hits:
        print("no other cases in the index")
        return 0
    header = f"{'rank':>4}  {'score':>6}  {'labels':<28}  {'study / series / SOP instance UID':<40}  path"
    print(header)
    for rank, hit in enumerate(result.hits, 1):
        case = hit.case
        labels = "|".join(case.labels) or "-"
        print(f"{rank:>4}  {hit.score:6.3f}  {labels:<28}  study {case.study_uid}")
        print(f"{'':>4}  {'':>6}  {'patient ' + (case.patient_id or '?'):<28}  series {case.series_uid}")
        print(f"{'':>4}  {'':>6}  {case.view or '':<28}  sop {case.sop_uid}  {case.source_path}")
    return 0


def cmd_info(args) -> int:
    from medsim.index import open_index

    with open_index(args.index) as index:
        stats = index.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    fmt = "%Y-%m-%d %H:%M:%S %Z"
    print(f"index:        {stats['path']}")
    print(f"cases:        {stats['cases']} images, {stats['studies']} studies, {stats['patients']} patients")
    print(f"model:        {stats['model']['name']} (fingerprint {stats['model']['fingerprint']}, "
          f"{stats['model']['dim']}-d)")
    print(f"model bundle: {stats['model']['path'] or '-'}")
    print(f"created:      {time.strftime(fmt, time.localtime(stats['created_at']))}")
    print(f"updated:      {time.strftime(fmt, time.localtime(stats['updated_at']))}")
    print(f"hnsw:         M={stats['hnsw']['M']} ef_construction={stats['hnsw']['ef_construction']} "
          f"ef={stats['hnsw']['ef']}")
    files = ", ".join(f"{k}: {v}" for k, v in sorted(stats["files"].items())) or "-"
    print(f"files seen:   {files}")
    for reason, n in sorted(stats["not_indexed"].items()):
        print(f"              {reason}: {n}")
    print(f"labels ({len(stats['labels'])}):")
    for label, n in stats["labels"].items():
        print(f"  {label:<32} {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

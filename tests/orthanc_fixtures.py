"""Fixtures for the service and DICOMweb tests: a real Orthanc holding the sample data, an index built from it over
DICOMweb, and the service over that index. Import the fixtures into a test module::

    from orthanc_fixtures import make_app, pacs, service  # noqa: F401

What the session sets up (once, however many modules import these fixtures):

1. Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on free loopback ports with a temporary storage folder and a
   temporary JSON config (:class:`medsim.orthanc.LocalOrthanc`). When it is not installed and cannot be installed here
   (no root or no apt-get), the tests skip and say so.
2. STOW-RS of the sample export's "indexed set": 12 chest radiographs, a second image (new series, view PA) added
   to one of their studies so that a study holds two images, the non-chest CT slice, the text SR, the truncated file
   and the non-DICOM files (the PACS refuses the last two kinds).
3. ``medsim build-index <DICOMweb URL> --labels labels.csv`` (the CLI, in-process), then ``medsim calibrate``'s
   :func:`~medsim.calibrate.calibrate_index` (target list recall 0.9 at k = 10) stores the operating point.
4. STOW-RS of the "PACS-only set": 3 chest radiographs that are not indexed, so queries must fetch them.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import SAMPLE_DIR, sample_manifest

# Patients whose images stay out of the index (their instances are only in the PACS).
PACS_ONLY_PATIENTS = ("KERMANY-40753759", "KERMANY-D1849D79", "KERMANY-5E4D155E")
# The study that gets a second image; the name and birth date that must never appear in a response.
SECOND_VIEW_SOURCE = "KERMANY-0CC42119/STB30853F1/1/IMG0001"
PHI_NAME = "Doe^Jane"
PHI_BIRTH_DATE = "19700101"
CALIBRATED_RECALL = 0.9


@dataclass
class Instance:
    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    patient_id: str
    labels: str = ""
    expected: str = "index"

    @property
    def uids(self) -> dict:
        return {"study_uid": self.study_uid, "series_uid": self.series_uid, "sop_uid": self.sop_uid}


@dataclass
class PacsEnv:
    orthanc: object
    url: str
    client: object
    index_path: Path
    work: Path
    indexed: list[Instance]
    pacs_only: list[Instance]
    second_view: Instance
    ct: Instance
    sr: Instance
    truncated: Path
    not_dicom: list[Path]
    operating_point: dict
    build_report: dict = field(default_factory=dict)

    def by_patient(self, patient_id: str) -> list[Instance]:
        return [i for i in self.indexed if i.patient_id == patient_id]


_STATE: dict = {}


def _ensure_orthanc() -> None:
    from medsim.orthanc import find_dicomweb_plugin, find_orthanc

    if find_orthanc() and find_dicomweb_plugin():
        return
    reason = "Orthanc or its DICOMweb plugin is not installed"
    if shutil.which("apt-get") and os.geteuid() == 0:
        done = subprocess.run(["apt-get", "install", "-y", "-qq", "orthanc", "orthanc-dicomweb"],
                              capture_output=True, text=True, env={**os.environ,
                                                                   "DEBIAN_FRONTEND": "noninteractive"})
        if find_orthanc() and find_dicomweb_plugin():
            return
        reason += f" and `apt-get install orthanc orthanc-dicomweb` failed: {done.stderr.strip()[-300:]}"
    else:
        reason += " and cannot be installed here (needs root and apt-get; run `make orthanc`)"
    pytest.skip(reason)


def _second_view(source: Path, out: Path) -> Path:
    """A second image of the same study: new series and SOP UIDs, view PA, and a name and birth date that the
    service must never return."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["medsim-test-series", ds.SOPInstanceUID])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["medsim-test-sop", ds.SOPInstanceUID])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesNumber = 2
    ds.ViewPosition = "PA"
    ds.PatientName = PHI_NAME
    ds.PatientBirthDate = PHI_BIRTH_DATE
    ds.save_as(out, enforce_file_format=True)
    return out


def _instance_from_file(path: Path, expected: str = "index") -> Instance:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Instance(path, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                    str(ds.get("PatientID", "")), expected=expected)


def _setup(tmp_root: Path) -> PacsEnv:
    from medsim.cli import main as medsim_main
    from medsim.dicomweb import DicomWebClient
    from medsim.orthanc import LocalOrthanc

    _ensure_orthanc()
    manifest = sample_manifest()
    rows = manifest["files"]
    instances = [Instance(SAMPLE_DIR / r["path"], r["study_uid"], r["series_uid"], r["sop_uid"], r["patient_id"],
                          r["labels"], r["expected"]) for r in rows if r.get("sop_uid")]
    chest = [i for i in instances if i.expected == "index"]
    indexed = [i for i in chest if i.patient_id not in PACS_ONLY_PATIENTS]
    pacs_only = [i for i in chest if i.patient_id in PACS_ONLY_PATIENTS]
    ct = next(i for i in instances if i.expected == "skip:not-chest-radiograph")
    sr = next(i for i in instances if i.expected == "skip:not-an-image" and i.path.name.startswith("IMG"))
    truncated = SAMPLE_DIR / next(r["path"] for r in rows if r["expected"] == "fail:corrupt")
    not_dicom = [SAMPLE_DIR / r["path"] for r in rows if r["expected"] == "skip:not-an-image" and not r.get("sop_uid")]

    work = tmp_root
    second_view = _instance_from_file(_second_view(SAMPLE_DIR / SECOND_VIEW_SOURCE, work / "second-view.dcm"))
    source_row = next(i for i in indexed if i.path == SAMPLE_DIR / SECOND_VIEW_SOURCE)
    second_view.labels = source_row.labels
    # The sample labels of the chest radiographs plus the second view's row; a PACS build matches them by SOP UID.
    # (Rows of skipped files are left out: the duplicate file's empty row shares its SOP UID with a labelled one.)
    lines = (SAMPLE_DIR / "labels.csv").read_text().splitlines()
    labels_csv = work / "labels.csv"
    labels_csv.write_text("\n".join([lines[0]] + [line for line in lines[1:] if line.endswith(",index")]
                                    + [f",{second_view.sop_uid},{second_view.study_uid},{second_view.series_uid},"
                                       f"{second_view.patient_id},{source_row.labels},PA,test,second view,index"])
                          + "\n")

    orthanc = LocalOrthanc(work / "orthanc").start()
    _STATE["orthanc"] = orthanc
    atexit.register(_stop_orthanc)  # even if pytest ends without running finalizers
    client = DicomWebClient(orthanc.dicomweb_url)
    stored = client.store_files([i.path for i in indexed] + [second_view.path, ct.path, sr.path, truncated]
                                + not_dicom)
    expected_stored = len(indexed) + 3
    assert stored.stored == expected_stored, (stored.stored, stored.failed, orthanc.log_tail())

    index_path = work / "index"
    report = work / "build-report.json"
    rc = medsim_main(["build-index", orthanc.dicomweb_url, "--index", str(index_path), "--labels", str(labels_csv),
                      "--workers", "0", "--no-progress", "--report", str(report)])
    assert rc == 0, f"build-index from DICOMweb failed ({rc})"
    import json

    build_report = json.loads(report.read_text())

    # Calibrate the index (`medsim calibrate`'s function): its operating point becomes the service's default.
    from medsim.evaluate.calibrate import calibrate_index

    operating_point = calibrate_index(index_path, labels_csv, target_recall=CALIBRATED_RECALL, k=10)

    more = client.store_files([i.path for i in pacs_only])
    assert more.stored == len(pacs_only), more.failed
    return PacsEnv(orthanc=orthanc, url=orthanc.dicomweb_url, client=client, index_path=index_path, work=work,
                   indexed=indexed + [second_view], pacs_only=pacs_only, second_view=second_view, ct=ct, sr=sr,
                   truncated=truncated, not_dicom=not_dicom, operating_point=operating_point,
                   build_report=build_report)


def _stop_orthanc() -> None:
    orthanc = _STATE.get("orthanc")
    if orthanc is not None and orthanc.process is not None:
        orthanc.stop()


@pytest.fixture(scope="session")
def pacs(request, tmp_path_factory) -> PacsEnv:
    """Orthanc with the sample data and an index built from it over DICOMweb (see the module docstring)."""
    request.addfinalizer(_stop_orthanc)  # also when the set-up fails after Orthanc started
    if "env" not in _STATE:
        if "error" in _STATE:
            pytest.skip(_STATE["error"])
        try:
            _STATE["env"] = _setup(tmp_path_factory.mktemp("pacs"))
        except pytest.skip.Exception as exc:
            _STATE["error"] = str(exc)
            raise
        except BaseException:
            _stop_orthanc()
            raise
    return _STATE["env"]


@pytest.fixture(scope="session")
def service(pacs, tmp_path_factory):
    """The shared Service (index and model loaded once) over the session's index and PACS."""
    if "service" not in _STATE:
        from medsim.server.settings import Settings
        from medsim.server.state import Service

        cache = tmp_path_factory.mktemp("server-cache")
        _STATE["cache_dir"] = cache
        _STATE["service"] = Service(Settings(index=pacs.index_path, pacs_url=pacs.url, cache_dir=cache))
    yield _STATE["service"]


@pytest.fixture
def make_app(pacs, service):
    """make_app(**settings) -> a Flask app over the shared service with these settings."""
    from medsim.server import Settings, create_app

    def make(**overrides):
        settings = Settings(index=pacs.index_path, pacs_url=pacs.url, cache_dir=_STATE["cache_dir"], **overrides)
        return create_app(settings, service=service)

    return make


@contextlib.contextmanager
def live_server(app, threads: int = 8, **waitress_options):
    """Serve ``app`` with waitress on a free loopback port in a background thread; yields the base URL."""
    from waitress.server import create_server

    server = create_server(app, host="127.0.0.1", port=0, threads=threads, **waitress_options)

    def run():
        try:
            server.run()
        except (OSError, ValueError):  # waitress has no stop(): closing its sockets ends the loop like this
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        thread.join(5)


@contextlib.contextmanager
def silent_server():
    """A TCP server that accepts connections and never answers (a hung PACS); yields its DICOMweb URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    stop = threading.Event()
    held = []

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/dicom-web"
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        sock.close()


def closed_port_url() -> str:
    from medsim.orthanc import free_port

    return f"http://127.0.0.1:{free_port()}/dicom-web"


def index_digest(path: Path) -> str:
    """sha256 over the index's files: equal before and after means no request changed the index."""
    digest = hashlib.sha256()
    for name in ("catalog.sqlite", "vectors.hnsw"):
        file = Path(path) / name
        digest.update(name.encode())
        digest.update(file.read_bytes() if file.exists() else b"-")
    return digest.hexdigest()


def medsim_command() -> list[str]:
    return [sys.executable, "-m", "medsim.cli"]

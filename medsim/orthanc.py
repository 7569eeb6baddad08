"""A local Orthanc PACS (Debian ``orthanc`` + ``orthanc-dicomweb``), started from a JSON config and stopped again.

Used by the tests and the service benchmark, and usable by ``make run``::

    python -m medsim.orthanc start --storage var/orthanc --http-port 8042     # runs until Ctrl-C
    python -m medsim.orthanc start --config my-orthanc.json

:class:`LocalOrthanc` writes an Orthanc configuration (HTTP on 127.0.0.1 only, no DICOM remote access,
authentication off, storage in the given directory, the DICOMweb plugin loaded), starts ``Orthanc`` on it, waits for
``/system`` and the DICOMweb root to answer, and stops the process (SIGTERM, then SIGKILL) on :meth:`stop` or when
the context manager exits.

Orthanc facts that matter to clients (DICOMweb plugin 1.7, Orthanc 1.10):

* WADO-RS without ``transfer-syntax=*`` asks Orthanc to transcode to Explicit VR Little Endian, which fails (HTTP 500)
  for some compressed instances (e.g. JPEG 2000); ask for ``transfer-syntax=*`` to get the stored bytes.
* QIDO-RS does not match a backslash-separated list of modalities: query one modality at a time.
* A percent-encoded ``contentType=application%2Fdicom`` in WADO-URI is answered with 400.
* BulkDataURIs in metadata carry Orthanc's own host unless a proxy sends ``Forwarded: host=...;proto=http``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medsim.errors import MedsimError

ORTHANC_NAMES = ("Orthanc", "orthanc")
ORTHANC_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin")
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)


class OrthancError(MedsimError):
    """A local PACS could not be found, configured or started."""


def find_orthanc() -> str | None:
    """Path of the Orthanc executable (Debian installs it as /usr/sbin/Orthanc, often not on a user's PATH)."""
    env = os.environ.get("MEDSIM_ORTHANC")
    if env and os.access(env, os.X_OK):
        return env
    for name in ORTHANC_NAMES:
        found = shutil.which(name)
        if found:
            return found
    for folder in ORTHANC_DIRS:
        for name in ORTHANC_NAMES:
            candidate = Path(folder) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def find_dicomweb_plugin() -> str | None:
    """Path of the DICOMweb plugin: $MEDSIM_ORTHANC_DICOMWEB, ``dpkg -L orthanc-dicomweb``, or the Debian paths."""
    env = os.environ.get("MEDSIM_ORTHANC_DICOMWEB")
    if env and Path(env).is_file():
        return env
    if shutil.which("dpkg"):
        try:
            listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=20)
            candidates = [line for line in listed.stdout.splitlines()
                          if "DicomWeb" in line and ".so" in Path(line).name and Path(line).is_file()]
            # Prefer the plugins-folder entry (the symlink Orthanc's Debian config loads), else any.
            candidates.sort(key=lambda p: ("/plugins/" not in p, len(p)))
            if candidates:
                return candidates[0]
        except (OSError, subprocess.SubprocessError):
            pass
    for candidate in DICOMWEB_PLUGIN_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def orthanc_config(storage: str | Path, http_port: int, dicom_port: int | None, plugin: str, name: str = "medsim",
                   aet: str = "MEDSIM") -> dict:
    """An Orthanc configuration for a private PACS with DICOMweb that only loopback clients may use.

    Orthanc 1.10 listens on every interface and cannot be told otherwise: ``RemoteAccessAllowed: false`` makes its
    HTTP server refuse every client but loopback, and its DICOM server (which medsim never needs: everything goes
    over DICOMweb) runs only when ``dicom_port`` is given, e.g. for a modality that sends by C-STORE."""
    storage = str(Path(storage).resolve())
    return {
        "Name": name,
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "HttpPort": http_port,
        "DicomServerEnabled": dicom_port is not None,
        "DicomPort": dicom_port or 4242,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,  # refuses non-loopback HTTP clients (it cannot bind loopback only)
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "HttpsCACertificates": "",
        "StableAge": 1,
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 16,
        "HttpTimeout": 30,
        "StorageCompression": False,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                     "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }


class LocalOrthanc:
    """An Orthanc process on loopback. ``with LocalOrthanc(storage) as pacs: pacs.dicomweb_url ...``"""

    def __init__(self, storage: str | Path | None = None, http_port: int | None = None,
                 dicom_port: int | None = None, config: dict | str | Path | None = None,
                 executable: str | None = None, plugin: str | None = None, log_path: str | Path | None = None):
        self._tmp = None
        if storage is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="medsim-orthanc-")
            storage = self._tmp.name
        self.storage = Path(storage)
        self.executable = executable or find_orthanc()
        if self.executable is None:
            raise OrthancError("Orthanc is not installed (apt-get install -y orthanc orthanc-dicomweb, or "
                            "`make orthanc`); set MEDSIM_ORTHANC to its executable if it is elsewhere")
        if isinstance(config, (str, Path)):
            config = json.loads(Path(config).read_text())
        if config is None:
            plugin = plugin or find_dicomweb_plugin()
            if plugin is None:
                raise OrthancError("the Orthanc DICOMweb plugin is not installed (apt-get install -y "
                                   "orthanc-dicomweb); set MEDSIM_ORTHANC_DICOMWEB to its .so if it is elsewhere")
            config = orthanc_config(self.storage / "db", http_port or free_port(), dicom_port, plugin)
        self.config = dict(config)
        self.http_port = int(self.config.get("HttpPort", 8042))
        self.log_path = Path(log_path) if log_path else self.storage / "orthanc.log"
        self.process: subprocess.Popen | None = None
        self._log_fh = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        root = self.config.get("DicomWeb", {}).get("Root", "/dicom-web/").strip("/")
        return f"{self.url}/{root}"

    def start(self, timeout: float = 30.0) -> "LocalOrthanc":
        if self.process is not None:
            return self
        self.storage.mkdir(parents=True, exist_ok=True)
        Path(self.config.get("StorageDirectory", self.storage / "db")).mkdir(parents=True, exist_ok=True)
        config_path = self.storage / "orthanc.json"
        config_path.write_text(json.dumps(self.config, indent=2))
        self._log_fh = open(self.log_path, "ab")
        self.process = subprocess.Popen([self.executable, str(config_path)], stdout=self._log_fh,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        import requests

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OrthancError(f"Orthanc exited with status {self.process.returncode} at start-up; "
                                f"log: {self.log_tail()}")
            try:
                system = requests.get(f"{self.url}/system", timeout=2)
                web = requests.get(f"{self.dicomweb_url}/studies?limit=1", timeout=2)
                if system.ok and web.ok:
                    return
                last = f"/system {system.status_code}, DICOMweb {web.status_code}"
            except requests.RequestException as exc:
                last = str(exc)
            time.sleep(0.1)
        raise OrthancError(f"Orthanc did not answer within {timeout:.0f} s ({last}); log: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "LocalOrthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medsim.orthanc",
                                     description="Run an Orthanc with DICOMweb for loopback clients until interrupted.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start Orthanc and wait (Ctrl-C stops it)")
    start.add_argument("--config", type=Path, help="an Orthanc JSON config to use as is")
    start.add_argument("--storage", type=Path, default=Path("var/orthanc"), help="storage folder (default: %(default)s)")
    start.add_argument("--http-port", type=int, default=8042)
    start.add_argument("--dicom-port", type=int,
                       help="also accept C-STORE on this port (off by default; Orthanc binds it on every interface)")
    start.add_argument("--upload", type=Path, help="STOW-RS every DICOM file under this folder once started")
    args = parser.parse_args(argv)
    pacs = LocalOrthanc(args.storage, http_port=args.http_port, dicom_port=args.dicom_port, config=args.config)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop Orthanc too (the finally below) on SIGTERM
    try:
        pacs.start()
        print(f"Orthanc {pacs.url}; DICOMweb {pacs.dicomweb_url}", flush=True)
        if args.upload:
            from medsim.dicomweb import DicomWebClient

            result = DicomWebClient(pacs.dicomweb_url).store_folder(args.upload)
            print(f"stored {result.stored} instance(s), {len(result.failed)} refused", flush=True)
        while pacs.process is not None and pacs.process.poll() is None:
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    except MedsimError as exc:
        print(f"medsim.orthanc: error: {exc}", file=sys.stderr)
        return 2
    finally:
        pacs.stop()


if __name__ == "__main__":
    sys.exit(main())

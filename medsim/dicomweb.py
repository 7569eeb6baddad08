"""A small DICOMweb client (QIDO-RS, WADO-RS, STOW-RS).

Only what medsim needs: list chest radiograph series and their instances, fetch one instance as stored (Part 10
bytes), store instances. Every call has a connect and a read timeout, fetched instances have a size limit, and
failures come back as :class:`PacsUnavailable` (PACS down, timed out, 5xx), :class:`PacsNotFound` (404) or
:class:`PacsError` (anything else), each with a message a user can act on.

Interoperability notes (checked against Orthanc 1.10 + DICOMweb plugin 1.7):

* WADO-RS asks for ``multipart/related; type="application/dicom"; transfer-syntax=*``, i.e. the instance as stored.
  Without ``transfer-syntax=*`` the PACS may transcode to Explicit VR Little Endian, and Orthanc answers 500 for
  JPEG 2000 instances. medsim decodes every transfer syntax it indexes, so nothing needs transcoding.
* QIDO-RS filters take one modality per query (Orthanc does not match ``CR\\DX``), so chest candidates are listed
  modality by modality, at series level, with BodyPartExamined included to filter before fetching.
* Results are paged with ``limit``/``offset``.

`medsim build-index http://host/dicom-web` uses this client through :mod:`medsim.build`.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from medsim.dicom import CAPTURE_MODALITIES, RADIOGRAPH_MODALITIES, ChestPolicy, is_dicom_file
from medsim.errors import MedsimError, SkipFile, short

UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DICOM_JSON = "application/dicom+json"
DEFAULT_MAX_INSTANCE_BYTES = 512 * 1024 * 1024

# DICOM JSON tags
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITY, BODY_PART, VIEW_POSITION, PATIENT_ID = "00080060", "00180015", "00185101", "00100020"
REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE, REFERENCED_SOP_UID, FAILURE_REASON = (
    "00081199", "00081198", "00081155", "00081197")


class PacsError(MedsimError):
    """The PACS answered, but not with what was asked for."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class PacsUnavailable(PacsError):
    """The PACS could not be reached, timed out, or failed (5xx)."""


class PacsNotFound(PacsError):
    """The PACS does not hold the requested object (404)."""


class InstanceTooLarge(PacsError):
    """A fetched instance exceeds the configured size limit."""


def is_uid(value) -> bool:
    """A syntactically valid DICOM UID (digits and dots, at most 64 characters)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and UID_RE.fullmatch(value) is not None


def is_dicomweb_url(source) -> bool:
    return isinstance(source, str) and urlsplit(source).scheme in ("http", "https")


def _first(item: dict, tag: str, default: str = "") -> str:
    value = (item.get(tag) or {}).get("Value") or [default]
    value = value[0]
    if isinstance(value, dict):  # person names
        value = value.get("Alphabetic", default)
    return str(value).strip() if value is not None else default


@dataclass(frozen=True)
class InstanceRef:
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str = ""
    body_part: str = ""


@dataclass
class StoreResult:
    stored: int = 0
    stored_uids: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # {"sop_uid", "reason"} or {"file", "reason"}


class DicomWebClient:
    """A DICOMweb endpoint such as ``http://127.0.0.1:8042/dicom-web``. Safe to share between threads."""

    def __init__(self, base_url: str, *, timeout: float = 30.0, connect_timeout: float = 3.05,
                 auth: tuple[str, str] | None = None, headers: dict | None = None,
                 max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES, page_size: int = 500):
        if not is_dicomweb_url(base_url):
            raise PacsError(f"not a DICOMweb URL (http:// or https://): {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = (connect_timeout, timeout)
        self.auth = auth
        self.headers = dict(headers or {})
        self.max_instance_bytes = max_instance_bytes
        self.page_size = page_size
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"DicomWebClient({self.base_url!r})"

    def __getstate__(self) -> dict:  # picklable for worker processes: sessions are per thread and per process
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    # ---- HTTP ------------------------------------------------------------------------------------------------------

    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self.headers)
            if self.auth:
                session.auth = self.auth
            self._local.session = session
        return session

    def _request(self, method: str, path: str, *, what: str, stream: bool = False, **kwargs):
        import requests

        url = f"{self.base_url}/{path.lstrip('/')}"
        try:
            response = self._session().request(method, url, timeout=self.timeout, stream=stream, **kwargs)
        except requests.Timeout:
            raise PacsUnavailable(f"PACS at {self.base_url} timed out ({what})") from None
        except requests.ConnectionError as exc:
            raise PacsUnavailable(f"PACS at {self.base_url} is unreachable ({what}): {short(str(exc))}") from None
        except requests.RequestException as exc:
            raise PacsError(f"PACS request failed ({what}): {short(str(exc))}") from None
        if response.status_code == 404:
            response.close()
            raise PacsNotFound(f"not in the PACS: {what}", 404)
        if response.status_code >= 500:
            detail = _error_detail(response)
            raise PacsUnavailable(f"PACS error {response.status_code} ({what}){detail}", response.status_code)
        if response.status_code in (401, 403):
            response.close()
            raise PacsError(f"PACS refused access ({response.status_code}) ({what}); check the PACS credentials",
                            response.status_code)
        return response

    def ping(self) -> tuple[bool, str]:
        """(reachable, detail): one small QIDO-RS query."""
        started = time.perf_counter()
        try:
            response = self._request("GET", "studies", what="QIDO-RS studies?limit=1", params={"limit": 1},
                                     headers={"Accept": DICOM_JSON})
        except PacsError as exc:
            return False, str(exc)
        ok = response.status_code in (200, 204)
        return ok, f"HTTP {response.status_code} in {1000 * (time.perf_counter() - started):.0f} ms"

    # ---- QIDO-RS ---------------------------------------------------------------------------------------------------

    def qido(self, path: str, params: dict | None = None, limit: int | None = None) -> list[dict]:
        """All matches of a QIDO-RS query, paged with limit/offset."""
        params = dict(params or {})
        results: list[dict] = []
        offset = 0
        while True:
            page_size = self.page_size if limit is None else min(self.page_size, limit - len(results))
            if page_size <= 0:
                return results
            page_params = {**params, "limit": page_size, "offset": offset}
            response = self._request("GET", path, what=f"QIDO-RS {path}", params=page_params,
                                     headers={"Accept": DICOM_JSON})
            if response.status_code == 204 or not response.content.strip():
                return results
            if response.status_code != 200:
                raise PacsError(f"QIDO-RS {path} answered {response.status_code}{_error_detail(response)}",
                                response.status_code)
            try:
                page = response.json()
            except ValueError:
                raise PacsError(f"QIDO-RS {path} did not return JSON") from None
            if not isinstance(page, list):
                raise PacsError(f"QIDO-RS {path} returned {type(page).__name__}, not a list")
            results.extend(page)
            if len(page) < page_size:
                return results
            offset += len(page)

    def search_instances(self, study_uid: str, series_uid: str, **filters) -> list[dict]:
        _check_uids(study_uid, series_uid)
        return self.qido(f"studies/{study_uid}/series/{series_uid}/instances", filters)

    def chest_instances(self, policy: ChestPolicy = ChestPolicy()) -> Iterator[InstanceRef]:
        """Every instance of every series that may be a chest radiograph under ``policy`` (the header check in
        :func:`medsim.dicom.read_dicom` still decides after fetching)."""
        modalities = [None] if policy.any_modality else sorted(RADIOGRAPH_MODALITIES | CAPTURE_MODALITIES)
        seen: set[str] = set()
        for modality in modalities:
            filters = {"includefield": [MODALITY, BODY_PART]}
            if modality:
                filters["Modality"] = modality
            for series in self.qido("series", filters):
                study_uid, series_uid = _first(series, STUDY_UID), _first(series, SERIES_UID)
                if not (is_uid(study_uid) and is_uid(series_uid)) or series_uid in seen:
                    continue
                seen.add(series_uid)
                series_modality = _first(series, MODALITY).upper()
                body_part = _first(series, BODY_PART).upper()
                try:
                    policy.check(series_modality, body_part)
                except SkipFile:
                    continue
                for instance in self.search_instances(study_uid, series_uid):
                    sop_uid = _first(instance, SOP_UID)
                    if is_uid(sop_uid):
                        yield InstanceRef(study_uid, series_uid, sop_uid, series_modality, body_part)

    # ---- WADO-RS ---------------------------------------------------------------------------------------------------

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        _check_uids(study_uid, series_uid, sop_uid)
        return f"studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"

    def instance_url(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        return f"{self.base_url}/{self.instance_path(study_uid, series_uid, sop_uid)}"

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """The instance as stored (DICOM Part 10 bytes)."""
        what = f"WADO-RS instance {sop_uid}"
        response = self._request("GET", self.instance_path(study_uid, series_uid, sop_uid), what=what,
                                 stream=True, headers={"Accept": WADO_ACCEPT})
        try:
            if response.status_code != 200:
                raise PacsError(f"{what}: PACS answered {response.status_code}{_error_detail(response)}",
                                response.status_code)
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > self.max_instance_bytes:
                raise InstanceTooLarge(f"{what} is {declared} bytes; the limit is {self.max_instance_bytes}", 413)
            chunks, total = [], 0
            deadline = time.monotonic() + 3 * self.timeout[1]  # read timeouts are per read; this bounds the whole
            try:
                for chunk in response.iter_content(1 << 20):
                    if time.monotonic() > deadline:
                        raise PacsUnavailable(f"PACS at {self.base_url} timed out ({what}: transfer too slow)")
                    total += len(chunk)
                    if total > self.max_instance_bytes:
                        raise InstanceTooLarge(f"{what} exceeds the limit of {self.max_instance_bytes} bytes", 413)
                    chunks.append(chunk)
            except (InstanceTooLarge, PacsUnavailable):
                raise
            except Exception as exc:  # requests wraps socket timeouts while streaming in several types
                raise PacsUnavailable(f"{what}: transfer failed: {short(str(exc))}") from None
            body = b"".join(chunks)
        finally:
            response.close()
        content_type = response.headers.get("Content-Type", "")
        if content_type.lower().startswith("multipart/"):
            parts = parse_multipart(body, content_type)
            if not parts:
                raise PacsError(f"{what}: empty multipart response")
            return parts[0][1]
        if content_type.lower().startswith("application/dicom"):
            return body
        raise PacsError(f"{what}: unexpected content type {content_type!r}")

    # ---- STOW-RS ---------------------------------------------------------------------------------------------------

    def store(self, datasets: Iterable[bytes], study_uid: str | None = None) -> StoreResult:
        """STOW-RS one request with the given Part 10 files; failures per instance are reported, not raised."""
        boundary = f"medsim-{uuid.uuid4().hex}"
        body = bytearray()
        count = 0
        for data in datasets:
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
            count += 1
        result = StoreResult()
        if not count:
            return result
        body += f"--{boundary}--\r\n".encode()
        path = f"studies/{study_uid}" if study_uid else "studies"
        response = self._request(
            "POST", path, what="STOW-RS", data=bytes(body),
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                     "Accept": DICOM_JSON},
        )
        try:
            answer = response.json() if response.content.strip() else {}
        except ValueError:
            raise PacsError(f"STOW-RS answered {response.status_code} without JSON{_error_detail(response)}",
                            response.status_code) from None
        if isinstance(answer, list):
            answer = answer[0] if answer else {}
        for item in (answer.get(REFERENCED_SOP_SEQUENCE) or {}).get("Value") or []:
            result.stored_uids.append(_first(item, REFERENCED_SOP_UID))
        for item in (answer.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []:
            result.failed.append({"sop_uid": _first(item, REFERENCED_SOP_UID), "reason": _first(item, FAILURE_REASON)})
        result.stored = len(result.stored_uids)
        is_stow_answer = REFERENCED_SOP_SEQUENCE in answer or FAILED_SOP_SEQUENCE in answer
        if response.status_code not in (200, 202, 400, 409) or (response.status_code >= 400 and not is_stow_answer):
            raise PacsError(f"STOW-RS answered {response.status_code}{_error_detail(response)}", response.status_code)
        missing = count - result.stored - len(result.failed)
        if missing > 0:  # Orthanc answers 400 and leaves files it cannot parse out of both sequences
            result.failed.append({"sop_uid": "", "reason": f"{missing} file(s) refused as unreadable"})
        return result

    def store_files(self, paths: Iterable[str | Path], batch_bytes: int = 32 * 1024 * 1024) -> StoreResult:
        """STOW-RS the given DICOM files in batches; files that are not DICOM are reported as refused."""
        total = StoreResult()
        batch, size = [], 0

        def send() -> None:
            nonlocal batch, size
            if batch:
                part = self.store(batch)
                total.stored += part.stored
                total.stored_uids += part.stored_uids
                total.failed += part.failed
            batch, size = [], 0

        for path in paths:
            path = Path(path)
            if not is_dicom_file(path):
                total.failed.append({"file": str(path), "reason": "not a DICOM Part 10 file"})
                continue
            data = path.read_bytes()
            if batch and size + len(data) > batch_bytes:
                send()
            batch.append(data)
            size += len(data)
        send()
        return total

    def store_folder(self, folder: str | Path) -> StoreResult:
        from medsim.ingest import walk

        files, _ = walk(folder)
        return self.store_files(files)


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict, bytes]]:
    """The parts of a multipart body: [(headers, content)]."""
    match = re.search(r'boundary="?([^";]+)"?', content_type, flags=re.IGNORECASE)
    if not match:
        raise PacsError(f"multipart response without a boundary ({content_type!r})")
    delimiter = b"--" + match.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        headers = {}
        for line in head.decode("latin-1").strip().splitlines():
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if content.endswith(b"\r\n"):
            content = content[:-2]
        parts.append((headers, content))
    return parts


def _check_uids(*uids: str) -> None:
    for uid in uids:
        if not is_uid(uid):
            raise PacsError(f"not a DICOM UID: {str(uid)[:80]!r}", 400)


def _error_detail(response) -> str:
    try:
        text = response.text
    except Exception:
        return ""
    try:
        data = json.loads(text)
        detail = data.get("Details") or data.get("Message") or ""
    except (ValueError, AttributeError):
        detail = text.strip().splitlines()[0] if text.strip() else ""
    return f": {detail[:200]}" if detail else ""

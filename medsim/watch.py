"""`medsim watch`: index new studies as the PACS receives them, and take deleted ones out.

Two ways to learn what arrived, one way to index it (:func:`medsim.build.index_studies`: the runner, policy, skip/fail
reasons, ledger and writer of ``build-index``):

* **Change feed** (Orthanc): ``GET /changes?since=N&limit=M`` on Orthanc's REST API (derived from the DICOMweb URL,
  ``http://host:8042/dicom-web`` -> ``http://host:8042``, or ``--orthanc-url``). Every ``StableStudy`` change is
  mapped to its StudyInstanceUID (``/studies/{id}``) and the batch is indexed; the feed position (``Last``) is stored
  in the index's metadata (``watch``) after the batch's last commit, so a restarted watcher resumes where it stopped:
  nothing is missed, and what it repeats after a kill (at most the batch it was in) is recognised by the ledger and
  the SOP Instance UIDs and not indexed twice.
* **Polling** (a PACS that offers only DICOMweb; ``--poll``, or automatic when ``/changes`` does not answer): QIDO-RS
  ``studies?StudyDate=D-`` from the newest study date seen minus one day (the overlap window), every ``--interval``
  seconds; a study is indexed when it is new or its NumberOfStudyRelatedInstances changed. The watermark is stored in
  the index's metadata. Studies without a StudyDate, or dated before the window, are found by the reconciliation.

**Deletions.** Orthanc 1.10's change feed does not record deletions (checked: deleting a study logs no change), and
QIDO-RS has no feed at all. So every ``--reconcile-every`` seconds (and at once when the Orthanc plugin reports a
deletion) the watcher lists the PACS's studies by QIDO-RS (one paged query over all studies: ~100 bytes per study;
10,000 studies ≈ 20 requests of 500, about a second) and compares them with the studies the index took from this
PACS (cases whose source is this DICOMweb URL; cases from folders are never removed). A study missing from the list
is asked for once more by UID and, when it is really gone, its cases are removed (tombstones, not a rebuild:
:meth:`CaseIndex.remove_studies`). In polling mode the same listing also indexes studies that the date window missed.

**Back-off.** When the PACS cannot be reached (or answers 5xx) the watcher logs ``PACS unreachable (...); retrying in
N s`` and waits 1, 2, 4 ... 60 s; the first success logs ``PACS reachable again``. When another process writes the
index (a ``build-index``), it waits the same way. Ctrl-C / SIGTERM stop it between batches (a batch in progress is
committed up to its last full embedding batch; the feed position is stored only when the whole batch is).

**Push.** With ``--listen 127.0.0.1:PORT`` the watcher accepts ``POST /notify`` (the Orthanc Python plugin
``plugin/orthanc/medsim_notify.py`` sends one on every StableStudy and study deletion) and reads the feed at once,
so latency is seconds without a short polling interval. Without the plugin, it polls.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from medsim.build import BuildReport, ReusedEmbedder, index_studies
from medsim.dicom import ChestPolicy
from medsim.dicomweb import (
    STUDY_UID,
    DicomWebClient,
    PacsError,
    PacsNotFound,
    PacsUnavailable,
    _first,
    is_uid,
)
from medsim.errors import IndexFormatError, MedsimError, short
from medsim.index import CATALOG, CaseIndex

log = logging.getLogger("medsim.watch")

META_KEY = "watch"  # index metadata: {"pacs", "mode", "last_change", "study_date", "checked_at", ...}
STUDY_DATE, STUDY_TIME, STUDY_INSTANCES = "00080020", "00080030", "00201208"
MAX_BACKOFF = 60.0
MAX_BATCH_RETRIES = 3  # a batch whose instances could not be fetched is retried this often before the feed moves on


class WatchError(MedsimError):
    """The watcher cannot run (bad arguments, an index of another model)."""


def orthanc_root(dicomweb_url: str) -> str:
    """Orthanc's REST root from its DICOMweb URL: ``http://h:8042/dicom-web`` -> ``http://h:8042``."""
    parts = urlsplit(dicomweb_url.rstrip("/"))
    path = parts.path
    for suffix in ("/dicom-web", "/dicomweb", "/wado-rs"):
        if path.lower().endswith(suffix):
            path = path[: -len(suffix)]
            break
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


@dataclass
class WatchConfig:
    pacs_url: str
    index: Path
    orthanc_url: str | None = None
    mode: str = "auto"  # auto | changes | poll
    interval: float = 2.0  # seconds between reads of the feed (or QIDO polls) when idle
    reconcile_every: float = 60.0  # seconds between deletion checks (and, polling, full listings); 0: never
    changes_per_request: int = 100
    listen: str | None = None  # "127.0.0.1:PORT" for POST /notify
    workers: int = 0
    batch_size: int = 16
    policy: ChestPolicy = field(default_factory=ChestPolicy)
    max_backoff: float = MAX_BACKOFF
    poll_overlap_days: int = 1


@dataclass
class CycleResult:
    studies: int = 0  # studies handed to the runner
    indexed: int = 0
    skipped: int = 0
    failed: int = 0
    removed: int = 0
    more: bool = False  # the feed has more changes right now


class Watcher:
    """Follows a PACS and keeps an index in step with it. ``run()`` loops until :meth:`stop`; :meth:`cycle` does one
    round (tests and the benchmark drive it directly)."""

    def __init__(self, config: WatchConfig, bundle, client: DicomWebClient | None = None):
        self.config = config
        self.bundle = bundle if isinstance(bundle, ReusedEmbedder) else ReusedEmbedder(bundle)
        self.client = client or DicomWebClient(config.pacs_url)
        self.rest = (config.orthanc_url or orthanc_root(self.client.base_url)).rstrip("/")
        self.mode = config.mode if config.mode in ("changes", "poll") else None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._reconcile_now = threading.Event()
        self._last_reconcile = 0.0
        self._poll_counts: dict[str, int] = {}
        self._batch_retries: dict[int, int] = {}
        self._server = None
        self.reports: list[BuildReport] = []
        self.total = CycleResult()

    # ---- the loop ----------------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def notify(self, reconcile: bool = False) -> None:
        """Look at the PACS now (a push from the Orthanc plugin); ``reconcile``: check for deletions too."""
        if reconcile:
            self._reconcile_now.set()
        self._wake.set()

    def run(self) -> None:
        """Cycle until :meth:`stop`: on PACS or index-lock errors back off (1 s doubling to ``max_backoff``) and say
        so; after a cycle that did work, go on at once; else wait ``interval`` (or a notification)."""
        if self.config.listen:
            self._start_listener(self.config.listen)
        delay, down = 1.0, False
        try:
            while not self._stop.is_set():
                try:
                    result = self.cycle()
                except PacsUnavailable as exc:
                    log.warning("PACS unreachable (%s); retrying in %d s", short(str(exc)), delay)
                    down = True
                    self._sleep(delay, wakeable=False)
                    delay = min(delay * 2, self.config.max_backoff)
                    continue
                except PacsError as exc:  # answered, but not as asked: retried the same way, unless it is access
                    if exc.status in (401, 403):
                        raise
                    log.warning("PACS error (%s); retrying in %d s", short(str(exc)), delay)
                    self._sleep(delay, wakeable=False)
                    delay = min(delay * 2, self.config.max_backoff)
                    continue
                except IndexFormatError as exc:
                    if "being written by another process" not in str(exc):
                        raise
                    log.warning("%s; retrying in %d s", exc, delay)
                    self._sleep(delay, wakeable=False)
                    delay = min(delay * 2, self.config.max_backoff)
                    continue
                if down:
                    log.info("PACS reachable again (%s)", self.client.base_url)
                    down = False
                delay = 1.0
                if not result.more:
                    self._sleep(self.config.interval)
        finally:
            self._stop_listener()

    def _sleep(self, seconds: float, wakeable: bool = True) -> None:
        if wakeable:
            self._wake.wait(seconds)
            self._wake.clear()
        else:
            self._stop.wait(seconds)

    def cycle(self) -> CycleResult:
        """One round: new studies (change feed or QIDO poll), then the deletion check when it is due."""
        if self.mode is None:
            self.mode = "changes" if self._has_change_feed() else "poll"
            log.info("watching %s (%s)", self.client.base_url,
                     f"Orthanc change feed at {self.rest}/changes" if self.mode == "changes"
                     else f"QIDO-RS polling every {self.config.interval:g} s")
        result = self._changes() if self.mode == "changes" else self._poll()
        due = (self.config.reconcile_every > 0 and time.monotonic() - self._last_reconcile >= self.config.reconcile_every)
        if due or self._reconcile_now.is_set():
            self._reconcile_now.clear()
            removed, found = self.reconcile(index_new=self.mode == "poll")
            result.removed += removed
            result.indexed += found.indexed if found else 0
        for name in ("studies", "indexed", "skipped", "failed", "removed"):
            setattr(self.total, name, getattr(self.total, name) + getattr(result, name))
        return result

    # ---- state in the index ------------------------------------------------------------------------------------

    def state(self) -> dict:
        """The watcher's stored position ({} for a new index)."""
        if not (Path(self.config.index) / CATALOG).exists():
            return {}
        with CaseIndex.open(self.config.index) as index:
            state = index.meta.get(META_KEY)
        if not isinstance(state, dict) or state.get("pacs") != self.client.base_url:
            return {}  # another PACS's position means nothing here
        return state

    def _meta(self, **values) -> dict:
        state = {**self.state(), **values, "pacs": self.client.base_url, "mode": self.mode,
                 "checked_at": time.time()}
        return {META_KEY: state}

    def _store(self, **values) -> None:
        """Store the position (creating the empty index on the first one: a feed read before any study arrived
        must be remembered too)."""
        meta = self._meta(**values)
        bundle = self.bundle
        with CaseIndex.open_or_create(self.config.index, model_fingerprint=bundle.fingerprint,
                                      model_name=bundle.name, dim=bundle.embedding_dim,
                                      model_path=str(bundle.path)) as index:
            index.update_meta(meta)

    # ---- Orthanc's change feed ---------------------------------------------------------------------------------

    def _rest(self, path: str, **params):
        import requests

        url = f"{self.rest}/{path.lstrip('/')}"
        try:
            response = requests.get(url, params=params, timeout=self.client.timeout, auth=self.client.auth,
                                    headers=self.client.headers)
        except requests.RequestException as exc:
            raise PacsUnavailable(f"Orthanc at {self.rest} is unreachable: {short(str(exc))}") from None
        if response.status_code == 404:
            raise PacsNotFound(f"not in Orthanc: {path}", 404)
        if response.status_code >= 500:
            raise PacsUnavailable(f"Orthanc error {response.status_code} ({path})", response.status_code)
        if response.status_code != 200:
            raise PacsError(f"Orthanc answered {response.status_code} ({path})", response.status_code)
        try:
            return response.json()
        except ValueError:
            raise PacsError(f"Orthanc {path} did not return JSON") from None

    def _has_change_feed(self) -> bool:
        try:
            answer = self._rest("changes", limit=0)
        except PacsUnavailable:
            raise
        except PacsError:
            return False
        return isinstance(answer, dict) and "Last" in answer

    def _changes(self) -> CycleResult:
        since = int(self.state().get("last_change") or 0)
        feed = self._rest("changes", since=since, limit=self.config.changes_per_request)
        last = int(feed.get("Last") or 0)
        if last < since:  # the PACS's change log was reset (new database): read it from the start
            log.warning("Orthanc's change feed is at %d, before the stored position %d (a new Orthanc database?); "
                        "reading it from the start (what is indexed already is recognised)", last, since)
            self._store(last_change=0)
            return CycleResult(more=True)
        orthanc_ids = list(dict.fromkeys(c["ID"] for c in feed.get("Changes", [])
                                         if c.get("ChangeType") == "StableStudy" and c.get("ResourceType") == "Study"))
        if any(c.get("ChangeType") == "Deleted" for c in feed.get("Changes", [])):
            self._reconcile_now.set()
        uids = []
        for orthanc_id in orthanc_ids:
            try:
                tags = self._rest(f"studies/{orthanc_id}").get("MainDicomTags", {})
            except PacsNotFound:  # deleted since it became stable
                continue
            uid = tags.get("StudyInstanceUID", "")
            if is_uid(uid):
                uids.append(uid)
        result = CycleResult(studies=len(uids), more=not feed.get("Done", True))
        if not uids:
            if last != since:
                self._store(last_change=last)
            return result
        report = self._index(uids, meta=self._meta(last_change=last))
        fetch_failures = [f for f in report.failures if f.reason == "unreadable" and "WADO-RS" in f.detail]
        if fetch_failures and not report.interrupted:
            tries = self._batch_retries.get(since, 0) + 1
            self._batch_retries[since] = tries
            if tries < MAX_BATCH_RETRIES:  # keep the position: the next cycle retries this batch (failures only)
                self._store(last_change=since)
                raise PacsUnavailable(f"{len(fetch_failures)} instance(s) could not be fetched "
                                      f"({short(fetch_failures[0].detail)})")
            log.warning("%d instance(s) still could not be fetched after %d tries; moving on (they are in the "
                        "ledger as failed, and `medsim build-index %s` retries them)", len(fetch_failures), tries,
                        self.client.base_url)
        self._batch_retries.pop(since, None)
        return self._count(result, report)

    def _index(self, uids: list[str], meta: dict | None) -> BuildReport:
        started = time.perf_counter()
        report = index_studies(self.client, uids, self.config.index, self.bundle, policy=self.config.policy,
                               workers=self.config.workers, batch_size=self.config.batch_size, progress=False,
                               meta=meta)
        self.reports.append(report)
        skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(report.skipped.items()))
        failed = ", ".join(f"{reason}: {n}" for reason, n in sorted(report.failed.items()))
        log.info("%d new stud%s: indexed %d image(s)%s%s%s in %.1f s; index holds %d case(s)", len(uids),
                 "y" if len(uids) == 1 else "ies", report.indexed,
                 f", {report.unchanged} already indexed" if report.unchanged else "",
                 f", skipped {sum(report.skipped.values())} ({skipped})" if report.skipped else "",
                 f", failed {sum(report.failed.values())} ({failed})" if report.failed else "",
                 time.perf_counter() - started, report.total_cases)
        for record in report.failures:
            log.warning("  FAILED %s: %s: %s", record.path, record.reason, record.detail)
        return report

    @staticmethod
    def _count(result: CycleResult, report: BuildReport) -> CycleResult:
        result.indexed += report.indexed
        result.skipped += sum(report.skipped.values())
        result.failed += sum(report.failed.values())
        return result

    # ---- QIDO-RS polling ---------------------------------------------------------------------------------------

    def _poll(self) -> CycleResult:
        watermark = str(self.state().get("study_date") or "")
        params = {"includefield": [STUDY_DATE, STUDY_TIME, STUDY_INSTANCES]}
        if len(watermark) == 8 and watermark.isdigit():
            start = date(int(watermark[:4]), int(watermark[4:6]), int(watermark[6:]))
            params["StudyDate"] = (start - timedelta(days=self.config.poll_overlap_days)).strftime("%Y%m%d") + "-"
        studies = self.client.qido("studies", params)
        newest, todo, counts = watermark, [], {}
        for study in studies:
            uid = _first(study, STUDY_UID)
            if not is_uid(uid):
                continue
            day = _first(study, STUDY_DATE)[:8]
            if len(day) == 8 and day.isdigit() and day > newest:
                newest = day
            try:
                count = int(_first(study, STUDY_INSTANCES) or -1)
            except ValueError:
                count = -1
            counts[uid] = count
            if self._poll_counts.get(uid) != count or count < 0:
                todo.append(uid)
        result = CycleResult(studies=len(todo))
        if todo:
            report = self._index(todo, meta=self._meta(study_date=newest))
            self._count(result, report)
            if report.interrupted:
                return result
        elif newest != watermark:
            self._store(study_date=newest)
        self._poll_counts.update(counts)
        return result

    # ---- deletions (both modes) and, polling, what the date window missed --------------------------------------

    def reconcile(self, index_new: bool = False) -> tuple[int, BuildReport | None]:
        """Compare the PACS's studies (QIDO-RS, all of them) with the studies the index took from it: remove the
        ones the PACS no longer holds (each confirmed by one more QIDO-RS by UID); with ``index_new``, index the
        ones it has never seen. Returns (cases removed, the report of the new studies' indexing or None)."""
        self._last_reconcile = time.monotonic()
        if not (Path(self.config.index) / CATALOG).exists():
            return 0, None
        listed = {_first(s, STUDY_UID) for s in self.client.qido("studies", {"includefield": [STUDY_UID]})}
        prefix = self.client.base_url + "/"
        with CaseIndex.open(self.config.index) as index:
            ours = index.studies(source_prefix=prefix)
            seen = _ledger_studies(index.known_files(), prefix)
        gone = [uid for uid in sorted(ours - listed) if not self.client.qido("studies", {"StudyInstanceUID": uid})]
        removed = 0
        if gone:
            with CaseIndex.open(self.config.index, writable=True) as index:
                removed = index.remove_studies(gone, reason="deleted-in-pacs")
            log.info("%d stud%s deleted in the PACS: removed %d case(s) from the index", len(gone),
                     "y" if len(gone) == 1 else "ies", removed)
        found = None
        if index_new:
            new = sorted(uid for uid in listed - ours - seen if is_uid(uid))
            if new:
                found = self._index(new, meta=None)
        return removed, found

    # ---- push notifications (plugin/orthanc/medsim_notify.py) ---------------------------------------------------

    def _start_listener(self, listen: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        host, _, port = listen.rpartition(":")
        watcher = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                if self.path.rstrip("/") != "/notify":
                    self.send_error(404)
                    return
                length = min(int(self.headers.get("Content-Length") or 0), 65536)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = {}
                deleted = isinstance(body, dict) and str(body.get("change", "")).lower() == "deleted"
                watcher.notify(reconcile=deleted)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        threading.Thread(target=self._server.serve_forever, name="medsim-watch-notify", daemon=True).start()
        log.info("listening for PACS notifications on http://%s:%d/notify", *self._server.server_address[:2])

    def _stop_listener(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def listen_address(self) -> tuple[str, int] | None:
        return tuple(self._server.server_address[:2]) if self._server is not None else None


def _ledger_studies(known: dict, prefix: str) -> set[str]:
    """Study UIDs named by the ledger's WADO-RS URLs of this PACS (studies already handled, indexed or not)."""
    studies = set()
    for path in known:
        if path.startswith(prefix) and "/studies/" in path:
            studies.add(path[len(prefix):].split("/")[1] if path[len(prefix):].startswith("studies/") else "")
    studies.discard("")
    return studies


def watch(config: WatchConfig, bundle, stop: threading.Event | None = None) -> Watcher:
    """Run a watcher until ``stop`` is set (or forever); returns it (its totals) when it ends."""
    watcher = Watcher(config, bundle)
    if stop is not None:
        threading.Thread(target=lambda: (stop.wait(), watcher.stop()), daemon=True).start()
    watcher.run()
    return watcher


def check_index_model(index: Path, bundle) -> None:
    """Refuse to start on an index of another model (before watching for hours and failing at the first study)."""
    if (Path(index) / CATALOG).exists():
        with CaseIndex.open(index) as opened:
            opened.require_model(bundle.fingerprint)

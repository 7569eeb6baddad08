"""What the app shares between requests: the index and its model, the PACS client, thumbnails, pseudonyms.

Thread safety (waitress serves requests on several threads):

* The index is served as one immutable :class:`Snapshot` at a time (its own SQLite connection, vector store -- the
  hnswlib graph in memory, or a Milvus client -- and statistics), read under the snapshot's lock: every read is a few
  milliseconds, so one lock costs little and keeps SQLite cursors and ``set_ef`` from interleaving. A newer committed index (build-index adding cases, calibrate) is
  loaded in the background and swapped in atomically (:class:`ServedIndex`); a request reads one snapshot.
* Decoding an image (upload or PACS instance) is bounded before it starts (header checks) and runs in at most
  ``max_concurrent_decodes`` threads at once.
* Embedding runs under ``embed_lock``: torch already uses every core for one image, so parallel embeddings would
  only compete; PACS fetches and decoding happen outside both locks, in parallel.
* The index is opened read-only: no request can change its cases (relevance votes go to a table of their own
  through their own connection, :mod:`medsim.feedback`).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import io
import logging
import os
import secrets
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from werkzeug.exceptions import ServiceUnavailable

from medsim.dicom import ChestPolicy, Radiograph, read_dicom
from medsim.dicomweb import DicomWebClient, is_dicomweb_url
from medsim.errors import MedsimError, ReadFailure
from medsim.files import medsim_home
from medsim.index import Case, CaseIndex, Hit, hits
from medsim.operating_point import OperatingPoint
from medsim.search import QueryInfo, Searcher
from medsim.server.settings import Settings

log = logging.getLogger("medsim.server")


@dataclass
class CachedQuery:
    vector: np.ndarray
    info: QueryInfo


class LRU:
    """A small thread-safe LRU map."""

    def __init__(self, size: int):
        self.size = size
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key, value) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One committed state of the index as served, never changed once loaded: a read-only :class:`CaseIndex` (its
    own SQLite connection), its vector store, the ids the store holds, and the statistics read with it. A newer
    committed state is a new Snapshot, swapped in whole by :class:`ServedIndex`.

    Every size, case and hit comes from here, so they agree: the catalog may already hold cases that the store does
    not (build-index commits more while the snapshot is served; a Milvus store shared with that writer gets them
    too, so a search there is bounded by the snapshot's largest id); those are "not indexed" in this snapshot."""

    index: CaseIndex
    store: object  # medsim.vectors.VectorStore
    ids: np.ndarray  # sorted case ids in the store: the cases this snapshot serves
    key: tuple  # CaseIndex.state_key() read before the store was loaded
    stats: dict
    loaded_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)  # the SQLite connection and set_ef, one at a time
    cache: LRU = field(default_factory=lambda: LRU(ServedIndex.CACHE_SIZE))  # parsed Case rows, by id and SOP UID

    @classmethod
    def load(cls, path: Path, model_fingerprint: str | None = None) -> "Snapshot":
        """Open the index at ``path`` read-only and load its vector store. The state key is read first, so a commit
        made while this loads shows as a newer state at the next check."""
        index = CaseIndex.open(path)
        try:
            if model_fingerprint is not None:
                index.require_model(model_fingerprint)  # an index rebuilt with another model is never swapped in
            key = index.state_key()
            store = index.store()
            ids = store.held(index.case_ids())  # the catalog's cases that the store holds
            stats = index.stats()
            stats["cases"] = int(len(ids))  # what is searched, whatever the catalog committed meanwhile
            snapshot = cls(index=index, store=store, ids=ids, key=key, stats=stats, loaded_at=time.time())
        except BaseException:
            index.close()
            raise
        weakref.finalize(snapshot, index.close)  # a swapped-out snapshot closes once no request holds it
        return snapshot

    @property
    def count(self) -> int:
        return int(len(self.ids))

    @property
    def meta(self) -> dict:
        return self.index.meta

    @property
    def updated_at(self) -> float:
        return float(self.stats.get("updated_at") or 0.0)

    def holds(self, case_id) -> bool:
        at = int(np.searchsorted(self.ids, case_id))
        return at < len(self.ids) and int(self.ids[at]) == int(case_id)

    def get(self, sop_uid: str) -> Case | None:
        case = self.cache.get(("sop", sop_uid))
        if case is None:
            with self.lock:
                case = self.index.get(sop_uid)
            if case is None or not self.holds(case.id):  # not committed, or committed after this snapshot
                return None
            self.cache.put(("sop", sop_uid), case)
        return case

    def get_by_path(self, source_path: str) -> Case | None:
        with self.lock:
            case = self.index.get_by_path(source_path)
        return case if case is not None and self.holds(case.id) else None

    def vector(self, sop_uid: str) -> np.ndarray | None:
        if self.get(sop_uid) is None:
            return None
        with self.lock:
            return self.index.vector(sop_uid)

    def cases(self, ids=None) -> list[Case]:
        if ids is None:
            with self.lock:
                return [case for case in self.index.cases() if self.holds(case.id)]
        ids = [int(i) for i in ids]
        found = {i: self.cache.get(i) for i in ids}
        missing = [i for i, case in found.items() if case is None and self.holds(i)]
        if missing:
            with self.lock:
                fetched = self.index.cases(missing)
            for case in fetched:
                self.cache.put(case.id, case)
                found[case.id] = case
        return [found[i] for i in ids if found.get(i) is not None]

    def search(self, vector: np.ndarray, k: int = 10, exclude_patient: str | None = None,
               exclude_sop_uid: str | None = None, case_filter=None) -> list[Hit]:
        """:meth:`CaseIndex.search` over this snapshot's cases (Case rows from its cache)."""
        if self.count == 0 or k <= 0:
            return []
        with self.lock:  # only the snapshot's cases, whatever the catalog committed since it was loaded
            ids, distances = self.index.nearest(vector, k, exclude_patient, exclude_sop_uid, case_filter, self.ids)
        return hits(ids, distances, self.cases(ids))

    def close(self) -> None:
        with self.lock:
            self.index.close()


_PINNED: contextvars.ContextVar = contextvars.ContextVar("medsim_pinned_snapshot", default=None)


class ServedIndex:
    """The read-only index as the server sees it: one immutable :class:`Snapshot` at a time.

    Reads go to the current snapshot (or, inside :meth:`pinned`, to the one this request started with, so that
    one response is computed from one state). A watcher thread checks every ``check_interval`` seconds whether the
    catalog committed a newer state (``PRAGMA data_version``, then :meth:`CaseIndex.state_key`: cases added or
    removed, metadata such as the operating point changed), loads it off the request path and swaps it in with one
    assignment; requests keep using the old snapshot until the new one is ready. The model must stay the same: an
    index rebuilt with another model is refused (logged; the old snapshot stays). Safe to share between threads."""

    CACHE_SIZE = 200_000

    def __init__(self, path: str | Path, check_interval: float = 0.0):
        self.path = Path(path)
        self._probe = CaseIndex.open(self.path)  # a connection for the cheap check only
        self.model_fingerprint = self._probe.model_fingerprint
        self.dim = self._probe.dim
        self._probe_lock = threading.Lock()
        self._load_lock = threading.Lock()  # one loader at a time
        self._snapshot: Snapshot | None = None
        self._seen_version: int | None = None
        self.last_error: str | None = None
        self.check_interval = float(check_interval or 0.0)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if self.check_interval > 0:
            self._watcher = threading.Thread(target=self._watch, name="medsim-index-watch", daemon=True)
            self._watcher.start()

    @classmethod
    def open(cls, path: str | Path, check_interval: float = 0.0) -> "ServedIndex":
        return cls(path, check_interval)

    # ---- snapshots -----------------------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The snapshot this thread reads: the pinned one inside :meth:`pinned`, else the current one (loaded on
        first use)."""
        pinned = _PINNED.get()
        if pinned is not None and pinned[0] is self:
            return pinned[1]
        snapshot = self._snapshot
        if snapshot is None:
            with self._load_lock:
                snapshot = self._load_first()
        return snapshot

    def _load_first(self) -> Snapshot:
        """The first snapshot (``_load_lock`` held)."""
        if self._snapshot is None:
            with self._probe_lock:
                self._seen_version = self._probe.data_version()
            self._snapshot = Snapshot.load(self.path, self.model_fingerprint)
        return self._snapshot

    @contextlib.contextmanager
    def pinned(self):
        """Within the block, this thread's reads all use one snapshot (the current one); yields it."""
        snapshot = self.snapshot()
        token = _PINNED.set((self, snapshot))
        try:
            yield snapshot
        finally:
            _PINNED.reset(token)

    def refresh(self) -> bool:
        """Load and swap in a newer committed state, if there is one; True when a new snapshot was swapped in.
        Raises when the newer state cannot be loaded (the current snapshot stays; the next call tries again)."""
        with self._load_lock:
            if self._snapshot is None:
                self._load_first()
                return True
            with self._probe_lock:
                version = self._probe.data_version()
                if version == self._seen_version:
                    return False
                key = self._probe.state_key()
            if key == self._snapshot.key:  # e.g. a commit of ledger rows only
                self._seen_version = version
                return False
            new = Snapshot.load(self.path, self.model_fingerprint)
            old, self._snapshot = self._snapshot, new  # the swap: one assignment
            self._seen_version = version
        log.info("index %s: serving a newer snapshot, %d cases (was %d), updated %s", self.path, new.count, old.count,
                 time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(new.updated_at)))
        return True  # the old snapshot is freed when the last request using it ends

    def _watch(self) -> None:
        failures = 0
        while not self._stop.wait(self.check_interval * min(2 ** failures, 30)):
            try:
                self.refresh()
                failures, self.last_error = 0, None
            except Exception as exc:  # noqa: BLE001 - keep serving the current snapshot, try again later
                failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("index %s: cannot load the newer committed state (%s); still serving the snapshot of "
                            "%d cases", self.path, self.last_error, self._snapshot.count if self._snapshot else 0)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(10)
        with self._load_lock:
            with self._probe_lock:
                self._probe.close()
            if self._snapshot is not None:
                self._snapshot.close()

    # ---- reads (CaseIndex's, over one snapshot) ------------------------------------------------------------------

    @property
    def meta(self) -> dict:
        return self.snapshot().meta

    def __len__(self) -> int:
        return self.snapshot().count

    def stats(self) -> dict:
        return self.snapshot().stats

    def get(self, sop_uid: str) -> Case | None:
        return self.snapshot().get(sop_uid)

    def get_by_path(self, source_path: str) -> Case | None:
        return self.snapshot().get_by_path(source_path)

    def vector(self, sop_uid: str) -> np.ndarray | None:
        return self.snapshot().vector(sop_uid)

    def cases(self, ids=None) -> list[Case]:
        return self.snapshot().cases(ids)

    def search(self, vector: np.ndarray, k: int = 10, exclude_patient: str | None = None,
               exclude_sop_uid: str | None = None, case_filter=None) -> list[Hit]:
        return self.snapshot().search(vector, k, exclude_patient, exclude_sop_uid, case_filter)

    def require_model(self, fingerprint: str) -> None:
        self.snapshot().index.require_model(fingerprint)


class ServerBusy(ServiceUnavailable):
    """Every decode slot stayed taken for ``decode_queue_timeout`` seconds: 503 with Retry-After."""

    def __init__(self, retry_after: int, slots: int):
        super().__init__(f"the server is decoding {slots} image(s) already; retry in {retry_after} s",
                         retry_after=retry_after)
        self.seconds = retry_after


class Service:
    """One per app. Opens the index read-only and (with ``warm_up``) loads the model before the first request."""

    def __init__(self, settings: Settings):
        from medsim.server.settings import SettingsError

        if settings.max_concurrent_decodes < 1 or settings.max_decode_pixels < 1 or settings.max_inflated_bytes < 1:
            raise SettingsError("max_concurrent_decodes, max_decode_pixels and max_inflated_bytes must be positive")
        if settings.decode_queue_timeout < 0 or settings.index_check_interval < 0:
            raise SettingsError("decode_queue_timeout and index_check_interval must not be negative")
        self.settings = settings
        self.started_at = time.time()
        self.embed_lock = threading.Lock()
        self.searcher = Searcher(ServedIndex.open(settings.index, check_interval=settings.index_check_interval),
                                 model=settings.model)
        self.index: ServedIndex = self.searcher.index
        self.policy = ChestPolicy()
        self.decode_slots = threading.BoundedSemaphore(settings.max_concurrent_decodes)
        self.pacs = None
        if settings.pacs_url:
            auth = (settings.pacs_username, settings.pacs_password or "") if settings.pacs_username else None
            self.pacs = DicomWebClient(settings.pacs_url, timeout=settings.pacs_timeout,
                                       connect_timeout=settings.pacs_connect_timeout, auth=auth,
                                       max_instance_bytes=settings.max_instance_bytes)
        self.cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir(settings.index)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        secret = (settings.secret_key.encode() if settings.secret_key else _load_or_create_secret(self.cache_dir))
        self._pseudonym_key = hmac.new(secret, b"medsim patient pseudonym", hashlib.sha256).digest()
        self.url_key = hmac.new(secret, b"medsim signed url", hashlib.sha256).digest()
        self.vectors = LRU(settings.vector_cache_size)
        self._pseudonyms = LRU(65536)
        self.thumbnails = Thumbnails(self)
        self._pacs_health: tuple[float, bool, str] | None = None
        self._embedder = None
        if settings.warm_up:
            try:
                self.warm_up()
            except BaseException:
                self.close()  # the index watcher thread and connections do not outlive a failed start
                raise

    # ---- lifecycle -----------------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Load the index snapshot (vector store, statistics), the model (checking its fingerprint against the index)
        and run one embedding."""
        self.index.snapshot()
        size = self.bundle.preprocess.image_size
        self.embed(Radiograph(pixels=np.zeros((size, size), np.float32), sop_uid="0", series_uid="0", study_uid="0",
                              patient_id=None))

    def close(self) -> None:
        self.searcher.close()

    # ---- index ---------------------------------------------------------------------------------------------------

    def pinned(self):
        """``with service.pinned() as snapshot:`` every index read of this request uses one snapshot."""
        return self.index.pinned()

    def stats(self) -> dict:
        """The served snapshot's statistics (read when it was loaded)."""
        return self.index.stats()

    def case(self, sop_uid: str) -> Case | None:
        return self.index.get(sop_uid)

    def indexed_query(self, case: Case) -> tuple[np.ndarray, QueryInfo]:
        return self.searcher.indexed_query(case)

    def radiograph_query(self, radiograph: Radiograph) -> tuple[np.ndarray, QueryInfo]:
        """The stored vector when the image is indexed, else its embedding (under the embedding lock only)."""
        return self.searcher.radiograph_query(radiograph, embed=self.embed)

    def search(self, vector: np.ndarray, info: QueryInfo, op: OperatingPoint, include_same_patient: bool) -> list[Hit]:
        """The top ``op.k`` (fewer when its threshold cuts them, or the snapshot holds fewer)."""
        return self.searcher.search(vector, info, op, include_same_patient).hits

    @property
    def size(self) -> int:
        return len(self.index)

    # ---- queries -------------------------------------------------------------------------------------------------

    @property
    def bundle(self):
        """The index's model bundle (fingerprint checked against the index), loaded once."""
        with self.embed_lock:
            if self._embedder is None:
                self._embedder = self.searcher.bundle.embedder()
            return self.searcher.bundle

    def embed(self, radiograph: Radiograph) -> np.ndarray:
        from medsim.preprocess import prepare

        prepared = prepare(radiograph.pixels, self.bundle.preprocess)  # CPU work outside the lock
        with self.embed_lock:
            return self._embedder.embed_prepared([prepared])[0]

    def radiograph_from_bytes(self, data: bytes, policy: ChestPolicy | None = None,
                              wait: float | None = None, min_side: int | None = None) -> Radiograph:
        """Read DICOM Part 10 bytes (a temporary file, so the SimpleITK fallback can read it too); ``min_side``: see
        :func:`medsim.dicom.read_dicom`.

        Memory is bounded before anything is decoded: the reader checks the header under the server's limits (at most
        ``max_decode_pixels`` pixels, the pixel data it declares, a deflated file inflating to at most
        ``max_inflated_bytes``), and at most ``max_concurrent_decodes`` images are read at once (others wait up to
        ``wait`` s, by default ``decode_queue_timeout``, then :class:`ServerBusy`). Every failure to read the image
        is a SkipFile or ReadFailure (4xx), never an unexpected exception."""
        settings = self.settings
        wait = settings.decode_queue_timeout if wait is None else wait
        if not self.decode_slots.acquire(timeout=wait):
            raise ServerBusy(max(1, int(round(settings.decode_queue_timeout))), settings.max_concurrent_decodes)
        try:
            fd, name = tempfile.mkstemp(prefix="medsim-query-", suffix=".dcm")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                radiograph = read_dicom(name, self._limited(policy), min_side=min_side)
            except MedsimError:
                raise
            except MemoryError:
                raise ReadFailure("too-large", "the image did not fit in the memory available for decoding") from None
            except Exception as exc:  # noqa: BLE001 - a reader failing in an unforeseen way: still the upload's fault
                log.info("unreadable image: %s: %s", type(exc).__name__, exc)
                raise ReadFailure("decode-error", f"unreadable image ({type(exc).__name__}: {exc})") from None
            finally:
                os.unlink(name)
        finally:
            self.decode_slots.release()
        return radiograph

    def _limited(self, policy: ChestPolicy | None) -> ChestPolicy:
        """``policy`` (default: chest radiographs) under the server's decoding limits, which the reader checks from
        the header before decoding (pixels, inflated size, pixel-data length)."""
        return replace(policy or self.policy, max_pixels=self.settings.max_decode_pixels,
                       max_inflated_bytes=self.settings.max_inflated_bytes)

    def fetch_radiograph(self, study_uid: str, series_uid: str, sop_uid: str,
                         policy: ChestPolicy | None = None, min_side: int | None = None) -> Radiograph:
        """An instance from the PACS, decoded like an upload; it waits for a decode slot as long as a PACS transfer
        may take (the viewer asks for a page of thumbnails at once), not just ``decode_queue_timeout``."""
        data = self.pacs.retrieve_instance(study_uid, series_uid, sop_uid)
        wait = max(self.settings.decode_queue_timeout, 3 * self.settings.pacs_timeout)
        return self.radiograph_from_bytes(data, policy, wait=wait, min_side=min_side)

    def pacs_health(self, max_age: float = 5.0) -> tuple[bool, str]:
        if self.pacs is None:
            return False, "no PACS configured"
        cached = self._pacs_health
        if cached is not None and time.monotonic() - cached[0] < max_age:
            return cached[1], cached[2]
        ok, detail = self.pacs.ping()
        self._pacs_health = (time.monotonic(), ok, detail)
        return ok, detail

    # ---- privacy -------------------------------------------------------------------------------------------------

    def patient_ref(self, patient_id: str | None, pseudonymize: bool = True) -> str | None:
        """What responses show for a patient: a keyed hash (stable for this server's secret), never a name."""
        if not patient_id:
            return None
        if not pseudonymize:
            return patient_id
        ref = self._pseudonyms.get(patient_id)
        if ref is None:
            digest = hmac.new(self._pseudonym_key, patient_id.encode(), hashlib.sha256).hexdigest()
            ref = f"anon-{digest[:16]}"
            self._pseudonyms.put(patient_id, ref)
        return ref

    def sign(self, message: str, expires: int) -> str:
        return hmac.new(self.url_key, f"{message}|{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def check_signature(self, message: str, expires: str, signature: str) -> bool:
        try:
            expires_at = int(expires)
        except (TypeError, ValueError):
            return False
        if expires_at < time.time():
            return False
        return hmac.compare_digest(self.sign(message, expires_at), str(signature))


class Thumbnails:
    """PNG thumbnails of indexed cases, made once and cached in memory and on disk (``cache_dir/thumbnails``).

    The image is checked before it is drawn: it must carry the case's SOP Instance UID (DICOM) and hash to the pixel
    hash the catalog holds (``Case.pixel_hash``, when the index has one). A file replaced at the case's source path
    (another patient's image, an edited one) or a PACS answering with another instance is refused (409
    ``source-mismatch``) and nothing is cached. Cached thumbnails are keyed by the SOP UID *and* the pixel hash."""

    def __init__(self, service: Service):
        self.service = service
        self.size = service.settings.thumbnail_size
        self.folder = service.cache_dir / "thumbnails" / f"{service.index.model_fingerprint}-{self.size}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.memory = LRU(512)
        self._locks: dict[tuple, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _path(self, case: Case) -> Path:
        return self.folder / f"{hashlib.sha1(f'{case.sop_uid}|{case.pixel_hash}'.encode()).hexdigest()}.png"

    def get(self, case: Case) -> bytes:
        key = (case.sop_uid, case.pixel_hash)
        data = self.memory.get(key)
        if data is not None:
            return data
        with self._locks_guard:
            lock = self._locks.setdefault(key, threading.Lock())
        try:
            with lock:  # one maker per case; the others wait and read its result
                path = self._path(case)
                if path.exists():
                    data = path.read_bytes()
                else:
                    data = render_png(self._radiograph(case).pixels, self.size)
                    tmp = path.with_suffix(f".tmp-{threading.get_ident()}")
                    tmp.write_bytes(data)
                    os.replace(tmp, path)
                self.memory.put(key, data)
        finally:
            with self._locks_guard:
                self._locks.pop(key, None)
        return data

    def _radiograph(self, case: Case) -> Radiograph:
        from medsim.build import REDUCED_MIN_SIDE_FACTOR, read_for_index
        from medsim.server.errors import ApiError

        policy = ChestPolicy(any_body_part=True, any_modality=True)
        source = case.source_path
        image_size = self.service.searcher.bundle.preprocess.image_size  # read as build-index did: same pixel hash
        if source and not is_dicomweb_url(source) and Path(source).is_file():
            radiograph, origin = read_for_index(source, policy, image_size), "the indexed file"
        elif self.service.pacs is None:
            raise ApiError(404, "image-unavailable", f"the image of {case.sop_uid} is no longer where it was indexed "
                           "and no PACS is configured to fetch it from")
        else:
            radiograph = self.service.fetch_radiograph(case.study_uid, case.series_uid, case.sop_uid, policy,
                                                       min_side=REDUCED_MIN_SIDE_FACTOR * image_size)
            origin = "the PACS's instance"
        self.check(case, radiograph, origin)
        return radiograph

    @staticmethod
    def check(case: Case, radiograph: Radiograph, origin: str) -> None:
        """Raise a 409 when ``radiograph`` is not the indexed image of ``case``: another SOP Instance UID (DICOM; a
        PNG/JPEG's UIDs derive from its path, so only its pixels can tell), or pixels whose hash is not the
        catalog's."""
        from medsim.server.errors import ApiError

        if radiograph.reader != "pillow" and radiograph.sop_uid != case.sop_uid:
            raise ApiError(409, "source-mismatch", f"{origin} of {case.sop_uid} now holds another instance (SOP "
                           "Instance UID differs); rebuild the index or restore the file")
        if case.pixel_hash and radiograph.pixel_hash and radiograph.pixel_hash != case.pixel_hash:
            raise ApiError(409, "source-mismatch", f"{origin} of {case.sop_uid} now holds other pixels than were "
                           "indexed (pixel hash differs); rebuild the index or restore the file")


def render_png(pixels: np.ndarray, size: int) -> bytes:
    """A grey PNG of display ``pixels`` (0..1) whose longest side is at most ``size``."""
    from PIL import Image

    image = Image.fromarray(np.clip(np.asarray(pixels) * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def default_cache_dir(index_path) -> Path:
    key = hashlib.sha1(str(Path(index_path).resolve()).encode()).hexdigest()[:12]
    return medsim_home() / "server" / f"{Path(index_path).name}-{key}"


def _load_or_create_secret(folder: Path) -> bytes:
    path = folder / "secret.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    secret = secrets.token_bytes(32)
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret.hex())
    os.replace(path.with_suffix(".tmp"), path)
    return secret

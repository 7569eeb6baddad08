"""What the app shares between requests: the index and its model, the PACS client, thumbnails, pseudonyms.

Thread safety (waitress serves requests on several threads):

* The index (one SQLite connection, the hnswlib graph and its query breadth) is used under ``index_lock``: every
  read is a few milliseconds, so one lock costs little and keeps SQLite cursors and ``set_ef`` from interleaving.
* Embedding runs under ``embed_lock``: torch already uses every core for one image, so parallel embeddings would
  only compete; PACS fetches and decoding happen outside both locks, in parallel.
* The index is opened read-only: no request can change it.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsim.dicom import ChestPolicy, Radiograph, read_dicom
from medsim.dicomweb import DicomWebClient, is_dicomweb_url
from medsim.index import Case, CaseIndex, Hit
from medsim.search import NO_THRESHOLD, QueryInfo, Searcher
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


class ServedIndex(CaseIndex):
    """The read-only index as the server sees it: a snapshot taken at start-up (the vector graph is loaded once), so
    its cases can be cached: rows are read and parsed once, not on every query. Restart the server to serve cases
    added later."""

    CACHE_SIZE = 200_000

    def _cached(self):
        cache = self.__dict__.get("_case_cache")
        if cache is None:
            cache = self.__dict__["_case_cache"] = LRU(self.CACHE_SIZE)
        return cache

    def cases(self, ids=None) -> list[Case]:
        if ids is None:
            return super().cases()
        cache = self._cached()
        ids = [int(i) for i in ids]
        found = {i: cache.get(i) for i in ids}
        missing = [i for i, case in found.items() if case is None]
        if missing:
            for case in super().cases(missing):
                cache.put(case.id, case)
                found[case.id] = case
        return [found[i] for i in ids if found.get(i) is not None]

    def get(self, sop_uid: str) -> Case | None:
        cache = self._cached()
        case = cache.get(("sop", sop_uid))
        if case is None:
            case = super().get(sop_uid)
            if case is not None:
                cache.put(("sop", sop_uid), case)
        return case


class Service:
    """One per app. Opens the index read-only and (with ``warm_up``) loads the model before the first request."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.started_at = time.time()
        self.index_lock = threading.RLock()
        self.embed_lock = threading.Lock()
        self.searcher = Searcher(ServedIndex.open(settings.index), model=settings.model)
        self.index = self.searcher.index
        self.policy = ChestPolicy()
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
        self._stats: dict | None = None
        self._embedder = None
        if settings.warm_up:
            self.warm_up()

    # ---- lifecycle -----------------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Load the vector graph, the model (checking its fingerprint against the index) and run one embedding."""
        with self.index_lock:
            self.index._graph()
            self.stats()
        size = self.bundle.preprocess.image_size
        self.embed(Radiograph(pixels=np.zeros((size, size), np.float32), sop_uid="0", series_uid="0", study_uid="0",
                              patient_id=None))

    def close(self) -> None:
        with self.index_lock:
            self.searcher.close()

    # ---- index ---------------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        with self.index_lock:
            if self._stats is None:  # a snapshot, like the vector graph
                stats = self.index.stats()
                rows = self.index._db.execute("SELECT view, COUNT(*) FROM cases GROUP BY view").fetchall()
                stats["views"] = {view or "unknown": n for view, n in rows}
                self._stats = stats
            return self._stats

    def case(self, sop_uid: str) -> Case | None:
        with self.index_lock:
            return self.index.get(sop_uid)

    def stored_vector(self, sop_uid: str) -> np.ndarray | None:
        with self.index_lock:
            return self.index.vector(sop_uid)

    def search(self, vector: np.ndarray, info: QueryInfo, k: int, include_same_patient: bool,
               threshold: float | None = None) -> list[Hit]:
        """The top k (fewer when ``threshold`` cuts them; None: no threshold, not even a calibrated one)."""
        with self.index_lock:
            return self.searcher.query_vector(
                vector, info, k=k, include_same_patient=include_same_patient,
                threshold=NO_THRESHOLD if threshold is None else threshold).hits

    @property
    def size(self) -> int:
        return int(self.stats()["cases"])

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

    def radiograph_from_bytes(self, data: bytes, policy: ChestPolicy | None = None) -> Radiograph:
        """Read DICOM Part 10 bytes (a temporary file, so the SimpleITK fallback can read it too)."""
        fd, name = tempfile.mkstemp(prefix="medsim-query-", suffix=".dcm")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return read_dicom(name, policy or self.policy)
        finally:
            os.unlink(name)

    def fetch_radiograph(self, study_uid: str, series_uid: str, sop_uid: str,
                         policy: ChestPolicy | None = None) -> Radiograph:
        data = self.pacs.retrieve_instance(study_uid, series_uid, sop_uid)
        return self.radiograph_from_bytes(data, policy)

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
    """PNG thumbnails of indexed cases, made once and cached in memory and on disk (``cache_dir/thumbnails``)."""

    def __init__(self, service: Service):
        self.service = service
        self.size = service.settings.thumbnail_size
        self.folder = service.cache_dir / "thumbnails" / f"{service.index.model_fingerprint}-{self.size}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.memory = LRU(512)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _path(self, sop_uid: str) -> Path:
        return self.folder / f"{hashlib.sha1(sop_uid.encode()).hexdigest()}.png"

    def get(self, case: Case) -> bytes:
        data = self.memory.get(case.sop_uid)
        if data is not None:
            return data
        with self._locks_guard:
            lock = self._locks.setdefault(case.sop_uid, threading.Lock())
        with lock:  # one maker per case; the others wait and read its result
            path = self._path(case.sop_uid)
            if path.exists():
                data = path.read_bytes()
            else:
                data = render_png(self._radiograph(case).pixels, self.size)
                tmp = path.with_suffix(f".tmp-{threading.get_ident()}")
                tmp.write_bytes(data)
                os.replace(tmp, path)
            self.memory.put(case.sop_uid, data)
        with self._locks_guard:
            self._locks.pop(case.sop_uid, None)
        return data

    def _radiograph(self, case: Case) -> Radiograph:
        from medsim.errors import MedsimError
        from medsim.ingest import read_any

        policy = ChestPolicy(any_body_part=True, any_modality=True)
        source = case.source_path
        if source and not is_dicomweb_url(source) and Path(source).is_file():
            return read_any(source, policy=policy)
        if self.service.pacs is None:
            raise MedsimError(f"the image of {case.sop_uid} is not at {source or 'its source'} and no PACS is "
                              "configured")
        return self.service.fetch_radiograph(case.study_uid, case.series_uid, case.sop_uid, policy)


def render_png(pixels: np.ndarray, size: int) -> bytes:
    from PIL import Image

    image = Image.fromarray(np.clip(np.asarray(pixels) * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def default_cache_dir(index_path) -> Path:
    home = os.environ.get("MEDSIM_HOME", "").strip()
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "medsim"
    key = hashlib.sha1(str(Path(index_path).resolve()).encode()).hexdigest()[:12]
    return base / "server" / f"{Path(index_path).name}-{key}"


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

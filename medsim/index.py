"""The case index: hnswlib (cosine) for vectors, SQLite for the catalog, both tied to one model.

An index is a directory:

    catalog.sqlite   cases (UIDs, patient, view, labels, path, vector), the file ledger, and index metadata.
                     It is the source of truth and changes only in transactions, so a crash never leaves it
                     half-written.
    vectors.hnsw     the hnswlib graph, a cache of the vectors in the catalog. Written to a temporary file and
                     renamed into place; when it is missing, stale or unreadable it is rebuilt from the catalog.
    lock             held by the one writer.

Knobs (hnswlib): ``M`` (graph degree; memory ~ 4*dim + 8*M bytes per case), ``ef_construction`` (build quality),
``ef`` (query breadth; raised to the number of results asked for). Defaults suit up to ~1M cases.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsim.errors import IndexFormatError, ModelMismatch

FORMAT_VERSION = 1
CATALOG = "catalog.sqlite"
VECTORS = "vectors.hnsw"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    id INTEGER PRIMARY KEY,
    sop_uid TEXT NOT NULL UNIQUE,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    patient_id TEXT,
    view TEXT NOT NULL DEFAULT '',
    modality TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '',
    source_path TEXT NOT NULL,
    pixel_hash TEXT NOT NULL DEFAULT '',
    attributes TEXT NOT NULL DEFAULT '{}',
    added_at REAL NOT NULL,
    vector BLOB NOT NULL,
    phash TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS cases_patient ON cases (patient_id);
CREATE INDEX IF NOT EXISTS cases_study ON cases (study_uid);
CREATE INDEX IF NOT EXISTS cases_pixel_hash ON cases (pixel_hash);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    sop_uid TEXT,
    seen_at REAL NOT NULL
);
"""

# Columns added to `cases` after format 1 shipped, appended by a writable open of an older index (ALTER TABLE ADD
# COLUMN keeps every row and fills in the default, so the format version stays 1). phash: 256-bit perceptual hash of
# the display pixels, 64 hex digits (medsim.duplicates.perceptual_hash); '' when not computed.
ADDED_COLUMNS = (("phash", "TEXT NOT NULL DEFAULT ''"),)


@dataclass
class Case:
    """One indexed image."""

    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str | None
    source_path: str
    view: str = ""
    modality: str = ""
    labels: tuple[str, ...] = ()
    pixel_hash: str = ""
    attributes: dict = field(default_factory=dict)
    added_at: float = 0.0
    id: int | None = None
    phash: str = ""

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> "Case":
        return cls(
            id=row["id"],
            sop_uid=row["sop_uid"],
            series_uid=row["series_uid"],
            study_uid=row["study_uid"],
            patient_id=row["patient_id"],
            source_path=row["source_path"],
            view=row["view"],
            modality=row["modality"],
            labels=tuple(v for v in row["labels"].split("|") if v),
            pixel_hash=row["pixel_hash"],
            attributes=json.loads(row["attributes"]),
            added_at=row["added_at"],
            phash=row["phash"] if "phash" in row.keys() else "",
        )


@dataclass
class Hit:
    case: Case
    score: float  # cosine similarity, 1 = identical direction


@dataclass(frozen=True)
class FileRecord:
    """What happened to one source file; lets a re-run skip what it has seen and report past failures."""

    path: str
    size: int
    mtime: float
    status: str  # indexed | skipped | failed
    reason: str = ""
    detail: str = ""
    sop_uid: str | None = None


class CaseIndex:
    """Open with :meth:`create` or :meth:`open`; add cases with :meth:`add`; search with :meth:`search`."""

    def __init__(self, path: Path, db: sqlite3.Connection, writable: bool, lock_fh=None):
        self.path = Path(path)
        self._db = db
        self._writable = writable
        self._lock_fh = lock_fh
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        if meta.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(f"{path}: unknown index format {meta.get('format_version')!r}")
        self.meta = meta
        self.dim = meta["dim"]
        self.model_fingerprint = meta["model_fingerprint"]
        self._hnsw = None
        self._dirty = False

    # ---- opening -------------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, *, model_fingerprint: str, model_name: str, dim: int, model_path: str = "",
               M: int = 32, ef_construction: int = 200, ef: int = 64) -> "CaseIndex":
        """A new, empty index; refuses to overwrite an existing one."""
        path = Path(path)
        if (path / CATALOG).exists():
            raise IndexFormatError(f"{path} already holds an index")
        path.mkdir(parents=True, exist_ok=True)
        lock_fh = _lock(path)
        db = _connect(path / CATALOG)
        now = time.time()
        meta = {
            "format_version": FORMAT_VERSION,
            "model_fingerprint": model_fingerprint,
            "model_name": model_name,
            "model_path": model_path,
            "dim": dim,
            "space": "cosine",
            "M": M,
            "ef_construction": ef_construction,
            "ef": ef,
            "created_at": now,
            "updated_at": now,
        }
        with db:
            db.executescript(SCHEMA)
            db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        return cls(path, db, writable=True, lock_fh=lock_fh)

    @classmethod
    def open(cls, path: str | Path, writable: bool = False) -> "CaseIndex":
        path = Path(path)
        if not (path / CATALOG).exists():
            raise IndexFormatError(f"{path} is not a medsim index (no {CATALOG}); build one with `medsim build-index`")
        lock_fh = _lock(path) if writable else None
        db = _connect(path / CATALOG, readonly=not writable)
        if writable:
            db.executescript(SCHEMA)
            _add_missing_columns(db)
        return cls(path, db, writable=writable, lock_fh=lock_fh)

    @classmethod
    def open_or_create(cls, path: str | Path, **create_kwargs) -> "CaseIndex":
        path = Path(path)
        if (path / CATALOG).exists():
            index = cls.open(path, writable=True)
            index.require_model(create_kwargs["model_fingerprint"])
            return index
        return cls.create(path, **create_kwargs)

    def close(self) -> None:
        if self._writable and self._dirty:
            self.save()
        self._db.close()
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self) -> "CaseIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- model binding -------------------------------------------------------------------------------------------

    def require_model(self, fingerprint: str) -> None:
        if fingerprint != self.model_fingerprint:
            raise ModelMismatch(
                f"index {self.path} was built with model {self.meta['model_name']} ({self.model_fingerprint}); "
                f"refusing vectors from model {fingerprint}. Use that model, or build a new index."
            )

    # ---- writing -------------------------------------------------------------------------------------------------

    def add(self, cases: list[Case], vectors: np.ndarray, model_fingerprint: str,
            files: list[FileRecord] = ()) -> list[int]:
        """Add cases with their vectors (and the ledger rows of the files that produced them) in one transaction."""
        if not self._writable:
            raise IndexFormatError("index opened read-only")
        self.require_model(model_fingerprint)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(cases), -1) if cases else np.zeros((0, self.dim))
        if cases and vectors.shape[1] != self.dim:
            raise ModelMismatch(f"vectors have {vectors.shape[1]} dimensions, the index {self.dim}")
        now = time.time()
        ids = []
        with self._db:
            for case, vector in zip(cases, vectors):
                cur = self._db.execute(
                    "INSERT INTO cases (sop_uid, series_uid, study_uid, patient_id, view, modality, labels,"
                    " source_path, pixel_hash, attributes, added_at, vector, phash)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (case.sop_uid, case.series_uid, case.study_uid, case.patient_id, case.view, case.modality,
                     "|".join(case.labels), case.source_path, case.pixel_hash, json.dumps(case.attributes),
                     now, vector.astype(np.float32).tobytes(), case.phash),
                )
                ids.append(cur.lastrowid)
            self._record_files(files)
            self._set_meta("updated_at", now)
        if ids:
            hnsw = self._graph()
            _ensure_capacity(hnsw, len(ids))
            hnsw.add_items(vectors, np.asarray(ids, dtype=np.int64))
            self._dirty = True
        return ids

    def record_files(self, files: list[FileRecord]) -> None:
        with self._db:
            self._record_files(files)

    def _record_files(self, files) -> None:
        now = time.time()
        self._db.executemany(
            "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?)",
            [(f.path, f.size, f.mtime, f.status, f.reason, f.detail, f.sop_uid, now) for f in files],
        )

    def set_meta(self, key: str, value) -> None:
        """Store a JSON value with the index (e.g. a calibrated operating point)."""
        with self._db:
            self._set_meta(key, value)

    def _set_meta(self, key: str, value) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        self.meta[key] = value

    def save(self) -> None:
        """Write the vector graph atomically (temporary file, fsync, rename)."""
        if self._hnsw is None:
            return
        tmp = self.path / f".{VECTORS}.tmp-{os.getpid()}"
        self._hnsw.save_index(str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path / VECTORS)
        self._dirty = False

    # ---- reading -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM cases").fetchone()[0]

    def known_files(self) -> dict[str, tuple[int, float, str]]:
        """path -> (size, mtime, status) for every file a previous run handled."""
        rows = self._db.execute("SELECT path, size, mtime, status FROM files")
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def file_records(self, status: str | None = None) -> list[FileRecord]:
        sql = "SELECT path, size, mtime, status, reason, detail, sop_uid FROM files"
        rows = self._db.execute(sql + " WHERE status=?", (status,)) if status else self._db.execute(sql)
        return [FileRecord(*r) for r in rows]

    def has_sop_uid(self, sop_uid: str) -> bool:
        return self._db.execute("SELECT 1 FROM cases WHERE sop_uid=?", (sop_uid,)).fetchone() is not None

    def find_pixel_hash(self, pixel_hash: str) -> Case | None:
        """The first indexed case whose decoded pixels hash to ``pixel_hash`` (an exact duplicate), if any."""
        if not pixel_hash:
            return None
        row = self._db.execute("SELECT * FROM cases WHERE pixel_hash=? ORDER BY id LIMIT 1", (pixel_hash,)).fetchone()
        return Case._from_row(row) if row else None

    def get(self, sop_uid: str) -> Case | None:
        row = self._db.execute("SELECT * FROM cases WHERE sop_uid=?", (sop_uid,)).fetchone()
        return Case._from_row(row) if row else None

    def get_by_path(self, source_path: str) -> Case | None:
        row = self._db.execute("SELECT * FROM cases WHERE source_path=?", (source_path,)).fetchone()
        return Case._from_row(row) if row else None

    def cases(self, ids=None) -> list[Case]:
        if ids is None:
            return [Case._from_row(r) for r in self._db.execute("SELECT * FROM cases ORDER BY id")]
        ids = [int(i) for i in ids]
        placeholders = ",".join("?" * len(ids))
        rows = self._db.execute(f"SELECT * FROM cases WHERE id IN ({placeholders})", ids).fetchall()
        by_id = {r["id"]: Case._from_row(r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    def vector(self, sop_uid: str) -> np.ndarray | None:
        row = self._db.execute("SELECT vector FROM cases WHERE sop_uid=?", (sop_uid,)).fetchone()
        return np.frombuffer(row[0], dtype=np.float32).copy() if row else None

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every case, in id order."""
        rows = self._db.execute("SELECT id, vector FROM cases ORDER BY id").fetchall()
        ids = np.asarray([r[0] for r in rows], dtype=np.int64)
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
        return ids, vectors

    def patient_image_count(self, patient_id: str | None) -> int:
        if patient_id is None:
            return 0
        return self._db.execute("SELECT COUNT(*) FROM cases WHERE patient_id=?", (patient_id,)).fetchone()[0]

    def label_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for (labels,) in self._db.execute("SELECT labels FROM cases"):
            for label in filter(None, labels.split("|")):
                counts[label] = counts.get(label, 0) + 1
        return dict(sorted(counts.items()))

    def stats(self) -> dict:
        """What `medsim info` and the API show."""
        db = self._db
        status_counts = dict(db.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
        reasons = db.execute(
            "SELECT status, reason, COUNT(*) FROM files WHERE status != 'indexed' GROUP BY status, reason"
        ).fetchall()
        return {
            "path": str(self.path),
            "cases": len(self),
            "patients": db.execute("SELECT COUNT(DISTINCT patient_id) FROM cases").fetchone()[0],
            "studies": db.execute("SELECT COUNT(DISTINCT study_uid) FROM cases").fetchone()[0],
            "model": {"name": self.meta["model_name"], "fingerprint": self.model_fingerprint,
                      "path": self.meta.get("model_path", ""), "dim": self.dim},
            "created_at": self.meta["created_at"],
            "updated_at": self.meta["updated_at"],
            "hnsw": {k: self.meta[k] for k in ("M", "ef_construction", "ef")},
            "labels": self.label_counts(),
            "files": status_counts,
            "not_indexed": {f"{s}:{r}": n for s, r, n in reasons},
        }

    # ---- search --------------------------------------------------------------------------------------------------

    def search(self, vector: np.ndarray, k: int = 10, exclude_patient: str | None = None,
               exclude_sop_uid: str | None = None) -> list[Hit]:
        """Top-k cases by cosine similarity, best first, without the excluded patient's images or the query itself."""
        n = len(self)
        if n == 0 or k <= 0:
            return []
        excluded = self.patient_image_count(exclude_patient) + (1 if exclude_sop_uid else 0)
        fetch = min(n, k + excluded)
        hnsw = self._graph()
        hnsw.set_ef(max(self.meta["ef"], fetch))
        labels, distances = hnsw.knn_query(np.asarray(vector, dtype=np.float32).reshape(1, -1), k=fetch)
        hits = []
        for case, distance in zip(self.cases(labels[0]), distances[0]):
            if exclude_patient is not None and case.patient_id == exclude_patient:
                continue
            if exclude_sop_uid is not None and case.sop_uid == exclude_sop_uid:
                continue
            hits.append(Hit(case=case, score=float(1.0 - distance)))
        return hits[:k]

    def neighbours(self, vectors: np.ndarray, k: int, num_threads: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """Batch k-NN for many query vectors: (case ids, cosine similarities), each (n, k), best first; k is capped
        at the number of cases. For scans over the whole index (duplicates); no SQL per query."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        k = min(int(k), len(self))
        if k <= 0 or not len(vectors):
            return np.zeros((len(vectors), 0), dtype=np.int64), np.zeros((len(vectors), 0), dtype=np.float32)
        hnsw = self._graph()
        hnsw.set_ef(max(self.meta["ef"], k))
        labels, distances = hnsw.knn_query(vectors, k=k, num_threads=num_threads)
        return labels.astype(np.int64), (1.0 - distances).astype(np.float32)

    def _graph(self):
        """The hnswlib graph, loaded from disk and caught up with the catalog, or rebuilt from it."""
        if self._hnsw is not None:
            return self._hnsw
        import hnswlib

        hnsw = hnswlib.Index(space="cosine", dim=self.dim)
        ids, vectors = self.vectors()
        loaded = False
        file = self.path / VECTORS
        if file.exists():
            try:
                hnsw.load_index(str(file), max_elements=max(len(ids), 1))
                loaded = True
            except RuntimeError:
                loaded = False  # unreadable cache: rebuilt below from the catalog
        if not loaded:
            hnsw.init_index(max_elements=max(len(ids), 1024), M=self.meta["M"],
                            ef_construction=self.meta["ef_construction"], allow_replace_deleted=False)
        present = set(hnsw.get_ids_list()) if loaded else set()
        missing = np.asarray([i for i in ids.tolist() if i not in present], dtype=np.int64)
        if len(missing):
            mask = np.isin(ids, missing)
            _ensure_capacity(hnsw, len(missing))
            hnsw.add_items(vectors[mask], ids[mask])
            self._dirty = True
        self._hnsw = hnsw
        return hnsw


def _ensure_capacity(hnsw, extra: int) -> None:
    needed = hnsw.get_current_count() + extra
    if needed > hnsw.get_max_elements():
        hnsw.resize_index(max(needed, 2 * hnsw.get_max_elements()))


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Schema migration for an index written by an older medsim: append the columns of ADDED_COLUMNS it lacks."""
    present = {row[1] for row in db.execute("PRAGMA table_info(cases)")}
    with db:
        for name, declaration in ADDED_COLUMNS:
            if name not in present:
                db.execute(f"ALTER TABLE cases ADD COLUMN {name} {declaration}")


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        db = sqlite3.connect(path, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
    db.row_factory = sqlite3.Row
    return db


def _lock(path: Path):
    """One writer per index; a second build on the same index fails fast with a clear message."""
    fh = open(path / "lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise IndexFormatError(f"{path} is being written by another process") from None
    return fh


@contextmanager
def open_index(path: str | Path, writable: bool = False):
    index = CaseIndex.open(path, writable=writable)
    try:
        yield index
    finally:
        index.close()

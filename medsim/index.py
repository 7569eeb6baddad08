"""The case index: SQLite for the catalog, a vector store (:mod:`medsim.vectors`: hnswlib by default, or Milvus) for
nearest-neighbour search, both tied to one model.

An index is a directory:

    catalog.sqlite   cases (UIDs, patient, view, labels, path, vector), the file ledger, and index metadata.
                     It is the source of truth and changes only in transactions, so a crash never leaves it
                     half-written. Its meta ``vector_store`` names the store when it is not hnswlib.
    vectors.hnsw     the hnswlib graph, a cache of the vectors in the catalog. Written to a temporary file and
                     renamed into place; the catalog records its SHA-256, size and element count (meta ``graph``),
                     which ties the file to this catalog. Before hnswlib reads it, its header, size and element count
                     are checked and its checksum compared; when it is missing, stale, damaged or left by another
                     catalog it is rebuilt from the catalog (and saved by the next writable use: any build-index).
    lock             held by the one writer.

Paths (the file ledger, a case's ``source_path``) are stored exactly: as text when they are valid UTF-8, otherwise
as their bytes (``os.fsencode``) in a BLOB, so any name a file system allows can be indexed and found again. Use
:func:`printable` to show one. A damaged catalog (not a database, truncated, malformed pages, values that cannot be
what medsim wrote) raises :class:`IndexFormatError` naming the index and what to do, never a bare sqlite3 error.

With a Milvus store (``vector_store`` = ``milvus://HOST:PORT/COLLECTION`` or a milvus-lite file), the collection
is that cache instead; it records which catalog it belongs to, and on opening its ids are compared with the
catalog's: a writer adds what it lacks and deletes what the catalog no longer holds, a reader reports the difference
and searches only cases of the catalog. `medsim rebuild-store` rebuilds either store from the catalog.

Knobs (both stores' HNSW): ``M`` (graph degree; memory ~ 4*dim + 8*M bytes per case), ``ef_construction`` (build
quality), ``ef`` (query breadth; raised to the number of results asked for). Defaults suit up to ~1M cases.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import os
import sqlite3
import time
import unicodedata
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsim.errors import IndexFormatError, ModelMismatch
from medsim.vectors import (BRUTE_FORCE_MAX, HNSWLIB, VECTORS, GraphInvalid, HnswStore, MilvusStore, StoreURL, VectorStore,
                            check_graph_body, graph_header, graph_record_of, open_milvus, parse_url, sha256_of)

FORMAT_VERSION = 1
CATALOG = "catalog.sqlite"
# meta key: {"url": the store's URL, "catalog": this catalog's id, recorded in the store}; absent for hnswlib
STORE_RECORD = "vector_store"
# meta key: {"sha256", "bytes", "count"} of the vectors.hnsw last saved for this catalog; null in a catalog that has
# not saved one yet; absent in a catalog written before medsim recorded it (its graph gets the full structural check).
GRAPH_RECORD = "graph"

log = logging.getLogger("medsim.index")

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
CREATE TABLE IF NOT EXISTS removed (
    id INTEGER PRIMARY KEY,
    sop_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    patient_id TEXT,
    source_path TEXT NOT NULL,
    added_at REAL NOT NULL,
    removed_at REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS removed_study ON removed (study_uid);
"""
# `removed`: tombstones of cases taken out of the index (a study deleted in the PACS, `medsim watch`): the case row
# leaves `cases` (so every read, count and rebuilt graph omits it) and its identity stays here with when and why;
# its file-ledger rows get status 'removed'. A graph saved before the removal still holds its vector: loading marks
# every graph element without a case deleted (hnswlib mark_deleted), so a search never returns it. Created by
# SCHEMA on the first writable open of an older index; read-only readers of an index without it see no tombstones.

# Columns added to `cases` after format 1 shipped, appended by a writable open of an older index (ALTER TABLE ADD
# COLUMN keeps every row and fills in the default, so the format version stays 1). phash: 256-bit perceptual hash,
# 64 hex digits, by the catalog's method (meta phash_method, medsim.phash); '' when not computed.
# (`files.path` and `cases.source_path` hold a BLOB for a name that is not UTF-8; SQLite keeps a BLOB as is in a TEXT
# column and such names could not be stored before, so older catalogs need no migration for it.)
ADDED_COLUMNS = (("phash", "TEXT NOT NULL DEFAULT ''"),)


# ---- names and text ----------------------------------------------------------------------------------------------

def printable(text) -> str:
    """``text`` (a path, a detail) safe to print, log or store as UTF-8, on one line: bytes of a file name that are not
    UTF-8 (kept by Python as lone surrogates, see os.fsdecode) become ``\\xNN``, control and format characters (a
    newline in a file name, a terminal escape) ``\\n``, ``\\x1b``, ``\\u202e``. For display only: the catalog keeps
    paths exactly."""
    text = _utf8(str(text))
    if text.isprintable():
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in _ESCAPED else c
                   for c in text)


_ESCAPED = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def _utf8(text: str) -> str:
    """``text`` encodable as UTF-8: lone surrogates (undecodable bytes of a file name) as ``\\xNN`` escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def _sql_text(value):
    """A text value for the catalog (SQLite text is UTF-8; Python's sqlite3 refuses lone surrogates)."""
    return _utf8(value) if isinstance(value, str) else value


def _sql_path(path) -> str | bytes:
    """A path as the catalog stores it: the text itself when it is valid UTF-8; otherwise (a name with bytes that
    are not UTF-8, which POSIX file systems allow) its exact bytes, ``os.fsencode``, as a BLOB. A name is only ever
    stored one way, so lookups by path and the ledger's primary key work for both kinds."""
    path = os.fspath(path)
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(path)
    except UnicodeEncodeError:  # lone surrogates no file name decodes to: kept as close as UTF-8 allows
        return path.encode("utf-8", "surrogatepass")


def _path_from_sql(value) -> str:
    """The path :func:`_sql_path` stored, as the str ``os.walk`` gives for that name (``os.fsdecode``)."""
    if isinstance(value, bytes):
        return os.fsdecode(value)
    if isinstance(value, str):
        return value
    raise _Damage(f"a stored path is {type(value).__name__}, not text")


# ---- damage ------------------------------------------------------------------------------------------------------

class _Damage(Exception):
    """A catalog value that medsim cannot have written; reported as IndexFormatError by :func:`_catalog_access`."""


def _damaged(path, detail: str) -> str:
    return (f"index {printable(path)}: {CATALOG} is damaged ({printable(detail)}); restore it from a backup, or move "
            f"it away and rebuild the index with `medsim build-index`")


def _catalog_error(path, exc: sqlite3.DatabaseError) -> IndexFormatError:
    """One line for an SQLite error on the catalog: busy, I/O, refused change, else damage."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    where = f"index {printable(path)}: {CATALOG}"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return IndexFormatError(f"{where} is locked by another process ({exc}); try again")
    if name.startswith(("SQLITE_IOERR", "SQLITE_FULL", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM",
                        "SQLITE_AUTH", "SQLITE_NOLFS")):
        return IndexFormatError(f"{where} could not be read or written ({exc})")
    if isinstance(exc, sqlite3.IntegrityError):
        return IndexFormatError(f"{where} refused a change ({exc})")
    return IndexFormatError(_damaged(path, str(exc)))


def _catalog_access(method):
    """A method that reads or writes the catalog: damage (SQLite's errors, values medsim cannot have written) raises
    IndexFormatError with the index's path and what to do, instead of a bare sqlite3/ValueError traceback."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except _Damage as exc:
            raise IndexFormatError(_damaged(self.path, str(exc))) from exc
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise  # a bug in the caller (closed index, wrong parameters), not the catalog
        except sqlite3.DatabaseError as exc:
            raise _catalog_error(self.path, exc) from exc
        except UnicodeDecodeError as exc:  # sqlite3 decoding a damaged text value (or SQLite's message about one)
            raise IndexFormatError(_damaged(self.path, f"text that is not UTF-8: {exc}")) from exc

    return wrapper


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
        try:
            attributes = json.loads(row["attributes"])
            if not isinstance(attributes, dict):
                raise TypeError(f"attributes are {type(attributes).__name__}, not an object")
            return cls(
                id=row["id"],
                sop_uid=row["sop_uid"],
                series_uid=row["series_uid"],
                study_uid=row["study_uid"],
                patient_id=row["patient_id"],
                source_path=_path_from_sql(row["source_path"]),
                view=row["view"],
                modality=row["modality"],
                labels=tuple(v for v in row["labels"].split("|") if v),
                pixel_hash=row["pixel_hash"],
                attributes=attributes,
                added_at=row["added_at"],
                phash=row["phash"] if "phash" in row.keys() else "",
            )
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            raise _Damage(f"case {_row_id(row)}: {type(exc).__name__}: {exc}") from None


def _row_id(row) -> str:
    try:
        return str(row["id"])
    except (KeyError, IndexError):
        return "?"


@dataclass
class Hit:
    case: Case
    score: float  # cosine similarity, 1 = identical direction


def hits(ids, distances, cases: list[Case]) -> list[Hit]:
    """Hits of a store's (ids, cosine distances), in that order, for the ``cases`` the catalog holds of them (an id
    without a case, removed meanwhile or not in a served snapshot, is skipped)."""
    by_id = {case.id: case for case in cases}
    return [Hit(case=by_id[i], score=float(1.0 - d))
            for i, d in zip(np.asarray(ids).tolist(), np.asarray(distances).tolist()) if i in by_id]


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
        self._vstore: VectorStore | None = None
        self._store_extra = frozenset()  # ids a read-only store holds that the catalog does not (never returned)
        self._dirty = False
        meta = self._read_meta()
        self.meta = meta
        self.dim = meta["dim"]
        self.model_fingerprint = meta["model_fingerprint"]

    @_catalog_access
    def _read_meta(self) -> dict:
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = sorted({"meta", "cases", "files"} - tables)
        if missing:
            raise _Damage(f"no {', '.join(missing)} table: not a complete medsim catalog")
        meta = {}
        for key, value in self._db.execute("SELECT key, value FROM meta"):
            try:
                meta[key] = json.loads(value)
            except (TypeError, ValueError):
                raise _Damage(f"metadata {printable(key)!r} is not JSON") from None
        if "format_version" not in meta:
            raise _Damage("its metadata has no format version")
        if meta["format_version"] != FORMAT_VERSION:
            raise IndexFormatError(
                f"{printable(self.path)}: unknown index format {meta['format_version']!r} (this medsim reads format "
                f"{FORMAT_VERSION}: a newer medsim wrote it, or {CATALOG} is damaged)")
        problem = _meta_problem(meta)
        if problem:
            raise _Damage(f"metadata {problem}")
        return meta

    # ---- opening -------------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, *, model_fingerprint: str, model_name: str, dim: int, model_path: str = "",
               M: int = 32, ef_construction: int = 200, ef: int = 64, vector_store: str | None = None
               ) -> "CaseIndex":
        """A new, empty index; refuses to overwrite an existing one. ``vector_store``: a store URL
        (:func:`medsim.vectors.parse_url`; default hnswlib); a Milvus collection is created for it here and must not
        exist yet."""
        path = Path(path)
        if (path / CATALOG).exists():
            raise IndexFormatError(f"{printable(path)} already holds an index")
        store_url = parse_url(vector_store, path, from_user=True)
        path.mkdir(parents=True, exist_ok=True)
        lock_fh = _lock(path)
        db = None
        try:
            if (path / CATALOG).exists():
                raise IndexFormatError(f"{printable(path)} already holds an index")
            for suffix in ("-wal", "-shm", "-journal"):  # left by a catalog that is gone: SQLite would replay them
                (path / (CATALOG + suffix)).unlink(missing_ok=True)
            store_record = {"url": str(store_url), "catalog": uuid.uuid4().hex}
            if store_url.kind != HNSWLIB:  # before the catalog exists: a refused collection leaves no index behind
                store = open_milvus(store_url, path, {"dim": dim, "M": M, "ef_construction": ef_construction,
                                                      "ef": ef}, store_record["catalog"])
                try:
                    store.create()
                finally:
                    store.close()
            # built whole under another name, then renamed: a reader (a server, a second process) that finds
            # catalog.sqlite never finds it without its tables and metadata
            staging = path / (CATALOG + ".new")
            for suffix in ("", "-wal", "-shm", "-journal"):
                (path / (staging.name + suffix)).unlink(missing_ok=True)
            db = _connect(staging)
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
                GRAPH_RECORD: None,  # no graph saved for this catalog yet: a vectors.hnsw already there is not ours
            }
            if store_url.kind != HNSWLIB:
                meta[STORE_RECORD] = store_record
            with db:
                db.executescript(SCHEMA)
                db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
            db.close()  # the last connection: SQLite folds the WAL into the file and removes it
            os.replace(staging, path / CATALOG)
            db = _connect(path / CATALOG)
            return cls(path, db, writable=True, lock_fh=lock_fh)
        except sqlite3.DatabaseError as exc:
            _close_quietly(db, lock_fh)
            raise _catalog_error(path, exc) from exc
        except UnicodeDecodeError as exc:
            _close_quietly(db, lock_fh)
            raise IndexFormatError(_damaged(path, f"text that is not UTF-8: {exc}")) from exc
        except BaseException:
            _close_quietly(db, lock_fh)
            raise

    @classmethod
    def open(cls, path: str | Path, writable: bool = False) -> "CaseIndex":
        path = Path(path)
        if not (path / CATALOG).exists():
            raise IndexFormatError(f"{printable(path)} is not a medsim index (no {CATALOG}); build one with "
                                   "`medsim build-index`")
        problem = _catalog_file_problem(path / CATALOG)
        if problem:
            raise IndexFormatError(_damaged(path, problem))
        lock_fh = _lock(path) if writable else None
        db = None
        try:
            db = _connect(path / CATALOG, readonly=not writable)
            index = cls(path, db, writable=writable, lock_fh=lock_fh)
            if writable:
                index._migrate()
            return index
        except sqlite3.DatabaseError as exc:
            _close_quietly(db, lock_fh)
            raise _catalog_error(path, exc) from exc
        except UnicodeDecodeError as exc:
            _close_quietly(db, lock_fh)
            raise IndexFormatError(_damaged(path, f"text that is not UTF-8: {exc}")) from exc
        except BaseException:
            _close_quietly(db, lock_fh)
            raise

    @_catalog_access
    def _migrate(self) -> None:
        self._db.executescript(SCHEMA)
        _add_missing_columns(self._db)

    @classmethod
    def open_or_create(cls, path: str | Path, **create_kwargs) -> "CaseIndex":
        """The index at ``path`` (writable), or a new one. A ``vector_store`` given for an existing index must be
        the one it uses (`medsim rebuild-store` moves an index to another)."""
        path = Path(path)
        if (path / CATALOG).exists():
            index = cls.open(path, writable=True)
            try:
                index.require_model(create_kwargs["model_fingerprint"])
                wanted = create_kwargs.get("vector_store")
                if wanted is not None and parse_url(wanted, path, from_user=True) != index.store_url():
                    raise IndexFormatError(
                        f"index {printable(path)} keeps its vectors in {index.store_url()}, not {wanted}; move it with "
                        f"`medsim rebuild-store --index {printable(path)} --vector-store {wanted}`")
            except BaseException:
                index.close()
                raise
            return index
        return cls.create(path, **create_kwargs)

    def close(self) -> None:
        try:
            if self._writable and self._dirty:
                self.save()
        finally:
            if self._vstore is not None:
                self._vstore.close()
                self._vstore = None
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
                f"index {printable(self.path)} was built with model {self.meta['model_name']} "
                f"({self.model_fingerprint}); refusing vectors from model {fingerprint}. Use that model, or build a "
                "new index."
            )

    # ---- writing -------------------------------------------------------------------------------------------------

    @_catalog_access
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
                    (_sql_text(case.sop_uid), _sql_text(case.series_uid), _sql_text(case.study_uid),
                     _sql_text(case.patient_id), _sql_text(case.view), _sql_text(case.modality),
                     _sql_text("|".join(case.labels)), _sql_path(case.source_path), _sql_text(case.pixel_hash),
                     json.dumps(case.attributes), now, vector.astype(np.float32).tobytes(), _sql_text(case.phash)),
                )
                ids.append(cur.lastrowid)
            self._record_files(files)
            self._set_meta("updated_at", now)
        if ids:
            self._store().add(np.asarray(ids, dtype=np.int64), vectors, [case_fields(c) for c in cases])
            self._dirty = True
        return ids

    @_catalog_access
    def record_files(self, files: list[FileRecord]) -> None:
        with self._db:
            self._record_files(files)

    def _record_files(self, files) -> None:
        now = time.time()
        self._db.executemany(
            "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?)",
            [(_sql_path(f.path), f.size, f.mtime, _sql_text(f.status), _sql_text(f.reason), _sql_text(f.detail),
              _sql_text(f.sop_uid), now) for f in files],
        )

    @_catalog_access
    def set_meta(self, key: str, value) -> None:
        """Store a JSON value with the index (e.g. a calibrated operating point)."""
        with self._db:
            self._set_meta(key, value)

    def _set_meta(self, key: str, value) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        self.meta[key] = value

    @_catalog_access
    def save(self) -> None:
        """Make the vector store durable. hnswlib: write the graph atomically (temporary file, fsync, rename) and
        record its checksum, size and element count in the catalog; when no graph was loaded (a build that added
        nothing), the file on disk is checked instead and, if it does not match the catalog, rebuilt from it and
        written. Milvus: check the collection against the catalog (repairing it) and flush it. Only a writable index
        saves."""
        if not self._writable:
            return
        if self._vstore is None and self.store_url().kind != HNSWLIB:
            self._store()
        if self._vstore is None:
            state, _ = self._graph_record()
            problem = self._graph_problem()
            if problem is None:
                if state == "legacy":  # an index from before graphs were recorded, whose graph passed every check:
                    file = self.path / VECTORS  # record it as it is (the migration of such an index)
                    try:
                        record = graph_record_of(file, graph_header(file, self.dim, self.meta["M"],
                                                                    self.meta["ef_construction"]).count)
                    except (GraphInvalid, OSError):
                        return  # changed under us: checked again on the next open
                    with self._db:
                        self._set_meta(GRAPH_RECORD, record)
                return
            self._store()
        record = self._vstore.save()
        if isinstance(self._vstore, HnswStore):
            with self._db:  # after the rename: a crash in between leaves a file that fails the check, so it is rebuilt
                self._set_meta(GRAPH_RECORD, record)
        self._dirty = False

    # ---- reading -------------------------------------------------------------------------------------------------

    @_catalog_access
    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM cases").fetchone()[0]

    @_catalog_access
    def known_files(self) -> dict[str, tuple[int, float, str]]:
        """path -> (size, mtime, status) for every file a previous run handled."""
        known = {}
        for path, size, mtime, status in self._db.execute("SELECT path, size, mtime, status FROM files"):
            if not (isinstance(size, int) and isinstance(mtime, (int, float)) and isinstance(status, str)):
                raise _Damage(f"file ledger row {printable(_path_from_sql(path))}: size {size!r}, mtime {mtime!r}, "
                              f"status {status!r}")
            known[_path_from_sql(path)] = (size, mtime, status)
        return known

    @_catalog_access
    def file_records(self, status: str | None = None) -> list[FileRecord]:
        sql = "SELECT path, size, mtime, status, reason, detail, sop_uid FROM files"
        rows = self._db.execute(sql + " WHERE status=?", (status,)) if status else self._db.execute(sql)
        return [FileRecord(_path_from_sql(r[0]), *r[1:]) for r in rows]

    @_catalog_access
    def has_sop_uid(self, sop_uid: str) -> bool:
        return self._db.execute("SELECT 1 FROM cases WHERE sop_uid=?", (_sql_text(sop_uid),)).fetchone() is not None

    @_catalog_access
    def find_pixel_hash(self, pixel_hash: str) -> Case | None:
        """The first indexed case whose decoded pixels hash to ``pixel_hash`` (an exact duplicate), if any."""
        if not pixel_hash:
            return None
        row = self._db.execute("SELECT * FROM cases WHERE pixel_hash=? ORDER BY id LIMIT 1", (pixel_hash,)).fetchone()
        return Case._from_row(row) if row else None

    @_catalog_access
    def get(self, sop_uid: str) -> Case | None:
        row = self._db.execute("SELECT * FROM cases WHERE sop_uid=?", (_sql_text(sop_uid),)).fetchone()
        return Case._from_row(row) if row else None

    @_catalog_access
    def get_by_path(self, source_path: str) -> Case | None:
        row = self._db.execute("SELECT * FROM cases WHERE source_path=?", (_sql_path(source_path),)).fetchone()
        return Case._from_row(row) if row else None

    @_catalog_access
    def cases(self, ids=None) -> list[Case]:
        if ids is None:
            return [Case._from_row(r) for r in self._db.execute("SELECT * FROM cases ORDER BY id")]
        ids = [int(i) for i in ids]
        placeholders = ",".join("?" * len(ids))
        rows = self._db.execute(f"SELECT * FROM cases WHERE id IN ({placeholders})", ids).fetchall()
        by_id = {r["id"]: Case._from_row(r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    @_catalog_access
    def vector(self, sop_uid: str) -> np.ndarray | None:
        row = self._db.execute("SELECT id, vector FROM cases WHERE sop_uid=?", (_sql_text(sop_uid),)).fetchone()
        return _decode_vectors([row], self.dim)[0].copy() if row else None

    @_catalog_access
    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every case, in id order."""
        rows = self._db.execute("SELECT id, vector FROM cases ORDER BY id").fetchall()
        ids = np.asarray([r[0] for r in rows], dtype=np.int64)
        return ids, _decode_vectors(rows, self.dim)

    @_catalog_access
    def patient_image_count(self, patient_id: str | None) -> int:
        if patient_id is None:
            return 0
        return self._db.execute("SELECT COUNT(*) FROM cases WHERE patient_id=?",
                                (_sql_text(patient_id),)).fetchone()[0]

    @_catalog_access
    def label_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for (labels,) in self._db.execute("SELECT labels FROM cases"):
            if not isinstance(labels, str):
                raise _Damage(f"a case's labels are {type(labels).__name__}, not text")
            for label in filter(None, labels.split("|")):
                counts[label] = counts.get(label, 0) + 1
        return dict(sorted(counts.items()))

    @_catalog_access
    def stats(self) -> dict:
        """What `medsim info` and the API show."""
        db = self._db
        status_counts = dict(db.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
        reasons = db.execute(
            "SELECT status, reason, COUNT(*) FROM files WHERE status != 'indexed' GROUP BY status, reason"
        ).fetchall()
        return {
            "path": printable(self.path),
            "cases": len(self),
            "patients": db.execute("SELECT COUNT(DISTINCT patient_id) FROM cases").fetchone()[0],
            "studies": db.execute("SELECT COUNT(DISTINCT study_uid) FROM cases").fetchone()[0],
            "model": {"name": self.meta["model_name"], "fingerprint": self.model_fingerprint,
                      "path": self.meta.get("model_path", ""), "dim": self.dim},
            "created_at": self.meta["created_at"],
            "updated_at": self.meta["updated_at"],
            "hnsw": {k: self.meta[k] for k in ("M", "ef_construction", "ef")},
            "vector_store": str(self.store_url()),
            "labels": self.label_counts(),
            "views": {view or "unknown": n
                      for view, n in db.execute("SELECT view, COUNT(*) FROM cases GROUP BY view")},
            "files": status_counts,
            "not_indexed": {f"{s}:{r}": n for s, r, n in reasons},
            "removed": self.removed_count(),
        }

    # ---- search --------------------------------------------------------------------------------------------------

    @_catalog_access
    def filter_ids(self, case_filter: "CaseFilter | None") -> tuple[np.ndarray, frozenset]:
        """(sorted ids, the same as a set) of the cases that pass ``case_filter``; cached per filter until the catalog
        changes (a commit by this or another connection), so a repeated filter (the default view filter of every
        query) costs no table scan."""
        where, params = (case_filter or CaseFilter()).sql()
        key = (where, tuple(params))
        state = (self.data_version(), self._db.total_changes)
        cache = self.__dict__.setdefault("_filter_cache", {})
        hit = cache.get(key)
        if hit is not None and hit[0] == state:
            return hit[1], hit[2]
        rows = self._db.execute(f"SELECT id FROM cases WHERE {where} ORDER BY id", params).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        found = (state, ids, frozenset(ids.tolist()), {})
        if len(cache) >= 32:
            cache.pop(next(iter(cache)))
        cache[key] = found
        return found[1], found[2]

    def _searchable(self, store: HnswStore, case_filter: "CaseFilter"
                    ) -> tuple[np.ndarray, frozenset, np.ndarray | None]:
        """(sorted ids, the same as a set, their normalised vectors row for row or None when too many to scan) of the
        cases that pass ``case_filter`` and that ``store`` holds: a read-only index's catalog may have committed cases
        since its graph was loaded (a writer beside it), which the graph cannot return. Cached with
        :meth:`filter_ids` and the store's changes (hnswlib's get_items costs ~50 us a vector)."""
        ids, members = self.filter_ids(case_filter)
        where, params = case_filter.sql()
        extra = self.__dict__["_filter_cache"][(where, tuple(params))][3]
        if extra.get("store") != (id(store), store.changes):
            held = store.held(ids)
            extra.clear()
            extra.update(store=(id(store), store.changes), ids=held,
                         members=members if len(held) == len(ids) else frozenset(held.tolist()),
                         vectors=store.vectors(held) if len(held) <= BRUTE_FORCE_MAX else None)
        return extra["ids"], extra["members"], extra["vectors"]

    @_catalog_access
    def excluded_ids(self, exclude_patient: str | None = None, exclude_sop_uid: str | None = None) -> frozenset:
        """Ids of the excluded patient's cases and of the query itself (indexed columns: no scan)."""
        ids = set()
        if exclude_patient is not None:
            ids.update(r[0] for r in self._db.execute("SELECT id FROM cases WHERE patient_id=?",
                                                      (_sql_text(exclude_patient),)))
        if exclude_sop_uid is not None:
            ids.update(r[0] for r in self._db.execute("SELECT id FROM cases WHERE sop_uid=?",
                                                      (_sql_text(exclude_sop_uid),)))
        return frozenset(ids)

    def allowed_ids(self, case_filter: "CaseFilter | None" = None, exclude_patient: str | None = None,
                    exclude_sop_uid: str | None = None) -> np.ndarray:
        """Sorted ids of the cases that pass ``case_filter`` and are neither the excluded patient's nor the query."""
        ids, _ = self.filter_ids(case_filter)
        excluded = self.excluded_ids(exclude_patient, exclude_sop_uid)
        if excluded:
            ids = ids[~np.isin(ids, np.fromiter(excluded, dtype=np.int64, count=len(excluded)))]
        return ids

    @_catalog_access
    def search(self, vector: np.ndarray, k: int = 10, exclude_patient: str | None = None,
               exclude_sop_uid: str | None = None, case_filter: "CaseFilter | None" = None) -> list[Hit]:
        """Top-k cases by cosine similarity, best first, without the excluded patient's images or the query itself.
        With ``case_filter``: the top k of the cases that pass it, searched among them only (inside the vector
        store's search), so k come back whenever k such cases exist."""
        ids, distances = self.nearest(vector, k, exclude_patient, exclude_sop_uid, case_filter)
        return hits(ids, distances, self.cases(ids))

    @_catalog_access
    def nearest(self, vector: np.ndarray, k: int, exclude_patient: str | None = None,
                exclude_sop_uid: str | None = None, case_filter: "CaseFilter | None" = None,
                within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(case ids, cosine distances) of :meth:`search`, only ever of cases the vector store holds. ``within``: the
        sorted ids a served snapshot holds (only those may come back: a Milvus collection shared with a writer may hold
        newer cases; a read-only hnswlib graph holds no others). hnswlib: the catalog turns the filter into allowed ids
        (SQL), restricted to those its graph holds; Milvus: the filter and the patient exclusion are its expression."""
        if k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        store = self._store()
        if store.filters_inside:
            max_id = None if within is None else (int(within[-1]) if len(within) else -1)
            share = None
            if case_filter:  # how selective the filter is (the catalog's count, cached per filter)
                share = len(self.filter_ids(case_filter)[0]) / max(1, len(self.filter_ids(None)[0]))
            return store.knn(vector, k, case_filter=case_filter or None, exclude_patient=exclude_patient,
                             excluded=self.excluded_ids(None, exclude_sop_uid) | self._store_extra, max_id=max_id,
                             share=share)
        excluded = self.excluded_ids(exclude_patient, exclude_sop_uid)
        if not case_filter:
            return store.knn(vector, k, excluded=excluded)
        allowed, members, vectors = self._searchable(store, case_filter)  # cached until the catalog or graph changes
        return store.knn(vector, k, allowed=allowed, members=members, allowed_vectors=vectors, excluded=excluded)

    @_catalog_access
    def neighbours(self, vectors: np.ndarray, k: int, num_threads: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """Batch k-NN for many query vectors: (case ids, cosine similarities), each (n, k), best first; k is capped
        at the number of cases. For scans over the whole index (duplicates); no SQL per query."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        k = min(int(k), len(self))
        if k <= 0 or not len(vectors):
            return np.zeros((len(vectors), 0), dtype=np.int64), np.zeros((len(vectors), 0), dtype=np.float32)
        labels, distances = self._store().knn_batch(vectors, k, num_threads=num_threads)
        return labels, (1.0 - distances).astype(np.float32)

    # ---- the vector store ----------------------------------------------------------------------------------------

    def store_url(self) -> StoreURL:
        """Where this index keeps its vectors (meta ``vector_store``; hnswlib when absent)."""
        record = self.meta.get(STORE_RECORD)
        return parse_url(record["url"] if record else None, self.path)

    def store(self) -> VectorStore:
        """The vector store, loaded and checked against the catalog on first use (:meth:`_store`); a served
        snapshot holds it."""
        return self._store()

    @_catalog_access
    def _store(self) -> VectorStore:
        """hnswlib: the saved graph when it passes the checks, else rebuilt from the catalog's vectors (hnswlib never
        reads a file that failed a check). Milvus: the collection, which must have been created for this catalog.
        Either is then compared with the catalog's case ids (:meth:`_catch_up`)."""
        if self._vstore is not None:
            return self._vstore
        url = self.store_url()
        if url.kind == HNSWLIB:
            ids, vectors = self.vectors()
            store = self._load_graph(ids, vectors)
        else:
            ids, vectors = self.case_ids(), None
            store = open_milvus(url, self.path, self.meta, self.meta[STORE_RECORD]["catalog"])
        try:
            if isinstance(store, MilvusStore):
                store.check_owner()
            self._catch_up(store, ids, vectors)
        except BaseException:
            store.close()
            raise
        self._vstore = store
        return store

    def _load_graph(self, ids: np.ndarray, vectors: np.ndarray) -> HnswStore:
        problem = self._graph_problem((ids, vectors))
        args = (self.path, self.dim, self.meta["M"], self.meta["ef_construction"], self.meta["ef"])
        if problem is None:
            try:
                return HnswStore.load(*args, capacity=len(ids))
            except (RuntimeError, MemoryError, ValueError) as exc:
                problem = f"could not be loaded ({exc})"
        if problem and len(ids):
            log.warning("index %s: %s %s; rebuilt the vector graph from the %d vectors in %s%s",
                        printable(self.path), VECTORS, problem, len(ids), CATALOG,
                        "" if self._writable else
                        " (in memory only: the index is open read-only; the next `medsim build-index` on it "
                        "saves the repaired graph)")
        return HnswStore.new(*args, capacity=len(ids))

    def _catch_up(self, store: VectorStore, ids: np.ndarray, vectors: np.ndarray | None) -> None:
        """Make ``store`` hold exactly the catalog's cases ``ids``: add the vectors it lacks (cases committed after a
        graph was saved; a build interrupted between catalog and store) and remove those the catalog no longer has
        (removed cases). hnswlib does so in memory, also read-only. A Milvus store is shared: only a writer changes
        it (and says so); a reader reports the difference, and never returns a case the catalog does not hold."""
        held = store.ids()
        missing = np.setdiff1d(ids, held, assume_unique=True)
        extra = np.setdiff1d(held, ids, assume_unique=True)
        if not len(missing) and not len(extra):
            return
        if isinstance(store, MilvusStore):
            what = (f"index {printable(self.path)}: vector store {store.url} lacks {len(missing)} of the catalog's "
                    f"{len(ids)} cases and holds {len(extra)} that the catalog does not")
            if not self._writable:
                log.warning("%s; searching only cases of the catalog that it holds (build-index or `medsim "
                            "rebuild-store` repairs it)", what)
                self._store_extra = frozenset(extra.tolist())
                return
            log.warning("%s; repaired from the catalog", what)
        store.remove(extra)
        for start in range(0, len(missing), 4096):
            part = missing[start:start + 4096]
            if vectors is not None:
                store.add(part, vectors[np.searchsorted(ids, part)], None)
            else:
                store.add(part, self._vectors_of(part), [case_fields(c) for c in self.cases(part)])
        self._dirty = True

    @_catalog_access
    def _vectors_of(self, ids: np.ndarray) -> np.ndarray:
        ids = [int(i) for i in ids]
        rows = self._db.execute(f"SELECT id, vector FROM cases WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id",
                                ids).fetchall()
        return _decode_vectors(rows, self.dim)

    @_catalog_access
    def rebuild_store(self, vector_store: str | None = None) -> int:
        """Rebuild the vector store from the catalog: a new hnswlib graph, or the Milvus collection dropped and
        written again. With ``vector_store`` (a store URL): into that store, which the index uses from then on (its
        meta changes only once the new store is complete). Returns the number of vectors written."""
        if not self._writable:
            raise IndexFormatError("index opened read-only")
        target = parse_url(vector_store, self.path, from_user=True) if vector_store is not None else self.store_url()
        if self._vstore is not None:
            self._vstore.close()
            self._vstore = None
        args = (self.path, self.dim, self.meta["M"], self.meta["ef_construction"], self.meta["ef"])
        if target.kind == HNSWLIB:
            store = HnswStore.new(*args, capacity=len(self))
            for ids, vectors in self.iter_vectors():
                store.add(ids, vectors, None)
            record = store.save()
            with self._db:
                self._set_meta(GRAPH_RECORD, record)
                self._db.execute("DELETE FROM meta WHERE key=?", (STORE_RECORD,))
                self.meta.pop(STORE_RECORD, None)
        else:
            current = self.meta.get(STORE_RECORD)
            catalog_id = current["catalog"] if current else uuid.uuid4().hex
            store = open_milvus(target, self.path, self.meta, catalog_id)
            try:
                store.create(replace=True)
                for ids, vectors in self.iter_vectors():
                    store.add(ids, vectors, [case_fields(c) for c in self.cases(ids)])
                store.save()
            except BaseException:
                store.close()
                raise
            with self._db:
                self._set_meta(STORE_RECORD, {"url": str(target), "catalog": catalog_id})
        self._vstore, self._store_extra, self._dirty = store, frozenset(), False
        return store.count()

    def _graph_record(self) -> tuple[str, dict | None]:
        """What the catalog recorded of its graph file: ("recorded", record), ("none", None) when it has saved none,
        ("legacy", None) for an index from before graphs were recorded, ("invalid", None) for an unreadable record."""
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (GRAPH_RECORD,)).fetchone()
        if row is None:
            return "legacy", None
        try:
            record = json.loads(row[0])
        except (TypeError, ValueError):
            return "invalid", None
        if record is None:
            return "none", None
        if (isinstance(record, dict) and isinstance(record.get("sha256"), str) and _is_count(record.get("bytes"))
                and _is_count(record.get("count"))):
            return "recorded", record
        return "invalid", None

    def _graph_problem(self, catalog: tuple[np.ndarray, np.ndarray] | None = None) -> str | None:
        """None when vectors.hnsw may be given to hnswlib; else why not ('' when there is simply none yet). With a
        recorded checksum: header, element count, size and SHA-256 must match the record. Without one (an index from
        before graphs were recorded): the full structural check of :func:`_check_graph_body` against ``catalog``
        ((ids, vectors), read here when not given)."""
        for _ in range(3):  # a writer may save a new graph meanwhile: check again against its new record
            state, record = self._graph_record()
            problem = self._graph_file_problem(state, record, catalog)
            if problem is None or self._graph_record() == (state, record):
                return problem
        return problem

    def _graph_file_problem(self, state: str, record: dict | None,
                            catalog: tuple[np.ndarray, np.ndarray] | None) -> str | None:
        file = self.path / VECTORS
        exists = file.exists()
        if state == "none":
            return "was not saved with this catalog (left by an earlier index?); discarded" if exists else ""
        if state == "invalid":
            return f"cannot be checked ({CATALOG} holds no readable record of it)"
        if not exists:
            return "is missing"
        try:
            header = graph_header(file, self.dim, self.meta["M"], self.meta["ef_construction"])
            if state == "legacy":
                ids, vectors = catalog if catalog is not None else self.vectors()
                check_graph_body(file, header, ids, vectors)
                return None
            if header.count != record["count"]:
                return f"holds {header.count} vectors, but {CATALOG} recorded {record['count']}"
            if header.size != record["bytes"]:
                return f"has {header.size} bytes, but {CATALOG} recorded {record['bytes']}"
            if sha256_of(file) != record["sha256"]:
                return f"does not match the SHA-256 recorded in {CATALOG} (damaged)"
        except GraphInvalid as exc:
            return f"is damaged ({exc})"
        except OSError as exc:
            return f"could not be read ({exc.strerror or exc})"
        return None

    # ---- whole-index reads for scans (medsim.duplicates) ---------------------------------------------------------

    @_catalog_access
    def phashes(self) -> tuple[np.ndarray, list[str]]:
        """(ids, perceptual hashes) of every case, in id order; '' where none is stored, and for every case of an
        index written before the ``phash`` column existed (opened read-only, so not migrated)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(cases)")}
        column = "phash" if "phash" in columns else "''"
        rows = self._db.execute(f"SELECT id, {column} FROM cases ORDER BY id").fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, [r[1] for r in rows]

    @_catalog_access
    def pixel_hash_groups(self) -> list[list[int]]:
        """Case ids (ascending) of every set of two or more cases with the same non-empty pixel hash (exact
        duplicates), ordered by pixel hash; one SQL GROUP BY on the indexed column."""
        rows = self._db.execute(
            "SELECT pixel_hash, id FROM cases WHERE pixel_hash IN (SELECT pixel_hash FROM cases WHERE pixel_hash != ''"
            " GROUP BY pixel_hash HAVING COUNT(*) > 1) ORDER BY pixel_hash, id"
        )
        groups: list[list[int]] = []
        previous = None
        for pixel_hash, case_id in rows:
            if pixel_hash != previous:
                groups.append([])
                previous = pixel_hash
            groups[-1].append(case_id)
        return groups

    def iter_vectors(self, batch_size: int = 4096):
        """(ids, vectors) of every case in id order, in batches of at most ``batch_size`` cases, read from the
        catalog as they are consumed (a scan that does not hold every vector twice)."""
        cursor = self._vector_cursor()
        try:
            while (batch := self._vector_batch(cursor, batch_size)) is not None:
                yield batch
        finally:
            cursor.close()

    @_catalog_access
    def _vector_cursor(self):
        return self._db.execute("SELECT id, vector FROM cases ORDER BY id")

    @_catalog_access
    def _vector_batch(self, cursor, batch_size: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The next (ids, vectors) of an :meth:`iter_vectors` scan, checked like :meth:`vectors`; None at the end."""
        rows = cursor.fetchmany(batch_size)
        if not rows:
            return None
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)), _decode_vectors(rows, self.dim)

    # ---- long-lived readers (medsim.server.state.ServedIndex): cheap change detection, the loaded graph ----------

    @_catalog_access
    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version`` of this connection: it changes whenever another connection commits to the
        catalog (build-index, calibrate), so a long-lived reader can tell cheaply, without reading a table, that it
        should look again."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    @_catalog_access
    def state_key(self) -> tuple:
        """What a served snapshot depends on, read fresh from the catalog: every metadata row (updated_at, the
        operating point, the graph record, ...), the number of cases and the largest case id. Equal keys: nothing
        served has changed (a commit that only touched the file ledger leaves the key as it was)."""
        meta = tuple(sorted((key, value) for key, value in self._db.execute("SELECT key, value FROM meta")))
        count, max_id = self._db.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM cases").fetchone()
        return meta, int(count), int(max_id)

    # ---- removal (tombstones) and watcher state (medsim.watch) ---------------------------------------------------

    @_catalog_access
    def case_ids(self) -> np.ndarray:
        """The ids of every case, ascending (what a reader's graph may return)."""
        rows = self._db.execute("SELECT id FROM cases ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    @_catalog_access
    def studies(self, source_prefix: str | None = None) -> set[str]:
        """The StudyInstanceUIDs of the indexed cases (only those whose source path starts with ``source_prefix``,
        e.g. one PACS's DICOMweb URL, when given)."""
        if source_prefix is None:
            return {r[0] for r in self._db.execute("SELECT DISTINCT study_uid FROM cases")}
        return {r[0] for r in self._db.execute(
            "SELECT DISTINCT study_uid FROM cases WHERE typeof(source_path)='text' AND substr(source_path, 1, ?)=?",
            (len(source_prefix), _sql_text(source_prefix)))}

    @_catalog_access
    def remove_studies(self, study_uids, reason: str = "deleted-in-pacs", meta: dict | None = None) -> int:
        """Take every case of these studies out of the index, in one transaction (with ``meta`` rows, e.g. a
        watcher's position): each case leaves ``cases`` and becomes a tombstone in ``removed`` (identity, when and
        ``reason``), its file-ledger rows get status 'removed' (a re-upload is indexed again), ``updated_at``
        changes (so a served snapshot's key changes), and its vector leaves the store (hnswlib: the graph element is
        marked deleted, saved with the graph; not a rebuild: the graph keeps marked elements until one; Milvus: the row
        is deleted). Returns the number of cases removed."""
        if not self._writable:
            raise IndexFormatError("index opened read-only")
        study_uids = sorted({_sql_text(uid) for uid in study_uids})
        now = time.time()
        removed: list[int] = []
        with self._db:
            for start in range(0, len(study_uids), 500):
                part = study_uids[start:start + 500]
                marks = ",".join("?" * len(part))
                rows = self._db.execute(f"SELECT id, sop_uid, series_uid, study_uid, patient_id, source_path, "
                                        f"added_at FROM cases WHERE study_uid IN ({marks})", part).fetchall()
                if not rows:
                    continue
                self._db.executemany("INSERT OR REPLACE INTO removed VALUES (?,?,?,?,?,?,?,?,?)",
                                     [(*tuple(r), now, _sql_text(reason)) for r in rows])
                self._db.execute(f"DELETE FROM cases WHERE study_uid IN ({marks})", part)
                sops = [r["sop_uid"] for r in rows]
                self._db.execute(f"UPDATE files SET status='removed', reason=?, seen_at=? WHERE sop_uid IN "
                                 f"({','.join('?' * len(sops))})", [_sql_text(reason), now, *sops])
                removed += [r["id"] for r in rows]
            if removed:
                self._set_meta("updated_at", now)
            for key, value in (meta or {}).items():
                self._set_meta(key, value)
        if removed:
            self._store().remove(removed)  # (a store loaded just now has dropped them already)
            self._dirty = True
        return len(removed)

    def _has_removed_table(self) -> bool:
        return self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='removed'").fetchone() \
            is not None

    @_catalog_access
    def removed_count(self) -> int:
        """Tombstones (cases removed since the index was built); 0 for an index without the table."""
        return self._db.execute("SELECT COUNT(*) FROM removed").fetchone()[0] if self._has_removed_table() else 0

    @_catalog_access
    def removed(self, study_uid: str | None = None) -> list[dict]:
        """The tombstones (of one study, or all), oldest first."""
        if not self._has_removed_table():
            return []
        sql = "SELECT * FROM removed" + (" WHERE study_uid=?" if study_uid else "") + " ORDER BY removed_at, id"
        rows = self._db.execute(sql, (_sql_text(study_uid),) if study_uid else ()).fetchall()
        return [{**dict(r), "source_path": _path_from_sql(r["source_path"])} for r in rows]

    @_catalog_access
    def update_meta(self, values: dict) -> None:
        """Store several JSON metadata values in one transaction (e.g. a watcher's position in the change feed)."""
        if not self._writable:
            raise IndexFormatError("index opened read-only")
        with self._db:
            for key, value in values.items():
                self._set_meta(key, value)


# ---- filters (issue 15): which cases a search may return, applied inside the nearest-neighbour search -------------

FRONTAL_VIEWS = ("PA", "AP")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LATERAL LEFT", "LATERAL RIGHT")
VIEW_CLASSES = ("frontal", "lateral", "unknown")
SEXES = ("F", "M", "O")
FINDINGS_MODES = ("any", "all")


def view_class(view: str | None) -> str:
    """'frontal' (PA, AP and e.g. 'AP SUPINE'), 'lateral' (LL, RL, LATERAL), or 'unknown' (no or another view, e.g.
    decubitus or oblique)."""
    view = (view or "").strip().upper()
    if view in FRONTAL_VIEWS or view.startswith(tuple(v + " " for v in FRONTAL_VIEWS)):
        return "frontal"
    if view in LATERAL_VIEWS:
        return "lateral"
    return "unknown"


_VIEW_SQL = {
    "frontal": "(UPPER(view) IN ('PA','AP') OR UPPER(view) LIKE 'PA %' OR UPPER(view) LIKE 'AP %')",
    "lateral": "(UPPER(view) IN (" + ",".join(f"'{v}'" for v in LATERAL_VIEWS) + "))",
}
_VIEW_SQL["unknown"] = f"(NOT {_VIEW_SQL['frontal']} AND NOT {_VIEW_SQL['lateral']})"
# age in years from a labels column ('58') or DICOM PatientAge ('058Y', '006M', '010W', '003D')
_AGE_SQL = ("(CASE WHEN json_extract(attributes, '$.age') IS NULL THEN NULL"
            " WHEN UPPER(CAST(json_extract(attributes, '$.age') AS TEXT)) LIKE '%M'"
            " THEN CAST(json_extract(attributes, '$.age') AS REAL) / 12.0"
            " WHEN UPPER(CAST(json_extract(attributes, '$.age') AS TEXT)) LIKE '%W'"
            " THEN CAST(json_extract(attributes, '$.age') AS REAL) / 52.0"
            " WHEN UPPER(CAST(json_extract(attributes, '$.age') AS TEXT)) LIKE '%D'"
            " THEN CAST(json_extract(attributes, '$.age') AS REAL) / 365.0"
            " ELSE CAST(json_extract(attributes, '$.age') AS REAL) END)")
_SEX_SQL = "UPPER(SUBSTR(TRIM(COALESCE(json_extract(attributes, '$.sex'), json_extract(attributes, '$.patient_sex'), '')), 1, 1))"
_DATE_SQL = "REPLACE(COALESCE(json_extract(attributes, '$.study_date'), ''), '-', '')"


@dataclass(frozen=True)
class CaseFilter:
    """What a search may return. Empty fields do not filter. Case fields used: ``view`` (its class, see
    :func:`view_class`), ``modality``, ``labels`` and the attributes ``sex`` (F/M/O; labels column or DICOM
    PatientSex), ``age`` (years, or DICOM PatientAge such as 058Y) and ``study_date`` (YYYYMMDD). A case without
    the attribute a filter needs does not pass it."""

    views: tuple[str, ...] | None = None  # view classes (VIEW_CLASSES); None or all three = any view
    sex: str | None = None
    age_min: float | None = None
    age_max: float | None = None
    findings: tuple[str, ...] = ()
    findings_mode: str = "any"
    modalities: tuple[str, ...] = ()
    date_from: str | None = None  # YYYYMMDD, inclusive
    date_to: str | None = None

    def __bool__(self) -> bool:
        return bool(self.views is not None and set(self.views) != set(VIEW_CLASSES)) or any(
            (self.sex, self.age_min is not None, self.age_max is not None, self.findings, self.modalities,
             self.date_from, self.date_to))

    def sql(self) -> tuple[str, list]:
        """(WHERE clause, parameters) over the ``cases`` table; '1' when nothing is filtered."""
        clauses, params = [], []
        if self.views is not None and set(self.views) != set(VIEW_CLASSES):
            clauses.append("(" + (" OR ".join(_VIEW_SQL[v] for v in self.views) or "0") + ")")
        if self.sex:
            clauses.append(f"{_SEX_SQL} = ?")
            params.append(self.sex)
        if self.age_min is not None:
            clauses.append(f"{_AGE_SQL} >= ?")
            params.append(float(self.age_min))
        if self.age_max is not None:
            clauses.append(f"{_AGE_SQL} <= ?")
            params.append(float(self.age_max))
        if self.findings:
            one = "('|' || LOWER(labels) || '|') LIKE ? ESCAPE '\\'"
            joiner = " AND " if self.findings_mode == "all" else " OR "
            clauses.append("(" + joiner.join([one] * len(self.findings)) + ")")
            params += ["%|" + _like_escape(f.lower()) + "|%" for f in self.findings]
        if self.modalities:
            clauses.append(f"UPPER(modality) IN ({','.join('?' * len(self.modalities))})")
            params += [m.upper() for m in self.modalities]
        if self.date_from:
            clauses.append(f"{_DATE_SQL} != '' AND {_DATE_SQL} >= ?")
            params.append(self.date_from)
        if self.date_to:
            clauses.append(f"{_DATE_SQL} != '' AND {_DATE_SQL} <= ?")
            params.append(self.date_to)
        return (" AND ".join(clauses) or "1"), params

    def to_dict(self) -> dict:
        """The filter as the API reports it (only the fields that filter)."""
        out: dict = {}
        if self.views is not None:
            out["view"] = list(self.views)
        if self.sex:
            out["sex"] = self.sex
        if self.age_min is not None or self.age_max is not None:
            out["age"] = {"min": self.age_min, "max": self.age_max}
        if self.findings:
            out["findings"] = {self.findings_mode: list(self.findings)}
        if self.modalities:
            out["modality"] = list(self.modalities)
        if self.date_from or self.date_to:
            out["study_date"] = {"from": self.date_from, "to": self.date_to}
        return out

    def matches(self, case: "Case") -> bool:
        """The same test in Python, for one case (tests, and a check of hits)."""
        if self.views is not None and view_class(case.view) not in self.views:
            return False
        attrs = case.attributes
        if self.sex and str(attrs.get("sex") or attrs.get("patient_sex") or "").strip()[:1].upper() != self.sex:
            return False
        if self.age_min is not None or self.age_max is not None:
            age = _age_years(attrs.get("age"))
            if age is None or (self.age_min is not None and age < self.age_min) or (
                    self.age_max is not None and age > self.age_max):
                return False
        if self.findings:
            have = {label.lower() for label in case.labels}
            wanted = [f.lower() in have for f in self.findings]
            if not (all(wanted) if self.findings_mode == "all" else any(wanted)):
                return False
        if self.modalities and case.modality.upper() not in {m.upper() for m in self.modalities}:
            return False
        date = str(attrs.get("study_date") or "").replace("-", "")
        if (self.date_from or self.date_to) and not date:
            return False
        if self.date_from and date < self.date_from or self.date_to and date > self.date_to:
            return False
        return True


def case_fields(case: Case) -> dict:
    """The filterable values of a case as a vector store keeps them (:class:`medsim.vectors.MilvusStore`), with the
    meaning :meth:`CaseFilter.matches` gives them: view class, first letter of the sex, age in years, the labels as
    '|a|b|' in lower case, YYYYMMDD study date, upper-case modality."""
    attrs = case.attributes
    age = _age_years(attrs.get("age"))
    return {"patient": case.patient_id, "view": view_class(case.view),
            "sex": str(attrs.get("sex") or attrs.get("patient_sex") or "").strip()[:1].upper(),
            "age": age if age is not None and math.isfinite(age) else None,
            "labels": "|" + "|".join(case.labels).lower() + "|",  # as the catalog's SQL matches them
            "study_date": str(attrs.get("study_date") or "").replace("-", "")[:16],
            "modality": case.modality.upper()[:64]}


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _age_years(value) -> float | None:
    if value is None or value == "":
        return None
    text = str(value).strip().upper()
    unit = {"Y": 1.0, "M": 12.0, "W": 52.0, "D": 365.0}.get(text[-1:], None)
    try:
        return float(text[:-1]) / unit if unit else float(text)
    except ValueError:
        return None


# ---- catalog values ----------------------------------------------------------------------------------------------

def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with the index metadata medsim relies on, if anything (types and sane ranges)."""
    limits = {"dim": 1 << 16, "M": 10_000, "ef_construction": 10_000_000, "ef": 10_000_000}
    for key, limit in limits.items():
        value = meta.get(key)
        if not _is_count(value) or not 0 < value <= limit:
            return f"{key}={value!r}"
    for key in ("model_fingerprint", "model_name"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            return f"{key}={meta.get(key)!r}"
    if not isinstance(meta.get("model_path", ""), str):
        return f"model_path={meta.get('model_path')!r}"
    for key in ("created_at", "updated_at"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{key}={value!r}"
    store = meta.get(STORE_RECORD)
    if store is not None and not (isinstance(store, dict) and isinstance(store.get("url"), str)
                                  and isinstance(store.get("catalog"), str)):
        return f"{STORE_RECORD}={store!r}"
    return None


def _decode_vectors(rows, dim: int) -> np.ndarray:
    """(n, dim) float32 from (id, vector blob) rows; a blob of another length or type is damage (a short vector, or
    metadata naming the wrong dimension), not a reshape ValueError."""
    try:
        blob = b"".join(r[1] for r in rows)
    except TypeError:
        bad = next(r for r in rows if not isinstance(r[1], bytes))
        raise _Damage(f"case {bad[0]} has a vector of type {type(bad[1]).__name__}, not binary") from None
    if len(blob) != len(rows) * 4 * dim:
        bad = next(r for r in rows if len(r[1]) != 4 * dim)
        raise _Damage(f"case {bad[0]} has a vector of {len(bad[1])} bytes, the index's {dim} dimensions need "
                      f"{4 * dim}")
    return np.frombuffer(blob, dtype=np.float32).reshape(len(rows), dim)


# ---- the catalog file --------------------------------------------------------------------------------------------

def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Schema migration for an index written by an older medsim: append the columns of ADDED_COLUMNS it lacks."""
    present = {row[1] for row in db.execute("PRAGMA table_info(cases)")}
    with db:
        for name, declaration in ADDED_COLUMNS:
            if name not in present:
                db.execute(f"ALTER TABLE cases ADD COLUMN {name} {declaration}")


def _catalog_file_problem(file: Path) -> str | None:
    """Damage visible before SQLite opens the catalog (an empty or foreign file, a truncated one), if any; SQLite
    would create tables in an empty file, and reports a truncated one only when a query reaches a missing page."""
    try:
        with open(file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            header = fh.read(100)
    except OSError as exc:
        raise IndexFormatError(f"index {printable(file.parent)}: cannot read {CATALOG} "
                               f"({exc.strerror or exc})") from None
    if size == 0:
        return "an empty file, 0 bytes"
    if not header.startswith(b"SQLite format 3\x00"):
        return "not an SQLite database"
    if len(header) < 100:
        return f"truncated to {size} bytes"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return f"damaged header: page size {page_size}"
    pages = int.from_bytes(header[28:32], "big")
    try:  # with a WAL in use, pages may be in the WAL and the file's header stale: SQLite's own checks apply then
        wal_size = file.with_name(file.name + "-wal").stat().st_size
    except OSError:
        wal_size = 0
    if not wal_size and pages and header[24:28] == header[92:96] and size < pages * page_size:
        return f"truncated: {size} of {pages * page_size} bytes"
    return None


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    # a URI of the exact bytes of the path: any name (also '?', '#', '%' or bytes that are not UTF-8) opens that file
    uri = "file:" + urllib.parse.quote(os.fsencode(path)) + ("?mode=ro" if readonly else "")
    db = sqlite3.connect(uri, uri=True, check_same_thread=False)
    try:
        if not readonly:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        db.close()
        raise
    db.row_factory = sqlite3.Row
    return db


def _close_quietly(db, lock_fh) -> None:
    if db is not None:
        try:
            db.close()
        except sqlite3.Error:
            pass
    if lock_fh is not None:
        lock_fh.close()


def _lock(path: Path):
    """One writer per index; a second build on the same index fails fast with a clear message."""
    fh = open(path / "lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise IndexFormatError(f"{printable(path)} is being written by another process") from None
    return fh

"""Vector stores: where an index keeps its vectors for nearest-neighbour search. The SQLite catalog
(:mod:`medsim.index`) is the source of truth; a store is a cache of its vectors that can always be rebuilt from it.

Two stores, one small hnswlib-like interface (:class:`VectorStore`: ``add``, ``remove``, ``knn``, ``knn_batch``,
``ids``, ``held``, ``count``, ``save``, ``close``):

* :class:`HnswStore` (default, URL ``hnswlib``): hnswlib in this process, saved as ``vectors.hnsw`` next to the
  catalog, checked before hnswlib reads it. Filters are resolved by the catalog (SQL) into the allowed ids.
* :class:`MilvusStore`: a Milvus collection through pymilvus' MilvusClient, either a Milvus server
  (``milvus://HOST:PORT/COLLECTION``) or a milvus-lite data folder on this machine (``path.db`` or
  ``milvus-lite://path.db#COLLECTION``). The filterable fields of each case are scalar fields of the collection, so
  a CaseFilter and the patient exclusion run inside the engine as one boolean expression.

Distances are cosine distances (1 - cosine similarity) in both, ids are the catalog's case ids.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsim.errors import IndexFormatError

HNSWLIB = "hnswlib"
VECTORS = "vectors.hnsw"
MILVUS_COLLECTION = "medsim_cases"  # the collection of a milvus-lite file given without one
# below this share of the index allowed by a filter, the exact scan of the allowed vectors is used instead of the
# graph's filtered search (it is faster there, and exact); above it the graph with hnswlib's filter callback
BRUTE_FORCE_SHARE = 0.05
BRUTE_FORCE_MAX = 20_000

log = logging.getLogger("medsim.index")


class VectorStore:
    """The interface CaseIndex uses; ids are int64 case ids, vectors float32 rows (stored normalised)."""

    url: str  # as the catalog records it (meta ``vector_store``), e.g. 'hnswlib' or 'milvus://host:19530/cases'
    filters_inside = False  # True: knn takes a CaseFilter and a patient to exclude and evaluates them itself

    def ids(self) -> np.ndarray:
        """Sorted ids of the vectors held (not removed)."""
        raise NotImplementedError

    def held(self, ids: np.ndarray) -> np.ndarray:
        """Those of the sorted ``ids`` whose vectors this store holds: a search asks only for these (a reader's
        catalog may commit cases after its store was loaded; a store cannot return a case it does not hold)."""
        ids = np.asarray(ids, dtype=np.int64)
        return ids[np.isin(ids, self.ids(), assume_unique=True)]

    def count(self) -> int:
        return int(len(self.ids()))

    def add(self, ids: np.ndarray, vectors: np.ndarray, fields: list[dict]) -> None:
        """Add vectors; ``fields``: the filterable values of each case (:func:`medsim.index.case_fields`)."""
        raise NotImplementedError

    def remove(self, ids) -> None:
        raise NotImplementedError

    def knn(self, vector: np.ndarray, k: int, *, allowed: np.ndarray | None = None, members: frozenset | None = None,
            allowed_vectors: np.ndarray | None = None, excluded: frozenset = frozenset(), case_filter=None,
            exclude_patient: str | None = None, max_id: int | None = None, share: float | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, cosine distances) of the k nearest, best first, never an ``excluded`` id. ``allowed`` (sorted ids,
        each held: :meth:`held`) restricts the search to those; ``case_filter``/``exclude_patient``/``max_id`` (only where ``filters_inside``)
        restrict it inside the engine, ``share`` (the fraction of the index that passes the filter, when known)
        lets it search a selective filter more broadly. As many as match, up to k."""
        raise NotImplementedError

    def knn_batch(self, vectors: np.ndarray, k: int, num_threads: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """(ids, cosine distances), each (n, k), for many queries (whole-index scans)."""
        raise NotImplementedError

    def save(self) -> dict | None:
        """Make what was added durable; returns what the catalog records of it (HnswStore: the file's checksum)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


# ---- URLs --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoreURL:
    kind: str  # 'hnswlib' | 'milvus' | 'milvus-lite'
    address: str = ""  # host:port (milvus) or the data folder (milvus-lite; relative = to the index folder)
    collection: str = ""

    def __str__(self) -> str:
        if self.kind == HNSWLIB:
            return HNSWLIB
        if self.kind == "milvus":
            return f"milvus://{self.address}/{self.collection}"
        return f"milvus-lite://{self.address}#{self.collection}"


def parse_url(url: str | None, index_folder: Path | None = None, *, from_user: bool = False) -> StoreURL:
    """A store URL as given on the command line (``from_user``: a relative milvus-lite path is relative to the
    working directory and is recorded relative to the index folder when inside it, else absolute) or as the catalog
    recorded it (relative to the index folder). Raises IndexFormatError for anything else."""
    text = (url or HNSWLIB).strip()
    if text == HNSWLIB:
        return StoreURL(HNSWLIB)
    if text.startswith("milvus://"):
        parts = urllib.parse.urlsplit(text)
        collection = parts.path.strip("/")
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or not port or not _collection_name_ok(collection):
            raise IndexFormatError(f"vector store {text!r}: expected milvus://HOST:PORT/COLLECTION (a collection name "
                                   "of letters, digits and _, starting with a letter or _)")
        return StoreURL("milvus", f"{parts.hostname}:{port}", collection)
    if text.startswith("milvus-lite://"):
        path, _, collection = text[len("milvus-lite://"):].partition("#")
        collection = collection or MILVUS_COLLECTION
    elif text.endswith(".db") and "://" not in text:
        path, collection = text, MILVUS_COLLECTION
    else:
        raise IndexFormatError(f"vector store {text!r}: expected 'hnswlib', milvus://HOST:PORT/COLLECTION, a milvus-lite "
                               "file (PATH.db) or milvus-lite://PATH.db#COLLECTION")
    if not path.endswith(".db") or not _collection_name_ok(collection):
        raise IndexFormatError(f"vector store {text!r}: a milvus-lite path ends in .db, a collection name is letters, "
                               "digits and _")
    if from_user and index_folder is not None:
        absolute = Path(path).resolve()
        try:
            path = str(absolute.relative_to(Path(index_folder).resolve()))
        except ValueError:
            path = str(absolute)
    return StoreURL("milvus-lite", path, collection)


def _collection_name_ok(name: str) -> bool:
    return bool(name) and len(name) <= 255 and (name[0].isalpha() or name[0] == "_") and all(
        c.isascii() and (c.isalnum() or c == "_") for c in name)


# ---- hnswlib -----------------------------------------------------------------------------------------------------

class HnswStore(VectorStore):
    """hnswlib's graph (cosine space) in memory, saved as ``vectors.hnsw`` beside the catalog. Build one with
    :meth:`new` or :meth:`load`; :meth:`save` writes it atomically and returns its checksum record."""

    url = HNSWLIB

    def __init__(self, folder: Path, graph, M: int, ef: int, held: set[int]):
        self.folder = Path(folder)
        self.graph = graph  # hnswlib.Index
        self.M = M
        self.ef = int(ef)
        self._held = held  # labels of elements not marked deleted
        self._sorted: np.ndarray | None = None  # the same, sorted (ids(), held()); None after a change
        self.changes = 0  # counts add/remove calls: what CaseIndex caches of the held ids is keyed by it

    @classmethod
    def new(cls, folder: Path, dim: int, M: int, ef_construction: int, ef: int, capacity: int = 1024) -> "HnswStore":
        import hnswlib

        graph = hnswlib.Index(space="cosine", dim=dim)
        graph.init_index(max_elements=max(capacity, 1024), M=M, ef_construction=ef_construction,
                         allow_replace_deleted=False)
        return cls(folder, graph, M, ef, set())

    @classmethod
    def load(cls, folder: Path, dim: int, M: int, ef_construction: int, ef: int, capacity: int) -> "HnswStore":
        """The saved graph, which the caller has checked (:func:`graph_header`, the recorded checksum). Its
        elements marked deleted are not held; hnswlib does not list them, so they are found by reading the file's
        level-0 link-count words (the deletion mark is bit 16)."""
        import hnswlib

        file = Path(folder) / VECTORS
        graph = hnswlib.Index(space="cosine", dim=dim)
        graph.load_index(os.fsencode(file), max_elements=max(capacity, 1))  # bytes: any path, str only UTF-8
        held = set(graph.get_ids_list())
        held -= _deleted_labels(file, graph.get_current_count())
        return cls(folder, graph, M, ef, held)

    def ids(self) -> np.ndarray:
        if self._sorted is None:
            self._sorted = np.fromiter(sorted(self._held), dtype=np.int64, count=len(self._held))
            self._sorted.flags.writeable = False
        return self._sorted

    def count(self) -> int:
        return len(self._held)

    def add(self, ids, vectors, fields=None) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        needed = self.graph.get_current_count() + len(ids)
        if needed > self.graph.get_max_elements():
            self.graph.resize_index(max(needed, 2 * self.graph.get_max_elements()))
        self.graph.add_items(np.asarray(vectors, dtype=np.float32), ids)
        self._held.update(ids.tolist())
        self._sorted, self.changes = None, self.changes + 1

    def remove(self, ids) -> None:
        for case_id in ids:
            try:
                self.graph.mark_deleted(int(case_id))
            except RuntimeError:  # marked already (in a graph saved before), or never added
                pass
            self._held.discard(int(case_id))
        self._sorted, self.changes = None, self.changes + 1

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored (normalised) vectors of ``ids``."""
        if not len(ids):
            return np.zeros((0, self.graph.dim), np.float32)
        return np.asarray(self.graph.get_items(ids), dtype=np.float32)

    def knn(self, vector, k, *, allowed=None, members=None, allowed_vectors=None, excluded=frozenset(),
            case_filter=None, exclude_patient=None, max_id=None, share=None):
        if case_filter or exclude_patient is not None or max_id is not None:
            raise ValueError("HnswStore filters by allowed ids only")
        if allowed is not None:
            return filtered_knn(self.graph, vector, k, allowed, self.ef, members, excluded, allowed_vectors)
        fetch = min(len(self._held), int(k) + len(excluded))
        if fetch <= 0 or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        labels, distances = graph_knn(self.graph, vector, fetch, self.ef)
        labels = labels.astype(np.int64)
        if excluded:
            keep = ~np.isin(labels, np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
            labels, distances = labels[keep], distances[keep]
        return labels[:k], distances[:k].astype(np.float32)

    def knn_batch(self, vectors, k, num_threads=-1):
        self.graph.set_ef(max(self.ef, k))
        labels, distances = self.graph.knn_query(vectors, k=k, num_threads=num_threads)
        return labels.astype(np.int64), distances.astype(np.float32)

    def save(self) -> dict:
        """Write the graph atomically (temporary file, fsync, rename); its checksum, size and element count."""
        file = self.folder / VECTORS
        tmp = self.folder / f".{VECTORS}.tmp-{os.getpid()}"
        try:
            self.graph.save_index(os.fsencode(tmp))
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            record = graph_record_of(tmp, self.graph.get_current_count())
            os.replace(tmp, file)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.folder)
        return record


def filtered_knn(graph, query: np.ndarray, k: int, allowed: np.ndarray, ef: int, members: frozenset | None = None,
                 excluded: frozenset = frozenset(), allowed_vectors: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(case ids, cosine distances) of the ``k`` nearest of the ``allowed`` case ids (sorted int64, all in
    ``graph``; ``members``: the same as a set, if at hand) that are not ``excluded``, best first: as many as there
    are, up to k, always. A selective filter (few allowed cases) scans the allowed vectors exactly; otherwise hnswlib
    searches its graph with a filter callback, and falls back to the exact scan if it returns fewer than asked (its
    breadth can miss matches scattered far apart in the graph)."""
    if excluded:
        excluded = frozenset(i for i in excluded if (members is not None and i in members) or members is None)
    available = len(allowed) - (len(excluded) if members is not None else 0)
    k = min(int(k), available)
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    query = np.asarray(query, dtype=np.float32).reshape(1, -1)
    total = graph.get_current_count()
    if len(allowed) > max(BRUTE_FORCE_SHARE * total, 4 * k) and len(allowed) > 2 * k:
        members = members if members is not None else frozenset(allowed.tolist())
        graph.set_ef(max(int(ef), 2 * k))
        accept = members.__contains__ if not excluded else (lambda i: i in members and i not in excluded)
        try:
            labels, distances = graph.knn_query(query, k=k, filter=accept)
            if labels.shape[1] == k:
                return labels[0].astype(np.int64), distances[0].astype(np.float32)
        except RuntimeError:  # fewer than k found at this breadth
            pass
    if allowed_vectors is not None and len(allowed_vectors) != len(allowed):
        allowed_vectors = None
    if excluded:
        keep = ~np.isin(allowed, np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
        allowed = allowed[keep]
        allowed_vectors = allowed_vectors[keep] if allowed_vectors is not None else None
    return exact_knn(query[0], k, allowed, allowed_vectors if allowed_vectors is not None
                     else lambda ids: (ids, np.asarray(graph.get_items(ids), dtype=np.float32)))


def exact_knn(query: np.ndarray, k: int, allowed: np.ndarray, vectors) -> tuple[np.ndarray, np.ndarray]:
    """The exact k nearest of ``allowed`` ids by cosine distance (ties by id); ``vectors``: their normalised
    vectors row for row, or a function giving (those of a slice of ids it still holds, their vectors), read in
    chunks."""
    q = np.asarray(query, dtype=np.float32).ravel()
    q = q / (np.linalg.norm(q) + 1e-30)
    best_ids, best_d = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    for start in range(0, len(allowed), BRUTE_FORCE_MAX):
        ids = allowed[start:start + BRUTE_FORCE_MAX]
        ids, chunk = vectors(ids) if callable(vectors) else (ids, vectors[start:start + BRUTE_FORCE_MAX])
        d = (1.0 - chunk @ q).astype(np.float32)
        best_ids, best_d = np.concatenate([best_ids, ids]), np.concatenate([best_d, d])
        if len(best_ids) > k:
            keep = np.argpartition(best_d, k - 1)[:k]
            best_ids, best_d = best_ids[keep], best_d[keep]
    order = np.lexsort((best_ids, best_d))[:k]
    return best_ids[order], best_d[order]


def graph_knn(graph, vector: np.ndarray, fetch: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, cosine distances) of the ``fetch`` nearest elements of an hnswlib ``graph``; when hnswlib finds fewer
    at breadth ``ef`` (removed cases still in the graph), the whole graph is searched."""
    query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
    graph.set_ef(max(ef, fetch))
    try:
        labels, distances = graph.knn_query(query, k=fetch)
    except RuntimeError:
        graph.set_ef(max(fetch, graph.get_current_count()))  # marked-deleted elements included
        labels, distances = graph.knn_query(query, k=fetch)
    return labels[0], distances[0]


# ---- checking a graph file before hnswlib reads it ---------------------------------------------------------------

class GraphInvalid(Exception):
    """vectors.hnsw is not a graph hnswlib can safely load for this index."""


# hnswlib's saveIndex header (hnswalg.h, format of 0.6-0.8): offsetLevel0, max_elements, cur_element_count,
# size_data_per_element, label_offset, offsetData (size_t), maxlevel (int), enterpoint_node (uint32), maxM, maxM0, M
# (size_t), mult (double), ef_construction (size_t). Then cur_element_count level-0 records of size_data_per_element
# bytes (link count word, maxM0 links, the vector, the label), then per element a uint32 byte size of its upper-level
# link lists and those lists (level * (4 + 4 * maxM) bytes).
_HNSW_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
_MAX_LEVEL = 1000


@dataclass(frozen=True)
class GraphHeader:
    size: int  # bytes of the file
    count: int
    per_element: int
    label_offset: int
    data_offset: int
    maxlevel: int
    enterpoint: int
    maxM: int
    maxM0: int


def graph_header(file: Path, dim: int, M: int, ef_construction: int) -> GraphHeader:
    """The header of a graph file, checked against the index (dimension, M, ef_construction) and the file's size."""
    with open(file, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        raw = fh.read(_HNSW_HEADER.size)
    if len(raw) < _HNSW_HEADER.size:
        raise GraphInvalid(f"{size} bytes, shorter than its header")
    (offset0, max_elements, count, per_element, label_offset, data_offset, maxlevel, enterpoint, maxM, maxM0,
     M_, mult, stored_ef_construction) = _HNSW_HEADER.unpack(raw)
    links0 = 4 + 4 * maxM0
    if offset0 != 0 or M_ != M or maxM != M_ or maxM0 != 2 * M_:
        raise GraphInvalid(f"header: M={M_}, maxM={maxM}, maxM0={maxM0}; the index uses M={M}")
    if data_offset != links0 or label_offset != links0 + 4 * dim or per_element != label_offset + 8:
        raise GraphInvalid(f"header: element layout ({per_element} bytes, vector at {data_offset}, label at "
                           f"{label_offset}) is not that of {dim}-d vectors with M={M}")
    if not count <= max_elements < 1 << 32:
        raise GraphInvalid(f"header: {count} elements, capacity {max_elements}")
    expected_mult = 1.0 / math.log(M) if M > 1 else math.inf
    if not (mult == expected_mult or math.isclose(mult, expected_mult, rel_tol=1e-15)):
        raise GraphInvalid(f"header: level multiplier {mult!r}, expected {expected_mult!r} for M={M}")
    if stored_ef_construction != max(ef_construction, M):  # hnswlib keeps max(ef_construction, M)
        raise GraphInvalid(f"header: ef_construction {stored_ef_construction}, the index uses {ef_construction}")
    if count == 0:
        if maxlevel != -1 or size != _HNSW_HEADER.size:
            raise GraphInvalid(f"header: no elements, but top level {maxlevel} and {size} bytes")
    elif not (0 <= maxlevel <= _MAX_LEVEL and enterpoint < count):
        raise GraphInvalid(f"header: top level {maxlevel}, entry point {enterpoint} of {count} elements")
    minimum = _HNSW_HEADER.size + count * (per_element + 4)
    if size < minimum:
        raise GraphInvalid(f"{size} bytes, but its {count} elements need at least {minimum} (truncated)")
    return GraphHeader(size, count, per_element, label_offset, data_offset, maxlevel, enterpoint, maxM, maxM0)


def _deleted_labels(file: Path, count: int) -> set[int]:
    """Labels of the elements a saved graph marks deleted (bit 16 of the level-0 link-count word)."""
    if not count:
        return set()
    with open(file, "rb") as fh:
        header = _HNSW_HEADER.unpack(fh.read(_HNSW_HEADER.size))
    per_element, label_offset = header[3], header[4]
    level0 = np.memmap(file, dtype=np.uint8, mode="r", offset=_HNSW_HEADER.size, shape=(count, per_element))
    words = np.ascontiguousarray(level0[:, :4]).view(np.uint32).ravel()
    marked = np.flatnonzero(words >> 16)
    labels = np.ascontiguousarray(level0[marked, label_offset:label_offset + 8]).view(np.uint64).ravel()
    del level0
    return set(labels.astype(np.int64).tolist())


def check_graph_body(file: Path, h: GraphHeader, ids: np.ndarray, vectors: np.ndarray, chunk: int = 65536) -> None:
    """Everything hnswlib trusts when it loads and searches a graph, checked without it: every link list's length
    within its bound, every link to an existing element, every upper-level link to an element that has that level,
    the level sizes adding up to the file's size and the top level and entry point agreeing with them, no deletion
    marks (medsim never deletes), every label a distinct case id of the catalog, and each element's vector the
    catalog's vector of that case (normalised, as hnswlib stores it for cosine): a graph of another catalog fails.
    For an index from before the catalog recorded its graph's checksum."""
    n, dim = h.count, vectors.shape[1] if vectors.ndim == 2 else 0
    if n == 0:
        return
    if n > len(ids):
        raise GraphInvalid(f"holds {n} vectors, the catalog {len(ids)}")
    base = _HNSW_HEADER.size
    level0_end = base + n * h.per_element
    words = h.per_element // 4
    level0 = np.memmap(file, dtype=np.uint32, mode="r", offset=base, shape=(n, words))
    first, data0, label0 = 1, h.data_offset // 4, h.label_offset // 4
    seen = np.zeros(len(ids), dtype=bool)
    slots = np.arange(h.maxM0)
    for start in range(0, n, chunk):
        part = np.asarray(level0[start:start + chunk])
        head = part[:, 0]
        if (head >> 16).any():
            raise GraphInvalid(f"element {start + int(np.flatnonzero(head >> 16)[0])} is marked deleted or has stray "
                               "bits in its link count")
        counts = head & 0xFFFF
        if (counts > h.maxM0).any():
            raise GraphInvalid(f"element {start + int(np.flatnonzero(counts > h.maxM0)[0])} has more than "
                               f"{h.maxM0} links")
        links = part[:, first:first + h.maxM0]
        if (links[slots < counts[:, None]] >= n).any():
            raise GraphInvalid("a level-0 link points past the last element")
        labels = np.ascontiguousarray(part[:, label0:label0 + 2]).view(np.uint64).ravel().astype(np.int64)
        where = np.searchsorted(ids, labels)
        found = (where < len(ids)) & (ids[np.minimum(where, len(ids) - 1)] == labels) & (labels >= 0)
        if not found.all():
            raise GraphInvalid(f"holds id {int(labels[~found][0])}, which is no case of the catalog")
        if seen[where].any() or len(np.unique(where)) != len(where):
            raise GraphInvalid("holds a case id twice")
        seen[where] = True
        stored = part[:, data0:data0 + dim].view(np.float32)
        expected = vectors[where]
        expected = expected / (np.linalg.norm(expected, axis=1, keepdims=True) + 1e-30)
        if not (np.abs(stored - expected) <= 1e-4).all():
            raise GraphInvalid("its vectors are not the catalog's (a graph of another catalog, or damaged)")
    del level0
    with open(file, "rb") as fh:
        fh.seek(level0_end)
        tail = np.frombuffer(fh.read(), dtype=np.uint8)
    if len(tail) % 4:
        raise GraphInvalid("its upper-level link lists do not add up to the file's size")
    tail = tail.view(np.uint32)
    per_level = 1 + h.maxM  # words: count, maxM links
    # walk the size words: elements without upper levels have a 0 word; jump over the others' lists
    nonzero = np.flatnonzero(tail)
    levels = np.zeros(n, dtype=np.int64)
    upper: list[tuple[int, int, int]] = []  # element, first word of its lists, levels
    element, word = 0, 0
    while element < n:
        nxt = int(np.searchsorted(nonzero, word))
        if nxt == len(nonzero):  # the rest are level-0 elements, one 0 word each
            word += n - element
            element = n
            break
        jump = int(nonzero[nxt]) - word
        if jump >= n - element:
            word += n - element
            element = n
            break
        element += jump
        word += jump
        size = int(tail[word])
        if size % (4 * per_level) or size // (4 * per_level) > _MAX_LEVEL:
            raise GraphInvalid(f"element {element} has upper-level lists of {size} bytes")
        levels[element] = size // (4 * per_level)
        upper.append((element, word + 1, int(levels[element])))
        word += 1 + size // 4
        element += 1
        if word > len(tail):
            raise GraphInvalid("its upper-level link lists run past the end of the file (truncated)")
    if word != len(tail):
        raise GraphInvalid(f"{4 * (len(tail) - word)} bytes after its last link list")
    if int(levels.max()) != h.maxlevel or int(levels[h.enterpoint]) != h.maxlevel:
        raise GraphInvalid(f"top level {h.maxlevel} and entry point {h.enterpoint} disagree with the elements' "
                           f"levels (highest {int(levels.max())})")
    if upper:
        owners = np.repeat(np.asarray([u[0] for u in upper]), [u[2] for u in upper])
        level_of_row = np.concatenate([np.arange(1, u[2] + 1) for u in upper])
        row_start = np.concatenate([u[1] + per_level * np.arange(u[2]) for u in upper])
        rows = tail[row_start[:, None] + np.arange(per_level)]
        counts = rows[:, 0]
        if (counts > h.maxM).any():
            raise GraphInvalid(f"element {int(owners[np.flatnonzero(counts > h.maxM)[0]])} has more than {h.maxM} "
                               "links on an upper level")
        mask = np.arange(h.maxM) < counts[:, None]
        targets = rows[:, 1:][mask].astype(np.int64)
        if (targets >= n).any():
            raise GraphInvalid("an upper-level link points past the last element")
        if (levels[targets] < np.broadcast_to(level_of_row[:, None], mask.shape)[mask]).any():
            raise GraphInvalid("an upper-level link points to an element without that level")


def sha256_of(file: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def graph_record_of(file: Path, count: int) -> dict:
    return {"sha256": sha256_of(file), "bytes": file.stat().st_size, "count": int(count)}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- Milvus ------------------------------------------------------------------------------------------------------

# scalar fields of the collection: what a CaseFilter and the patient exclusion need (medsim.index.case_fields)
_MAX_TEXT = 1024
_MAX_LABELS = 65535  # bytes of the '|'-joined findings
_CATALOG_PROPERTY = "medsim.catalog"  # the catalog's id, so a collection of another index is never used
_MILVUS_BATCH = 2000
_MAX_EF = 8192
# milvus-lite runs in this process (a gRPC server per data folder, which locks the folder): stopped when the last
# store using the folder closes, so another process (a CLI command, the server) can open it
_LITE_USERS: dict[str, int] = {}
_LITE_LOCK = threading.Lock()


class MilvusStore(VectorStore):
    """A Milvus collection (HNSW index, COSINE metric: distances as hnswlib's). One row per case: ``id`` (the case
    id, primary key), ``vector``, and the filterable fields ``patient`` (nullable), ``view`` (frontal, lateral or
    unknown), ``sex`` (F/M/O or ''), ``age`` (years, nullable), ``labels`` ('|a|b|', lower case), ``study_date`` (YYYYMMDD or
    ''), ``modality`` (upper case). Writes are visible to searches at once (Strong consistency); :meth:`save`
    flushes them to storage."""

    filters_inside = True

    def __init__(self, url: StoreURL, index_folder: Path, dim: int, M: int, ef_construction: int, ef: int,
                 catalog_id: str):
        from pymilvus import MilvusClient

        self.address = url
        self.url = str(url)
        self.collection = url.collection
        self.dim, self.M, self.ef_construction, self.ef = dim, M, ef_construction, int(ef)
        self.catalog_id = catalog_id
        for name, level in (("pymilvus", logging.CRITICAL), ("milvus_lite", logging.WARNING), ("faiss", logging.WARNING),
                            ("grpc._server", logging.CRITICAL), ("milvus_lite.server_manager", logging.CRITICAL)):
            logging.getLogger(name).setLevel(level)  # milvus-lite's in-process server: its calls (and its start)
            # that fail come back to us as IndexFormatError, without tracebacks
        self._lite = None
        if url.kind == "milvus":
            uri = f"http://{url.address}"
        else:
            folder = Path(url.address)
            uri = os.path.abspath(folder if folder.is_absolute() else Path(index_folder) / folder)
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            with _LITE_LOCK:
                _LITE_USERS[uri] = _LITE_USERS.get(uri, 0) + 1
            self._lite = uri
        try:
            self.client = MilvusClient(uri=uri, timeout=30)
        except Exception as exc:  # noqa: BLE001 - pymilvus raises its own and grpc's errors
            self._release_lite()
            if url.kind == "milvus-lite" and _lite_folder_locked(uri):
                raise IndexFormatError(
                    f"vector store {self.url}: another process has this milvus-lite folder open (milvus-lite serves "
                    "one process at a time). To use the index from several processes (e.g. `medsim serve` beside "
                    "`medsim watch`), run a Milvus server (`milvus-lite server --data-dir DIR --host 127.0.0.1 "
                    "--port 19530`, or Milvus) and move the index to it: `medsim rebuild-store --index "
                    f"{Path(index_folder)} --vector-store milvus://127.0.0.1:19530/{self.collection}`") from None
            raise IndexFormatError(f"vector store {self.url}: cannot connect ({_short(exc)})") from None
        self._loaded = False

    # -- collection lifecycle --

    def exists(self) -> bool:
        return bool(self._call(self.client.has_collection, self.collection))

    def owner(self) -> str | None:
        """The catalog id the collection was created for (None: not a medsim collection)."""
        described = self._call(self.client.describe_collection, self.collection)
        return (described.get("properties") or {}).get(_CATALOG_PROPERTY)

    def create(self, replace: bool = False) -> None:
        """Create the collection for this catalog; an existing one is dropped first only with ``replace``."""
        from pymilvus import DataType

        if self.exists():
            if not replace:
                raise IndexFormatError(f"vector store {self.url}: collection {self.collection} already exists; choose "
                                       "another collection, or rebuild it from this index with `medsim rebuild-store`")
            self._call(self.client.drop_collection, self.collection)
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("patient", DataType.VARCHAR, max_length=_MAX_TEXT, nullable=True)
        schema.add_field("view", DataType.VARCHAR, max_length=16)
        schema.add_field("sex", DataType.VARCHAR, max_length=4)
        schema.add_field("age", DataType.FLOAT, nullable=True)
        schema.add_field("labels", DataType.VARCHAR, max_length=_MAX_LABELS)
        schema.add_field("study_date", DataType.VARCHAR, max_length=16)
        schema.add_field("modality", DataType.VARCHAR, max_length=64)
        params = self.client.prepare_index_params()
        params.add_index(field_name="vector", index_type="HNSW", metric_type="COSINE",
                         params={"M": self.M, "efConstruction": self.ef_construction})
        self._call(self.client.create_collection, self.collection, schema=schema, index_params=params,
                   consistency_level="Strong")
        self._call(self.client.alter_collection_properties, self.collection,
                   properties={_CATALOG_PROPERTY: self.catalog_id})
        self._loaded = False

    def check_owner(self) -> None:
        """Raise IndexFormatError unless the collection exists and was created for this catalog."""
        if not self.exists():
            raise IndexFormatError(f"vector store {self.url}: collection {self.collection} does not exist; rebuild it "
                                   "from the catalog with `medsim rebuild-store`")
        owner = self.owner()
        if owner != self.catalog_id:
            raise IndexFormatError(f"vector store {self.url}: collection {self.collection} belongs to another index "
                                   f"({'not medsim' if owner is None else 'catalog ' + owner}); rebuild it from this "
                                   "index with `medsim rebuild-store`")

    def _load(self) -> None:
        if not self._loaded:
            self._call(self.client.load_collection, self.collection)
            self._loaded = True

    # -- the interface --

    def ids(self) -> np.ndarray:
        self._load()
        return self._matching_ids("", None)

    def count(self) -> int:
        self._load()
        rows = self._call(self.client.query, self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def add(self, ids, vectors, fields) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32)
        vectors = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-30)  # stored as hnswlib stores them
        for start in range(0, len(ids), _MILVUS_BATCH):
            rows = [{"id": int(i), "vector": v.tolist(), **f} for i, v, f in
                    zip(ids[start:start + _MILVUS_BATCH], vectors[start:start + _MILVUS_BATCH],
                        fields[start:start + _MILVUS_BATCH])]
            self._call(self.client.insert, self.collection, rows)

    def remove(self, ids) -> None:
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), _MILVUS_BATCH):
            self._call(self.client.delete, self.collection, ids=ids[start:start + _MILVUS_BATCH])

    def _held_vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(those of ``ids`` the collection holds, their stored vectors): a writer beside this reader may have
        deleted one since its id was read."""
        self._load()
        found = {}
        for start in range(0, len(ids), _MILVUS_BATCH):
            part = [int(i) for i in ids[start:start + _MILVUS_BATCH]]
            for row in self._call(self.client.get, self.collection, ids=part, output_fields=["vector"]):
                found[int(row["id"])] = row["vector"]
        held = np.asarray([i for i in np.asarray(ids).tolist() if i in found], dtype=np.int64)
        return held, np.asarray([found[i] for i in held.tolist()], dtype=np.float32).reshape(len(held), self.dim)

    def knn(self, vector, k, *, allowed=None, members=None, allowed_vectors=None, excluded=frozenset(),
            case_filter=None, exclude_patient=None, max_id=None, share=None):
        if k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        self._load()
        narrowed = milvus_expression(case_filter, exclude_patient, excluded, None,
                                     allowed if allowed is not None and len(allowed) <= 10_000 else None)
        expr = " and ".join(filter(None, (narrowed, milvus_expression(max_id=max_id))))
        query = np.asarray(vector, dtype=np.float32).ravel()
        # a snapshot's bound (max_id) passes (nearly) every case: searched as broadly as without it, same answers
        ef = max(self.ef, 2 * int(k)) if narrowed else max(self.ef, int(k))
        if share:  # HNSW under a filter that passes few cases must look further to find k of them (measured:
            ef = max(ef, min(_MAX_EF, int(1.5 * k / share)))  # recall@10 0.44 at ef 64, 0.99 at 1024, 1 % passing)
        hits = self._search([query], int(k), expr, ef)[0]
        ids = np.asarray([h["id"] for h in hits], dtype=np.int64)
        distances = np.asarray([1.0 - h["distance"] for h in hits], dtype=np.float32)
        if allowed is not None and len(allowed) > 10_000:  # too many to write out: checked here
            keep = np.isin(ids, allowed)
            ids, distances = ids[keep], distances[keep]
        if len(ids) < k:  # an approximate filtered search may find fewer than exist: count, then scan exactly
            matching = self._matching_ids(expr, allowed)
            if len(matching) > len(ids):
                return exact_knn(query, int(k), matching, self._held_vectors)
        return ids, distances

    def _matching_ids(self, expr: str, allowed) -> np.ndarray:
        """Sorted ids that match ``expr`` (and are ``allowed``), read in pages by primary key as pymilvus' query
        iterator does (Milvus returns a page's rows in key order), without its server-side timestamp call."""
        found, last = [], None
        while True:
            page = f"id > {last}" if last is not None else "id >= -9223372036854775808"
            rows = self._call(self.client.query, self.collection, filter=f"({expr}) and {page}" if expr else page,
                              limit=16384, output_fields=["id"])
            if not rows:
                break
            batch = [int(row["id"]) for row in rows]
            found.extend(batch)
            last = max(batch)
            if len(rows) < 16384:
                break
        ids = np.unique(np.asarray(found, dtype=np.int64))
        return ids[np.isin(ids, allowed)] if allowed is not None else ids

    def knn_batch(self, vectors, k, num_threads=-1):
        self._load()
        vectors = np.asarray(vectors, dtype=np.float32)
        ids = np.zeros((len(vectors), k), dtype=np.int64)
        distances = np.ones((len(vectors), k), dtype=np.float32)
        for start in range(0, len(vectors), 256):
            for row, hits in enumerate(self._search(vectors[start:start + 256], k, "", max(self.ef, k)), start):
                ids[row, :len(hits)] = [h["id"] for h in hits]
                distances[row, :len(hits)] = [1.0 - h["distance"] for h in hits]
        return ids, distances

    def _search(self, queries, k: int, expr: str, ef: int):
        return self._call(self.client.search, self.collection, data=[np.asarray(q, np.float32).tolist() for q in queries],
                          limit=k, filter=expr, output_fields=[],
                          search_params={"metric_type": "COSINE", "params": {"ef": ef}})

    def save(self) -> None:
        self._call(self.client.flush, self.collection)

    def drop(self) -> None:
        if self.exists():
            self._call(self.client.drop_collection, self.collection)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing a connection that failed
            pass
        self._release_lite()

    def _release_lite(self) -> None:
        if self._lite is None:
            return
        with _LITE_LOCK:
            _LITE_USERS[self._lite] -= 1
            last = _LITE_USERS[self._lite] == 0
            if last:
                del _LITE_USERS[self._lite]
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self._lite)
        self._lite = None

    def _call(self, method, *args, **kwargs):
        """A pymilvus call whose failure (server gone, refused request) is one IndexFormatError line."""
        try:
            return method(*args, **kwargs)
        except IndexFormatError:
            raise
        except Exception as exc:  # MilvusException, grpc errors
            if type(exc).__module__.startswith(("pymilvus", "grpc", "milvus_lite")):
                raise IndexFormatError(f"vector store {self.url}: {_short(exc)}") from None
            raise


def _lite_folder_locked(folder: str) -> bool:
    """Whether another process holds milvus-lite's lock on its data folder (one process per folder)."""
    import fcntl

    from milvus_lite.db import LOCK_FILENAME

    try:
        fd = os.open(os.path.join(folder, LOCK_FILENAME), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _short(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return " ".join(str(text).split())[:300]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _literal(text: str) -> str:
    """A string literal of a Milvus boolean expression."""
    return json.dumps(text, ensure_ascii=False)


def milvus_expression(case_filter=None, exclude_patient: str | None = None, excluded=frozenset(),
                      max_id: int | None = None, allowed=None) -> str:
    """The Milvus boolean expression of a :class:`medsim.index.CaseFilter` (the same cases pass as through its SQL),
    the excluded patient (a case without a patient is never excluded), excluded ids, ids above ``max_id`` (cases a
    served snapshot does not hold) and, when given, a list of allowed ids. '' when nothing restricts."""
    clauses = []
    f = case_filter
    if f:
        if f.views is not None and set(f.views) != {"frontal", "lateral", "unknown"}:
            clauses.append(f"view in [{', '.join(_literal(v) for v in f.views)}]" if f.views else "id < 0")
        if f.sex:
            clauses.append(f"sex == {_literal(f.sex)}")
        if f.age_min is not None:
            clauses.append(f"age >= {float(f.age_min)!r}")
        if f.age_max is not None:
            clauses.append(f"age <= {float(f.age_max)!r}")
        if f.findings:  # LIKE over '|a|b|', as the catalog's SQL (array_contains is a row-wise loop in milvus-lite)
            joiner = " and " if f.findings_mode == "all" else " or "
            clauses.append("(" + joiner.join(f"labels like {_literal('%|' + _like_escape(x.lower()) + '|%')}"
                                             for x in f.findings) + ")")
        if f.modalities:
            clauses.append(f"modality in [{', '.join(_literal(m.upper()) for m in f.modalities)}]")
        if f.date_from:
            clauses.append(f'study_date != "" and study_date >= {_literal(f.date_from)}')
        if f.date_to:
            clauses.append(f'study_date != "" and study_date <= {_literal(f.date_to)}')
    if exclude_patient is not None:
        clauses.append(f"(patient is null or patient != {_literal(exclude_patient)})")
    if excluded:
        clauses.append(f"id not in [{', '.join(str(int(i)) for i in sorted(excluded))}]")
    if max_id is not None:
        clauses.append(f"id <= {int(max_id)}")
    if allowed is not None:
        clauses.append(f"id in [{', '.join(str(int(i)) for i in allowed)}]")
    return " and ".join(clauses)


# ---- opening a store ---------------------------------------------------------------------------------------------

def open_milvus(url: StoreURL, index_folder: Path, meta: dict, catalog_id: str) -> MilvusStore:
    return MilvusStore(url, index_folder, meta["dim"], meta["M"], meta["ef_construction"], meta["ef"], catalog_id)

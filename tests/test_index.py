"""CaseIndex: model binding, atomic saves, recovery from a stale or broken vector file, patient exclusion."""

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medsim.errors import IndexFormatError, ModelMismatch
from medsim import index as index_module
from medsim.index import CATALOG, VECTORS, Case, CaseIndex, FileRecord


def _cases(n, patients):
    return [
        Case(sop_uid=f"1.2.3.{i}", series_uid=f"1.2.4.{i}", study_uid=f"1.2.5.{i}", patient_id=patients[i % len(patients)],
             source_path=f"/x/{i}.dcm", labels=("Pneumonia",) if i % 2 else ("No Finding",))
        for i in range(n)
    ]


def _vectors(n, dim=16, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _new(path, dim=16):
    return CaseIndex.create(path, model_fingerprint="fp-a", model_name="test-model", dim=dim, M=8, ef_construction=50)


def test_search_returns_exact_neighbour_and_excludes_patient(tmp_path):
    vectors = _vectors(50)
    with _new(tmp_path / "idx") as index:
        index.add(_cases(50, ["p1", "p2", "p3", "p4", "p5"]), vectors, "fp-a")
        hits = index.search(vectors[7], k=5)
        assert hits[0].case.sop_uid == "1.2.3.7"
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        others = index.search(vectors[7], k=5, exclude_patient="p3")  # case 7 belongs to p3 (7 % 5 == 2 -> p3)
        assert len(others) == 5
        assert all(h.case.patient_id != "p3" for h in others)


def test_refuses_vectors_and_reopen_from_another_model(tmp_path):
    with _new(tmp_path / "idx") as index:
        with pytest.raises(ModelMismatch):
            index.add(_cases(2, ["p"]), _vectors(2), "fp-other")
        with pytest.raises(ModelMismatch):
            index.add(_cases(2, ["p"]), _vectors(2, dim=8), "fp-a")
        assert len(index) == 0
    with pytest.raises(ModelMismatch):
        CaseIndex.open_or_create(tmp_path / "idx", model_fingerprint="fp-other", model_name="x", dim=16)


def test_vector_file_is_rebuilt_when_stale_or_broken(tmp_path):
    vectors = _vectors(40)
    path = tmp_path / "idx"
    with _new(path) as index:
        index.add(_cases(30, ["p1", "p2"]), vectors[:30], "fp-a")
    # A crash after the catalog commit but before the vector file was saved: add 10 more without saving.
    index = CaseIndex.open(path, writable=True)
    extra = _cases(40, ["p1", "p2"])[30:]
    index.add(extra, vectors[30:], "fp-a")
    index._db.close()  # simulate a crash: no save()
    index._lock_fh.close()
    with CaseIndex.open(path) as reopened:
        assert len(reopened) == 40
        assert reopened.search(vectors[35], k=1)[0].case.sop_uid == "1.2.3.35"
    (path / VECTORS).write_bytes(b"garbage")
    with CaseIndex.open(path) as reopened:
        assert reopened.search(vectors[3], k=1)[0].case.sop_uid == "1.2.3.3"


def test_one_writer_at_a_time_and_no_overwrite(tmp_path):
    path = tmp_path / "idx"
    with _new(path):
        with pytest.raises(IndexFormatError, match="another process"):
            CaseIndex.open(path, writable=True)
    with pytest.raises(IndexFormatError, match="already holds"):
        _new(path)
    with pytest.raises(IndexFormatError, match="not a medsim index"):
        CaseIndex.open(tmp_path / "nothing")


def test_a_reader_finds_no_catalog_or_a_whole_one_while_an_index_is_created(tmp_path, monkeypatch):
    """A watcher creates its index while a server or a second process may open it: at every step of create(),
    catalog.sqlite is absent or a whole index (before: its tables came before its metadata, and a reader in between
    was told the index was damaged). The reader looks each time create() encodes a metadata value."""
    path, seen = tmp_path / "idx", []

    class Reader:  # medsim.index's json, looking at the index before each metadata value is encoded
        def __getattr__(self, name):
            return getattr(json, name)

        @staticmethod
        def dumps(value, *args, **kwargs):
            if (path / CATALOG).exists():
                with CaseIndex.open(path) as reader:  # IndexFormatError if the catalog is not whole
                    seen.append(len(reader))
            else:
                seen.append(None)
            return json.dumps(value, *args, **kwargs)

    monkeypatch.setattr(index_module, "json", Reader())
    created = _new(path)
    monkeypatch.undo()
    created.close()
    assert seen and set(seen) == {None}
    assert sorted(p.name for p in path.iterdir()) == [CATALOG, "lock"]  # no staging file or WAL left
    with CaseIndex.open(path) as index:
        assert len(index) == 0 and index.meta["dim"] == 16


def test_ledger_and_stats(tmp_path):
    with _new(tmp_path / "idx") as index:
        files = [FileRecord("/x/0.dcm", 10, 1.0, "indexed", sop_uid="1.2.3.0"),
                 FileRecord("/x/sr.dcm", 5, 1.0, "skipped", "not-an-image", "report")]
        index.add(_cases(1, ["p"]), _vectors(1), "fp-a", files=files)
        index.set_meta("operating_point", {"threshold": 0.5})
        stats = index.stats()
    assert stats["cases"] == 1 and stats["labels"] == {"No Finding": 1}
    assert stats["files"] == {"indexed": 1, "skipped": 1}
    assert stats["not_indexed"] == {"skipped:not-an-image": 1}
    with CaseIndex.open(tmp_path / "idx") as index:
        assert index.meta["operating_point"] == {"threshold": 0.5}
        assert index.known_files()["/x/sr.dcm"] == (5, 1.0, "skipped")


# ---- issue 13: names that are not UTF-8, a checked vector graph, a damaged catalog -------------------------------

ODD = os.fsdecode(b"/x/\xff\xfe-bad.dcm")  # '/x/\udcff\udcfe-bad.dcm', as os.walk gives a name that is not UTF-8


def test_paths_that_are_not_utf8_round_trip_through_the_catalog(tmp_path):
    path = tmp_path / "idx"
    cases = _cases(2, ["p"])
    cases[0].source_path = ODD
    files = [FileRecord(ODD, 10, 1.5, "indexed", sop_uid="1.2.3.0"),
             FileRecord(os.fsdecode(b"/x/notes-\xe9.txt"), 3, 2.0, "skipped", "not-an-image", "text"),
             FileRecord("/x/1.dcm", 10, 1.0, "indexed", sop_uid="1.2.3.1"),
             FileRecord(os.fsdecode(b"/x/gone-\x80"), 0, 0.0, "failed", "unreadable",
                        os.fsdecode(b"[Errno 2] No such file: '/x/gone-\x80'"))]
    with _new(path) as index:
        index.add(cases, _vectors(2), "fp-a", files=files)
    with CaseIndex.open(path) as index:
        known = index.known_files()
        assert known[ODD] == (10, 1.5, "indexed") and known[os.fsdecode(b"/x/notes-\xe9.txt")][2] == "skipped"
        assert index.get_by_path(ODD).sop_uid == "1.2.3.0" and index.get_by_path("/x/1.dcm").sop_uid == "1.2.3.1"
        assert [c.source_path for c in index.cases()] == [ODD, "/x/1.dcm"]
        records = {r.path: r for r in index.file_records()}
        assert set(records) == {f.path for f in files}
        assert records[os.fsdecode(b"/x/gone-\x80")].detail == "[Errno 2] No such file: '/x/gone-\\x80'"
    db = sqlite3.connect(path / CATALOG)  # stored as the exact bytes, text for a UTF-8 name
    assert db.execute("SELECT path FROM files WHERE typeof(path)='blob' ORDER BY path").fetchall() == [
        (b"/x/gone-\x80",), (b"/x/notes-\xe9.txt",), (b"/x/\xff\xfe-bad.dcm",)]
    assert db.execute("SELECT typeof(source_path) FROM cases ORDER BY id").fetchall() == [("blob",), ("text",)]
    db.close()


def test_printable_escapes_undecodable_bytes_and_control_characters():
    assert index_module.printable(ODD) == "/x/\\xff\\xfe-bad.dcm"
    assert index_module.printable(os.fsdecode(b"a\n\x1bb\xc3\xa9")) == "a\\n\\x1bb\u00e9"  # a valid UTF-8 é stays
    assert index_module.printable("plain/path with space.dcm") == "plain/path with space.dcm"
    assert index_module.printable("rtl\u202eevil") == "rtl\\u202eevil"


def _graph_record(path):
    db = sqlite3.connect(path / CATALOG)
    try:
        row = db.execute("SELECT value FROM meta WHERE key='graph'").fetchone()
        return json.loads(row[0]) if row else "absent"
    finally:
        db.close()


def test_saved_graph_is_recorded_and_a_damaged_one_is_rebuilt_before_hnswlib_reads_it(tmp_path, caplog):
    vectors = _vectors(60)
    path = tmp_path / "idx"
    with _new(path) as index:
        assert index.meta["graph"] is None  # a new catalog: no graph saved yet
        index.add(_cases(60, ["p1", "p2", "p3"]), vectors, "fp-a")
    record = _graph_record(path)
    data = (path / VECTORS).read_bytes()
    assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "count": 60}
    for offset in (40, 96 + 5, len(data) // 2, len(data) - 3):  # header, links, vectors, level sizes
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        (path / VECTORS).write_bytes(bytes(damaged))
        caplog.clear()
        with CaseIndex.open(path) as index:
            assert [h.case.sop_uid for h in index.search(vectors[7], k=3)][0] == "1.2.3.7"
        assert "rebuilt the vector graph" in caplog.text and "in memory only" in caplog.text
        assert (path / VECTORS).read_bytes() == bytes(damaged)  # read-only: nothing written
    with CaseIndex.open(path, writable=True) as index:  # a writable use with nothing to add repairs it on save
        index.save()
    assert hashlib.sha256((path / VECTORS).read_bytes()).hexdigest() == _graph_record(path)["sha256"]
    caplog.clear()
    with CaseIndex.open(path) as index:
        index.search(vectors[0], k=1)
    assert "rebuilt" not in caplog.text


def test_a_graph_left_by_a_lost_catalog_is_not_used(tmp_path):
    path = tmp_path / "idx"
    old, new = _vectors(30, seed=1), _vectors(10, seed=2)
    with _new(path) as index:
        index.add(_cases(30, ["p"]), old, "fp-a")
    (path / CATALOG).unlink()
    with _new(path) as index:  # same ids 1..10, other vectors
        index.add(_cases(10, ["q"]), new, "fp-a")
        hits = index.search(new[4], k=10)
        assert [h.case.sop_uid for h in hits][0] == "1.2.3.4" and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert len(hits) == 10
    with CaseIndex.open(path) as index:
        scores = {h.case.sop_uid: h.score for h in index.search(new[4], k=10)}
        assert scores == pytest.approx({f"1.2.3.{i}": float(new[i] @ new[4]) for i in range(10)}, abs=1e-5)


_LEGACY_CHILD = """
import sys, numpy as np
from medsim.index import CaseIndex
vectors = np.load(sys.argv[1])
for copy in sys.argv[2:]:
    with CaseIndex.open(copy) as index:
        for q in (0, 77, 299):
            index.search(vectors[q], k=5)
"""


def test_graph_of_an_index_from_before_checksums_gets_the_structural_check(tmp_path, caplog):
    """No recorded checksum (an index written before it was recorded): header, levels, links, labels and vectors are
    checked before hnswlib loads the file; bit flips anywhere never crash a reader (separate processes: a crash
    would be a signal), and a writable save records the checksum."""
    base = tmp_path / "idx"
    vectors = _vectors(300)
    with CaseIndex.create(base, model_fingerprint="fp-a", model_name="m", dim=16, M=4, ef_construction=40) as index:
        index.add(_cases(300, ["p1", "p2", "p3"]), vectors, "fp-a")
    np.save(tmp_path / "vectors.npy", vectors)
    db = sqlite3.connect(base / CATALOG)
    with db:
        db.execute("DELETE FROM meta WHERE key='graph'")
    db.close()
    with CaseIndex.open(base) as index:  # a sound graph without a record is still used
        assert index.search(vectors[5], k=1)[0].case.sop_uid == "1.2.3.5"
    assert "rebuilt" not in caplog.text
    data = (base / VECTORS).read_bytes()
    level0_end = 96 + 300 * (4 + 8 * 4 + 16 * 4 + 8)
    rng = np.random.default_rng(0)
    copies = []
    for seed in range(30):
        copy = tmp_path / f"c{seed}"
        shutil.copytree(base, copy)
        damaged = bytearray(data)
        low, high = [(0, 96), (96, level0_end), (level0_end, len(data))][seed % 3]
        for _ in range(int(rng.integers(1, 6))):
            damaged[int(rng.integers(low, high))] ^= 1 << int(rng.integers(0, 8))
        (copy / VECTORS).write_bytes(bytes(damaged))
        copies.append(str(copy))
    run = subprocess.run([sys.executable, "-c", _LEGACY_CHILD, str(tmp_path / "vectors.npy"), *copies],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert run.returncode == 0, f"exit status {run.returncode} (negative: killed by a signal)\n{run.stderr[-3000:]}"
    assert run.stderr.count("rebuilt the vector graph") >= 15  # most flips are caught (some hit unused link slots)
    with CaseIndex.open(base, writable=True) as index:
        index.save()
    assert _graph_record(base)["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "no-tables", "bad-meta"])
def test_damaged_catalog_raises_index_format_error_naming_it(tmp_path, kind):
    path = tmp_path / "idx"
    with _new(path) as index:
        index.add(_cases(200, ["p"]), _vectors(200), "fp-a")
    catalog = path / CATALOG
    if kind == "empty":
        catalog.write_bytes(b"")
    elif kind == "text":
        catalog.write_text("hello\n")
    elif kind == "truncated":
        catalog.write_bytes(catalog.read_bytes()[:20000])
    else:
        db = sqlite3.connect(catalog)
        with db:
            if kind == "no-tables":
                db.execute("DROP TABLE files")
            else:
                db.execute("UPDATE meta SET value='{' WHERE key='dim'")
        db.close()
    for writable in (False, True):
        with pytest.raises(IndexFormatError, match=r"catalog\.sqlite is damaged .*medsim build-index") as caught:
            CaseIndex.open(path, writable=writable)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(IndexFormatError, match="damaged"):  # a failed open released the lock: not "another process"
        CaseIndex.open(path, writable=True)


def test_short_vector_or_wrong_dimension_is_index_format_error(tmp_path):
    path = tmp_path / "idx"
    vectors = _vectors(5)
    with _new(path) as index:
        index.add(_cases(5, ["p"]), vectors, "fp-a")
    db = sqlite3.connect(path / CATALOG)
    with db:
        db.execute("UPDATE cases SET vector=? WHERE id=2", (b"\x00" * 12,))
    db.close()
    with CaseIndex.open(path) as index:
        assert index.vector("1.2.3.0") is not None
        with pytest.raises(IndexFormatError, match="case 2 has a vector of 12 bytes"):
            index.vector("1.2.3.1")
        with pytest.raises(IndexFormatError, match="case 2 has a vector of 12 bytes"):
            index.vectors()
        with pytest.raises(IndexFormatError, match="damaged"):
            index.search(vectors[0], k=2)
    db = sqlite3.connect(path / CATALOG)
    with db:
        db.execute("UPDATE meta SET value='8' WHERE key='dim'")
    db.close()
    with CaseIndex.open(path) as index, pytest.raises(IndexFormatError, match="8 dimensions need 32"):
        index.vectors()


def test_a_reused_case_id_is_searchable_after_a_graph_marked_it_deleted(tmp_path):
    """SQLite gives a new case the id of a removed case that held the largest id. A graph saved with that id marked
    deleted (hnswlib keeps the label) must not hide the new case: a later open adds it back from the catalog."""
    vectors = _vectors(11)
    with _new(tmp_path / "idx") as index:
        index.add(_cases(10, ["p1", "p2"]), vectors[:10], "fp-a")
        removed_id = index.get("1.2.3.9").id
        assert index.remove_studies(["1.2.5.9"]) == 1
    db = sqlite3.connect(tmp_path / "idx" / CATALOG)  # the new case committed without a graph save (killed build)
    with db:
        row = db.execute("SELECT * FROM cases WHERE sop_uid='1.2.3.0'").fetchone()
        db.execute("INSERT INTO cases (sop_uid, series_uid, study_uid, patient_id, source_path, added_at, vector) "
                   "VALUES ('9.9', '9.8', '9.7', 'p9', '/new.dcm', 0, ?)", (vectors[10].tobytes(),))
        new_id = db.execute("SELECT id FROM cases WHERE sop_uid='9.9'").fetchone()[0]
    db.close()
    assert row is not None and new_id == removed_id
    with CaseIndex.open(tmp_path / "idx") as index:
        hits = index.search(vectors[10], k=3)
        assert hits[0].case.sop_uid == "9.9" and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert index.store().count() == len(index) == 10


def test_a_reader_searches_only_the_cases_its_graph_holds_while_a_writer_commits(tmp_path):
    """A read-only index (a CLI query, the server's snapshot) loaded its graph; a writer then commits cases that pass
    the same filter. The catalog's filter names them, the reader's graph does not hold them: the reader's filtered
    search returns the cases its graph holds, as many as asked, and never fails on the others (hnswlib's 'Label not
    found' was a 500 in the server). Selective filters (exact scan) and permissive ones (hnswlib's filtered graph
    search) both; a filter that only the new cases pass finds nothing; the served snapshot too, without a retry."""
    from medsim.index import CaseFilter
    from medsim.server.state import Snapshot

    n, dim = 400, 16
    vectors = _vectors(n + 60, dim, seed=4)
    cases = _cases(n + 60, ["p1", "p2", "p3", "p4", "p5", "p6", "p7"])
    for i, case in enumerate(cases):
        case.view = "PA" if i % 2 else "LL"
        case.modality = "CR" if i >= n else "DX"
        case.labels = ("Effusion",) if i % 40 == 0 else case.labels
    with _new(tmp_path / "idx", dim) as index:
        index.add(cases[:n], vectors[:n], "fp-a")
    frontal, effusion, new_only = (CaseFilter(views=("frontal",)), CaseFilter(findings=("Effusion",)),
                                   CaseFilter(modalities=("CR",)))
    reader = CaseIndex.open(tmp_path / "idx")
    snapshot = Snapshot.load(tmp_path / "idx")
    try:
        for case_filter in (frontal, effusion):  # graph loaded, the filters' ids cached
            assert len(reader.search(vectors[0], k=10, case_filter=case_filter)) == 10
        with CaseIndex.open(tmp_path / "idx", writable=True) as writer:
            new_ids = set(writer.add(cases[n:], vectors[n:], "fp-a"))
        assert len(reader) == n + 60  # the catalog sees them
        for query in (vectors[n + 1], vectors[n + 40], vectors[3]):  # the new cases are the nearest of two queries
            for case_filter in (frontal, effusion):
                passing = sum(case_filter.matches(c) for c in cases[:n])
                k = min(passing, 10) if case_filter is frontal else passing + 1  # more than the graph holds
                for searched in (reader, snapshot.index):
                    hits = searched.search(query, k=k, case_filter=case_filter)
                    assert len(hits) == min(k, passing)
                    assert all(case_filter.matches(h.case) for h in hits)
                    assert not {h.case.id for h in hits} & new_ids
            assert reader.search(query, k=5, case_filter=new_only) == []
            assert snapshot.search(query, k=5, case_filter=new_only) == []
            assert len(snapshot.search(query, k=10, case_filter=frontal)) == 10
    finally:
        reader.close()
        snapshot.close()

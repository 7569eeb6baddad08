"""CaseIndex: model binding, atomic saves, recovery from a stale or broken vector file, patient exclusion."""

import numpy as np
import pytest

from medsim.errors import IndexFormatError, ModelMismatch
from medsim.index import VECTORS, Case, CaseIndex, FileRecord


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

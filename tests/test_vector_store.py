"""The vector stores behind CaseIndex (medsim/vectors.py): hnswlib and Milvus give the same answers.

Milvus runs for real: milvus-lite in this process (a data folder, ``PATH.db``) and, in the tests marked ``milvus``,
as a ``milvus-lite server`` process on 127.0.0.1 reached at ``milvus://127.0.0.1:PORT/COLLECTION``. Indexes are the
sample export's (real embeddings) and a synthetic one of 2,000 cases whose vectors are drawn near those real
embeddings, with patients, views, sexes, ages, findings, dates and modalities to filter on.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medsim.errors import IndexFormatError
from medsim.index import CATALOG, Case, CaseFilter, CaseIndex
from medsim.vectors import MilvusStore, parse_url
from orthanc_fixtures import pacs  # noqa: F401  (the serve tests' Orthanc and index)

K = 10
FILTERS = [  # real filters of the API (issue 15), selective and permissive
    CaseFilter(views=("frontal",)),
    CaseFilter(views=("lateral", "unknown")),
    CaseFilter(sex="F"),
    CaseFilter(age_min=40, age_max=60),
    CaseFilter(findings=("Cardiomegaly", "Effusion")),
    CaseFilter(findings=("Cardiomegaly", "Effusion"), findings_mode="all"),
    CaseFilter(modalities=("DX",)),
    CaseFilter(date_from="20200101", date_to="20201231"),
    CaseFilter(views=("frontal",), sex="M", age_min=30, findings=("Pneumonia",)),
]
FINDINGS = ("Cardiomegaly", "Effusion", "Pneumonia", "Atelectasis", "No Finding")


# ---- indexes ----------------------------------------------------------------------------------------------------

def _copy_catalog(src: Path, dst: Path) -> Path:
    """A copy of an index's catalog only (its store is rebuilt from it)."""
    dst.mkdir(parents=True)
    source, target = sqlite3.connect(f"file:{src / CATALOG}?mode=ro", uri=True), sqlite3.connect(dst / CATALOG)
    source.backup(target)  # a consistent copy, WAL included
    source.close()
    target.close()
    return dst


def _milvus_copy(src: Path, dst: Path, url: str) -> Path:
    _copy_catalog(src, dst)
    with CaseIndex.open(dst, writable=True) as index:
        index.rebuild_store(url)
    return dst


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, sample_index):
    """(hnswlib index, case vectors): 2,000 cases near the sample export's real embeddings, with filterable fields."""
    with CaseIndex.open(sample_index[0]) as index:
        _, real = index.vectors()
        meta = index.meta
    rng = np.random.default_rng(17)
    n = 2000
    centers = real[rng.integers(0, len(real), n)]
    vectors = (centers + rng.normal(scale=0.35 * np.abs(centers).mean(), size=centers.shape)).astype(np.float32)
    views = ["PA", "AP", "LL", "LATERAL", "", "AP SUPINE"]
    cases = []
    for i in range(n):
        labels = tuple(f for f in FINDINGS if rng.random() < 0.25)
        attributes = {"sex": "FMO"[i % 3] if i % 11 else "", "study_date": f"20{18 + i % 5}{1 + i % 12:02d}15"}
        if i % 13:
            attributes["age"] = str(18 + (i * 7) % 70) if i % 4 else f"{18 + (i * 7) % 70:03d}Y"
        cases.append(Case(sop_uid=f"1.2.{i}", series_uid=f"1.3.{i}", study_uid=f"1.4.{i // 2}",
                          patient_id=None if i % 97 == 0 else f"P{i % 400}", source_path=f"/synthetic/{i}.dcm",
                          view=views[i % len(views)], modality="DX" if i % 3 else "CR", labels=labels,
                          attributes=attributes))
    path = tmp_path_factory.mktemp("vs") / "synthetic"
    with CaseIndex.create(path, model_fingerprint=meta["model_fingerprint"], model_name=meta["model_name"],
                          dim=meta["dim"]) as index:
        index.add(cases, vectors, meta["model_fingerprint"])
    return path, vectors


@pytest.fixture(scope="module")
def lite(tmp_path_factory, synthetic, sample_index):
    """Milvus-lite (in this process) copies of the synthetic and the sample index: {name: path}."""
    root = tmp_path_factory.mktemp("lite")
    return {"synthetic": _milvus_copy(synthetic[0], root / "synthetic", str(root / "synthetic" / "vectors.db")),
            "sample": _milvus_copy(sample_index[0], root / "sample", f"milvus-lite://{root}/sample.db#sample_cases")}


def _exact(index: CaseIndex, query, k):
    """Ids of the exact top k by cosine similarity."""
    ids, vectors = index.vectors()
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return ids[np.argsort(-(v @ (query / np.linalg.norm(query))), kind="stable")[:k]].tolist()


def _ids(hits):
    return [h.case.id for h in hits]


# ---- milvus-lite in this process ---------------------------------------------------------------------------------

def test_store_urls():
    assert str(parse_url(None)) == "hnswlib" and str(parse_url("hnswlib")) == "hnswlib"
    assert str(parse_url("milvus://db.example.org:19530/cases")) == "milvus://db.example.org:19530/cases"
    assert parse_url("/data/x.db").collection == "medsim_cases"
    assert str(parse_url("milvus-lite:///data/x.db#c1")) == "milvus-lite:///data/x.db#c1"
    for bad in ("milvus://host/cases", "milvus://host:1/", "milvus://host:1/a-b", "x.sqlite", "milvus-lite://x#c",
                "redis://x"):
        with pytest.raises(IndexFormatError):
            parse_url(bad)


def test_unfiltered_top10_overlaps_exact_search(lite, synthetic):
    """Milvus (HNSW, COSINE) against exact search over 2,000 cases near real embeddings: top-10 overlap >= 0.95,
    scores the same cosine similarities as the catalog's vectors give."""
    _, vectors = synthetic
    rng = np.random.default_rng(3)
    overlaps = []
    with CaseIndex.open(lite["synthetic"]) as index:
        assert index.store_url().kind == "milvus-lite" and isinstance(index.store(), MilvusStore)
        for row in rng.choice(len(vectors), 40, replace=False):
            query = vectors[row] + rng.normal(scale=0.01, size=vectors.shape[1]).astype(np.float32)
            hits = index.search(query, k=K)
            exact = _exact(index, query, K)
            overlaps.append(len(set(_ids(hits)) & set(exact)) / K)
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            stored = index.vector(hits[0].case.sop_uid)
            assert hits[0].score == pytest.approx(float(stored @ query / np.linalg.norm(stored) / np.linalg.norm(query)),
                                                  abs=1e-4)
    assert np.mean(overlaps) >= 0.95, overlaps


@pytest.mark.parametrize("case_filter", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.to_dict().items()))
def test_filtered_search_runs_in_milvus_and_agrees_with_hnswlib(lite, synthetic, case_filter):
    """A CaseFilter becomes a Milvus expression: every hit passes it, k come back whenever k cases pass, and the
    ranking is hnswlib's (exact scan of the allowed cases, or its filtered graph search) within approximation."""
    path, vectors = synthetic
    rng = np.random.default_rng(5)
    with CaseIndex.open(path) as hnsw, CaseIndex.open(lite["synthetic"]) as milvus:
        cases = hnsw.cases()
        passing = {c.id for c in cases if case_filter.matches(c)}
        assert passing and len(passing) < len(hnsw)
        agree = []
        for row in rng.choice(len(vectors), 5, replace=False):
            query = vectors[row]
            got = milvus.search(query, k=K, case_filter=case_filter, exclude_patient=f"P{row % 400}")
            want = hnsw.search(query, k=K, case_filter=case_filter, exclude_patient=f"P{row % 400}")
            assert len(got) == len(want) == min(K, sum(c.id in passing and c.patient_id != f"P{row % 400}"
                                                       for c in cases))
            assert {h.case.id for h in got} <= passing
            assert all(h.case.patient_id != f"P{row % 400}" for h in got)
            agree.append(len(set(_ids(got)) & set(_ids(want))) / max(len(want), 1))
        assert np.mean(agree) >= 0.95, agree


def test_sample_index_same_results_as_hnswlib(lite, sample_index):
    """On the sample export (real embeddings): for every case as the query, the same hits and scores in both stores,
    with and without filters, own patient excluded."""
    with CaseIndex.open(sample_index[0]) as hnsw, CaseIndex.open(lite["sample"]) as milvus:
        assert hnsw.stats()["cases"] == milvus.stats()["cases"] and milvus.store().count() == len(hnsw)
        assert milvus.stats()["vector_store"] == f"milvus-lite://{lite['sample'].parent}/sample.db#sample_cases"
        for case in hnsw.cases():
            query = hnsw.vector(case.sop_uid)
            for case_filter in (None, CaseFilter(views=("frontal",)), CaseFilter(findings=("Pneumonia",)),
                                CaseFilter(modalities=("DX",))):
                args = dict(k=K, exclude_patient=case.patient_id, exclude_sop_uid=case.sop_uid, case_filter=case_filter)
                want, got = hnsw.search(query, **args), milvus.search(query, **args)
                assert _ids(got) == _ids(want)
                assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)


def test_patient_exclusion_and_cases_without_a_patient(lite):
    with CaseIndex.open(lite["synthetic"]) as index:
        patient = index.cases()[5].patient_id
        own = [c for c in index.cases() if c.patient_id == patient]
        query = index.vector(own[0].sop_uid)
        assert {own[0].id} <= set(_ids(index.search(query, k=K)))
        hits = index.search(query, k=K, exclude_patient=patient)
        assert len(hits) == K and all(h.case.patient_id != patient for h in hits)
        anonymous = [c for c in index.cases() if c.patient_id is None]  # never excluded as "another" patient's
        query = index.vector(anonymous[0].sop_uid)
        assert anonymous[0].id in _ids(index.search(query, k=K, exclude_patient=patient))
        assert anonymous[0].id not in _ids(index.search(query, k=K, exclude_sop_uid=anonymous[0].sop_uid))


def test_incremental_add_and_removed_studies(tmp_path, lite, synthetic):
    path = _copy_catalog(lite["sample"], tmp_path / "idx")
    url = str(tmp_path / "own.db")
    with CaseIndex.open(path, writable=True) as index:
        index.rebuild_store(url)
        fingerprint, before = index.model_fingerprint, len(index)
    _, vectors = synthetic
    new = [Case(sop_uid=f"9.9.{i}", series_uid="9.8", study_uid=f"9.7.{i % 2}", patient_id="NEW", view="PA",
                source_path=f"/new/{i}", labels=("Effusion",)) for i in range(3)]
    with CaseIndex.open(path, writable=True) as index:  # build-index's path: catalog, then the store
        index.add(new, vectors[:3], fingerprint)
        assert index.search(vectors[0], k=1)[0].case.sop_uid == "9.9.0"  # searchable at once
    with CaseIndex.open(path) as index:
        assert index.store().count() == len(index) == before + 3
        hits = index.search(vectors[1], k=K, case_filter=CaseFilter(findings=("effusion",), views=("frontal",)))
        assert hits[0].case.sop_uid == "9.9.1"
    with CaseIndex.open(path, writable=True) as index:
        assert index.remove_studies(["9.7.0"]) == 2
    with CaseIndex.open(path) as index:
        assert index.store().count() == len(index) == before + 1
        assert {h.case.sop_uid for h in index.search(vectors[0], k=len(index))} & {"9.9.0", "9.9.2"} == set()
        assert int(index.get("9.9.1").id) in index.store().ids().tolist()


def test_store_that_disagrees_with_the_catalog_is_reported_then_repaired(tmp_path, lite, caplog):
    path = _copy_catalog(lite["sample"], tmp_path / "idx")
    with CaseIndex.open(path, writable=True) as index:
        index.rebuild_store(str(tmp_path / "v.db"))
        ids = index.case_ids()
        gone = ids[:3]
        index.store().remove(gone)  # behind the catalog's back: a store that lost rows
        stranger = index.cases([ids[5]])[0]
    with CaseIndex.open(path) as index:  # a reader: reports, searches what the store holds, writes nothing
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="medsim.index"):
            assert index.store().count() == len(ids) - 3
        assert "lacks 3 of the catalog's" in caplog.text and "rebuild-store" in caplog.text
        assert not set(gone.tolist()) & set(_ids(index.search(index.vector(stranger.sop_uid), k=len(ids))))
    with CaseIndex.open(path, writable=True) as index:  # a writer repairs it from the catalog
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="medsim.index"):
            assert index.store().count() == len(ids)
        assert "repaired from the catalog" in caplog.text
    with CaseIndex.open(path) as index:
        assert index.store().ids().tolist() == ids.tolist()


def test_a_collection_of_another_index_is_never_used(tmp_path, lite):
    """Two catalogs pointed at one collection: the second is refused (it would search the first one's vectors)
    until `medsim rebuild-store` rebuilds the collection from it."""
    first = _milvus_copy(lite["sample"], tmp_path / "first", str(tmp_path / "shared.db"))
    second = _copy_catalog(lite["sample"], tmp_path / "second")
    with pytest.raises(IndexFormatError, match="already exists"):
        CaseIndex.create(tmp_path / "third", model_fingerprint="x", model_name="m", dim=8,
                         vector_store=str(tmp_path / "shared.db"))
    assert not (tmp_path / "third" / CATALOG).exists()
    with CaseIndex.open(first) as index:
        record = dict(index.meta["vector_store"])
    db = sqlite3.connect(second / CATALOG)
    with db:  # the second catalog names the first's collection, with its own catalog id
        db.execute("INSERT OR REPLACE INTO meta VALUES ('vector_store', ?)",
                   (json.dumps({**record, "url": f"milvus-lite://{tmp_path / 'shared.db'}#medsim_cases",
                                "catalog": "another"}),))
    db.close()
    with CaseIndex.open(second) as index, pytest.raises(IndexFormatError, match="belongs to another index"):
        index.search(np.ones(index.dim, np.float32), k=3)
    from medsim.cli import main

    assert main(["rebuild-store", "--index", str(second)]) == 0
    with CaseIndex.open(second) as index:
        assert len(index.search(np.ones(index.dim, np.float32), k=3)) == 3


def test_served_snapshot_over_milvus_serves_its_own_cases_until_refreshed(tmp_path, lite, synthetic):
    """The server's snapshot of a Milvus index: cases a writer adds reach the shared collection at once, but the
    snapshot searches only the cases it holds (bounded by its largest id) until it swaps in the newer state."""
    from medsim.server.state import ServedIndex

    path = _milvus_copy(lite["sample"], tmp_path / "idx", str(tmp_path / "served.db"))
    _, vectors = synthetic
    served = ServedIndex.open(path)
    try:
        before = len(served)
        with CaseIndex.open(path, writable=True) as index:
            index.add([Case(sop_uid="7.7", series_uid="7.8", study_uid="7.9", patient_id="N", view="PA",
                            source_path="/n")], vectors[:1], index.model_fingerprint)
            assert index.search(vectors[0], k=1)[0].case.sop_uid == "7.7"  # in the collection now
        for case_filter in (None, CaseFilter(views=("frontal",))):
            hits = served.search(vectors[0], k=K, case_filter=case_filter)
            assert "7.7" not in {h.case.sop_uid for h in hits} and len(hits) == min(K, before)
        assert served.refresh() and len(served) == before + 1
        assert served.search(vectors[0], k=1)[0].case.sop_uid == "7.7"
    finally:
        served.close()


def test_cli_commands_work_unchanged_against_a_milvus_index(tmp_path, lite, sample_index, capsys):
    """build-index --vector-store on an index that uses another store points to rebuild-store; info names the store;
    duplicates finds the same groups through either store; rebuild-store moves an index back to hnswlib."""
    from medsim.cli import main

    with CaseIndex.open(sample_index[0]) as index:
        meta = index.meta
    with pytest.raises(IndexFormatError, match="rebuild-store"):
        CaseIndex.open_or_create(lite["sample"], model_fingerprint=meta["model_fingerprint"], model_name="m", dim=512,
                                 vector_store="hnswlib")
    assert main(["info", "--index", str(lite["sample"])]) == 0
    assert f"vectors:      milvus-lite://{lite['sample'].parent}/sample.db#sample_cases" in capsys.readouterr().out
    for index, out in ((sample_index[0], tmp_path / "h.csv"), (lite["sample"], tmp_path / "m.csv")):
        assert main(["duplicates", "--index", str(index), "--out", str(out)]) == 0
    assert (tmp_path / "h.csv").read_text() == (tmp_path / "m.csv").read_text()
    back = _copy_catalog(lite["sample"], tmp_path / "back")
    assert main(["rebuild-store", "--index", str(back), "--vector-store", "hnswlib"]) == 0
    with CaseIndex.open(back) as index, CaseIndex.open(sample_index[0]) as original:
        assert "vector_store" not in index.meta and (back / "vectors.hnsw").exists()
        query = original.vectors()[1][0]
        assert _ids(index.search(query, k=K)) == _ids(original.search(query, k=K))


def test_build_index_in_python_chooses_the_vector_store(tmp_path, bundle, sample_index):
    """build_index(..., vector_store=URL), the Python API of `build-index --vector-store`: the sample export built
    into a milvus-lite folder answers every query as the hnswlib build does; a re-run (with the URL or without it)
    adds nothing; an index that uses another store is refused, naming rebuild-store, before anything is read, and is
    left as it was."""
    from conftest import SAMPLE_DIR
    from medsim.build import build_index
    from medsim.ingest import LabelTable

    labels = LabelTable.from_csv(SAMPLE_DIR / "labels.csv")
    path, url = tmp_path / "built", str(tmp_path / "vectors.db")
    report = build_index(SAMPLE_DIR, path, bundle, labels=labels, workers=0, batch_size=4, progress=False,
                         vector_store=url)
    with CaseIndex.open(path) as milvus, CaseIndex.open(sample_index[0]) as hnsw:
        assert isinstance(milvus.store(), MilvusStore) and str(milvus.store_url()) == f"milvus-lite://{url}#medsim_cases"
        assert not (path / "vectors.hnsw").exists()
        assert milvus.store().count() == len(milvus) == len(hnsw) == report.total_cases
        for case in hnsw.cases():
            args = dict(k=K, exclude_patient=case.patient_id, exclude_sop_uid=case.sop_uid)
            want = [h.case.sop_uid for h in hnsw.search(hnsw.vector(case.sop_uid), **args)]
            assert [h.case.sop_uid for h in milvus.search(milvus.vector(case.sop_uid), **args)] == want
    for again in (url, None):
        assert build_index(SAMPLE_DIR, path, bundle, labels=labels, workers=0, progress=False,
                           vector_store=again).indexed == 0
    hnsw_copy = _copy_catalog(sample_index[0], tmp_path / "hnsw")
    for index, other in ((path, "hnswlib"), (path, str(tmp_path / "other.db")), (hnsw_copy, url)):
        with pytest.raises(IndexFormatError, match="rebuild-store"):
            build_index(SAMPLE_DIR, index, bundle, labels=labels, workers=0, progress=False, vector_store=other)
    assert not (tmp_path / "other.db").exists()
    with CaseIndex.open(hnsw_copy) as index, CaseIndex.open(sample_index[0]) as original:
        assert "vector_store" not in index.meta and index.state_key() == original.state_key()


_HOLD = """import sys
from medsim.index import CaseIndex
index = CaseIndex.open(sys.argv[1])
index.store()
print("holding", flush=True)
sys.stdin.read()
index.close()
"""


def test_a_milvus_lite_folder_held_by_another_process_is_one_clear_error(tmp_path, lite):
    """milvus-lite serves a folder to one process at a time: while one process holds it (`medsim watch`, a
    server), `medsim serve` and `medsim duplicates` each fail with one error line that says to use a Milvus server,
    not a traceback; once the folder is free, the same command works."""
    from medsim.orthanc import free_port

    path = _milvus_copy(lite["sample"], tmp_path / "idx", str(tmp_path / "idx" / "vectors.db"))
    medsim = str(Path(sys.executable).with_name("medsim"))
    duplicates = [medsim, "duplicates", "--index", str(path), "--out", str(tmp_path / "pairs.csv"), "--no-progress"]
    serve = [medsim, "serve", "--index", str(path), "--host", "127.0.0.1", "--port", str(free_port()), "--cache-dir",
             str(tmp_path / "cache")]
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        runs = [subprocess.run(command, capture_output=True, text=True, timeout=120) for command in (serve, duplicates)]
    finally:
        holder.stdin.close()
        holder.wait(60)
    for run in runs:
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        errors = [line for line in run.stderr.splitlines() if line.startswith("medsim: error:")]
        assert len(errors) == 1 and errors[0] == run.stderr.strip().splitlines()[-1], run.stderr
        assert errors[0].startswith("medsim: error: vector store milvus-lite://"), run.stderr
        for text in ("another process has this milvus-lite folder open", "milvus-lite server", "rebuild-store",
                     "milvus://127.0.0.1:19530/medsim_cases"):
            assert text in errors[0]
    assert subprocess.run(duplicates, capture_output=True, text=True, timeout=120).returncode == 0


# ---- a milvus-lite server process on 127.0.0.1 --------------------------------------------------------------------

@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """`milvus-lite server` (milvus-lite's gRPC server, the Milvus API) on a free loopback port; stopped after."""
    from medsim.orthanc import free_port

    port = free_port()
    folder = tmp_path_factory.mktemp("milvus-server")
    log = open(folder / "server.log", "w")
    process = subprocess.Popen([str(Path(sys.executable).with_name("milvus-lite")), "server", "--data-dir",
                                str(folder / "data"), "--host", "127.0.0.1", "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "listening" not in (folder / "server.log").read_text():
            assert process.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()
            time.sleep(0.2)
        yield f"milvus://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@pytest.mark.milvus
def test_server_process_same_results(tmp_path, milvus_server, lite, synthetic, sample_index):
    """The synthetic and the sample index in collections of a Milvus server: the same hits as in milvus-lite in
    this process (and so as exact search and hnswlib, above), filters and patient exclusion included."""
    remote = {name: _milvus_copy(path, tmp_path / name, f"{milvus_server}/{name}_cases") for name, path in lite.items()}
    rng = np.random.default_rng(9)
    _, vectors = synthetic
    for name in remote:
        with CaseIndex.open(lite[name]) as local, CaseIndex.open(remote[name]) as server:
            assert server.store_url().kind == "milvus" and server.store().count() == len(local)
            for row in rng.choice(len(local), 8):
                query = local.vectors()[1][row]
                for case_filter in (None, *FILTERS[:4]):
                    args = dict(k=K, exclude_patient="P7", case_filter=case_filter)
                    assert _ids(server.search(query, **args)) == _ids(local.search(query, **args))
    with CaseIndex.open(remote["synthetic"]) as index:
        overlaps = [len(set(_ids(index.search(vectors[r], k=K))) & set(_exact(index, vectors[r], K))) / K
                    for r in rng.choice(len(vectors), 20, replace=False)]
    assert np.mean(overlaps) >= 0.95


@pytest.mark.milvus
def test_build_index_into_a_milvus_server(tmp_path, milvus_server, sample_index):
    """`medsim build-index --vector-store milvus://…` on the sample export: the catalog as the hnswlib build's, every
    query's hits the same; a re-run adds nothing and keeps the store; `query` works unchanged."""
    from conftest import SAMPLE_DIR
    from medsim.cli import main

    path = tmp_path / "built"
    args = ["build-index", str(SAMPLE_DIR), "--index", str(path), "--labels", str(SAMPLE_DIR / "labels.csv"),
            "--model", "imagenet", "--workers", "1", "--batch-size", "4", "--no-progress", "--vector-store", f"{milvus_server}/built"]
    assert main(args) == 0
    assert main(args[:-2]) == 0  # a re-run without the flag uses the recorded store
    with CaseIndex.open(path) as milvus, CaseIndex.open(sample_index[0]) as hnsw:
        assert str(milvus.store_url()) == f"{milvus_server}/built" and milvus.store().count() == len(hnsw)
        for case in hnsw.cases():
            args = dict(k=K, exclude_patient=case.patient_id, exclude_sop_uid=case.sop_uid)
            want = [h.case.sop_uid for h in hnsw.search(hnsw.vector(case.sop_uid), **args)]
            assert [h.case.sop_uid for h in milvus.search(milvus.vector(case.sop_uid), **args)] == want
        first = hnsw.cases()[0]
    assert main(["query", first.source_path, "--index", str(path), "-k", "3"]) == 0


@pytest.fixture(scope="module")
def served_milvus_index(milvus_server, pacs, tmp_path_factory):
    """The serve tests' index (built from Orthanc over DICOMweb, calibrated) with its vectors in the Milvus server;
    every case's search there is checked against the hnswlib original first."""
    path = _milvus_copy(pacs.index_path, tmp_path_factory.mktemp("served") / "index", f"{milvus_server}/served")
    with CaseIndex.open(pacs.index_path) as hnsw, CaseIndex.open(path) as milvus:
        for case in hnsw.cases():
            args = dict(k=K, exclude_patient=case.patient_id, exclude_sop_uid=case.sop_uid)
            assert _ids(milvus.search(hnsw.vector(case.sop_uid), **args)) == _ids(
                hnsw.search(hnsw.vector(case.sop_uid), **args))
    return path


SERVER_TESTS = ("test_query_by_indexed_uids", "test_query_by_non_indexed_uids_fetches_from_the_pacs",
                "test_query_by_upload", "test_group_by_study_keeps_each_studys_best_image",
                "test_same_patient_is_excluded_unless_asked", "test_calibrated_threshold_versus_explicit_k",
                "test_index_resource", "test_case_and_thumbnail")


@pytest.mark.milvus
@pytest.mark.parametrize("name", SERVER_TESTS)
def test_serve_api_against_a_milvus_index(name, served_milvus_index, pacs, tmp_path_factory, monkeypatch):
    """A representative part of tests/test_server.py, run as it is against the same index served from Milvus (the
    API answers are compared with CaseIndex.search over that index, which the tests above tie to hnswlib)."""
    import dataclasses
    import inspect

    import test_server
    from medsim.server import Settings, create_app
    from medsim.server.state import Service

    env = dataclasses.replace(pacs, index_path=served_milvus_index)
    cache = tmp_path_factory.mktemp("milvus-served-cache")
    service = Service(Settings(index=served_milvus_index, pacs_url=pacs.url, cache_dir=cache))
    try:
        assert service.index.snapshot().index.store_url().kind == "milvus"

        def make_app(**overrides):
            return create_app(Settings(index=served_milvus_index, pacs_url=pacs.url, cache_dir=cache, **overrides),
                              service=service)

        available = {"client": make_app().test_client(), "pacs": env, "service": service, "make_app": make_app,
                     "monkeypatch": monkeypatch}
        test = getattr(test_server, name)
        test(**{p: available[p] for p in inspect.signature(test).parameters})
    finally:
        service.close()

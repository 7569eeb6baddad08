"""Hardening of the index (issue 13) on a real index of the sample PACS export: file names that are not UTF-8, a
damaged or foreign vector graph, a damaged catalog. Commands run in subprocesses, so a crash (a segfault, a
traceback) shows as what a user would see."""

import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from medsim.build import build_index
from medsim.errors import MedsimError
from medsim.index import CATALOG, VECTORS, CaseIndex
from medsim.ingest import LabelTable

from conftest import ROOT, SAMPLE_DIR, sample_manifest

ODD_NAME = b"\xff\xfe-bad.dcm"  # not UTF-8: Python sees '\udcff\udcfe-bad.dcm' (os.fsdecode)
REBUILT = "rebuilt the vector graph"
GRAPH_RECORD = "graph"  # the catalog meta key of the graph file's checksum


def _copy(index, tmp_path, name="index"):
    """A copy of the session's sample index (``index``: the sample_index fixture) to damage."""
    copy = tmp_path / name
    shutil.copytree(index[0], copy)
    return copy


def _medsim(*args, env=None, timeout=600):
    """`python -m medsim.cli ARGS` in a subprocess; (returncode, stdout, stderr)."""
    args = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]
    run = subprocess.run([sys.executable, "-m", "medsim.cli", *args], capture_output=True, cwd=ROOT,
                         env=dict(os.environ, **(env or {})), timeout=timeout)
    return run.returncode, run.stdout.decode("utf-8", "replace"), run.stderr.decode("utf-8", "replace")


def _one_line_error(rc, err, *expected):
    """A failed command as the CLI promises it: a non-zero exit (not a signal), no traceback, and one error line."""
    assert rc > 0, f"exit status {rc}: {err}"
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("medsim: error:")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    for text in expected:
        assert text in errors[0], err
    return errors[0]


def _indexed_file(index, case_id=3) -> str:
    db = sqlite3.connect(index / CATALOG)
    try:
        return db.execute("SELECT source_path FROM cases WHERE id=?", (case_id,)).fetchone()[0]
    finally:
        db.close()


def _query_json(index, file, env=None):
    rc, out, err = _medsim("query", file, "--index", index, "-k", "20", "--json", "--no-threshold",
                           "--include-same-patient", env=env)
    return rc, (json.loads(out) if rc == 0 else None), err


def _hits(result):
    return [(r["sop_uid"], r["score"]) for r in result["results"]]


def _same_hits(got, expected):
    assert [uid for uid, _ in got] == [uid for uid, _ in expected]
    assert np.allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)


# ---- 1. file names that are not UTF-8 ----------------------------------------------------------------------------

def _odd_export(tmp_path) -> bytes:
    """A folder with a real chest radiograph named b'\\xff\\xfe-bad.dcm', a truncated DICOM whose name has a byte that
    is not UTF-8 and a newline, and a text file with a Latin-1 name: indexed, failed, skipped."""
    files = {f["expected"]: f for f in sample_manifest()["files"]}
    folder = os.path.join(os.fsencode(tmp_path), b"export")
    os.mkdir(folder)
    shutil.copyfile(os.fsencode(SAMPLE_DIR / files["index"]["path"]), os.path.join(folder, ODD_NAME))
    shutil.copyfile(os.fsencode(SAMPLE_DIR / files["fail:corrupt"]["path"]), os.path.join(folder, b"broken-\x80\n.dcm"))
    with open(os.path.join(folder, b"notes-\xe9.txt"), "wb") as fh:
        fh.write(b"not an image")
    return folder


@pytest.mark.slow
def test_file_names_that_are_not_utf8_are_indexed_reported_and_known_on_rerun(bundle, tmp_path):
    folder = _odd_export(tmp_path)
    odd_path = os.fsdecode(os.path.join(folder, ODD_NAME))
    strict = {"PYTHONIOENCODING": "utf-8:strict"}  # a UTF-8 terminal: printing an undecodable name raw would fail

    # the CLI, with a worker process (the names cross a process boundary)
    cli_index = tmp_path / "cli-index"
    build = ("build-index", folder, "--index", cli_index, "--model", "imagenet", "--workers", "1", "--no-progress")
    rc, out, err = _medsim(*build, env=strict)
    assert rc == 0, err
    assert "Traceback" not in err
    assert "indexed 1 new image(s)" in out and "skipped 1 (not-an-image: 1)" in out and "failed 1 (corrupt: 1)" in out
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "broken-\\x80\\n.dcm: corrupt: " in failed[0]  # escaped, on one line
    rc, out, err = _medsim(*build, env=strict)
    assert rc == 0, err
    assert "indexed 0 new image(s)" in out and "unchanged since an earlier run (not re-read): 3" in out
    rc, out, err = _medsim("info", "--index", cli_index, env=strict)
    assert rc == 0 and "Traceback" not in err, err
    assert "1 images" in out and "failed:corrupt: 1" in out and "skipped:not-an-image: 1" in out
    rc, out, err = _medsim("info", "--index", cli_index, "--json", env=strict)
    assert rc == 0 and json.loads(out)["files"] == {"indexed": 1, "skipped": 1, "failed": 1}, err
    rc, result, err = _query_json(cli_index, odd_path, env=strict)  # found by its path: the stored vector
    assert rc == 0, err
    assert result["query"]["indexed"] is True

    # the Python API
    api_index = tmp_path / "api-index"
    report = build_index(os.fsdecode(folder), api_index, bundle, workers=0, progress=False)
    assert (report.indexed, dict(report.skipped), dict(report.failed)) == (1, {"not-an-image": 1}, {"corrupt": 1})
    assert all("\n" not in line for line in report.summary_lines())
    with CaseIndex.open(api_index) as index:
        (case,) = index.cases()
        assert os.fsencode(case.source_path) == os.path.join(folder, ODD_NAME)  # the exact bytes
        assert index.get_by_path(odd_path).sop_uid == case.sop_uid
        known = index.known_files()
        assert {os.fsencode(p) for p in known} == {os.path.join(folder, n)
                                                   for n in (ODD_NAME, b"broken-\x80\n.dcm", b"notes-\xe9.txt")}
        assert index.stats()["files"] == {"indexed": 1, "skipped": 1, "failed": 1}
    again = build_index(os.fsdecode(folder), api_index, bundle, workers=0, progress=False)
    assert (again.indexed, again.unchanged, again.total_cases) == (0, 3, 1)


# ---- 2. the vector graph: bit flips, a graph left by a lost catalog ----------------------------------------------

ELEMENT = 4 + 4 * 64 + 4 * 512 + 8  # a level-0 record of the sample index (M=32, 512-d): count, links, vector, label


def _flip(file, seed, region, flips=6):
    """Flip random bits of the sample index's graph (16 elements, all on level 0) in one region: the header, the
    level-0 link lists, the vectors, or the 16 upper-level size words at the end."""
    data = bytearray(file.read_bytes())
    rng = np.random.default_rng(seed)
    for _ in range(flips):
        element = int(rng.integers(0, 16))
        offset = {"header": lambda: int(rng.integers(0, 96)),
                  "links": lambda: 96 + element * ELEMENT + int(rng.integers(4, 260)),
                  "vectors": lambda: 96 + element * ELEMENT + int(rng.integers(260, 260 + 2048)),
                  "tail": lambda: len(data) - 4 * int(rng.integers(1, 17)) + int(rng.integers(0, 4))}[region]()
        data[offset] ^= 1 << int(rng.integers(0, 8))
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("region,seeds", [("header", (0, 1, 2)), ("links", (2, 3, 4)), ("vectors", (5, 6)),
                                          ("tail", (7, 8))])
def test_bit_flipped_graph_is_rebuilt_and_query_answers_as_before(sample_index, tmp_path, region, seeds):
    copy = _copy(sample_index, tmp_path)
    query = _indexed_file(copy)
    rc, before, err = _query_json(copy, query)
    assert rc == 0 and REBUILT not in err, err
    pristine = (copy / VECTORS).read_bytes()
    outcomes = {}
    for seed in seeds:
        (copy / VECTORS).write_bytes(pristine)
        _flip(copy / VECTORS, seed, region)
        assert (copy / VECTORS).read_bytes() != pristine
        outcomes[seed] = _query_json(copy, query)
    assert {seed: rc for seed, (rc, _, _) in outcomes.items()} == dict.fromkeys(seeds, 0), \
        "exit status (negative: killed by a signal): " + "\n".join(err for _, _, err in outcomes.values())
    for seed, (_, after, err) in outcomes.items():
        _same_hits(_hits(after), _hits(before))
        assert REBUILT in err and VECTORS in err, err


def test_build_index_that_adds_nothing_repairs_the_graph(sample_index, bundle, tmp_path):
    copy = _copy(sample_index, tmp_path)
    _flip(copy / VECTORS, seed=11, region="links")
    damaged = (copy / VECTORS).read_bytes()
    report = build_index(SAMPLE_DIR, copy, bundle, labels=LabelTable.from_csv(SAMPLE_DIR / "labels.csv"),
                         workers=0, progress=False)
    assert report.indexed == 0 and report.total_cases == 16
    repaired = (copy / VECTORS).read_bytes()
    assert repaired != damaged
    db = sqlite3.connect(copy / CATALOG)
    record = json.loads(db.execute("SELECT value FROM meta WHERE key=?", (GRAPH_RECORD,)).fetchone()[0])
    db.close()
    assert record["sha256"] == hashlib.sha256(repaired).hexdigest() and record["count"] == 16
    rc, _, err = _query_json(copy, _indexed_file(copy))
    assert rc == 0 and REBUILT not in err, err


def test_catalog_lost_and_rebuilt_in_the_same_folder_does_not_reuse_the_old_graph(sample_index, bundle, tmp_path):
    copy = _copy(sample_index, tmp_path)
    with CaseIndex.open(copy) as index:  # images that had other ids: the new catalog numbers them 1, 2, ...
        later = [c.source_path for c in index.cases() if c.id > 10]
    subset = tmp_path / "subset"
    subset.mkdir()
    for i, source in enumerate(later):
        shutil.copyfile(source, subset / f"{i:02d}.dcm")
    (copy / CATALOG).unlink()
    old_graph = (copy / VECTORS).read_bytes()
    report = build_index(subset, copy, bundle, workers=0, progress=False)
    assert report.total_cases == len(later) > 1
    assert (copy / VECTORS).read_bytes() != old_graph
    with CaseIndex.open(copy) as index:
        ids, vectors = index.vectors()
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        for i, vector in enumerate(vectors):
            hits = index.search(vector, k=len(ids))
            brute = unit @ (vector / np.linalg.norm(vector))
            order = np.argsort(-brute, kind="stable")
            assert [h.case.id for h in hits] == ids[order].tolist()
            assert np.allclose([h.score for h in hits], brute[order], atol=1e-5)
    rc, result, err = _query_json(copy, subset / "00.dcm")
    assert rc == 0, err
    assert len(result["results"]) == len(later) - 1


# ---- 12. a damaged catalog ---------------------------------------------------------------------------------------

def _damage_catalog(file, kind):
    data = file.read_bytes()
    if kind == "empty":
        file.write_bytes(b"")
    elif kind == "text":
        file.write_text("patient_id,labels\nP1,Pneumonia\n")
    elif kind == "truncated":
        file.write_bytes(data[: len(data) * 3 // 5])
    elif kind == "header-flip":  # the page size (4096 -> 4352)
        damaged = bytearray(data)
        damaged[16] ^= 0x01
        file.write_bytes(bytes(damaged))
    elif kind == "page-flips":  # the b-tree page type byte of every page after the first
        damaged = bytearray(data)
        page = int.from_bytes(data[16:18], "big")
        for offset in range(page, len(data), page):
            damaged[offset] ^= 0x80
        file.write_bytes(bytes(damaged))
    else:
        raise AssertionError(kind)


CATALOG_DAMAGE = ("empty", "text", "truncated", "header-flip", "page-flips")


@pytest.mark.slow
@pytest.mark.parametrize("kind", CATALOG_DAMAGE)
def test_damaged_catalog_gives_one_line_errors(sample_index, tmp_path, kind):
    copy = _copy(sample_index, tmp_path)
    query = _indexed_file(copy)
    _damage_catalog(copy / CATALOG, kind)
    damaged = (copy / CATALOG).read_bytes()
    expected = (str(copy), f"{CATALOG} is damaged", "medsim build-index")
    rc, out, err = _medsim("info", "--index", copy)
    _one_line_error(rc, err, *expected)
    rc, out, err = _medsim("query", query, "--index", copy)
    _one_line_error(rc, err, *expected)
    rc, out, err = _medsim("build-index", SAMPLE_DIR, "--index", copy, "--model", "imagenet", "--workers", "0",
                           "--no-progress")
    _one_line_error(rc, err, *expected)
    rc, out, err = _serve(copy)
    _one_line_error(rc, err, *expected)
    assert (copy / CATALOG).read_bytes() == damaged  # nothing wrote to it


def _serve(index, timeout=120):
    """`medsim serve` on a free port: it must refuse at start (the index is opened before it listens)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        return _medsim("serve", "--index", index, "--port", port, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("medsim serve started on a damaged index")


@pytest.mark.parametrize("seed", range(4))
def test_catalog_with_random_bit_flips_never_gives_a_traceback(sample_index, tmp_path, seed):
    copy = _copy(sample_index, tmp_path)
    query = _indexed_file(copy)
    data = bytearray((copy / CATALOG).read_bytes())
    rng = np.random.default_rng(seed)
    for _ in range(40):
        data[int(rng.integers(100, len(data)))] ^= 1 << int(rng.integers(0, 8))
    (copy / CATALOG).write_bytes(bytes(data))
    for args in (("info", "--index", copy), ("query", query, "--index", copy, "--json")):
        rc, out, err = _medsim(*args)
        if rc:
            _one_line_error(rc, err, str(copy))
        assert "Traceback" not in err, err


def test_catalog_bit_flips_through_the_api_raise_only_index_format_errors(sample_index, tmp_path):
    """Many seeds in-process: every read the commands and the server make either works or raises MedsimError."""
    copy = _copy(sample_index, tmp_path)
    pristine = (copy / CATALOG).read_bytes()
    outcomes = {"ok": 0, "error": 0}
    for seed in range(60):
        data = bytearray(pristine)
        rng = np.random.default_rng(1000 + seed)
        for _ in range(int(rng.integers(1, 30))):
            data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        (copy / CATALOG).write_bytes(bytes(data))
        for writable in (False, True):
            try:
                with CaseIndex.open(copy, writable=writable) as index:
                    index.stats()
                    index.known_files()
                    index.file_records()
                    cases = index.cases()
                    _, vectors = index.vectors()
                    if len(vectors):
                        index.search(vectors[0], k=5, exclude_patient=cases[0].patient_id)
                        index.vector(cases[0].sop_uid)
                outcomes["ok"] += 1
            except MedsimError as exc:
                assert "\n" not in str(exc)
                outcomes["error"] += 1
    assert outcomes["error"] > 0


@pytest.mark.parametrize("damage", ["short-vector", "wrong-dim"])
def test_short_vector_or_wrong_dimension_is_a_one_line_error(sample_index, tmp_path, damage):
    copy = _copy(sample_index, tmp_path)
    query = _indexed_file(copy, case_id=5)
    db = sqlite3.connect(copy / CATALOG)
    with db:
        if damage == "short-vector":
            db.execute("UPDATE cases SET vector=? WHERE id=3", (b"\x00" * 100,))
        else:
            db.execute("UPDATE meta SET value='256' WHERE key='dim'")
    db.close()
    expected = "case 3 has a vector of 100 bytes" if damage == "short-vector" else "256 dimensions need 1024"
    rc, out, err = _medsim("query", query, "--index", copy)
    _one_line_error(rc, err, f"{CATALOG} is damaged", expected)
    rc, out, err = _serve(copy)
    _one_line_error(rc, err, f"{CATALOG} is damaged", expected)

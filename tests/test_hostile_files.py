"""Hostile files (issue 13): every file of the hostile corpus ends as an image, a skip or a failure with a one-line
reason, never another exception, never NaN pixels, never a shape the header does not declare; and `medsim build-index`
over the whole corpus sorts every file and indexes only finite vectors."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import pydicom
import pytest

from medsim.errors import ReadFailure, SkipFile
from medsim.ingest import read_any

from hostile_corpus import CLASSES, HostileFile, build_corpus, build_non_utf8_corpus, summary

MAX_REFUSAL_MIB = 64  # a deflate bomb or a 9999 x 9999 header is refused without allocating more than this


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple:
    folder = tmp_path_factory.mktemp("hostile") / "corpus"
    return folder, build_corpus(folder, non_utf8_name=False)


@pytest.fixture(scope="module")
def non_utf8_corpus(tmp_path_factory) -> tuple:
    folder = tmp_path_factory.mktemp("hostile-name") / "corpus"
    return folder, build_non_utf8_corpus(folder)


def _read(path) -> tuple[str, str, object]:
    """(outcome, detail, radiograph): outcome is "indexed", "skipped:<reason>", "failed:<reason>" or
    "exception:<type>" (the last is always a bug)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            radiograph = read_any(path)
    except SkipFile as exc:
        return f"skipped:{exc.reason}", str(exc), None
    except ReadFailure as exc:
        return f"failed:{exc.reason}", str(exc), None
    except Exception as exc:  # noqa: BLE001 - this is what the test is looking for
        return f"exception:{type(exc).__name__}", f"{type(exc).__name__}: {exc}"[:300], None
    return "indexed", "", radiograph


def _header_shape(path) -> tuple[int, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    return int(ds.Rows), int(ds.Columns)


def _problems(f: HostileFile) -> list[str]:
    outcome, detail, radiograph = _read(f.path)
    problems = []
    if not f.allows(outcome):
        problems.append(f"{outcome} ({detail}), expected {' or '.join(f.expected)}")
    if outcome != "indexed":
        if "\n" in detail or len(detail) >= 400 or not detail:
            problems.append(f"reason is not one short line: {detail!r}")
        if "unexpected" in detail and "failed:*" not in f.expected:  # the reader's safety net, not a deliberate check
            problems.append(f"reached the safety net: {detail}")
        return problems
    pixels = radiograph.pixels
    if pixels.dtype != np.float32 or pixels.ndim != 2:
        problems.append(f"pixels {pixels.dtype} {pixels.shape}")
    elif not np.isfinite(pixels).all():
        problems.append(f"{int((~np.isfinite(pixels)).sum())} non-finite pixels")
    elif pixels.min() < 0 or pixels.max() > 1:
        problems.append(f"pixels outside [0, 1]: {pixels.min()}..{pixels.max()}")
    elif pixels.shape != _header_shape(f.path):
        problems.append(f"pixels {pixels.shape}, header {_header_shape(f.path)}")
    return problems


def test_corpus_covers_every_class_with_several_variants(corpus):
    _, files = corpus
    counts = summary(files)
    assert set(counts) == set(CLASSES) - {"non-utf8-name"}
    fewer = {"deflate-bomb": 3, "unknown-ts": 3, "multi-uid": 3, "ybr-in-mono": 3}  # three variants suffice
    for cls, n in counts.items():
        assert n >= fewer.get(cls, 4), (cls, n)
    assert counts["truncated"] >= 48
    assert sum(f.expected == ("indexed",) for f in files) >= 10  # a few valid files among the hostile ones


@pytest.mark.parametrize("cls", [c for c in CLASSES if c != "non-utf8-name"])
def test_every_hostile_file_gets_a_clean_outcome(corpus, cls):
    """read_any: a Radiograph of finite pixels in [0, 1] with the header's shape, or SkipFile/ReadFailure with a
    one-line reason, and the outcome the class expects."""
    _, files = corpus
    problems = {f.variant: p for f in files if f.cls == cls for p in [_problems(f)] if p}
    assert not problems, problems


def test_non_utf8_file_name_is_read(non_utf8_corpus):
    _, files = non_utf8_corpus
    assert len(files) == 1 and os.fsencode(files[0].path.name) == b"\xff\xfe.dcm"
    assert _problems(files[0]) == []


@pytest.mark.parametrize("cls", ["deflate-bomb", "huge-header"])
def test_bombs_and_huge_headers_are_refused_before_allocating(corpus, cls):
    _, files = corpus
    for f in (f for f in files if f.cls == cls):
        tracemalloc.start()
        try:
            outcome, detail, _ = _read(f.path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert outcome.startswith("failed:"), (f.variant, outcome, detail)
        assert peak < MAX_REFUSAL_MIB * 2**20, (f.variant, outcome, f"{peak / 2**20:.0f} MiB")


def _build_index(source, index, tmp_path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "medsim.cli", "build-index", str(source), "--index", str(index), "--model",
           "imagenet", "--workers", "1", "--batch-size", "8", "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=1800, cwd=tmp_path)


def _ledger_problems(index, files: list[HostileFile]) -> tuple[dict, list[str]]:
    from medsim.index import CaseIndex

    with CaseIndex.open(index) as opened:
        records = {os.path.realpath(r.path): r for r in opened.file_records()}
        _, vectors = opened.vectors()
    problems, counts = [], {}
    for f in files:
        record = records.get(os.path.realpath(f.path))
        if record is None:
            problems.append(f"{f.variant}: not in the ledger")
            continue
        outcome = "indexed" if record.status == "indexed" else f"{record.status}:{record.reason}"
        counts[outcome] = counts.get(outcome, 0) + 1
        if not f.allows(outcome):
            problems.append(f"{f.variant}: {outcome} ({record.detail}), expected {' or '.join(f.expected)}")
        if record.status != "indexed" and ("\n" in (record.detail or "") or not record.detail):
            problems.append(f"{f.variant}: reason detail not one line: {record.detail!r}")
    if len(vectors) != counts.get("indexed", 0):
        problems.append(f"{len(vectors)} vectors for {counts.get('indexed', 0)} indexed files")
    if not np.isfinite(vectors).all():
        problems.append("non-finite vectors in the index")
    return counts, problems


@pytest.mark.slow
def test_build_index_sorts_the_whole_corpus(corpus, tmp_path):
    folder, files = corpus
    index = tmp_path / "index"
    result = _build_index(folder, index, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    counts, problems = _ledger_problems(index, files)
    assert not problems, problems
    print("build-index over the hostile corpus:", dict(sorted(counts.items())))
    assert counts["indexed"] >= 10 and counts["failed:corrupt"] >= 100


@pytest.mark.slow
def test_build_index_records_a_non_utf8_file_name(non_utf8_corpus, tmp_path):
    """Issue 13 point 1 (the ledger in index.py; was xfail until index.py stored non-UTF-8 paths)."""
    folder, files = non_utf8_corpus
    index = tmp_path / "index"
    result = _build_index(folder, index, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-3000:]
    counts, problems = _ledger_problems(index, files)
    assert not problems and counts == {"indexed": 1}, (counts, problems)


def test_png_with_a_non_utf8_name_gets_a_stable_pseudo_uid(tmp_path):
    """PNG/JPEG files get UIDs from their path; a name that is not UTF-8 must still get one (the same every time),
    and UTF-8 names keep the UIDs they always had."""
    from PIL import Image

    from medsim.ingest import pseudo_uid

    Image.fromarray(np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)).save(tmp_path / "ok.png")
    odd = os.path.join(os.fsencode(tmp_path), b"\xff\xfe-odd.png")
    os.link(os.fsencode(tmp_path / "ok.png"), odd)
    first = read_any(os.fsdecode(odd), root=tmp_path)
    again = read_any(os.fsdecode(odd), root=tmp_path)
    assert first.sop_uid == again.sop_uid and first.sop_uid.startswith("2.25.")
    assert first.sop_uid != read_any(tmp_path / "ok.png", root=tmp_path).sop_uid
    assert pseudo_uid("sop", "a/b.png") == "2.25.249839480350448749841733782377148542353"  # as before the fix

"""`build-index --ray` on a real two-node Ray cluster (tests/ray_fixtures.py): the same index as the local build, the
same incremental and resumable behaviour, also when the worker node dies in the middle of a build; and a DICOMweb
source (the Orthanc of tests/orthanc_fixtures.py) fetched by the nodes.

The source: the sample PACS export (16 chest radiographs, a CT, an SR, a truncated file, text files, a byte-identical
copy) plus a slice of ../shared/data (its 3 DICOMs, two of which share a SOP Instance UID with different pixels, and 8
JPEG radiographs). Each node has one CPU and the pipeline needs one for its embedding actor and one for a decoding
task, so a build that finishes has used both nodes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from conftest import SAMPLE_DIR, SHARED_CXR, SHARED_DICOM, sample_manifest
from medsim.build import build_index
from medsim.cli import main
from medsim.index import CaseIndex
from medsim.ingest import LabelTable
from orthanc_fixtures import pacs  # noqa: F401
from ray_fixtures import descendants, listening_addresses, ray_cluster  # noqa: F401

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

BATCH = 4


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The sample export with a slice of the shared data beside it; the labels file of the sample."""
    sample_manifest()
    root = tmp_path_factory.mktemp("ray-export") / "export"
    shutil.copytree(SAMPLE_DIR, root)
    shared = root / "shared"
    shared.mkdir()
    for dicom in sorted(SHARED_DICOM.glob("*.dcm")):
        shutil.copy(dicom, shared / dicom.name)
    rows = list(csv.DictReader(open(SHARED_CXR / "labels.csv")))
    for row in [r for r in rows if r["source"] == "kermany"][:4] + [r for r in rows if r["source"] == "nih"][:4]:
        shutil.copy(SHARED_CXR / row["path"], shared / row["path"].replace("/", "_"))
    return root, LabelTable.from_csv(root / "labels.csv")


@pytest.fixture(scope="module")
def local_fp32(export, bundle, tmp_path_factory):
    """The local build of the export in float32 (the reference for vectors, counts and reasons)."""
    root, labels = export
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSIM_EMBED_MODE", "fp32")
        path = tmp_path_factory.mktemp("local") / "index"
        report = build_index(root, path, bundle, labels=labels, workers=0, batch_size=BATCH, progress=False)
    return path, report


def test_a_ray_started_for_the_run_listens_on_loopback_only():
    """`--ray` without an address starts a Ray of this machine: none of its processes may listen beyond 127.0.0.1.
    (First in the module: it needs this process not yet connected to the cluster below.)"""
    from medsim.build_ray import _connect

    before = descendants(os.getpid())  # servers that earlier tests started (Orthanc, say) are not Ray's
    assert _connect(None)
    import ray

    try:
        addresses = listening_addresses((descendants(os.getpid()) - before) | {os.getpid()})
    finally:
        ray.shutdown()
    assert addresses and addresses <= {"127.0.0.1"}, addresses


def test_an_unreachable_cluster_is_one_line_and_no_index(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["build-index", str(SAMPLE_DIR), "--index", str(tmp_path / "idx"), "--model", "imagenet",
                 "--no-progress", "--ray", f"127.0.0.1:{port}"]) == 2
    assert f"the Ray cluster at 127.0.0.1:{port} is unreachable" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_cluster_build_equals_the_local_build(ray_cluster, export, local_fp32, tmp_path, monkeypatch, capsys):
    root, _ = export
    local_path, local = local_fp32
    monkeypatch.setenv("MEDSIM_EMBED_MODE", "fp32")  # passed on to the actors
    path, summary = tmp_path / "index", tmp_path / "report.json"
    assert main(["build-index", str(root), "--index", str(path), "--labels", str(root / "labels.csv"), "--model",
                 "imagenet", "--batch-size", str(BATCH), "--no-progress", "--report", str(summary),
                 "--ray", ray_cluster.address]) == 0
    out = capsys.readouterr().out
    assert "embedding mode: fp32 (float32, contiguous), cpu, batch 4" in out and "(Ray actors)" in out
    report = json.loads(summary.read_text())
    assert report["indexed"] == local.indexed == 26 and report["total_cases"] == local.total_cases
    assert report["skipped"] == dict(local.skipped) == {"duplicate-sop-uid": 2, "not-an-image": 4,
                                                        "not-chest-radiograph": 1}
    assert report["failed"] == dict(local.failed) == {"corrupt": 1}
    assert [f["path"] for f in report["failures"]] == [f.path for f in local.failures]
    with CaseIndex.open(path) as ray_index, CaseIndex.open(local_path) as local_index:
        assert ray_index.meta["model_fingerprint"] == local_index.meta["model_fingerprint"]
        assert Counter((f.status, f.reason) for f in ray_index.file_records()) == \
            Counter((f.status, f.reason) for f in local_index.file_records())
        assert len(ray_index.file_records()) == len(local_index.file_records()) == 34
        by_path = {c.source_path: c for c in local_index.cases()}
        # the same files: of two with one SOP UID (the sample's copies) both builds index the first listed, since
        # outcomes arrive in the files' order on Ray as locally, whichever task finishes first
        assert {c.source_path for c in ray_index.cases()} == set(by_path)
        for case in ray_index.cases():
            twin = by_path[case.source_path]
            assert (case.sop_uid, case.patient_id, case.labels, case.pixel_hash, case.view) == \
                (twin.sop_uid, twin.patient_id, twin.labels, twin.pixel_hash, twin.view)
            assert float(ray_index.vector(case.sop_uid) @ local_index.vector(twin.sop_uid)) >= 0.9999


def test_rerun_on_the_cluster_reads_only_what_is_new(ray_cluster, export, local_fp32, bundle, tmp_path):
    from medsim.build_ray import RayExecutor

    root, labels = export
    copy = tmp_path / "index"
    shutil.copytree(local_fp32[0], copy)  # a local index continued on the cluster: the same ledger decides
    again = build_index(root, copy, bundle, labels=labels, batch_size=BATCH, progress=False,
                        executor=RayExecutor(ray_cluster.address))
    assert again.indexed == 0 and again.unchanged == 34 and again.total_cases == 26
    extra = tmp_path / "extra"
    extra.mkdir()
    row = next(r for r in csv.DictReader(open(SHARED_CXR / "labels.csv")) if r["source"] == "rsna")
    shutil.copy(SHARED_CXR / row["path"], extra / "new.jpg")
    added = build_index(extra, copy, bundle, batch_size=BATCH, progress=False,
                        executor=RayExecutor(ray_cluster.address))
    assert added.indexed == 1 and added.total_cases == 27


def test_cluster_build_from_a_pacs(ray_cluster, pacs, tmp_path):
    """A DICOMweb source on the cluster: the driver lists (QIDO-RS), the decoding tasks fetch (WADO-RS) on the nodes;
    the same cases, keyed by their WADO-RS URLs, as the local build from the same PACS."""
    from medsim.build_ray import RayExecutor
    from medsim.search import bundle_for_index

    with CaseIndex.open(pacs.index_path) as index:
        bundle = bundle_for_index(index)
    report = build_index(pacs.url, tmp_path / "index", bundle, batch_size=BATCH, progress=False,
                         executor=RayExecutor(ray_cluster.address))
    expected = pacs.indexed + pacs.pacs_only
    assert report.indexed == len(expected) and not report.failed
    with CaseIndex.open(tmp_path / "index") as index:
        cases = {c.sop_uid: c for c in index.cases()}
        assert set(cases) == {i.sop_uid for i in expected}
        for instance in expected:
            assert cases[instance.sop_uid].source_path == pacs.client.instance_url(*instance.uids.values())


def test_a_lost_worker_node_loses_and_repeats_nothing(ray_cluster, export, local_fp32, bundle, tmp_path):
    """`build-index --ray` (its own process) loses the worker node once the first batch is committed; Ray re-runs
    the lost work elsewhere (or the run fails); a second run adds exactly what is missing. Nothing is lost, nothing is
    indexed or recorded twice."""
    from medsim.build_ray import RayExecutor, bundle_folders

    root, labels = export
    path = tmp_path / "index"
    cmd = [sys.executable, "-m", "medsim.cli", "build-index", str(root), "--index", str(path), "--labels",
           str(root / "labels.csv"), "--model", "imagenet", "--batch-size", str(BATCH), "--no-progress",
           "--report", str(tmp_path / "first.json"), "--ray", ray_cluster.address]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    committed, deadline = 0, time.monotonic() + 300
    while committed < BATCH and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            with sqlite3.connect(f"file:{path / 'catalog.sqlite'}?mode=ro", uri=True, timeout=1) as db:
                committed = db.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
        except sqlite3.Error:
            committed = 0
    assert process.poll() is None and BATCH <= committed < 26, "the worker node was not killed during the build"
    ray_cluster.kill_worker()
    _, err = process.communicate(timeout=300)
    assert process.returncode in (0, 2), err[-3000:]  # finished despite the loss, or failed with one line
    first = json.loads((tmp_path / "first.json").read_text())["indexed"] if process.returncode == 0 else None
    assert process.returncode == 0 or "the Ray pipeline failed" in err
    second = build_index(root, path, bundle, labels=labels, batch_size=BATCH, progress=False,
                         executor=RayExecutor(ray_cluster.address))
    if first is not None:
        assert first + second.indexed == 26
    assert second.total_cases == 26
    with CaseIndex.open(path) as index, CaseIndex.open(local_fp32[0]) as local:
        records = index.file_records()
        assert len(records) == len({r.path for r in records}) == 34
        assert Counter((f.status, f.reason) for f in records) == Counter((f.status, f.reason)
                                                                         for f in local.file_records())
        cases = index.cases()
        assert len(cases) == len({c.sop_uid for c in cases}) == len(index.vectors()[0]) == 26
        assert {c.sop_uid for c in cases} == {c.sop_uid for c in local.cases()}
        assert np.allclose(np.linalg.norm(index.vectors()[1], axis=1), 1.0, atol=1e-4)
    # the killed node's actors ran no cleanup; the re-run's actors removed their bundle copies and the dead ones'
    stale = list(bundle_folders().iterdir()) if bundle_folders().exists() else []
    assert not stale, f"bundle copies left on the node: {stale}"


def test_gpu_actors_go_to_the_gpu_node_and_a_node_without_cuda_fails_in_one_line(ray_cluster, export, bundle,
                                                                                tmp_path, capsys):
    """A third node declares two GPUs to Ray (logical: this machine has none). The build plans one embedding actor
    per GPU, each holding one, and Ray places them there; torch on that node sees no CUDA device, so the build stops
    with one line naming the node and the GPU Ray gave the actor, and writes no vector (``embedding_plan``: no CPU
    fallback). With the node gone, the same command builds the index on the CPU actors."""
    import ray
    import torch

    from medsim.build_ray import RayExecutor
    from ray_fixtures import NODE_OBJECT_STORE_BYTES

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here: a GPU actor would embed, not fail")
    source = tmp_path / "four"
    source.mkdir()
    for jpeg in sorted((export[0] / "shared").glob("*.jpg"))[:4]:
        shutil.copy(jpeg, source / jpeg.name)
    path = tmp_path / "index"
    command = ["build-index", str(source), "--index", str(path), "--model", "imagenet", "--batch-size", str(BATCH),
               "--no-progress", "--ray", ray_cluster.address]
    gpu_node = ray_cluster.cluster.add_node(node_ip_address="127.0.0.1", num_cpus=2, num_gpus=2,
                                            object_store_memory=NODE_OBJECT_STORE_BYTES)
    ray.init(address=ray_cluster.address, logging_level="WARNING")
    try:
        assert RayExecutor(ray_cluster.address).plan(ray.cluster_resources()) == (2, 1, "cuda")
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err
        line = next(x for x in err.splitlines() if "could not start" in x)
        assert re.search(rf"an embedding actor could not start: Ray node 127\.0\.0\.1 \(ID {gpu_node.node_id[:8]}, "
                         r"given GPU [01]\): no CUDA device is visible to torch here \(torch .*CUDA_VISIBLE_DEVICES="
                         r"'[01]'\)", line), line
        actors = [a for a in ray._private.state.actors().values()
                  if "_Embed" in a["ActorClassName"] and a["JobID"] == ray.get_runtime_context().get_job_id()]
        assert len(actors) == 2 and {a["Address"]["NodeID"] for a in actors} == {gpu_node.node_id}, actors
        with CaseIndex.open(path) as index:
            assert len(index) == 0 and not index.file_records()
    finally:
        ray.shutdown()
        ray_cluster.cluster.remove_node(gpu_node)
    assert main(command) == 0
    assert "(Ray actors)" in capsys.readouterr().out
    with CaseIndex.open(path) as index:
        assert len(index) == 4

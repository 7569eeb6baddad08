"""`medsim watch` (issue 16): new studies in the PACS become findable without a rebuild or a server restart, deleted
ones leave the index, a killed watcher resumes without losing or repeating anything, an unreachable PACS is retried
with back-off. Against a real Orthanc of its own (not the session's shared one: these tests add and delete studies).

The tombstone tests at the top need no PACS."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_DIR, sample_manifest
from orthanc_fixtures import closed_port_url, live_server

# ---- tombstones in the index (no PACS) ---------------------------------------------------------------------------


def _case(i: int, study: str, patient: str = "P"):
    from medsim.index import Case

    return Case(sop_uid=f"1.2.{i}", series_uid=f"1.3.{study}", study_uid=f"1.4.{study}", patient_id=f"{patient}{i}",
                source_path=f"http://pacs/dicom-web/studies/1.4.{study}/series/1.3.{study}/instances/1.2.{i}")


def _small_index(path: Path, n: int = 40):
    from medsim.index import CaseIndex, FileRecord

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    cases = [_case(i, str(i // 4)) for i in range(n)]
    with CaseIndex.create(path, model_fingerprint="fp", model_name="test", dim=8) as index:
        index.add(cases, vectors, "fp", files=[FileRecord(c.source_path, 1, 0.0, "indexed", sop_uid=c.sop_uid)
                                               for c in cases])
    return cases, vectors


def test_removed_studies_leave_search_counts_and_graph(tmp_path):
    from medsim.index import CaseIndex

    _, vectors = _small_index(tmp_path / "idx")
    with CaseIndex.open(tmp_path / "idx") as index:
        key_before = index.state_key()
        assert index.search(vectors[0], k=1)[0].case.sop_uid == "1.2.0"
    with CaseIndex.open(tmp_path / "idx", writable=True) as index:
        assert index.remove_studies(["1.4.0", "1.4.404"], meta={"watch": {"last_change": 7}}) == 4
        assert len(index) == 36
        assert all(h.case.study_uid != "1.4.0" for h in index.search(vectors[0], k=36))
    with CaseIndex.open(tmp_path / "idx") as index:  # a fresh reader: the saved graph has the elements marked
        assert index.state_key() != key_before
        assert index.meta["watch"] == {"last_change": 7}
        assert len(index) == 36 and index.stats()["cases"] == 36 and index.stats()["removed"] == 4
        assert index.stats()["files"] == {"indexed": 36, "removed": 4}
        hits = index.search(vectors[0], k=36)
        assert len(hits) == 36 and all(h.case.study_uid != "1.4.0" for h in hits)
        assert {t["sop_uid"] for t in index.removed("1.4.0")} == {"1.2.0", "1.2.1", "1.2.2", "1.2.3"}
        assert not index.has_sop_uid("1.2.0")


def test_removal_with_a_stale_graph_and_a_rebuilt_graph(tmp_path):
    """A graph saved before the removal (a reader that loads it) and a rebuilt one (graph file lost) both leave the
    removed cases out."""
    from medsim.index import VECTORS, CaseIndex

    _, vectors = _small_index(tmp_path / "idx")
    stale = (tmp_path / "idx" / VECTORS).read_bytes()
    with CaseIndex.open(tmp_path / "idx", writable=True) as index:
        index.remove_studies(["1.4.1"])
    (tmp_path / "idx" / VECTORS).unlink()
    with CaseIndex.open(tmp_path / "idx") as index:
        assert all(h.case.study_uid != "1.4.1" for h in index.search(vectors[4], k=36))
        assert index.store().graph.get_current_count() == 36  # rebuilt from the catalog: no removed element at all
    (tmp_path / "idx" / VECTORS).write_bytes(stale)  # not the recorded graph: rebuilt too, never trusted
    with CaseIndex.open(tmp_path / "idx") as index:
        assert len(index.search(vectors[4], k=36)) == 36


def test_server_snapshot_picks_up_a_removal(tmp_path):
    from medsim.index import CaseIndex
    from medsim.server.state import ServedIndex

    _, vectors = _small_index(tmp_path / "idx")
    served = ServedIndex.open(tmp_path / "idx")
    try:
        assert len(served) == 40
        with CaseIndex.open(tmp_path / "idx", writable=True) as index:
            index.remove_studies(["1.4.2"])
        assert served.refresh()
        assert len(served) == 36 and served.stats()["cases"] == 36
        assert all(h.case.study_uid != "1.4.2" for h in served.search(vectors[8], k=40))
        assert served.get("1.2.8") is None
    finally:
        served.close()


def test_orthanc_root_from_dicomweb_url():
    from medsim.watch import orthanc_root

    assert orthanc_root("http://127.0.0.1:8042/dicom-web") == "http://127.0.0.1:8042"
    assert orthanc_root("https://pacs.example/orthanc/dicom-web/") == "https://pacs.example/orthanc"


# ---- against a real Orthanc ---------------------------------------------------------------------------------------

def _rows():
    return sample_manifest()["files"]


def _chest_files() -> list[Path]:
    return [SAMPLE_DIR / r["path"] for r in _rows() if r["expected"] == "index"]


def _ct_file() -> Path:
    return next(SAMPLE_DIR / r["path"] for r in _rows() if r["expected"] == "skip:not-chest-radiograph")


def new_study(source: Path, out: Path, patient: str, instances: int = 1, tag: str = "",
              study_date: str | None = None) -> dict:
    """``instances`` copies of ``source`` as one new study of a new patient (fresh UIDs): identical pixels, so a
    query with ``source`` finds them first."""
    import pydicom
    from pydicom.uid import generate_uid

    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    files, sops = [], []
    for i in range(instances):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName = patient, f"Watch^{patient}"
        ds.InstanceNumber = i + 1
        if study_date:
            ds.StudyDate = study_date
        path = out / f"{tag}{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sops.append(str(ds.SOPInstanceUID))
    return {"study_uid": str(study), "series_uid": str(series), "sop_uids": sops, "files": files,
            "patient_id": patient}


class Env:
    def __init__(self, orthanc, client, index: Path, work: Path, bundle, chest: list[Path]):
        self.orthanc, self.client, self.index, self.work, self.bundle, self.chest = (orthanc, client, index, work,
                                                                                     bundle, chest)

    def rest(self, method: str, path: str):
        import requests

        return requests.request(method, f"{self.orthanc.url}/{path.lstrip('/')}", timeout=10)

    def orthanc_study_id(self, study_uid: str) -> str:
        import requests

        found = requests.post(f"{self.orthanc.url}/tools/lookup", data=study_uid, timeout=10)
        return next(r["ID"] for r in found.json() if r["Type"] == "Study")


@pytest.fixture(scope="module")
def watch_env(tmp_path_factory, bundle):
    """An Orthanc of this module's own with 6 sample chest radiographs, and an index of them made by one watcher
    round (change feed)."""
    from orthanc_fixtures import _ensure_orthanc

    from medsim.dicomweb import DicomWebClient
    from medsim.orthanc import LocalOrthanc
    from medsim.watch import WatchConfig, Watcher

    _ensure_orthanc()
    work = tmp_path_factory.mktemp("watch")
    orthanc = LocalOrthanc(work / "orthanc").start()
    try:
        client = DicomWebClient(orthanc.dicomweb_url)
        chest = _chest_files()
        assert client.store_files(chest[:6]).stored == 6
        env = Env(orthanc, client, work / "index", work, bundle, chest)
        watcher = Watcher(WatchConfig(orthanc.dicomweb_url, env.index, reconcile_every=0), bundle)
        _until(lambda: watcher.cycle().indexed == 0 and _count(env.index) == 6, 60, "the first 6 studies indexed")
        yield env
    finally:
        orthanc.cleanup()


def _count(index: Path, study_uid: str | None = None) -> int:
    from medsim.index import CaseIndex

    if not (index / "catalog.sqlite").exists():
        return 0
    with CaseIndex.open(index) as opened:
        return len(opened) if study_uid is None else sum(c.study_uid == study_uid for c in opened.cases())


def _until(check, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


@pytest.fixture
def running(watch_env, tmp_path):
    """A copy of the module's index, a watcher thread following the PACS into it (0.5 s rounds, deletions checked
    every second) and a live server over it (index checked every 0.3 s); yields (env, watcher, base URL, index)."""
    from medsim.server import Settings, create_app
    from medsim.watch import WatchConfig, Watcher

    index = tmp_path / "index"
    shutil.copytree(watch_env.index, index, ignore=shutil.ignore_patterns("lock"))
    watcher = Watcher(WatchConfig(watch_env.orthanc.dicomweb_url, index, interval=0.5, reconcile_every=1.0),
                      watch_env.bundle)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    settings = Settings(index=index, pacs_url=watch_env.orthanc.dicomweb_url, cache_dir=tmp_path / "cache",
                        index_check_interval=0.3)
    app = create_app(settings)
    try:
        with live_server(app) as base:
            yield watch_env, watcher, base, index
    finally:
        watcher.stop()
        thread.join(30)
        app.extensions["medsim"].close()


def _similar_sops(base: str, sop_uid: str) -> list[str]:
    import requests

    answer = requests.post(f"{base}/api/v1/similar", timeout=30,
                           json={"sop_uid": sop_uid, "k": 10, "threshold": "none", "group_by": "image"})
    assert answer.status_code == 200, answer.text
    return [row["sop_uid"] for row in answer.json()["results"]]


@pytest.mark.orthanc
def test_stow_chest_radiograph_is_found_by_similar_within_10_s_and_delete_removes_it(running, caplog):
    import requests

    caplog.set_level(logging.INFO, logger="medsim.watch")
    env, _, base, _ = running
    query = env.chest[0]  # indexed; the new study is a copy of its pixels under another patient
    import pydicom

    query_sop = str(pydicom.dcmread(query, stop_before_pixels=True).SOPInstanceUID)
    study = new_study(query, env.work / "found", patient="WATCH-NEW-1")
    assert study["sop_uids"][0] not in _similar_sops(base, query_sop)
    before = requests.get(f"{base}/api/v1/index", timeout=10).json()

    stored_at = time.monotonic()
    assert env.client.store_files(study["files"]).stored == 1
    _until(lambda: study["sop_uids"][0] in _similar_sops(base, query_sop), 10,
           "the uploaded chest radiograph returned by /similar")
    latency = time.monotonic() - stored_at
    after = requests.get(f"{base}/api/v1/index", timeout=10).json()
    assert after["cases"] == before["cases"] + 1 and after["updated_at"] > before["updated_at"]
    assert after["watch"]["mode"] == "changes" and after["watch"]["last_change"] > 0
    print(f"STOW-RS -> returned by /similar in {latency:.1f} s")

    # delete the study in the PACS: it leaves the results (a tombstone, not a rebuild)
    assert env.rest("DELETE", f"studies/{env.orthanc_study_id(study['study_uid'])}").ok
    _until(lambda: study["sop_uids"][0] not in _similar_sops(base, query_sop), 15, "the deleted study gone")
    def served_without_it():
        info = requests.get(f"{base}/api/v1/index", timeout=10).json()
        return info if info["cases"] == before["cases"] else None

    info = _until(served_without_it, 5, "the server's snapshot without the study")
    assert info["removed"] >= 1 and info["updated_at"] > after["updated_at"]
    assert "deleted in the PACS: removed 1 case(s)" in caplog.text


@pytest.mark.orthanc
def test_uploaded_ct_is_skipped_with_its_reason_and_logged(running, caplog):
    from medsim.index import CaseIndex

    caplog.set_level(logging.INFO, logger="medsim.watch")
    env, _, _, index = running
    ct = new_study(_ct_file(), env.work / "ct", patient="WATCH-CT")
    count = _count(index)
    assert env.client.store_files(ct["files"]).stored == 1

    def ledger_row():
        with CaseIndex.open(index) as opened:
            return next((r for r in opened.file_records("skipped") if r.sop_uid == ct["sop_uids"][0]), None)

    row = _until(ledger_row, 15, "the CT in the ledger")
    assert row.reason == "not-chest-radiograph" and "CT" in row.detail
    assert _count(index) == count
    _until(lambda: "skipped 1 (not-chest-radiograph: 1)" in caplog.text, 5, "the skip logged")


@pytest.mark.orthanc
def test_restart_repeats_nothing_and_a_lost_position_is_harmless(watch_env, tmp_path):
    """A second watcher on the same index (a restart) reads the feed from the stored position: nothing to do. With
    the position lost (read from the start) it re-lists every study and indexes nothing twice."""
    from medsim.index import CaseIndex
    from medsim.watch import META_KEY, WatchConfig, Watcher

    index = tmp_path / "index"
    shutil.copytree(watch_env.index, index, ignore=shutil.ignore_patterns("lock"))
    first = Watcher(WatchConfig(watch_env.orthanc.dicomweb_url, index, reconcile_every=0), watch_env.bundle)
    while first.cycle().more:  # catch up with what other tests uploaded meanwhile
        pass
    count = _count(index)
    restarted = Watcher(WatchConfig(watch_env.orthanc.dicomweb_url, index, reconcile_every=0), watch_env.bundle)
    result = restarted.cycle()
    assert (result.studies, result.indexed) == (0, 0)
    with CaseIndex.open(index, writable=True) as opened:
        opened.update_meta({META_KEY: {}})
    again = Watcher(WatchConfig(watch_env.orthanc.dicomweb_url, index, reconcile_every=0), watch_env.bundle)
    while True:
        result = again.cycle()
        assert result.indexed == 0
        if not result.more:
            break
    assert again.total.studies >= 6 and _count(index) == count
    assert sum(r.unchanged for r in again.reports) >= 6


@pytest.mark.orthanc
def test_feed_read_in_small_pages_into_a_new_index(watch_env, tmp_path):
    """A page of the change feed without any StableStudy (a burst's NewInstance/NewSeries/... changes come first)
    still moves the stored position, also before the index holds anything."""
    from medsim.index import CaseIndex
    from medsim.watch import WatchConfig, Watcher

    index = tmp_path / "index"
    watcher = Watcher(WatchConfig(watch_env.orthanc.dicomweb_url, index, reconcile_every=0, changes_per_request=3),
                      watch_env.bundle)
    positions = []
    for _ in range(500):
        result = watcher.cycle()
        positions.append(watcher.state().get("last_change"))
        if not result.more:
            break
    assert not result.more and positions == sorted(positions) and len(set(positions)) > 3
    with CaseIndex.open(index) as opened:
        assert len(opened) >= 6 and opened.meta["watch"]["last_change"] == positions[-1]


@pytest.mark.orthanc
def test_polling_mode_by_qido(watch_env, tmp_path):
    """A DICOMweb-only PACS: QIDO-RS polling indexes what is there, then what arrives; deletions by reconciliation."""
    from medsim.index import CaseIndex
    from medsim.watch import WatchConfig, Watcher

    index = tmp_path / "index"
    watcher = Watcher(WatchConfig(watch_env.orthanc.dicomweb_url, index, mode="poll", reconcile_every=0),
                      watch_env.bundle)
    watcher.cycle()
    count = _count(index)
    assert count >= 6
    with CaseIndex.open(index) as opened:
        watermark = opened.meta["watch"]["study_date"]
    assert len(watermark) == 8
    assert watcher.cycle().studies == 0  # nothing new: nothing re-listed per study
    study = new_study(watch_env.chest[1], tmp_path / "new", patient="WATCH-POLL", instances=2,
                      study_date=time.strftime("%Y%m%d"))
    assert watch_env.client.store_files(study["files"]).stored == 2
    result = watcher.cycle()
    assert result.indexed == 2 and _count(index, study["study_uid"]) == 2
    # a study dated before the window (an old study sent today) is found by the full listing
    old = new_study(watch_env.chest[2], tmp_path / "old", patient="WATCH-OLD", study_date="19990101")
    assert watch_env.client.store_files(old["files"]).stored == 1
    assert watcher.cycle().indexed == 0
    removed, found = watcher.reconcile(index_new=True)
    assert removed == 0 and found.indexed == 1 and _count(index, old["study_uid"]) == 1
    for uid in (study["study_uid"], old["study_uid"]):
        assert watch_env.rest("DELETE", f"studies/{watch_env.orthanc_study_id(uid)}").ok
    removed, _ = watcher.reconcile(index_new=True)
    assert removed == 3 and _count(index) == count


@pytest.mark.orthanc
def test_unreachable_pacs_is_retried_with_back_off(tmp_path, bundle, caplog):
    from medsim.watch import WatchConfig, Watcher

    caplog.set_level(logging.INFO, logger="medsim.watch")
    watcher = Watcher(WatchConfig(closed_port_url(), tmp_path / "index", interval=0.1, max_backoff=2), bundle)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        _until(lambda: "retrying in 2 s" in caplog.text, 10, "a second, longer back-off")
    finally:
        stopped = time.monotonic()
        watcher.stop()
        thread.join(10)
    assert not thread.is_alive() and time.monotonic() - stopped < 5  # stops promptly, also while backing off
    messages = [r.getMessage() for r in caplog.records if "PACS unreachable" in r.getMessage()]
    assert "retrying in 1 s" in messages[0] and any("retrying in 2 s" in m for m in messages[1:])
    assert not (tmp_path / "index").exists()  # nothing created for an unreachable PACS


@pytest.mark.orthanc
@pytest.mark.slow
def test_orthanc_down_then_back_watcher_resumes(watch_env, tmp_path, caplog):
    """Orthanc stopped under a running watcher: it backs off and says so; started again: it resumes and indexes
    what arrived."""
    from medsim.watch import WatchConfig, Watcher

    caplog.set_level(logging.INFO, logger="medsim.watch")
    index = tmp_path / "index"
    shutil.copytree(watch_env.index, index, ignore=shutil.ignore_patterns("lock"))
    watcher = Watcher(WatchConfig(watch_env.orthanc.dicomweb_url, index, interval=0.3, reconcile_every=0,
                                  max_backoff=2), watch_env.bundle)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        watch_env.orthanc.stop()
        _until(lambda: "PACS unreachable" in caplog.text, 15, "the back-off message")
        watch_env.orthanc.start()
        study = new_study(watch_env.chest[2], tmp_path / "new", patient="WATCH-BACK")
        assert watch_env.client.store_files(study["files"]).stored == 1
        _until(lambda: _count(index, study["study_uid"]) == 1, 30, "the study stored after the outage indexed")
        _until(lambda: "PACS reachable again" in caplog.text, 10, "the recovery logged")
    finally:
        watcher.stop()
        thread.join(30)
        if watch_env.orthanc.process is None:
            watch_env.orthanc.start()


def _watch_process(env, index: Path, log: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medsim.cli", "watch", env.orthanc.dicomweb_url, "--index",
                             str(index), "--model", "imagenet", "--interval", "0.3", "--reconcile-every", "0", *extra],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=os.environ.copy())


@pytest.mark.orthanc
@pytest.mark.slow
def test_watcher_killed_mid_study_then_restarted_loses_and_repeats_nothing(watch_env, tmp_path):
    from medsim.index import CaseIndex

    index = tmp_path / "index"
    shutil.copytree(watch_env.index, index, ignore=shutil.ignore_patterns("lock"))
    log = tmp_path / "watch.log"
    first = _watch_process(watch_env, index, log, "--batch-size", "2")
    try:
        _until(lambda: "Ctrl-C stops" in log.read_text(errors="replace"), 120, "the watcher started")
        time.sleep(1.0)  # its first round: nothing new
        study = new_study(watch_env.chest[3], tmp_path / "burst", patient="WATCH-KILL", instances=12)
        assert watch_env.client.store_files(study["files"]).stored == 12
        seen = _until(lambda: _count(index, study["study_uid"]), 60, "the first images of the study committed",
                      every=0.02)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    print(f"killed with {seen} of 12 images of the study committed")
    second = _watch_process(watch_env, index, log)
    try:
        _until(lambda: _count(index, study["study_uid"]) == 12, 120, "all 12 images after the restart")
        time.sleep(1.5)  # more rounds: nothing more
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    with CaseIndex.open(index) as opened:
        sops = [c.sop_uid for c in opened.cases() if c.study_uid == study["study_uid"]]
        ledger = [r for r in opened.file_records() if r.sop_uid in set(study["sop_uids"])]
    assert sorted(sops) == sorted(study["sop_uids"])  # nothing lost, nothing twice
    assert len(ledger) == 12 and {r.status for r in ledger} == {"indexed"}
    assert "stopped; indexed" in log.read_text(errors="replace")
    # the killed watcher's fetched files (its temp folder) were removed by the restarted one; nothing else is left
    from medsim.files import process_alive, process_temp_root

    left = [f for folder in process_temp_root("dicomweb").iterdir() if not process_alive(int(folder.name))
            for f in folder.iterdir()]
    assert not left, f"fetched files left behind: {left}"


@pytest.mark.orthanc
def test_orthanc_python_plugin_notifies_the_watcher(tmp_path, bundle):
    """With the Orthanc Python plugin (Debian orthanc-python) the watcher hears of a stable study at once: its
    polling interval here is 60 s, so only the notification explains a fast pick-up."""
    from orthanc_fixtures import _ensure_orthanc

    from medsim.dicomweb import DicomWebClient
    from medsim.orthanc import (
        LocalOrthanc,
        find_dicomweb_plugin,
        free_port,
        orthanc_config,
    )
    from medsim.watch import WatchConfig, Watcher

    _ensure_orthanc()
    python_plugin = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
    if not python_plugin.exists():
        pytest.skip("the Orthanc Python plugin is not installed (apt-get install orthanc-python)")
    port = free_port()
    config = orthanc_config(tmp_path / "orthanc" / "db", free_port(), free_port(), find_dicomweb_plugin())
    config["Plugins"].append(str(python_plugin))
    config["PythonScript"] = str(Path(__file__).resolve().parents[1] / "plugin" / "orthanc" / "medsim_notify.py")
    config["MedsimNotify"] = {"Url": f"http://127.0.0.1:{port}/notify"}
    with LocalOrthanc(tmp_path / "orthanc", config=config) as orthanc:
        assert "medsim_notify: notifying" in orthanc.log_tail(200)
        index = tmp_path / "index"
        watcher = Watcher(WatchConfig(orthanc.dicomweb_url, index, interval=60, reconcile_every=0,
                                      listen=f"127.0.0.1:{port}"), bundle)
        thread = threading.Thread(target=watcher.run, daemon=True)
        thread.start()
        try:
            _until(lambda: watcher.listen_address is not None and watcher.mode is not None, 30, "the watcher up")
            time.sleep(0.5)
            study = new_study(_chest_files()[0], tmp_path / "new", patient="WATCH-PUSH")
            assert DicomWebClient(orthanc.dicomweb_url).store_files(study["files"]).stored == 1
            _until(lambda: _count(index, study["study_uid"]) == 1, 30, "the notified study indexed")
            import requests

            found = requests.post(f"{orthanc.url}/tools/lookup", data=study["study_uid"], timeout=10).json()
            assert requests.delete(f"{orthanc.url}/studies/{found[0]['ID']}", timeout=10).ok
            _until(lambda: _count(index, study["study_uid"]) == 0, 30, "the deleted study removed on notification")
        finally:
            watcher.stop()
            thread.join(30)


@pytest.mark.orthanc
def test_cli_watch_once_uses_the_index_model(watch_env, tmp_path, capsys):
    from medsim.cli import main

    index = tmp_path / "index"
    shutil.copytree(watch_env.index, index, ignore=shutil.ignore_patterns("lock"))
    assert main(["watch", watch_env.orthanc.dicomweb_url, "--index", str(index), "--once"]) == 0
    assert "removed" in capsys.readouterr().err

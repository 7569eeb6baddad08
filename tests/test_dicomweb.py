"""The DICOMweb client and `medsim build-index <DICOMweb URL>` against a real Orthanc holding the sample data."""

import shutil
import time

import pytest

from medsim.dicomweb import (
    DicomWebClient,
    PacsError,
    PacsNotFound,
    PacsUnavailable,
    is_uid,
    parse_multipart,
)
from medsim.build import build_index
from medsim.index import CaseIndex
from orthanc_fixtures import closed_port_url, pacs, silent_server  # noqa: F401


def test_uid_syntax():
    assert is_uid("1.2.840.10008.1.2.1")
    assert is_uid("2.25.13392735511332086352228944845957613925")
    for bad in ("", "abc", "1..2", "1.2.", "../1", "1.2/3", "1.2.3\n", "1" * 65, None, 12):
        assert not is_uid(bad)


def test_parse_multipart():
    body = b"--b1\r\nContent-Type: application/dicom\r\n\r\nDATA1\r\n--b1\r\nContent-Type: a/b\r\n\r\nX\r\n--b1--\r\n"
    parts = parse_multipart(body, 'multipart/related; type="application/dicom"; boundary=b1')
    assert [(h["content-type"], c) for h, c in parts] == [("application/dicom", b"DATA1"), ("a/b", b"X")]


def test_qido_lists_the_chest_radiographs_only(pacs):
    ok, detail = pacs.client.ping()
    assert ok, detail
    listed = {ref.sop_uid: ref for ref in pacs.client.chest_instances()}
    expected = {i.sop_uid for i in pacs.indexed + pacs.pacs_only}
    assert set(listed) == expected  # the CT slice and the SR are not candidates
    assert {ref.modality for ref in listed.values()} <= {"CR", "DX"}


def test_wado_returns_the_stored_instance_unchanged(pacs):
    # JPEG 2000: Orthanc 1.10 cannot transcode it (HTTP 500 without transfer-syntax=*); the client asks for it as stored.
    for instance in pacs.pacs_only + pacs.indexed[:2]:
        data = pacs.client.retrieve_instance(instance.study_uid, instance.series_uid, instance.sop_uid)
        assert data == instance.path.read_bytes(), instance.path


def test_unknown_instance_and_bad_uids(pacs):
    first = pacs.indexed[0]
    with pytest.raises(PacsNotFound):
        pacs.client.retrieve_instance(first.study_uid, first.series_uid, "1.2.3.4.5.6.7.8.9")
    with pytest.raises(PacsError) as exc:
        pacs.client.retrieve_instance(first.study_uid, "../../tools", first.sop_uid)
    assert exc.value.status == 400


def test_size_limit_on_fetched_instances(pacs):
    small = DicomWebClient(pacs.url, max_instance_bytes=10_000)
    first = pacs.indexed[0]
    with pytest.raises(PacsError, match="limit"):
        small.retrieve_instance(first.study_uid, first.series_uid, first.sop_uid)


def test_pacs_down_and_pacs_hanging():
    down = DicomWebClient(closed_port_url(), timeout=2)
    with pytest.raises(PacsUnavailable, match="unreachable"):
        down.qido("studies")
    ok, detail = down.ping()
    assert not ok and "unreachable" in detail
    with silent_server() as url:
        hung = DicomWebClient(url, timeout=0.5, connect_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(PacsUnavailable, match="timed out"):
            hung.retrieve_instance("1.2", "1.3", "1.4")
        assert time.monotonic() - started < 5


def test_stopped_orthanc_is_reported_as_unavailable(pacs, tmp_path):
    from medsim.orthanc import LocalOrthanc

    orthanc = LocalOrthanc(tmp_path / "other").start()
    client = DicomWebClient(orthanc.dicomweb_url, timeout=2)
    assert client.ping()[0]
    orthanc.stop()
    assert not client.ping()[0]
    with pytest.raises(PacsUnavailable):
        client.retrieve_instance("1.2", "1.3", "1.4")


def test_store_reports_refused_files(pacs):
    result = pacs.client.store_files([pacs.truncated, *pacs.not_dicom])
    assert result.stored == 0
    assert len(result.failed) == 1 + len(pacs.not_dicom)


def test_build_index_from_dicomweb(pacs):
    report = pacs.build_report
    assert report["indexed"] == len(pacs.indexed) and report["failed"] == {}
    with CaseIndex.open(pacs.index_path) as index:
        cases = {c.sop_uid: c for c in index.cases()}
        assert set(cases) == {i.sop_uid for i in pacs.indexed}
        for instance in pacs.indexed:
            case = cases[instance.sop_uid]
            assert case.source_path == pacs.client.instance_url(*instance.uids.values())
            assert "|".join(case.labels) == instance.labels  # labels.csv rows matched by SOP Instance UID
        assert cases[pacs.second_view.sop_uid].view == "PA"
        assert {r.status for r in index.file_records()} == {"indexed"}


def test_build_index_rerun_adds_only_new_instances(pacs, tmp_path):
    """A re-run over the PACS indexes only what it does not hold: here the 3 instances stored after the build."""
    from medsim.search import bundle_for_index

    copy = tmp_path / "index"
    shutil.copytree(pacs.index_path, copy)
    with CaseIndex.open(copy) as index:
        bundle = bundle_for_index(index)
    report = build_index(pacs.url, copy, bundle, workers=0, progress=False)
    assert report.indexed == len(pacs.pacs_only)
    assert report.unchanged == len(pacs.indexed)
    again = build_index(pacs.url, copy, bundle, workers=0, progress=False)
    assert again.indexed == 0 and again.unchanged == len(pacs.indexed) + len(pacs.pacs_only)


def test_cli_build_index_from_an_unreachable_pacs(tmp_path, capsys):
    from medsim.cli import main

    rc = main(["build-index", closed_port_url(), "--index", str(tmp_path / "idx"), "--no-progress"])
    assert rc == 2
    assert "unreachable" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_build_index_from_dicomweb_skips_pixel_duplicates(pacs, tmp_path):
    """`--skip-duplicates` on a DICOMweb source: the second view (new UIDs, the same pixels as its source image) is
    kept out and reported with the instance it copies; everything else is indexed."""
    from medsim.search import bundle_for_index
    from orthanc_fixtures import SAMPLE_DIR, SECOND_VIEW_SOURCE

    with CaseIndex.open(pacs.index_path) as index:
        bundle = bundle_for_index(index)
    source = next(i for i in pacs.indexed + pacs.pacs_only if i.path == SAMPLE_DIR / SECOND_VIEW_SOURCE)
    pair = {source.sop_uid, pacs.second_view.sop_uid}
    report = build_index(pacs.url, tmp_path / "index", bundle, workers=0, progress=False, skip_duplicates=True)
    assert dict(report.skipped) == {"duplicate-pixels": 1}
    (duplicate,) = report.duplicates
    assert duplicate.sop_uid in pair and (pair - {duplicate.sop_uid}).pop() in duplicate.detail
    assert report.indexed == len(pacs.indexed) + len(pacs.pacs_only) - 1
    with CaseIndex.open(tmp_path / "index") as index:
        assert duplicate.sop_uid not in {c.sop_uid for c in index.cases()}

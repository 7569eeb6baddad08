"""Case attributes from DICOM headers (issue 15 filters): sex from PatientSex, age from PatientAge (045Y, 006M, or a
bare number as real modalities write it) or else from PatientBirthDate and StudyDate, modality and study date -- read
at ingest from real DICOM files, stored in the catalog and selected by the search filters. The birth date is not kept."""

import shutil

import numpy as np
import pydicom
import pytest
from conftest import SAMPLE_DIR, SHARED_DICOM

from medsim.build import process_file
from medsim.dicom import ChestPolicy
from medsim.index import CaseFilter, CaseIndex
from medsim.ingest import patient_age, patient_sex
from medsim.preprocess import CAFFE_VGG16

SIIM = "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
NIH = "nih_gcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"


def _case(path):
    outcome = process_file(str(path), str(path.parent), ChestPolicy(), CAFFE_VGG16)
    assert outcome.record.status == "indexed", outcome.record
    return outcome.case


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """Copies of the real SIIM file with demographics edited the ways PACS exports carry them."""
    if not (SHARED_DICOM / SIIM).exists():
        pytest.skip("no shared DICOM files")
    folder = tmp_path_factory.mktemp("edited")
    edits = {
        "as-years.dcm": {"PatientSex": "F", "PatientAge": "045Y"},
        "as-months.dcm": {"PatientSex": "M", "PatientAge": "006M"},
        "birth-date.dcm": {"PatientSex": "O", "PatientAge": None, "PatientBirthDate": "19700615",
                           "StudyDate": "20240614"},
        "unreadable.dcm": {"PatientSex": "unknown", "PatientAge": "abc", "PatientBirthDate": "1970-13-45"},
    }
    for i, (name, values) in enumerate(edits.items()):
        ds = pydicom.dcmread(SHARED_DICOM / SIIM)
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{i + 1}"
        ds.save_as(folder / name)
    return folder


def test_real_dicom_headers_give_sex_age_modality_and_study_date():
    if not (SHARED_DICOM / SIIM).exists():
        pytest.skip("no shared DICOM files")
    siim, nih = _case(SHARED_DICOM / SIIM), _case(SHARED_DICOM / NIH)
    # the SIIM file says PatientSex M, PatientAge "62" (no unit), StudyDate 19010101; the NIH one M, "81", no date
    assert (siim.attributes["sex"], siim.attributes["age"], siim.attributes["study_date"]) == ("M", 62, "19010101")
    assert siim.modality == "CR" and nih.modality == "DX"
    assert (nih.attributes["sex"], nih.attributes["age"]) == ("M", 81) and "study_date" not in nih.attributes
    for case in (siim, nih):
        assert not any("birth" in key.lower() for key in case.attributes)


def test_edited_headers_and_what_is_not_kept(edited):
    years, months, born, unreadable = (_case(edited / n) for n in ("as-years.dcm", "as-months.dcm",
                                                                      "birth-date.dcm", "unreadable.dcm"))
    assert (years.attributes["sex"], years.attributes["age"]) == ("F", 45)
    assert (months.attributes["sex"], months.attributes["age"]) == ("M", 0.5)
    assert (born.attributes["sex"], born.attributes["age"]) == ("O", 53)  # the day before the 54th birthday
    assert "sex" not in unreadable.attributes and "age" not in unreadable.attributes  # indexed all the same
    assert all("19700615" not in str(value) for value in born.attributes.values())


def test_the_catalog_filters_on_header_attributes(edited, tmp_path):
    """Cases read from headers go through the catalog's SQL filters like labels-file attributes do."""
    folder = tmp_path / "export"
    shutil.copytree(edited, folder)
    shutil.copy(SHARED_DICOM / NIH, folder / "nih.dcm")
    cases = [_case(p) for p in sorted(folder.iterdir())]
    with CaseIndex.create(tmp_path / "index", model_fingerprint="t", model_name="t", dim=4) as index:
        index.add(cases, np.eye(len(cases), 4, dtype=np.float32), "t")
        by_id = {c.id: c.source_path.rsplit("/", 1)[-1] for c in index.cases()}

        def names(**kwargs):
            ids, _ = index.filter_ids(CaseFilter(views=None, **kwargs))
            return sorted(by_id[int(i)] for i in ids)

        assert names(sex="M") == ["as-months.dcm", "nih.dcm"]
        assert names(age_min=40, age_max=60) == ["as-years.dcm", "birth-date.dcm"]
        assert names(age_max=1) == ["as-months.dcm"]
        assert names(modalities=("DX",)) == ["nih.dcm"]


def test_units():
    assert [patient_age(a) for a in ("045Y", "006M", "052W", "365D", "62", "200Y", "", "Y", "4 5")] == \
        [45, 0.5, 1.0, 1.0, 62, None, None, None, None]
    assert patient_age("", "20000229", "20240228") == 23 and patient_age("", "20000229", "20240229") == 24
    assert patient_age("", "19700615", "") is None and patient_age("", "bad", "20240101") is None
    assert [patient_sex(s) for s in ("M", " f ", "O", "X", "")] == ["M", "F", "O", "", ""]


def test_sample_export_without_demographics_keeps_none():
    """The sample export blanks PatientSex/PatientAge/PatientBirthDate: no sex or age attribute appears."""
    path = next(p for p in sorted(SAMPLE_DIR.rglob("*.dcm")) if "KERMANY" in str(p))
    case = _case(path)
    assert "sex" not in case.attributes and "age" not in case.attributes and case.attributes["study_date"]

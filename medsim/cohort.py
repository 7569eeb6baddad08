"""Cohort export: a query and its similar cases as a CSV table or as a DICOM Key Object Selection (KOS) document.

A :class:`Cohort` is the result list as shown (query first, then the hits in rank order) with what may leave the
server: UIDs, rank, score, view, findings and a *pseudonymous* patient reference (never a name, birth date, stored
patient ID or file path).

The KOS (built with highdicom, title (113000, DCM, "Of Interest")) is what makes the cohort open in any DICOM viewer:

* it belongs to the **query's study** (the patient and study attributes are those the PACS holds for that study),
  as a new series ("medsim cohort", modality KO) per export, so viewers list it beside the query image;
* its content lists the query image first, then every hit in rank order, each with the SOP Class UID the PACS
  reports; the Key Object Description says which image is the query and gives each hit's rank, score and findings;
* every referenced instance, also those in other studies (other patients), is listed in the Current Requested
  Procedure Evidence Sequence, one item per study, as PS3.3 C.17.6.2 requires for a KOS. highdicom 0.28 writes only
  the document's own study there (and refuses more than one other study), so the document is made by highdicom for
  the query image and then given the full content and evidence, and read back by highdicom as a check.

:func:`store_kos` looks the instances up in the PACS (QIDO-RS) and stores the document there (STOW-RS).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from medsim import __version__
from medsim.dicomweb import SERIES_UID, SOP_UID, STUDY_UID, DicomWebClient, PacsError, PacsNotFound, _first
from medsim.errors import MedsimError

CSV_COLUMNS = ("role", "rank", "score", "study_uid", "series_uid", "sop_uid", "patient", "view", "findings")
SERIES_DESCRIPTION = "medsim cohort"
SERIES_NUMBER = 990  # after the acquisition series; every export is a series of its own
SOP_CLASS = "00080016"
ROWS, COLUMNS = "00280010", "00280011"
# The patient and study attributes a KOS in the query's study copies from the PACS (QIDO-RS study level).
STUDY_FIELDS = ("00100010", "00100020", "00100030", "00100040", "00080020", "00080030", "00080050", "00200010",
                "00080090", "00080005")


class CohortError(MedsimError):
    """A cohort that cannot be exported; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Member:
    """One image of a cohort: the query (rank 0, no score) or a hit."""

    role: str  # "query" or "hit"
    rank: int
    score: float | None
    study_uid: str
    series_uid: str
    sop_uid: str
    patient: str | None = None  # a pseudonym
    view: str = ""
    findings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cohort:
    query: Member
    hits: tuple[Member, ...]
    model: str = ""
    filters: dict = field(default_factory=dict)

    @property
    def members(self) -> tuple[Member, ...]:
        return (self.query, *self.hits)


def make_cohort(query, query_findings: Iterable[str], hits: Sequence, pseudonym: Callable[[str | None], str | None],
                model: str = "", filters: dict | None = None) -> Cohort:
    """A cohort from a query (:class:`medsim.search.QueryInfo`) and its hits in rank order (each with ``.case`` and
    ``.score``, like :class:`medsim.index.Hit`); ``pseudonym`` turns a stored patient ID into what may be shown."""
    head = Member("query", 0, None, query.study_uid, query.series_uid, query.sop_uid, pseudonym(query.patient_id),
                  query.view or "", tuple(query_findings))
    rows = tuple(Member("hit", rank, round(float(hit.score), 6), hit.case.study_uid, hit.case.series_uid,
                        hit.case.sop_uid, pseudonym(hit.case.patient_id), hit.case.view or "", tuple(hit.case.labels))
                 for rank, hit in enumerate(hits, 1))
    return Cohort(head, rows, model=model, filters=dict(filters or {}))


# ---- CSV -------------------------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text a spreadsheet will not run as a formula (OWASP CSV injection)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def to_csv(cohort: Cohort) -> str:
    """One row per image, the query first (role ``query``, rank 0, no score), then the hits best first."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for m in cohort.members:
        writer.writerow([m.role, m.rank, "" if m.score is None else f"{m.score:.6f}", m.study_uid, m.series_uid,
                         m.sop_uid, _cell(m.patient or ""), _cell(m.view), _cell("|".join(m.findings))])
    return out.getvalue()


# ---- KOS -------------------------------------------------------------------------------------------------------------


def description(cohort: Cohort) -> str:
    """The Key Object Description: which image is the query, and each hit's rank, score and findings."""
    lines = [f"medsim similar-case cohort: the first image is the query (SOP Instance UID {cohort.query.sop_uid}); "
             f"then {len(cohort.hits)} similar case(s), best first."]
    if cohort.model:
        lines.append(f"model: {cohort.model}")
    if cohort.filters:
        lines.append(f"filters: {json.dumps(cohort.filters, sort_keys=True)}")
    for m in cohort.hits:
        lines.append(f"#{m.rank} score {m.score:.3f} {'|'.join(m.findings) or 'no findings'}: {m.sop_uid}")
    return "\n".join(lines)


def build_kos(cohort: Cohort, study, instances: dict, *, series_uid: str | None = None,
              sop_uid: str | None = None, now: datetime.datetime | None = None):
    """The KOS (a pydicom Dataset) of ``cohort`` in the query's study.

    ``study``: a Dataset with the query study's patient and study attributes (see :func:`study_from_qido`);
    ``instances``: SOP Instance UID → Dataset with at least SOPClassUID (and Rows/Columns for images) of every member.
    """
    import highdicom as hd
    from highdicom.sr.utils import collect_evidence
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    missing = [m.sop_uid for m in cohort.members if m.sop_uid not in instances]
    if missing:
        raise CohortError("not-in-pacs", f"the PACS does not hold {len(missing)} instance(s) of the cohort, e.g. "
                          f"{missing[0]}")
    now = now or datetime.datetime.now()
    evidence = []
    for m in cohort.members:
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = m.study_uid, m.series_uid, m.sop_uid
        ds.SOPClassUID = instances[m.sop_uid].SOPClassUID
        for name in ("Rows", "Columns"):
            if name in instances[m.sop_uid]:
                setattr(ds, name, instances[m.sop_uid].get(name))
        evidence.append(ds)
    head = evidence[0]
    for name in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName"):
        setattr(head, name, study.get(name, None) or None)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["medsim", __version__]), name="medsim", manufacturer_name="medsim",
            model_name="similar-case retrieval"))
    text = description(cohort)
    content = hd.ko.KeyObjectSelection(codes.DCM.OfInterest, evidence, observer_device_context=device,
                                       description=text)
    own = hd.ko.KeyObjectSelection(codes.DCM.OfInterest, [head], observer_device_context=device, description=text)
    doc = hd.ko.KeyObjectSelectionDocument(
        evidence=[head], content=own, series_instance_uid=series_uid or generate_uid(),
        series_number=SERIES_NUMBER, sop_instance_uid=sop_uid or generate_uid(), instance_number=1,
        manufacturer="medsim", series_description=SERIES_DESCRIPTION, software_versions=__version__,
        content_date=now.date(), content_time=now.time(), series_date=now.date(), series_time=now.time(),
        specific_character_set="ISO_IR 192")
    # the full content, and every study's instances in the evidence (see the module docstring)
    doc.ContentSequence = content[0].ContentSequence
    same, other = collect_evidence(evidence, content[0], study_instance_uid=doc.StudyInstanceUID)
    doc.CurrentRequestedProcedureEvidenceSequence = same + other
    return hd.ko.KeyObjectSelectionDocument.from_dataset(doc)


def kos_bytes(doc) -> bytes:
    """The document as a DICOM Part 10 file."""
    from pydicom.filewriter import dcmwrite

    buffer = io.BytesIO()
    dcmwrite(buffer, doc, enforce_file_format=True)
    return buffer.getvalue()


def referenced(doc) -> dict[str, tuple[str, str, str]]:
    """SOP Instance UID → (study UID, series UID, SOP Class UID) of every instance a KOS's evidence lists."""
    found = {}
    for study in doc.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            for item in series.ReferencedSOPSequence:
                found[item.ReferencedSOPInstanceUID] = (study.StudyInstanceUID, series.SeriesInstanceUID,
                                                        item.ReferencedSOPClassUID)
    return found


# ---- PACS ------------------------------------------------------------------------------------------------------------


def study_from_qido(client: DicomWebClient, study_uid: str):
    """The study's patient and study attributes as the PACS holds them (QIDO-RS, study level)."""
    from pydicom.dataset import Dataset

    found = [item for item in client.qido("studies", {"StudyInstanceUID": study_uid, "includefield": list(STUDY_FIELDS)})
             if _first(item, STUDY_UID) == study_uid]
    if not found:
        raise CohortError("not-in-pacs", f"the PACS does not hold the query's study {study_uid}")
    item = {tag: value for tag, value in found[0].items() if tag in STUDY_FIELDS}
    return Dataset.from_json(item)


def instances_from_qido(client: DicomWebClient, cohort: Cohort) -> dict:
    """SOP Instance UID → Dataset (SOPClassUID, Rows, Columns) of the cohort's instances the PACS holds; one QIDO-RS
    query per series."""
    from pydicom.dataset import Dataset

    wanted: dict[tuple[str, str], set[str]] = {}
    for m in cohort.members:
        wanted.setdefault((m.study_uid, m.series_uid), set()).add(m.sop_uid)
    found = {}
    for (study_uid, series_uid), sops in wanted.items():
        try:
            items = client.search_instances(study_uid, series_uid, includefield=[SOP_CLASS, ROWS, COLUMNS])
        except PacsNotFound:
            continue
        for item in items:
            sop = _first(item, SOP_UID)
            if sop in sops and _first(item, SOP_CLASS) and _first(item, SERIES_UID, series_uid) == series_uid:
                found[sop] = Dataset.from_json({tag: item[tag] for tag in (SOP_CLASS, ROWS, COLUMNS) if tag in item})
    return found


@dataclass(frozen=True)
class StoredKos:
    study_uid: str
    series_uid: str
    sop_uid: str
    references: int


def store_kos(client: DicomWebClient, cohort: Cohort) -> StoredKos:
    """Build the cohort's KOS from what the PACS holds and store it there (STOW-RS to the query's study)."""
    doc = build_kos(cohort, study_from_qido(client, cohort.query.study_uid), instances_from_qido(client, cohort))
    try:
        result = client.store([kos_bytes(doc)], study_uid=doc.StudyInstanceUID)
    except PacsError as exc:  # 4xx: e.g. read-only credentials (401/403), or an endpoint without STOW-RS (404, 405)
        if exc.status is not None and 400 <= exc.status < 500:
            raise CohortError("pacs-refused", f"the PACS refused the KOS: {exc}") from None
        raise
    if doc.SOPInstanceUID not in result.stored_uids:
        reason = "; ".join(f"{f.get('reason') or 'no reason given'}" for f in result.failed) or "not stored"
        raise CohortError("pacs-refused", f"the PACS refused the KOS ({reason})")
    return StoredKos(doc.StudyInstanceUID, doc.SeriesInstanceUID, doc.SOPInstanceUID, len(referenced(doc)))


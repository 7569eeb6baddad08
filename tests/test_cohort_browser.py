"""Cohort export in a browser (the stack and fixtures of tests/test_viewer_browser.py: Orthanc, the sample index,
medsim serving OHIF with the packed plugin, Playwright + Debian Chromium): "Export cohort" downloads the CSV of the
list the panel shows; "Save to PACS (KOS)" stores the Key Object Selection document and says so; OHIF's study list
then shows the KO series "medsim cohort" in the query's study. Skips as test_viewer_browser does when a requirement
is missing."""

from __future__ import annotations

import csv
import io
import re

import pytest
import requests
from test_viewer_browser import (  # noqa: F401  (fixtures)
    OUT,
    QUERY_PATH,
    browser,
    click_find,
    context,
    open_study,
    panel_state,
    results,
    sample_rows,
    stack,
    wait_for_image,
)

pytestmark = pytest.mark.timeout(600)


def test_export_cohort_csv_and_save_kos_listed_by_ohif(stack, context):
    query = next(r for r in sample_rows() if r["path"] == QUERY_PATH)
    page = open_study(context, stack.base, query["study_uid"])
    wait_for_image(page)
    click_find(page)
    assert panel_state(page) == "results"
    shown = results(page)
    assert shown

    # "Export cohort": a CSV download of the query and the results as listed, best first
    with page.expect_download(timeout=60_000) as download:
        page.click('[data-cy="medsim-cohort-csv"]')
    assert download.value.suggested_filename == "medsim-cohort.csv"
    rows = list(csv.DictReader(io.StringIO(open(download.value.path(), encoding="utf-8").read())))
    assert [r["role"] for r in rows] == ["query"] + ["hit"] * len(shown)
    assert rows[0]["sop_uid"] == query["sop_uid"]
    assert [r["sop_uid"] for r in rows[1:]] == [r["sop"] for r in shown]
    assert all(r["patient"].startswith("anon-") for r in rows) and query["patient_id"] not in str(rows)
    page.wait_for_selector('[data-cy="medsim-cohort"][data-status="done"]', timeout=30_000)

    # "Save to PACS (KOS)": stored, and the panel says where
    page.click('[data-cy="medsim-cohort-kos"]')
    page.wait_for_selector('[data-cy="medsim-cohort"][data-status="done"] [data-cy="medsim-cohort-message"]'
                           ':has-text("Saved to the PACS")', timeout=60_000)
    message = page.locator('[data-cy="medsim-cohort-message"]').inner_text()
    assert f"referencing {len(shown) + 1} images" in message, message
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / "cohort-saved.png"))
    series = requests.get(f"{stack.base}/dicom-web/studies/{query['study_uid']}/series", params={"Modality": "KO"},
                          headers={"Accept": "application/dicom+json"}, timeout=30).json()
    assert len(series) == 1

    # OHIF's study list: the query's study (its row: the accession number) shows modality KO, and once selected,
    # the series "medsim cohort" (KO) beside the query's own series
    study = requests.get(f"{stack.base}/dicom-web/studies", params={"StudyInstanceUID": query["study_uid"],
                         "includefield": "00080050"}, headers={"Accept": "application/dicom+json"}, timeout=30).json()
    accession = study[0]["00080050"]["Value"][0]
    worklist = context.new_page()
    worklist.goto(f"{stack.base}/?mrn={query['patient_id']}", wait_until="domcontentloaded")
    row = worklist.locator(f'tr[aria-selected]:has-text("{accession}")')
    row.wait_for(timeout=90_000)
    assert "KO" in re.split(r"[\s\\/]+", row.inner_text()), row.inner_text()  # the Modalities cell, e.g. CR\KO
    row.click()
    listed = worklist.locator('tr:has-text("medsim cohort")')
    listed.wait_for(timeout=60_000)
    assert listed.count() == 1 and "KO" in listed.inner_text()
    worklist.screenshot(path=str(OUT / "cohort-study-list.png"))
    assert not page.errors, page.errors

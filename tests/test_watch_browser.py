"""Issue 16 in the browser: with the viewer open, a study uploaded to the stack's Orthanc (STOW-RS) is indexed by the
watcher that `medsim stack` runs, and "Find similar cases" finds it, without restarting or reloading the server.

Reuses the stack and browser fixtures of test_viewer_browser.py (its own stack: this module's tests add a study)."""

from __future__ import annotations

import time

import pytest
import requests
from conftest import SAMPLE_DIR
from test_viewer_browser import (  # noqa: F401
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
from test_watch import new_study

pytestmark = pytest.mark.timeout(600)


def test_study_uploaded_while_the_viewer_is_open_is_found(stack, context, tmp_path):  # noqa: F811
    from medsim.dicomweb import DicomWebClient

    query = next(r for r in sample_rows() if r["path"] == QUERY_PATH)
    page = open_study(context, stack.base, query["study_uid"])
    wait_for_image(page)
    click_find(page)
    assert panel_state(page) == "results"
    before = requests.get(f"{stack.base}/api/v1/index", timeout=10).json()
    assert "watching Orthanc for new studies" in stack.log(), stack.log_tail()

    # a new study of a new patient: the query's pixels, so it must come first for the query
    study = new_study(SAMPLE_DIR / QUERY_PATH, tmp_path / "upload", patient="BROWSER-NEW")
    pacs = DicomWebClient(f"http://127.0.0.1:{stack.orthanc_port()}/dicom-web")
    uploaded = time.monotonic()
    assert pacs.store_files(study["files"]).stored == 1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = requests.get(f"{stack.base}/api/v1/index", timeout=10).json()
        if info["cases"] == before["cases"] + 1:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the uploaded study was not indexed within 60 s:\n{stack.log_tail()}")
    indexed_in = time.monotonic() - uploaded
    assert info["updated_at"] > before["updated_at"]

    # the open viewer, same page, same server process: the new study is now the best match
    page.click('[data-cy="medsim-refresh"]')
    page.wait_for_selector('[data-cy="medsim-similar-panel"][data-status="results"]', timeout=60_000)
    page.wait_for_function(f"""() => [...document.querySelectorAll('[data-cy="medsim-result"]')]
        .some(e => e.dataset.studyUid === "{study['study_uid']}")""", timeout=30_000)
    found = results(page)
    assert found[0]["study"] == study["study_uid"], found[:3]
    assert found[0]["score"] > 0.99
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / "found-after-upload.png"))

    # and the new study itself, opened in the viewer, is an indexed query
    new_page = open_study(context, stack.base, study["study_uid"])
    wait_for_image(new_page)
    click_find(new_page)
    assert panel_state(new_page) == "results"
    assert "indexed" in new_page.locator('[data-cy="medsim-query"]').inner_text()
    assert stack.process.poll() is None  # the same server throughout
    with open(OUT / "timings.txt", "a") as fh:
        fh.write(f"upload to indexed (watcher in the stack): {indexed_in:.1f} s\n")

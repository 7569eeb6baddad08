"""Relevance feedback in a browser (the stack and fixtures of tests/test_viewer_browser.py: Orthanc, the sample index,
medsim serving OHIF with the packed plugin, Playwright + Debian Chromium): 👍 on a hit stores the vote in the index's
catalog; 👎 on the first hit and "Refine" search again with the refined query, the panel says "refined with 1 👍 /
1 👎" and the list changes order. Skips as test_viewer_browser does when a requirement is missing."""

from __future__ import annotations

import sqlite3

import pytest
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


def stored_votes(stack) -> list[tuple]:
    with sqlite3.connect(f"file:{stack.work / 'index' / 'catalog.sqlite'}?mode=ro", uri=True) as db:
        return db.execute("SELECT user, query_sop_uid, hit_sop_uid, vote, score FROM feedback ORDER BY id").fetchall()


def test_thumbs_are_stored_and_refine_reorders_the_list(stack, context):
    query = next(r for r in sample_rows() if r["path"] == QUERY_PATH)
    page = open_study(context, stack.base, query["study_uid"])
    wait_for_image(page)
    click_find(page)
    assert panel_state(page) == "results"
    before = results(page)
    assert len(before) >= 2, before
    assert page.locator('[data-cy="medsim-refine"]').is_disabled()

    last = page.locator('[data-cy="medsim-result"]').nth(len(before) - 1)
    last.locator('[data-cy="medsim-vote-up"]').click()
    page.wait_for_selector(f'[data-cy="medsim-result"][data-sop-uid="{before[-1]["sop"]}"] '
                           '[data-cy="medsim-vote-up"][aria-pressed="true"]', timeout=30_000)
    votes = stored_votes(stack)
    assert [(v[0], v[1], v[2], v[3]) for v in votes] == [("anonymous", query["sop_uid"], before[-1]["sop"], 1)]
    assert votes[0][4] == pytest.approx(before[-1]["score"], abs=1e-3)

    page.locator('[data-cy="medsim-result"]').first.locator('[data-cy="medsim-vote-down"]').click()
    page.wait_for_function("() => document.querySelector('[data-cy=\"medsim-refine\"]').textContent"
                           ".includes('1 👍 / 1 👎')", timeout=30_000)
    assert [v[3] for v in stored_votes(stack)] == [1, -1]

    page.click('[data-cy="medsim-refine"]')
    page.wait_for_selector('[data-cy="medsim-refined"]', timeout=90_000)
    assert page.locator('[data-cy="medsim-refined"]').inner_text() == "refined with 1 👍 / 1 👎"
    assert panel_state(page) == "results"
    after = results(page)
    order = [r["sop"] for r in after]
    assert order != [r["sop"] for r in before], order
    assert order[0] != before[0]["sop"]  # the 👎 hit is no longer first
    assert before[-1]["sop"] in order[:len(before) - 1]  # the 👍 hit moved up
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / "relevance-feedback.png"))
    assert not page.errors, page.errors

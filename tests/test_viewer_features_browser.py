"""Issue 15 in a browser (the stack and fixtures of tests/test_viewer_browser.py: Orthanc, the sample index, medsim
serving OHIF with the packed plugin, Playwright + Debian Chromium): the operating point names the model and warns
that the sample index's threshold was calibrated on fewer than 200 labeled queries; the "where they match" toggle
draws an overlay on each thumbnail, at the thumbnail's aspect ratio; a filter chip searches again with its filter
and changes the results. Skips as test_viewer_browser does when a requirement is missing."""

from __future__ import annotations

import json

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


def test_operating_point_overlays_and_filter_chips(stack, context):
    query = next(r for r in sample_rows() if r["path"] == QUERY_PATH)
    page = open_study(context, stack.base, query["study_uid"])
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data or "{}"))
            if r.url.endswith("/api/v1/similar") and r.method == "POST" else None)
    wait_for_image(page)
    click_find(page)
    assert panel_state(page) == "results"
    before = results(page)
    assert before

    # the operating point says which model answered and how many labeled queries calibrated its threshold
    calibration = page.locator('[data-cy="medsim-calibration"]').inner_text()
    assert calibration.startswith("model ") and "calibrated on" in calibration and "labeled queries" in calibration
    warning = page.locator('[data-cy="medsim-op-warning"]').inner_text()
    assert "fewer than 200" in warning, warning

    # "where they match": an overlay on every thumbnail, with the thumbnail's aspect ratio
    page.click('[data-cy="medsim-explain-toggle"]')
    page.wait_for_function("""() => {
        const o = [...document.querySelectorAll('[data-cy="medsim-overlay"]')];
        return o.length > 0 && o.length === document.querySelectorAll('[data-cy="medsim-result"]').length
          && o.every(i => i.complete && i.naturalWidth > 0); }""", timeout=240_000)
    pairs = page.eval_on_selector_all('[data-cy="medsim-result"]', """items => items.map(e => {
        const [thumb, overlay] = e.querySelectorAll('img');
        return {tw: thumb.naturalWidth, th: thumb.naturalHeight, ow: overlay.naturalWidth, oh: overlay.naturalHeight};
    })""")
    for pair in pairs:
        assert abs(pair["tw"] / pair["th"] - pair["ow"] / pair["oh"]) < 0.03, pair
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / "where-they-match.png"))

    # a filter chip searches again with its filter: no sample case is lateral, so "Lateral" empties the list
    page.click('[data-cy="medsim-filter-chip"][data-chip="view-lateral"]')
    page.wait_for_selector('[data-cy="medsim-similar-panel"][data-status="empty"]', timeout=90_000)
    assert bodies[-1].get("filters") == {"view": "lateral"}, bodies[-1]
    assert page.locator('[data-cy="medsim-filter-chip"][data-chip="view-lateral"]').get_attribute(
        "aria-pressed") == "true"
    page.click('[data-cy="medsim-filter-chip"][data-chip="view-lateral"]')  # off again: the same results
    assert panel_state(page) == "results"
    page.wait_for_selector('[data-cy="medsim-result"]')
    assert [r["study"] for r in results(page)] == [r["study"] for r in before]
    assert "filters" not in bodies[-1]
    assert not page.errors, page.errors


def test_an_image_the_viewer_cannot_draw_gets_a_message(stack, context):
    """The sample's Deflated Explicit VR Little Endian instance: OHIF cannot draw it; the panel says so."""
    row = next(r for r in sample_rows() if "deflated" in r.get("variant", ""))
    page = open_study(context, stack.base, row["study_uid"])
    page.wait_for_timeout(3000)  # the display set is loaded (its image is not drawn)
    click_find(page)
    panel_state(page)
    note = page.locator('[data-cy="medsim-undrawable"]')
    note.wait_for(state="visible", timeout=30_000)
    assert "Deflated Explicit VR Little Endian" in note.inner_text()

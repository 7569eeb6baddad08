"""Side by side that compares (issue 15, part 3) in a browser, on the stack of tests/test_viewer_browser.py (Orthanc,
the sample index, medsim serving OHIF with the packed plugin, Playwright + Debian Chromium): "compare" on a hit gives
exactly two viewports in one row, the query's image left labelled "query", the hit's image right labelled with its
rank and score, the panel still open; with "sync window/level" on, a window/level drag on one image moves the
other's window to the same place relative to its own initial window, and off it does not; "where they match" draws
an overlay on both images, where the images are drawn, following the camera. Skips as test_viewer_browser does when
a requirement is missing."""

from __future__ import annotations

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

# the grid's viewports, left to right, with what cornerstone draws in each (OHIF's own services: window.services)
GRID = """() => {
  const s = window.services;
  const state = s.viewportGridService.getState();
  return {layout: state.layout, viewports: [...state.viewports.values()].sort((a, b) => a.x - b.x).map(v => {
    const vp = s.cornerstoneViewportService.getCornerstoneViewport(v.viewportId);
    const voi = vp && vp.getProperties ? vp.getProperties().voiRange : null;
    return {id: v.viewportId, x: v.x, y: v.y, width: v.width, height: v.height,
            imageId: vp && vp.getCurrentImageId ? vp.getCurrentImageId() || '' : '',
            voi: voi ? [voi.lower, voi.upper] : null};
  })};
}"""


# the overlays over the images: their boxes, their viewport canvas's box, the image's and the PNG's sizes
OVERLAYS = """() => [...document.querySelectorAll('[data-cy="medsim-compare-overlay"]')].map(o => {
    const pane = o.closest('[data-cy="viewport-pane"]').querySelector('canvas.cornerstone-canvas')
      .getBoundingClientRect();
    const box = o.getBoundingClientRect();
    return {role: o.dataset.role, pane: [pane.left, pane.top, pane.right, pane.bottom],
            box: [box.left, box.top, box.right, box.bottom], columns: Number(o.dataset.columns),
            rows: Number(o.dataset.rows), ow: o.naturalWidth, oh: o.naturalHeight};
})"""


# both windows at the same place relative to each image's initial window (`initial`: [[lower, upper]] left, right)
SAME_RELATIVE_WINDOW = f"""initial => {{
  const [a, b] = ({GRID})().viewports;
  const rel = (voi, [lo, hi]) => voi.map(x => (x - lo) / (hi - lo));
  if (!a.voi || !b.voi) return false;
  const [ra, rb] = [rel(a.voi, initial[0]), rel(b.voi, initial[1])];
  return Math.abs(ra[0] - rb[0]) < 1e-3 && Math.abs(ra[1] - rb[1]) < 1e-3 && (ra[0] !== 0 || ra[1] !== 1);
}}"""


def grid(page) -> dict:
    return page.evaluate(GRID)


def drag(page, box: dict, dx: float, dy: float) -> None:
    """A left-button drag across the middle of a viewport: OHIF's basic viewer adjusts window/level with it. A click
    first makes the viewport the active one (OHIF takes that click for itself); it is made elsewhere and a while before
    the drag, else the drag's press would be the second click of a double click, which is no drag."""
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.click(x - 40, y - 40)
    page.wait_for_timeout(700)
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(x + dx * step / 10, y + dy * step / 10)
    page.mouse.up()
    page.wait_for_timeout(300)


def test_compare_query_and_hit_side_by_side(stack, context):
    query = next(r for r in sample_rows() if r["path"] == QUERY_PATH)
    page = open_study(context, stack.base, query["study_uid"])
    wait_for_image(page)
    click_find(page)
    assert panel_state(page) == "results"
    found = results(page)
    hit = found[2] if len(found) >= 3 else found[0]
    rank = found.index(hit) + 1

    page.click(f'[data-cy="medsim-result"][data-rank="{rank}"] [data-cy="medsim-compare"]')
    page.wait_for_selector('[data-cy="medsim-compare-bar"][data-status="on"]', timeout=90_000)
    page.wait_for_function(f"""() => {{ const g = ({GRID})();
        return g.viewports.length === 2 && g.viewports.every(v => v.imageId); }}""", timeout=90_000)
    shown = grid(page)
    # exactly two viewports, in one row: the query's image left, the hit's right
    assert (shown["layout"]["numRows"], shown["layout"]["numCols"]) == (1, 2), shown["layout"]
    left, right = shown["viewports"]
    assert left["y"] == right["y"] == 0 and left["height"] == right["height"] == 1 and left["x"] < right["x"]
    assert query["sop_uid"] in left["imageId"], left
    assert hit["sop"] in right["imageId"], right
    # the query's viewport stays the active one ("Find similar cases" is still about the query)
    assert page.evaluate("() => window.services.viewportGridService.getState().activeViewportId") == left["id"]
    panes = page.locator('[data-cy="viewport-pane"]')
    assert panes.count() == 2
    boxes = [panes.nth(i).bounding_box() for i in range(2)]
    boxes.sort(key=lambda b: b["x"])
    assert abs(boxes[0]["y"] - boxes[1]["y"]) < 2 and abs(boxes[0]["height"] - boxes[1]["height"]) < 2
    assert boxes[0]["height"] > 300, boxes  # a full-height row, not the top half of a 2 x 2 grid
    # both drawn, both labelled
    for pane in range(2):
        wait_for_image(page, canvas=panes.nth(pane).locator("canvas.cornerstone-canvas"))
    labels = {}
    for viewport in (left, right):
        label = page.locator(f'[data-cy="medsim-compare-label"][data-viewport-id="{viewport["id"]}"]')
        label.wait_for(state="visible", timeout=30_000)
        labels[viewport["id"]] = label.inner_text().strip()
    assert labels[left["id"]] == "query"
    assert labels[right["id"]] == f"#{rank} · {hit['score']:.3f}", labels
    # the panel is still open, with its results
    assert page.locator('[data-cy="medsim-similar-panel"][data-status="results"]').is_visible()
    assert len(results(page)) == len(found)

    # "where they match": an overlay on each image, lying on the image (same box as the image in the viewport)
    page.click('[data-cy="medsim-explain-toggle"]')
    page.wait_for_function("""() => { const o = [...document.querySelectorAll('[data-cy="medsim-compare-overlay"]')];
        return o.length === 2 && o.every(i => i.complete && i.naturalWidth > 0); }""", timeout=240_000)
    placed = page.evaluate(OVERLAYS)
    assert sorted(p["role"] for p in placed) == ["hit", "query"]
    for one in placed:
        (pl, pt, pr, pb), (bl, bt, br, bb) = one["pane"], one["box"]
        assert pl - 1 <= bl < br <= pr + 1 and pt - 1 <= bt < bb <= pb + 1, one  # inside its viewport
        assert abs(one["ow"] / one["oh"] - one["columns"] / one["rows"]) < 0.03, one  # the PNG has the image's shape
        # where the viewer draws the image: fitted into the canvas (contain) and centred
        scale = min((pr - pl) / one["columns"], (pb - pt) / one["rows"])
        width, height = one["columns"] * scale, one["rows"] * scale
        expected = [(pl + pr - width) / 2, (pt + pb - height) / 2, (pl + pr + width) / 2, (pt + pb + height) / 2]
        assert all(abs(got - want) < 3 for got, want in zip(one["box"], expected)), (one, expected)
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / "side-by-side.png"))
    # the overlay follows the camera: zoomed 2x, it is twice as large
    page.evaluate("""() => { const vp = window.services.cornerstoneViewportService
        .getCornerstoneViewport('medsim-compare-query'); vp.setZoom(2 * vp.getZoom()); vp.render(); }""")
    page.wait_for_timeout(500)
    zoomed = next(p for p in page.evaluate(OVERLAYS) if p["role"] == "query")
    first = next(p for p in placed if p["role"] == "query")
    assert abs((zoomed["box"][2] - zoomed["box"][0]) / (first["box"][2] - first["box"][0]) - 2) < 0.02, zoomed
    page.click('[data-cy="medsim-explain-toggle"]')
    page.wait_for_function("""() => !document.querySelector('[data-cy="medsim-compare-overlay"]')""",
                           timeout=10_000)

    # window/level: independent by default, linked with the toggle on
    before = grid(page)["viewports"]
    drag(page, boxes[0], 60, 40)
    after = grid(page)["viewports"]
    assert after[0]["voi"] != before[0]["voi"], "the drag did not change the query's window/level"
    assert after[1]["voi"] == before[1]["voi"], "the hit's window/level followed without sync"
    # synced, a change on one image is carried to the other relative to each one's initial window (the sample's
    # query's initial window is 0-255, its third hit's 0-65535)
    page.check('[data-cy="medsim-compare-sync"]')
    initial = [v["voi"] for v in before]
    drag(page, boxes[0], -80, 30)
    page.wait_for_function(SAME_RELATIVE_WINDOW, arg=initial, timeout=10_000)
    synced = grid(page)["viewports"]
    assert synced[1]["voi"] != after[1]["voi"]
    drag(page, boxes[1], 50, -50)  # and from the hit's side to the query's
    page.wait_for_function(SAME_RELATIVE_WINDOW, arg=initial, timeout=10_000)
    assert grid(page)["viewports"][0]["voi"] != synced[0]["voi"]
    page.screenshot(path=str(OUT / "side-by-side-synced.png"))
    page.uncheck('[data-cy="medsim-compare-sync"]')
    unsynced = grid(page)["viewports"]
    drag(page, boxes[0], 70, 70)
    assert grid(page)["viewports"][1]["voi"] == unsynced[1]["voi"], "still linked after sync was switched off"

    # close: the query alone again
    page.click('[data-cy="medsim-compare-close"]')
    page.wait_for_function(f"""() => {{ const g = ({GRID})();
        return g.viewports.length === 1 && g.viewports[0].imageId; }}""", timeout=30_000)
    assert query["sop_uid"] in grid(page)["viewports"][0]["imageId"]
    assert not page.locator('[data-cy="medsim-compare-label"]').count()
    assert not page.errors, page.errors

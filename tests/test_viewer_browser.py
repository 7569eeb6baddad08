"""The whole stack in a browser: `medsim stack` (Orthanc + sample studies + index + medsim serving the OHIF viewer with
the plugin), driven by Playwright in Debian's headless Chromium. The plugin is served from the contents of the npm
tarball (`npm pack` in plugin/ohif/, unpacked; MEDSIM_PLUGIN_DIR), not from the source tree: what a site that
installs the npm package gets is what is tested.

1. open a sample chest X-ray in the "similar" mode; the image is drawn (the viewport is not blank);
2. "Find similar cases": the panel lists cases, the first shares a finding with the query, none is of the query's
   patient (who has a second study); the operating point is named; a screenshot goes to test-output/viewer/;
3. clicking a result opens that study in a new tab, and its image is drawn too;
4. the other states: a CT (not a chest radiograph), nothing above the threshold → "Show top 10 anyway" (answer
   stubbed, then the real top 10), an auth failure (answer stubbed); the button reopens a panel closed by hand;
5. Ctrl-C (SIGINT) stops the stack (server and Orthanc), and the open viewer then shows "server unreachable".

Skips (saying why) without Playwright, Chromium (`apt-get install chromium`; or MEDSIM_CHROMIUM), npm, the viewer
(`make viewer`) or Orthanc (`make orthanc`). Bounded: the stack must be up within 5 minutes, each step has its own
timeout, and every test has a pytest timeout.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE_DIR, sample_manifest

OUT = ROOT / "test-output" / "viewer"
STACK_START_TIMEOUT = 300
QUERY_PATH = "KERMANY-12917FD6/STC4DC0DD5/1/IMG0001.dcm"  # the sample query: its patient has a second study
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.timeout(600)


def chromium_path() -> str | None:
    for candidate in (os.environ.get("MEDSIM_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def viewer_dist() -> Path | None:
    import json

    version = json.loads((ROOT / "plugin" / "ohif" / "ohif-viewer.json").read_text())["version"]
    dist = ROOT / "var" / "ohif" / version / "dist"
    return dist if (dist / "index.html").is_file() and (dist / ".medsim-viewer.json").is_file() else None


def _requirements() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; the browser is Debian's chromium)"
    if chromium_path() is None:
        return "Chromium is not installed (apt-get install chromium, or set MEDSIM_CHROMIUM)"
    if viewer_dist() is None:
        return "the OHIF viewer is not fetched (make viewer)"
    if shutil.which("npm") is None:
        return "npm is not installed (the plugin is served from its npm pack tarball)"
    from medsim.orthanc import find_dicomweb_plugin, find_orthanc

    if not (find_orthanc() and find_dicomweb_plugin()):
        return "Orthanc with its DICOMweb plugin is not installed (make orthanc)"
    return None


def sample_rows() -> list[dict]:
    sample_manifest()  # builds the sample data on a fresh clone
    with open(SAMPLE_DIR / "labels.csv", newline="") as fh:
        return [row for row in csv.DictReader(fh) if row["expected"] == "index"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Stack:
    def __init__(self, work: Path):
        self.work = work
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "stack.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        from test_viewer_plugin_js import pack_plugin

        self.plugin_dir = pack_plugin(self.work / "npm-pack") / "src"  # what the viewer loads: the packed copy
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "medsim.cli", "stack", "--sample", str(SAMPLE_DIR), "--index",
             str(self.work / "index"), "--port", str(self.port), "--threads", "8"],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "MEDSIM_PLUGIN_DIR": str(self.plugin_dir)})
        import requests

        deadline = time.monotonic() + STACK_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the stack exited ({self.process.returncode}) at start-up:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.base}/healthz", timeout=2).json().get("status") == "ok":
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(1)
        raise AssertionError(f"the stack did not come up in {STACK_START_TIMEOUT} s:\n{self.log_tail()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def orthanc_port(self) -> int:
        match = re.search(r"Orthanc is up: http://127\.0\.0\.1:(\d+)", self.log())
        assert match, self.log_tail()
        return int(match.group(1))

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C: SIGINT, then wait for the stack to stop everything."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if getattr(self, "_log", None):
            self._log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    running = Stack(tmp_path_factory.mktemp("stack"))
    try:
        running.start()
        running.started_in = time.monotonic() - started
        yield running
    finally:
        running.stop()
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "stack.log").write_text(running.log())


@pytest.fixture(scope="module")
def browser(stack):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def context(browser, tmp_path):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
    ctx.set_default_timeout(60_000)
    yield ctx
    ctx.close()


def open_study(context, base: str, study_uid: str):
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    page.goto(f"{base}/similar?StudyInstanceUIDs={study_uid}", wait_until="domcontentloaded")
    page.wait_for_selector('[data-cy="medsimFindSimilarCases"]', timeout=90_000)
    return page


def wait_for_image(page, timeout: float = 60, canvas=None) -> float:
    """Wait until the viewport's canvas (the first, or the locator `canvas`) shows an image (not a flat colour);
    returns its pixel standard deviation."""
    from PIL import Image, ImageStat

    canvas = canvas or page.locator("canvas.cornerstone-canvas").first
    canvas.wait_for(state="visible", timeout=timeout * 1000)
    deadline = time.monotonic() + timeout
    spread = 0.0
    while time.monotonic() < deadline:
        shot = Image.open(io.BytesIO(canvas.screenshot())).convert("L")
        stat = ImageStat.Stat(shot)
        spread = stat.stddev[0]
        lit = sum(shot.histogram()[32:]) / (shot.width * shot.height)
        if spread > 25 and lit > 0.2:
            return spread
        time.sleep(0.5)
    raise AssertionError(f"the viewport stayed blank (pixel std {spread:.1f}); page errors: {page.errors[-3:]}")


def click_find(page):
    page.click('[data-cy="medsimFindSimilarCases"]')


def close_side_panel(page):
    """Collapse OHIF's right side panel by its header button, as a user would. OHIF can swallow a click that lands
    while the panel's opening transition still runs (seen once in a full-suite run), so a second click is allowed."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for _ in range(2):
        page.click('[data-cy="side-panel-header-right"]')
        try:
            page.wait_for_selector('[data-cy="medsim-similar-panel"]', state="hidden", timeout=5_000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError("the side panel did not collapse")


def panel_state(page, timeout: float = 90):
    page.wait_for_selector('[data-cy="medsim-similar-panel"][data-status="results"], '
                           '[data-cy="medsim-similar-panel"][data-status="empty"], '
                           '[data-cy="medsim-similar-panel"][data-status="error"]', timeout=timeout * 1000)
    return page.locator('[data-cy="medsim-similar-panel"]').get_attribute("data-status")


def results(page) -> list[dict]:
    return page.eval_on_selector_all('[data-cy="medsim-result"]', """items => items.map(e => ({
        study: e.dataset.studyUid, sop: e.dataset.sopUid, findings: e.dataset.findings, patient: e.dataset.patient,
        score: Number(e.dataset.score), text: e.innerText}))""")


def test_find_similar_cases_end_to_end(stack, context):
    rows = sample_rows()
    query = next(r for r in rows if r["path"] == QUERY_PATH)
    own_studies = {r["study_uid"] for r in rows if r["patient_id"] == query["patient_id"]}
    assert len(own_studies) == 2, "the sample query's patient has a second study"
    query_findings = set(query["labels"].split("|"))
    timings = {"stack up": stack.started_in}
    # the plugin comes from the unpacked npm tarball, and is the same bytes as the source
    assert f"the medsim plugin from {stack.plugin_dir}" in stack.log(), stack.log_tail()
    import requests

    for module in sorted(p.name for p in stack.plugin_dir.iterdir()):
        served = requests.get(f"{stack.base}/medsim-plugin/{module}", timeout=30).content
        assert served == (stack.plugin_dir / module).read_bytes() == (ROOT / "plugin/ohif/src" / module).read_bytes()

    started = time.monotonic()
    page = open_study(context, stack.base, query["study_uid"])
    wait_for_image(page)
    timings["viewer + image"] = time.monotonic() - started

    started = time.monotonic()
    click_find(page)
    assert panel_state(page) == "results", page.locator('[data-cy="medsim-similar-panel"]').inner_text()
    timings["similar cases"] = time.monotonic() - started
    found = results(page)
    assert found, "no results"
    assert set(found[0]["findings"].split("|")) & query_findings, (found[0], query_findings)
    assert not {r["study"] for r in found} & own_studies, "a case of the query's own patient was listed"
    assert len({r["study"] for r in found}) == len(found), "one row per study"
    assert [r["score"] for r in found] == sorted((r["score"] for r in found), reverse=True)
    op_text = page.locator('[data-cy="medsim-operating-point"]').inner_text()
    assert re.match(r"showing cases above the 90 %-recall threshold \(similarity ≥ 0\.\d{3}\)", op_text), op_text
    query_text = page.locator('[data-cy="medsim-query"]').inner_text()
    assert "Pneumonia" in query_text and "indexed" in query_text, query_text
    # thumbnails and study details arrive after the list
    page.wait_for_function("""() => {
        const imgs = [...document.querySelectorAll('[data-cy="medsim-result"] img')].slice(0, 4);
        return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }""", timeout=60_000)
    page.wait_for_selector('[data-cy="medsim-study-meta"]', timeout=30_000)
    assert "2018-01-05 · CHEST 1 VIEW" in page.locator('[data-cy="medsim-study-meta"]').first.inner_text()
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / "similar-cases-panel.png"))

    # clicking a result opens that study (new tab), in the same mode, and its image is drawn
    started = time.monotonic()
    target = found[0]["study"]
    with context.expect_page(timeout=30_000) as opened:
        page.locator('[data-cy="medsim-open-study"]').first.click()
    study_page = opened.value
    study_page.errors = []
    metadata_requests: list[str] = []
    study_page.on("request", lambda r: metadata_requests.append(r.url) if "/metadata" in r.url else None)
    study_page.wait_for_load_state("domcontentloaded")
    assert f"StudyInstanceUIDs={target}" in study_page.url
    study_page.wait_for_selector('[data-cy="medsimFindSimilarCases"]', timeout=90_000)
    wait_for_image(study_page)
    timings["open result"] = time.monotonic() - started
    assert any(f"/dicom-web/studies/{target}/" in url for url in metadata_requests), metadata_requests
    study_page.screenshot(path=str(OUT / "opened-result.png"))
    assert not page.errors, page.errors
    (OUT / "timings.txt").write_text("".join(f"{k}: {v:.1f} s\n" for k, v in timings.items()))


def test_panel_states_not_chest_empty_and_auth(stack, context):
    rows = sample_rows()
    query = next(r for r in rows if r["path"] == QUERY_PATH)
    ct = next(r for r in sample_manifest()["files"] if r["expected"] == "skip:not-chest-radiograph")

    page = open_study(context, stack.base, ct["study_uid"])
    click_find(page)
    assert panel_state(page) == "error"
    box = page.locator('[data-cy="medsim-state"]')
    assert box.get_attribute("data-error-kind") == "not-chest"
    assert "Not a chest radiograph" in box.inner_text()
    page.close()

    page = open_study(context, stack.base, query["study_uid"])
    # the button brings the panel back after the user closed the side panel by hand
    click_find(page)
    assert panel_state(page) == "results"
    close_side_panel(page)
    click_find(page)
    page.wait_for_selector('[data-cy="medsim-similar-panel"][data-status="results"]', state="visible", timeout=30_000)

    empty = ('{"query": {"study_uid": "%s", "sop_uid": "%s", "view": "AP", "indexed": true, "source": "index"}, '
             '"operating_point": {"mode": "calibrated", "k": 10, "threshold": 0.99, "target_recall": 0.9}, '
             '"group_by": "study", "include_same_patient": false, "results": [], "took_ms": 1}'
             % (query["study_uid"], query["sop_uid"]))
    page.route("**/api/v1/similar", lambda route: route.fulfill(status=200, content_type="application/json",
                                                                   body=empty))
    click_find(page)
    assert panel_state(page) == "empty"
    assert "above the 90 %-recall threshold" in page.locator('[data-state="empty"]').inner_text()
    page.unroute("**/api/v1/similar")
    page.click('[data-cy="medsim-show-anyway"]')
    page.wait_for_selector('[data-cy="medsim-similar-panel"][data-status="results"]', timeout=60_000)
    assert len(results(page)) == 10
    assert "regardless of threshold" in page.locator('[data-cy="medsim-operating-point"]').inner_text()
    page.screenshot(path=str(OUT / "show-top-10-anyway.png"))

    page.route("**/api/v1/similar", lambda route: route.fulfill(
        status=401, content_type="application/json",
        body='{"error": {"status": 401, "code": "unauthorized", "message": "invalid bearer token"}}'))
    page.click('[data-cy="medsim-refresh"]')
    page.wait_for_selector('[data-cy="medsim-similar-panel"][data-status="error"]', timeout=30_000)
    box = page.locator('[data-cy="medsim-state"]')
    assert box.get_attribute("data-error-kind") == "auth"
    assert "Not authorised" in box.inner_text()


def test_ctrl_c_stops_the_stack_and_the_viewer_says_server_unreachable(stack, context):
    rows = sample_rows()
    query = next(r for r in rows if r["path"] == QUERY_PATH)
    page = open_study(context, stack.base, query["study_uid"])
    wait_for_image(page)
    orthanc_port = stack.orthanc_port()
    assert port_open(orthanc_port)

    started = time.monotonic()
    assert stack.interrupt(timeout=60) == 0, stack.log_tail()
    stopped_in = time.monotonic() - started
    assert not port_open(stack.port), "the server still listens"
    assert not port_open(orthanc_port), "Orthanc still runs"
    assert "stopped Orthanc" in stack.log()

    click_find(page)
    assert panel_state(page, timeout=60) == "error"
    box = page.locator('[data-cy="medsim-state"]')
    assert box.get_attribute("data-error-kind") == "unreachable", box.inner_text()
    assert "unreachable" in box.inner_text()
    assert page.locator('[data-cy="medsim-retry"]').is_visible()
    page.screenshot(path=str(OUT / "server-down.png"))
    with open(OUT / "timings.txt", "a") as fh:
        fh.write(f"ctrl-c to stopped: {stopped_in:.1f} s\n")

"""Shared test data: the generated sample PACS export and the development data in ../shared/data."""

import ast
import json
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import shared_data  # noqa: E402  (one finder for tests and benchmarks)

SAMPLE_DIR = ROOT / "sample_data" / "pacs_export"


SHARED_DATA = shared_data()  # ../shared/data beside the checkout, or beside the repository a clone came from
SHARED_DICOM = SHARED_DATA / "dicom"
SHARED_CXR = SHARED_DATA / "cxr"


@lru_cache(maxsize=1)
def sample_manifest() -> dict:
    """The sample export's manifest, building the sample data first when a fresh clone has none."""
    if not (SAMPLE_DIR / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "sample_data" / "build_sample_data.py"), "--out", str(SAMPLE_DIR)],
                       check=True)
    return json.loads((SAMPLE_DIR / "manifest.json").read_text())


@pytest.fixture(scope="session", autouse=True)
def _medsim_home(tmp_path_factory):
    """Model bundles are cached per test session, never in the developer's home."""
    home = os.environ.get("MEDSIM_TEST_HOME") or str(tmp_path_factory.mktemp("medsim-home"))
    os.environ["MEDSIM_HOME"] = home
    yield home


# ---- markers (registered in pyproject.toml) -----------------------------------------------------------------------
# orthanc, browser and shared_data are added here from what a test uses, so they cannot go stale; train and slow are
# marked in the test modules (pytestmark or decorators). `make test-fast` deselects orthanc, browser, train and slow.

# Fixtures that bring up a service: a test using one of them (directly or through another fixture) gets these markers.
FIXTURE_MARKERS = {
    "pacs": ("orthanc",),  # tests/orthanc_fixtures.py: a local Orthanc holding the sample data (service, make_app)
    "stack": ("orthanc",),  # tests/test_viewer_browser.py: the whole `make run` stack, Orthanc included
    "browser": ("browser",),  # tests/test_viewer_browser.py: headless Chromium driven by Playwright
}
# Names that lead to ../shared/data (see benchmarks.common.shared_data); a module-level name assigned from one of them counts too.
SHARED_DATA_NAMES = frozenset({"SHARED_DATA", "SHARED_DICOM", "SHARED_CXR"})


@lru_cache(maxsize=None)
def _shared_data_users(module_path: str) -> frozenset[str]:
    """Names of the test module's functions (tests, fixtures, helpers) that reach ../shared/data: they mention a
    SHARED_* name (or a module-level alias of one), or call, or take as a fixture, a function of the module that
    does. Read from the source, so a new test is marked without anyone remembering to."""
    try:
        tree = ast.parse(Path(module_path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return frozenset()
    functions: dict[str, set[str]] = {}  # function -> names it mentions (body, defaults, decorators) and parameters
    assigns: list[tuple[set[str], set[str]]] = []  # (module-level names assigned, names their value mentions)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            mentioned = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            params = {a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs}
            functions.setdefault(node.name, set()).update(mentioned | params)
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            assigned = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            assigns.append((assigned, {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}))
    reaching = set(SHARED_DATA_NAMES)
    changed = True
    while changed:  # until no more functions or module-level names reach the data
        changed = False
        for name, mentioned in functions.items():
            if name not in reaching and mentioned & reaching:
                reaching.add(name)
                changed = True
        for assigned, mentioned in assigns:
            if not assigned <= reaching and mentioned & reaching:
                reaching |= assigned
                changed = True
    return frozenset(reaching & functions.keys())


def pytest_report_header(config):
    """Free disk where the run writes: a full disk shows up as many unrelated errors, so the header says it first."""
    import tempfile

    places = {"temp": Path(tempfile.gettempdir()), "checkout": ROOT}
    return "free disk: " + ", ".join(f"{name} {shutil.disk_usage(path).free / 2**30:.1f} GiB ({path})"
                                     for name, path in places.items())


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        markers = {m for f in fixtures for m in FIXTURE_MARKERS.get(f, ())}
        module = getattr(item, "module", None)
        if module is not None and getattr(module, "__file__", None):
            users = _shared_data_users(module.__file__)
            if users & ({getattr(item, "originalname", item.name)} | fixtures):
                markers.add("shared_data")
        for marker in sorted(markers - {m.name for m in item.iter_markers()}):
            item.add_marker(marker)


@pytest.fixture(scope="session")
def bundle():
    """The ImageNet VGG-16 GAP bundle (converted once per session into the session's MEDSIM_HOME)."""
    from medsim.model import resolve_bundle

    return resolve_bundle("imagenet")


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory, bundle):
    """(path, build report) of the sample export indexed once per session with the ImageNet bundle. Tests read it;
    a test that changes an index works on a copy."""
    from medsim.build import build_index
    from medsim.ingest import LabelTable

    sample_manifest()
    path = tmp_path_factory.mktemp("idx") / "sample-index"
    report = build_index(SAMPLE_DIR, path, bundle, labels=LabelTable.from_csv(SAMPLE_DIR / "labels.csv"),
                         workers=1, batch_size=4, progress=False)
    return path, report


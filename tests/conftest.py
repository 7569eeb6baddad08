"""Shared test data: the generated sample PACS export and the development data in ../shared/data."""

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = ROOT / "sample_data" / "pacs_export"


def _find_shared_data() -> Path:
    """../shared/data beside the checkout; for a clone elsewhere (e.g. /tmp/c), beside the repository it came from."""
    if os.environ.get("MEDSIM_SHARED_DATA"):
        return Path(os.environ["MEDSIM_SHARED_DATA"])
    candidates = [ROOT.parent / "shared" / "data"]
    origin = subprocess.run(["git", "-C", str(ROOT), "remote", "get-url", "origin"], capture_output=True, text=True)
    if origin.returncode == 0 and Path(origin.stdout.strip()).is_dir():
        candidates.append(Path(origin.stdout.strip()).resolve().parent / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), candidates[0])


SHARED_DATA = _find_shared_data()
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

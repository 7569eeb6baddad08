"""medsim as people install it: ``python -m build`` makes an sdist and a wheel (from that sdist), and the wheel,
installed into a fresh venv outside the checkout, is a complete medsim.

The fresh venv gets the wheel with ``--no-deps``; its dependencies (torch and the rest, several GB) are borrowed from
the checkout's venv through a ``.pth`` line that appends that venv's site-packages to ``sys.path``. Nothing of the
checkout itself is importable there (no editable finder: a ``.pth`` line only adds a path, the ``.pth`` files in it
are not run), the commands run from a folder outside the checkout without ``PYTHONPATH``, and the test checks that
``medsim`` and ``medsim.ohif`` come from the fresh venv. So a module or a package-data file missing from the wheel
fails here.

There: ``medsim --version`` against the metadata; the sample data built by the packaged builder; ``medsim
build-index`` on it; ``medsim serve --viewer`` serving the plugin's files byte-identical to plugin/ohif/src/ (and
/metrics). Marked slow: about 2 minutes on 2 cores (index build and a server start with the model).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

PLUGIN_SRC = ROOT / "plugin" / "ohif" / "src"
PLUGIN_FILES = sorted(p.name for p in PLUGIN_SRC.iterdir() if p.suffix in (".js", ".css"))


def source_modules() -> list[str]:
    """Every module under medsim/ as a wheel path (medsim/server/app.py ...)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "medsim").rglob("*.py") if "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict:
    """``python -m build``: the sdist, then the wheel built from it (the default of ``build``)."""
    pytest.importorskip("build", reason="the build package is not installed (pip install build)")
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'(?m)^version\s*=\s*"([^"]+)"', text).group(1)


def test_the_wheel_carries_every_module_the_plugin_the_fetcher_and_the_sample_builder(dists):
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        names = set(wheel.namelist())
        missing = [m for m in source_modules() if m not in names]
        assert not missing, f"modules left out of the wheel: {missing}"
        for name in PLUGIN_FILES:
            assert wheel.read(f"medsim/ohif/src/{name}") == (PLUGIN_SRC / name).read_bytes(), name
        for name in ("fetch_viewer.py", "ohif-viewer.json", "package.json", "README.md", "__init__.py"):
            assert wheel.read(f"medsim/ohif/{name}") == (ROOT / "plugin" / "ohif" / name).read_bytes(), name
        assert wheel.read("medsim/sample_data/build_sample_data.py") == \
            (ROOT / "sample_data" / "build_sample_data.py").read_bytes()
        assert "medsim/server/openapi.yaml" in names
        assert {"medsim/templates/evaluation.html.j2", "medsim/templates/duplicates.html.j2"} <= names
        # nothing generated: no sample DICOM, no fetched viewer, no caches
        assert not [n for n in names if re.search(r"pacs_export|\.cache/|__pycache__|/var/|\.tgz$|\.dcm$", n)]
        metadata = wheel.read(f"medsim-{project_version()}.dist-info/METADATA").decode()
        assert re.search(r"(?m)^Requires-Dist: prometheus-client", metadata)
        entry_points = wheel.read(f"medsim-{project_version()}.dist-info/entry_points.txt").decode()
        assert "medsim = medsim.cli:main" in entry_points
    assert dists["wheel"].name == f"medsim-{project_version()}-py3-none-any.whl"
    print(f"wheel: {len(names)} entries")


def test_the_sdist_holds_tests_docs_and_the_plugin(dists):
    with tarfile.open(dists["sdist"]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    for path in ("tests/conftest.py", "tests/test_packaging.py", "tests/plugin/logic.test.mjs", "docs/api.md",
                 "docs/release.md", "docs/deploy/nginx.conf", "docs/deploy/medsim.service", "CHANGELOG.md",
                 "README.md", "Makefile", "MANIFEST.in", "pyproject.toml", "plugin/ohif/package.json",
                 "plugin/ohif/fetch_viewer.py", "sample_data/build_sample_data.py", "medsim/server/openapi.yaml"):
        assert path in names, f"{path} is not in the sdist"
    assert {f"plugin/ohif/src/{n}" for n in PLUGIN_FILES} <= names
    assert not [n for n in names if re.search(r"pacs_export|^var/|test-output|__pycache__|\.venv", n)]


# ---- the wheel in a fresh venv ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh(dists, tmp_path_factory) -> dict:
    """A new venv outside the checkout with the wheel installed (--no-deps) and the checkout venv's site-packages
    appended for the dependencies."""
    base = tmp_path_factory.mktemp("installed")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           str(dists["wheel"])], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz-medsim-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = base / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    return {"venv": venv, "python": python, "medsim": venv / "bin" / "medsim", "site": site, "work": work,
            "env": env}


def run_in(fresh, *args, timeout=600, **env) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=fresh["work"], env={**fresh["env"], **env},
                          capture_output=True, text=True, timeout=timeout)
    return done


def test_installed_medsim_comes_from_the_wheel_and_says_its_version(fresh):
    done = run_in(fresh, fresh["python"], "-c", "import json, sys, medsim, medsim.ohif, medsim.sample_data, "
                  "medsim.server.viewer as v, importlib.metadata as m; print(json.dumps({'medsim': medsim.__file__, "
                  "'ohif': medsim.ohif.__file__, 'plugin': str(v.default_plugin_dir()), 'version': medsim.__version__, "
                  "'metadata': m.version('medsim'), 'path': sys.path}))")
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout)
    for key in ("medsim", "ohif", "plugin"):
        assert Path(info[key]).is_relative_to(fresh["site"]), (key, info[key])
    assert not [p for p in info["path"] if p and Path(p).resolve().is_relative_to(ROOT) and ".venv" not in p], \
        info["path"]
    assert info["version"] == info["metadata"] == project_version()
    version = run_in(fresh, fresh["medsim"], "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"medsim {info['metadata']}", version
    # installed, the sample data, its index and the viewer live under $MEDSIM_HOME, never in site-packages
    where = run_in(fresh, fresh["python"], "-c", "from medsim import stack; import medsim.ohif.fetch_viewer as f; "
                   "print(stack.in_checkout(), stack.default_sample(), stack.default_index(), f.default_cache())",
                   MEDSIM_HOME=str(fresh["work"] / "home"))
    assert where.stdout.split() == ["False", str(fresh["work"] / "home" / "sample" / "pacs_export"),
                                    str(fresh["work"] / "home" / "sample-index"), str(fresh["work"] / "home" / "ohif")]
    assert run_in(fresh, fresh["medsim"], "stack", "--help").returncode == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def viewer_for_test(base: Path) -> tuple[str, dict]:
    """``--viewer`` and extra environment: the pinned viewer through the installed fetcher's cache look-up when the
    checkout has fetched it (make viewer), else a stand-in dist folder."""
    pin = json.loads((ROOT / "plugin" / "ohif" / "ohif-viewer.json").read_text())
    cache = ROOT / "var" / "ohif"
    if (cache / pin["version"] / "dist" / ".medsim-viewer.json").is_file():
        return "pinned", {"MEDSIM_VIEWER_CACHE": str(cache)}
    dist = base / "viewer-dist"
    dist.mkdir()
    (dist / "index.html").write_text("<!doctype html><title>OHIF Viewer</title>")
    return str(dist), {}


def test_installed_medsim_builds_the_sample_index_and_serves_the_plugin(fresh):
    home = os.environ.get("MEDSIM_HOME") or str(fresh["work"] / "home")  # the session's model bundles
    sample = fresh["work"] / "pacs_export"
    cache = ROOT / "sample_data" / ".cache"  # the downloaded source wheel, when the checkout has it
    built = run_in(fresh, fresh["python"], "-m", "medsim.sample_data.build_sample_data", "--out", sample,
                   *(["--cache", cache] if cache.is_dir() else []), MEDSIM_HOME=home)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    assert (sample / "manifest.json").is_file() and (sample / "labels.csv").is_file()

    index = fresh["work"] / "index"
    done = run_in(fresh, fresh["medsim"], "build-index", sample, "--labels", sample / "labels.csv", "--index", index,
                  "--no-progress", "--workers", "0", MEDSIM_HOME=home, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (index / "catalog.sqlite").is_file()
    manifest = json.loads((sample / "manifest.json").read_text())
    expected = sum(f["expected"] == "index" for f in manifest["files"])
    info = run_in(fresh, fresh["medsim"], "info", "--index", index, "--json", MEDSIM_HOME=home)
    assert info.returncode == 0, info.stderr[-2000:]
    assert json.loads(info.stdout)["cases"] == expected

    viewer, viewer_env = viewer_for_test(fresh["work"])
    port = free_port()
    log_path = fresh["work"] / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([str(fresh["medsim"]), "serve", "--index", str(index), "--port", str(port),
                                   "--viewer", viewer], cwd=fresh["work"], stdout=log, stderr=subprocess.STDOUT,
                                  env={**fresh["env"], "MEDSIM_HOME": home, **viewer_env})
    import requests

    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "medsim serve did not come up:\n" + log_path.read_text()[-3000:]
            time.sleep(1)
        for name in PLUGIN_FILES:
            response = requests.get(f"{base}/medsim-plugin/{name}", timeout=30)
            assert response.status_code == 200, name
            assert response.content == (PLUGIN_SRC / name).read_bytes(), f"{name} differs from plugin/ohif/src"
        config = requests.get(f"{base}/app-config.js", timeout=30).text
        assert "/medsim-plugin/extension.js" in config and "/medsim-plugin/mode.js" in config
        assert requests.get(f"{base}/", timeout=30).text.lower().startswith("<!doctype html>")
        metrics = requests.get(f"{base}/metrics", timeout=30)
        assert metrics.status_code == 200 and f"medsim_index_cases {float(expected)}" in metrics.text
    finally:
        server.terminate()
        server.wait(60)
    log_text = log_path.read_text()
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    served_from = next((line["message"] for line in lines if "the medsim plugin from" in line["message"]), "")
    assert str(fresh["site"] / "medsim" / "ohif" / "src") in served_from, log_text[-3000:]

"""Runs the plugin's JavaScript unit tests (tests/plugin/*.test.mjs, `node --test`) as part of `make test`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (Node.js 18+ runs the plugin tests)")
def test_plugin_unit_tests_pass_under_node():
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "plugin").glob("*.test.mjs"))
    assert files, "no plugin tests found"
    done = subprocess.run(["node", "--test", *files], cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = "\n".join(line for line in done.stdout.splitlines() if line.startswith(("not ok", "# ")))
    assert done.returncode == 0, f"node --test failed:\n{summary}\n{done.stderr[-2000:]}"
    passed = int(re.search(r"^# pass (\d+)", done.stdout, re.M).group(1))
    assert passed >= 30, summary


# ---- the npm package (plugin/ohif/package.json) -------------------------------------------------------------------

PLUGIN = ROOT / "plugin" / "ohif"
needs_npm = pytest.mark.skipif(shutil.which("npm") is None or shutil.which("node") is None,
                               reason="npm is not installed (Node.js 18+ with npm packs the plugin)")


def viewer_files() -> list[str]:
    """What the viewer loads: the ES modules and the stylesheet of plugin/ohif/src/."""
    return sorted(f"src/{p.name}" for p in (PLUGIN / "src").iterdir() if p.suffix in (".js", ".css"))


def pack_plugin(dest: Path) -> Path:
    """``npm pack`` in plugin/ohif/ into ``dest``, unpacked; returns the unpacked ``package`` folder."""
    import json
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["npm", "pack", "--json", "--pack-destination", str(dest)], cwd=PLUGIN, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tarball = dest / json.loads(done.stdout)[0]["filename"].replace("@", "").replace("/", "-")
    with tarfile.open(tarball) as tar:
        members = tar.getmembers()
        assert all(m.isfile() and m.name.startswith("package/") and ".." not in m.name for m in members)
        tar.extractall(dest, members=members)
    return dest / "package"


def project_version() -> str:
    return re.search(r'(?m)^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def test_package_json_follows_ohif_conventions_and_shares_the_version():
    import json

    package = json.loads((PLUGIN / "package.json").read_text())
    assert package["name"] == "@medsim/ohif-similar-cases"
    assert package["version"] == project_version(), "plugin/ohif/package.json and pyproject.toml disagree"
    extension_version = re.search(r"export const VERSION = '([^']+)'", (PLUGIN / "src" / "extension.js").read_text())
    assert extension_version and extension_version.group(1) == package["version"], "extension.js VERSION differs"
    assert package["type"] == "module" and package["module"] == package["main"] == "src/extension.js"
    for target in package["exports"].values():
        assert (PLUGIN / target).is_file(), target
    assert package["exports"]["."] == "./src/extension.js" and package["exports"]["./mode.js"] == "./src/mode.js"
    assert {"ohif-extension", "ohif-mode"} <= set(package["keywords"])
    pinned = json.loads((PLUGIN / "ohif-viewer.json").read_text())["version"]  # the viewer the tests run
    major, minor, _ = (int(x) for x in pinned.split("."))
    for peer in ("@ohif/core", "@ohif/extension-default"):
        assert package["peerDependencies"][peer] == f">={major}.{minor}.0 <{major}.{minor + 1}.0", peer
    assert "dependencies" not in package, "the plugin runs on what the viewer provides"


@needs_npm
def test_npm_pack_lists_only_the_plugin_files():
    import json

    done = subprocess.run(["npm", "pack", "--dry-run", "--json"], cwd=PLUGIN, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    packed = sorted(f["path"] for f in json.loads(done.stdout)[0]["files"])
    assert packed == sorted(["README.md", "package.json", *viewer_files()]), packed


@needs_npm
def test_the_packed_plugin_imports_by_package_name(tmp_path):
    """The tarball's files, byte-identical to src/, resolve by package name (the exports map) under Node."""
    package = pack_plugin(tmp_path / "pack")
    for name in viewer_files():
        assert (package / name).read_bytes() == (PLUGIN / name).read_bytes(), name
    project = tmp_path / "site"
    target = project / "node_modules" / "@medsim" / "ohif-similar-cases"
    target.parent.mkdir(parents=True)
    shutil.copytree(package, target)
    script = ("const ext = await import('@medsim/ohif-similar-cases');"
              "const mode = await import('@medsim/ohif-similar-cases/mode.js');"
              "console.log(JSON.stringify({extension: ext.default.id, mode: mode.MODE_ID}));")
    done = subprocess.run(["node", "--input-type=module", "-e", script], cwd=project, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    assert json.loads(done.stdout) == {"extension": "@medsim/extension-similar-cases",
                                       "mode": "@medsim/mode-similar-cases"}


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (Node.js 18+ runs the plugin tests)")
def test_every_filter_chip_sends_a_filter_the_server_accepts():
    """Each panel chip's filters object (logic.js, under node) parses with the server's own parser, into that filter."""
    import json

    from medsim.search import parse_filters

    script = ("const m = await import('./plugin/ohif/src/logic.js');"
              "console.log(JSON.stringify(m.FILTER_CHIPS.map(c => [c.group,"
              " m.filtersFromChips({[c.group]: c.id}, ['Effusion'])])));")
    done = subprocess.run(["node", "--input-type=module", "-e", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    chips = json.loads(done.stdout)
    assert {group for group, _ in chips} == {"view", "sex", "findings", "age", "modality", "study_date"}
    for group, spec in chips:
        assert list(spec) == [group], spec
        applied = parse_filters(spec).to_dict()
        assert group in applied, (spec, applied)

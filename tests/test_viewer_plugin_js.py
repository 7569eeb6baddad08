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

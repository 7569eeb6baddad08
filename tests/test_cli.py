"""The `medsim` command line: help must not load the heavy stack (torch, MONAI, OpenCV, hnswlib, Flask).

`medsim --help` and `medsim COMMAND --help` used to take ~10 s because building the parser imported torch and MONAI.
These tests check *what is imported*, not how long it takes (timings belong in benchmarks/): each help runs in a fresh
interpreter, which then reports the heavy top-level packages it loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# Top-level packages that printing help must never import (each costs from a few hundred ms to seconds).
HEAVY = {"torch", "torchvision", "monai", "ignite", "cv2", "hnswlib", "flask", "werkzeug", "waitress", "SimpleITK",
         "imagehash", "scipy", "matplotlib", "onnxruntime"}

PROBE = """
import json, sys
from medsim.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = set(json.loads({heavy!r}))
print("\\n@@" + json.dumps({{"code": code, "heavy": sorted({{m.split(".")[0] for m in sys.modules}} & heavy),
                            "medsim": sorted(m for m in sys.modules if m.startswith("medsim."))}}))
"""


def _subcommands() -> list[str]:
    from medsim.cli import _parser

    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


def _help(*argv: str) -> tuple[str, dict]:
    code = PROBE.format(heavy=json.dumps(sorted(HEAVY)))
    proc = subprocess.run([sys.executable, "-c", code, *argv, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "120"})
    out, sep, tail = proc.stdout.rpartition("\n@@")
    assert sep, f"medsim {' '.join(argv)} --help failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return out, json.loads(tail)


def test_subcommands_are_the_documented_ones():
    assert set(_subcommands()) >= {"build-index", "query", "evaluate", "calibrate", "train", "info", "duplicates",
                                   "serve"}


def test_top_level_help_imports_nothing_heavy():
    out, probe = _help()
    assert probe["code"] == 0
    assert out.startswith("usage: medsim")
    for command in _subcommands():
        assert command in out
    assert probe["heavy"] == [], f"`medsim --help` imported {probe['heavy']} (medsim modules: {probe['medsim']})"


@pytest.mark.parametrize("command", _subcommands())
def test_subcommand_help_imports_nothing_heavy(command):
    out, probe = _help(command)
    assert probe["code"] == 0
    assert out.startswith(f"usage: medsim {command}")
    assert "options:" in out and "-h, --help" in out
    assert probe["heavy"] == [], (
        f"`medsim {command} --help` imported {probe['heavy']} (medsim modules loaded: {probe['medsim']}): building "
        f"its parser must import nothing heavy (import inside the command function; take defaults/choices from a "
        f"light module)")


def test_lazy_subparsers_get_their_arguments():
    """duplicates and serve add their arguments on first use; the defaults still come from their modules."""
    from medsim.cli import _parser
    from medsim.duplicates import Thresholds

    args = _parser().parse_args(["duplicates", "--out", "dups.csv"])
    defaults = Thresholds()
    assert (args.min_cosine, args.max_hamming, args.neighbours) == (defaults.min_cosine, defaults.max_hamming,
                                                                    defaults.neighbours)
    assert args.func.__name__ == "cmd_duplicates" and str(args.out) == "dups.csv"
    args = _parser().parse_args(["serve", "--index", "idx"])
    assert args.func.__name__ == "cmd_serve"


def test_serve_viewer_flag_alone_means_the_pinned_viewer():
    import argparse

    from medsim.server.settings import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert str(parser.parse_args(["--index", "i", "--viewer"]).viewer_dir) == "pinned"
    assert str(parser.parse_args(["--index", "i", "--viewer", "/srv/ohif"]).viewer_dir) == "/srv/ohif"
    assert parser.parse_args(["--index", "i"]).viewer_dir is None

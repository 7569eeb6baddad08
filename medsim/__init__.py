"""medsim: similar-case retrieval for chest X-rays.

The version has one source, ``version`` in pyproject.toml; installed (wheel or editable) it is read back from the
package metadata, so ``medsim --version``, ``medsim.__version__`` and the wheel's name always agree.
"""

from __future__ import annotations


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medsim")
    except PackageNotFoundError:  # a source tree on sys.path without an install: read pyproject.toml itself
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"))
        except OSError:
            match = None
        return match.group(1) if match else "0+unknown"


__version__ = _version()

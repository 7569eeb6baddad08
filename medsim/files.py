"""Helpers every stage shares, kept in one place: where medsim keeps its caches, file digests, JSON-safe values.

This module sits at the bottom of the import graph (it imports nothing from medsim), so any stage may use it.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np


def medsim_home() -> Path:
    """``$MEDSIM_HOME``, else ``~/.cache/medsim``: model bundles, the int8 cache, evaluation and server caches."""
    env = os.environ.get("MEDSIM_HOME", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medsim"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (weights and datasets do not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_safe(obj):
    """``obj`` with numpy scalars/arrays as Python values, paths as text, dict keys as text and NaN/Inf as None.

    Floats are not rounded: a stored threshold must compare exactly with the scores it was chosen from."""
    if isinstance(obj, dict):
        return {str(key): json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj

"""Helpers every stage shares, kept in one place: where medsim keeps its caches, file digests, JSON-safe values.

This module sits at the bottom of the import graph (it imports nothing from medsim), so any stage may use it.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np


def medsim_home() -> Path:
    """``$MEDSIM_HOME``, else ``~/.cache/medsim``: model bundles, the int8 cache, evaluation and server caches."""
    env = os.environ.get("MEDSIM_HOME", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medsim"


def process_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_temp_root(kind: str) -> Path:
    """Where the processes of one kind keep their temp folders (:func:`process_temp_folder`)."""
    return Path(tempfile.gettempdir()) / f"medsim-{kind}-{os.getuid()}"


def process_temp_folder(kind: str) -> Path:
    """This process's folder under the machine's temp folder (``medsim-KIND-UID/PID``, created if missing), for files
    that live only while the process uses them. A process killed without running its cleanup (SIGKILL, a node
    lost, Ray ending an actor) leaves its folder behind: the folders of processes that are gone are removed first,
    so a kill leaves at most one stale folder until the next process of that kind starts."""
    root = process_temp_root(kind)
    root.mkdir(mode=0o700, exist_ok=True)
    own = str(os.getpid())
    for folder in root.iterdir():
        if folder.name != own and (not folder.name.isdigit() or not process_alive(int(folder.name))):
            shutil.rmtree(folder, ignore_errors=True)
    folder = root / own
    folder.mkdir(exist_ok=True)
    return folder


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

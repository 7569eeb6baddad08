"""The work folder of a training run (``--work-dir``; default ``.OUT-NAME.train`` beside the bundle).

* ``run.json``: the settings, label vocabulary, split, data fingerprint, starting bundle, the baseline's validation
  report, the last finished epoch and the status -- what ``--resume`` checks and continues from;
* ``history.json``: one row per finished epoch;
* ``last_checkpoint_epoch=N.pt`` (engine, network, optimizer, scheduler, early stopping: for ``--resume``) and
  ``best.pt`` (the network of the best validation epoch), written by MONAI's ``CheckpointSaver``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from medsim.files import json_safe

RUN_FORMAT = 1
LAST_CHECKPOINT_PREFIX = "last"  # CheckpointSaver(file_prefix=...): last_checkpoint_epoch=N.pt
BEST_CHECKPOINT = "best.pt"


def default_work_dir(out: str | Path) -> Path:
    out = Path(out).expanduser()
    return out.parent / f".{out.name}.train"


def write_json(path: Path, data) -> None:
    """``data`` as JSON (:func:`medsim.files.json_safe`), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2) + "\n")
    os.replace(tmp, path)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def checkpoint_epoch(path: Path) -> int:
    m = re.search(r"epoch=(\d+)", path.name)
    return int(m.group(1)) if m else 0


class RunFolder:
    """The files of one run's work folder (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.run_json = path / "run.json"
        self.history_json = path / "history.json"
        self.best_checkpoint = path / BEST_CHECKPOINT

    def read(self) -> dict | None:
        """run.json, or None when there is no run here."""
        return json.loads(self.run_json.read_text()) if self.run_json.is_file() else None

    def create(self, data: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.run_json, data)

    def update(self, **changes) -> None:
        data = json.loads(self.run_json.read_text())
        data.update(changes)
        write_json(self.run_json, data)

    def discard(self) -> None:
        shutil.rmtree(self.path)

    def latest_checkpoint(self) -> Path | None:
        files = list(self.path.glob(f"{LAST_CHECKPOINT_PREFIX}_checkpoint_epoch=*.pt"))
        return max(files, key=checkpoint_epoch) if files else None

    def finished_epochs(self) -> int:
        """The epoch of the latest checkpoint (0: none)."""
        last = self.latest_checkpoint()
        return checkpoint_epoch(last) if last is not None else 0

    def read_history(self, up_to_epoch: int) -> list[dict]:
        if not self.history_json.is_file():
            return []
        return [row for row in json.loads(self.history_json.read_text()) if row["epoch"] <= up_to_epoch]

    def write_history(self, rows: list[dict]) -> None:
        write_json(self.history_json, rows)

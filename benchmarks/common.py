"""Shared helpers of the benchmarks: where things live, the machine description, timing, JSON results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "var" / "bench"  # git-ignored: DICOM exports, cached tensors and vectors (derived from ../shared)
SAMPLE = ROOT / "sample_data" / "pacs_export"
DOCS = ROOT / "docs"
PLOTS = DOCS / "images"


def shared_data() -> Path:
    """../shared/data beside the checkout (or $MEDSIM_SHARED_DATA); read at run time only, never copied in."""
    if os.environ.get("MEDSIM_SHARED_DATA"):
        return Path(os.environ["MEDSIM_SHARED_DATA"])
    candidates = [ROOT.parent / "shared" / "data"]
    origin = subprocess.run(["git", "-C", str(ROOT), "remote", "get-url", "origin"], capture_output=True, text=True)
    if origin.returncode == 0 and Path(origin.stdout.strip()).is_dir():
        candidates.append(Path(origin.stdout.strip()).resolve().parent / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), candidates[0])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector-ISA flags that decide the numeric modes (bf16, int8) this CPU runs natively."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile",
              "avx_vnni")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [flag for flag in wanted if flag in have]
    except OSError:
        pass
    return []


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    """What the numbers were measured on, including how busy the machine was (other jobs slow everything)."""
    import numpy

    info = {
        "cpu": cpu_name(), "logical_cpus": os.cpu_count(), "cpu_flags": cpu_flags(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(), "python": platform.python_version(), "numpy": numpy.__version__,
        "load_average_1_5_15min": load_average(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["native_bf16"] = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                                   or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        info["mkldnn"] = bool(torch.backends.mkldnn.is_available())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def under_load(before: list[float], after: list[float], cpus: int | None = None) -> bool:
    """True when other work competed for the cores (1-minute load average above ~1.25 x cores at either end,
    minus what the benchmark itself adds, which is at most the cores)."""
    cpus = cpus or os.cpu_count() or 1
    peak = max([v[0] for v in (before, after) if v] or [0.0])
    return peak > 1.25 * cpus


def percentile(values, q: float) -> float | None:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def write_result(name: str, payload: dict, out_dir: Path = RESULTS) -> Path:
    """benchmarks/results/<name>.json, with the machine and a timestamp; returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **payload}
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(obj):
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start

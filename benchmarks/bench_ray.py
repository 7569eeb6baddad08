"""build-index on Ray against the local build, on this machine (issue 17): the Ray path's overhead and a 1 -> 2
worker-node curve.

Every build indexes the same N JPEG radiographs of ../shared/data/cxr (512 px; copied at run time to the git-ignored
var/bench/ray-cxr) from scratch, in a fresh process, with the default bundle, numeric mode and batch size:

  local            medsim.build.build_index as `medsim build-index` runs it (default workers)
  ray-local        the same with RayExecutor() (`build-index --ray`: a Ray for the run on this machine, all its CPUs)
  cluster-1 / -2   RayExecutor(address) on a cluster of this machine (ray.cluster_utils): a head with no CPUs (as
                   KubeRay's head is usually run) and 1, then 2 worker nodes of 2 logical CPUs each -- all on the
                   same 2 physical cores, so the curve measures Ray's distribution overhead, not added hardware

*Whole run* = indexed / the build's wall time (model load, Ray start or connection, actor start included); *steady*
= images committed after the first batch / the time since. Start-up is reported apart: *first commit* (seconds to
the first committed batch), *connect* (`ray.init`: starting a Ray or joining the cluster) and *teardown* (after the
last commit: stopping the workers, or the Ray this build started). A whole run tends to the steady ratio as N grows
(whole = N / (first commit + N / steady)), so a longer run (``--images 2000 --builds local,ray-local --result
ray_build_long``) shows what start-up costs a real build. The machine is shared: its load average is recorded
before and after each build.

    python -m benchmarks.bench_ray [--images 480] [--builds local,ray-local,cluster] [--result ray_build]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import shutil
import subprocess
import sys
import time

from benchmarks.common import ROOT, WORK, load_average, machine, say, shared_data, write_result

BUILD = r"""
import json, sys, time, warnings, logging
warnings.filterwarnings("ignore")
logging.getLogger("medsim.model").setLevel(logging.ERROR)
from medsim import build as B
from medsim.model import resolve_bundle
source, index, address = sys.argv[1], sys.argv[2], sys.argv[3]
stamps, connect = [], []
flush = B.IndexWriter.flush
def timed_flush(self):
    flush(self)
    stamps.append((time.perf_counter(), self.report.indexed))
B.IndexWriter.flush = timed_flush
started = time.perf_counter()
bundle = resolve_bundle(None)
executor = None
if address != "none":
    from medsim import build_ray as R
    join = R._connect
    def timed_connect(where):
        begun = time.perf_counter()
        try:
            return join(where)
        finally:
            connect.append(time.perf_counter() - begun)
    R._connect = timed_connect
    executor = R.RayExecutor(None if address == "local" else address)
report = B.build_index(source, index, bundle, progress=False, executor=executor)
wall = time.perf_counter() - started
steady = None
if len(stamps) >= 3 and stamps[-1][0] > stamps[0][0]:
    steady = (stamps[-1][1] - stamps[0][1]) / (stamps[-1][0] - stamps[0][0])
print(json.dumps({"indexed": report.indexed, "failed": dict(report.failed), "skipped": dict(report.skipped),
                  "seconds": report.seconds, "wall": wall, "images_per_s": report.images_per_second,
                  "steady_images_per_s": steady, "first_batch_s": stamps[0][0] - started if stamps else None,
                  "connect_s": connect[0] if connect else None,
                  "teardown_s": started + wall - stamps[-1][0] if stamps else None,
                  "mode": report.embed_mode}))
"""


def _source(n: int):
    """N JPEGs of the dev set (kermany and nih: 512 px), copied once."""
    folder = WORK / "ray-cxr" / str(n)
    if folder.is_dir() and len(list(folder.iterdir())) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cxr = shared_data() / "cxr"
    rows = [r for r in csv.DictReader(open(cxr / "labels.csv")) if r["path"].endswith(".jpg")
            and r["source"] in ("kermany", "nih", "nih2", "rsna")]
    if len(rows) < n:
        raise SystemExit(f"--images {n}: {cxr} has {len(rows)} JPEGs of those sources")
    for row in rows[:n]:
        shutil.copy(cxr / row["path"], folder / row["path"].replace("/", "_"))
    return folder


def _build(source, address: str, env: dict) -> dict:
    index = WORK / "ray-index"
    shutil.rmtree(index, ignore_errors=True)
    before = load_average()
    result = subprocess.run([sys.executable, "-c", BUILD, str(source), str(index), address], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore", **env}, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"build ({address}) failed: {result.stderr[-3000:]}")
    shutil.rmtree(index, ignore_errors=True)
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "load_average_before": before,
            "load_average_after": load_average()}


BUILDS = ("local", "ray-local", "cluster")


def run(images: int = 480, builds_wanted=BUILDS) -> dict:
    source = _source(images)
    builds = {}
    say(f"local build of {images} images")
    builds["local"] = _build(source, "none", {})
    if "ray-local" in builds_wanted:
        say("ray-local")
        builds["ray-local"] = _build(source, "local", {})
    if "cluster" in builds_wanted:
        builds.update(_cluster_builds(source))
    local = builds["local"]
    ratios = {name: {"whole_run": b["images_per_s"] / local["images_per_s"],
                     "steady": (b["steady_images_per_s"] / local["steady_images_per_s"]
                                if b["steady_images_per_s"] and local["steady_images_per_s"] else None),
                     "first_commit_extra_s": b["first_batch_s"] - local["first_batch_s"]}
              for name, b in builds.items() if name != "local"}
    return {"machine": machine(), "images": images, "source": "../shared/data/cxr JPEGs (512 px), kermany/nih/rsna",
            "builds": builds, "ratio_to_local": ratios,
            "note": "one 2-core VM; the 1-minute load average before and after each build is recorded with it"}


def _cluster_builds(source) -> dict:
    """cluster-1 and cluster-2: a head without CPUs, then 1 and 2 worker nodes of 2 logical CPUs."""
    builds = {}
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    os.environ.update(env)
    from ray.cluster_utils import Cluster

    temp_dir = f"/tmp/medsim-bench-ray-{os.getpid()}"
    cluster = Cluster()
    try:
        cluster.add_node(node_ip_address="127.0.0.1", num_cpus=0, include_dashboard=False,
                         object_store_memory=256 * 2**20, temp_dir=temp_dir)
        for nodes in (1, 2):
            cluster.add_node(node_ip_address="127.0.0.1", num_cpus=2, object_store_memory=256 * 2**20)
            say(f"cluster with {nodes} worker node(s)")
            builds[f"cluster-{nodes}"] = {**_build(source, cluster.address, env), "worker_nodes": nodes,
                                          "logical_cpus": 2 * nodes}
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    return builds


def _seconds(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def _table(data: dict) -> list[str]:
    rows = []
    for name, b in data["builds"].items():
        ratio = data["ratio_to_local"].get(name, {})
        rows.append(f"| {name} | {b['indexed']} | {b['wall']:.1f} | {b['images_per_s']:.2f} | "
                    f"{b['steady_images_per_s'] or 0:.2f} | "
                    + (f"{100 * ratio['whole_run']:.0f} % / {100 * ratio['steady']:.0f} %" if ratio.get("steady")
                       else "–")
                    + f" | {_seconds(b.get('first_batch_s'))} | {_seconds(b.get('connect_s'))} | "
                    f"{_seconds(b.get('teardown_s'))} | {b['load_average_before'][0]:.1f} → "
                    f"{b['load_average_after'][0]:.1f} | {b['mode']} |")
    return [("| build | images | wall s | whole run img/s | steady img/s | of local (whole / steady) | "
             "first commit s | Ray connect s | teardown s | load (1 min) | embedding mode |"),
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---|", *rows, ""]


def section_ray(results=None) -> list[str]:
    """The docs/performance.md section from benchmarks/results/ray_build.json and, when it was run, the longer
    ray_build_long.json (empty when neither was)."""
    from benchmarks.common import RESULTS

    found = {name: (results or RESULTS) / f"{name}.json" for name in ("ray_build", "ray_build_long")}
    found = {name: json.loads(path.read_text()) for name, path in found.items() if path.exists()}
    if not found:
        return []
    lines = ["## Build-index on Ray (issue 17)", ""]
    for name, data in found.items():
        m = data["machine"]
        lines += [
            f"`python -m benchmarks.bench_ray --images {data['images']}"
            + (f" --builds {','.join(b for b in BUILDS if b == 'local' or b in data['builds'])} --result {name}`"
               if name != "ray_build" else "`")
            + f" ({m['cpu']}, {m['logical_cpus']} logical CPUs, created {data['created_at']}): {data['images']} JPEG "
            "radiographs of the dev set (512 px) indexed from scratch, each build in a fresh process with the default "
            "bundle and mode. *local*: `build-index` as it runs by default; *ray-local*: `build-index --ray` (a Ray "
            "started for the run on this machine, 2 CPUs: one embedding actor of 2 torch threads, one decoding task at a "
            "time)"
            + ("; *cluster-1/-2*: `--ray ADDRESS` on a cluster of this machine with a head without CPUs and 1 then 2 "
               "worker nodes of 2 logical CPUs each (1 then 2 actors of 2 threads) -- on the same 2 physical cores, "
               "so the curve shows Ray's overhead, not more hardware" if "cluster-1" in data["builds"] else "")
            + f". **{data['note']}.**", "", *_table(data)]
    lines += [
        "Steady = images committed after the first batch / the time since (start-up excluded: Ray start or "
        "connection, actor start, model load). First commit = seconds from the start to the first committed batch; "
        "Ray connect = `ray.init` (starting a Ray for the run, or joining the cluster); teardown = after the last "
        "commit (stopping the Ray this build started). Goal: the Ray path ≥ 85 % of the local path's throughput. "
        + ("A steady ratio above 100 % is not Ray embedding faster: both embed with the same threads, and "
           "the rest is the noise of a VM (a few per cent when quiet) or, under load, processes taking a larger share "
           "of a contended machine ([scaling](scaling.md#measured-on-this-machine)). "
           if any((r.get("steady") or 0) > 1 for d in found.values() for r in d["ratio_to_local"].values()) else "")
        + "Cost model for 10^6-10^7 images: [scaling](scaling.md#how-many-nodes-the-cost-model).", ""]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=480, help="JPEGs of ../shared/data/cxr to index (default 480)")
    parser.add_argument("--builds", default=",".join(BUILDS),
                        help="which builds besides local: ray-local, cluster (1 and 2 worker nodes); default: all")
    parser.add_argument("--result", default="ray_build", choices=("ray_build", "ray_build_long"),
                        help="result file in benchmarks/results (ray_build_long: a longer run beside the default)")
    args = parser.parse_args()
    wanted = {b.strip() for b in args.builds.split(",") if b.strip()}
    if not wanted <= set(BUILDS):
        parser.error(f"--builds: choose from {', '.join(BUILDS)}")
    started = time.time()
    path = write_result(args.result, run(args.images, wanted))
    say(f"wrote {path} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

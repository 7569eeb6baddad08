"""`medsim build-index SOURCE --ray [ADDRESS]`: the build runner's work on a Ray cluster (Ray Data).

The runner (``medsim.build._run``) is the same as for a local build: this process lists what is new (the file
ledger), and its ``IndexWriter`` applies labels, drops duplicates and commits batches. Only the work in between runs
on the cluster, as one Ray Data pipeline:

    items (paths on storage every node mounts at the same path, or DICOMweb instance refs)
      → map_batches(read, decode, classify, preprocess)      stateless CPU tasks (Ray Data spreads them over the
                                                             nodes: its default scheduling strategy is SPREAD)
      → map_batches(_Embed, ActorPoolStrategy(size=N))       stateful actors holding the model: one GPU each
                                                             (num_gpus=1) when the cluster has GPUs, else one CPU
                                                             reserved and the cluster's CPUs / N torch threads
      → iter_batches on this process                         outcomes with their vectors, in the files' order,
                                                             → the writer

The model bundle travels through the object store (the nodes need medsim installed, not the bundle); each actor
verifies its fingerprint and picks its device's numeric mode by the local rules
(``medsim.model.embedder.embedding_plan``: bf16 on a GPU of compute capability 8 or more, else channels_last; int8
on CPUs with VNNI for a bundle that approved it; ``$MEDSIM_EMBED_MODE`` of this process is passed on). Ray retries
tasks and restarts actors lost with a node; an outcome that arrives twice is dropped here, and if the pipeline fails
anyway, what was committed stays and a re-run adds only the rest.

A GPU actor whose node declares a GPU to Ray but whose torch sees no CUDA device (a CPU-only torch in the node's
image, no driver, a wrong CUDA_VISIBLE_DEVICES) fails the build with one line naming the node, before any vector is
written; it does not fall back to the CPU. Such a node is misconfigured: a fallback would hold the GPU that Ray
reserved while embedding one thread at a time (10^7 images: weeks instead of hours) and in another numeric mode than
the actors whose GPU works, and a researcher would learn of it from the run time, not from the build. The fix is on
the node (or in its Ray resources), after which the same command runs the whole build.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

from medsim.build import BuildReport, _init_worker
from medsim.errors import MedsimError, ModelMismatch, short
from medsim.files import process_temp_folder, process_temp_root
from medsim.model.embedder import EMBED_MODE_ENV

# What an embedding actor reserves besides its CPU or GPU: torch and the model held in memory (a build-index embedding
# process peaks at ~1.3 GB, docs/performance.md). It also keeps Ray Data from fusing the decoding tasks into the
# actors (it fuses operators whose resources are equal), which would decode on the GPU nodes' actors.
ACTOR_MEMORY_BYTES = 2 * 2**30
# Object store of a Ray that medsim starts itself (no ADDRESS): the pipeline keeps a few batches of 224 px tensors
# (~0.6 MB per image) in flight; Ray's default would take 30 % of the RAM.
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
BUNDLE_COPIES = "ray-bundles"  # the kind of temp folder (medsim.files.process_temp_folder) the actors copy it into
CONNECT_TIMEOUT_SECONDS = 5.0
# Ray's single-machine mode (its default on macOS and Windows): every Ray process of this machine binds 127.0.0.1
# instead of every interface and advertising the machine's public address. Ray reads it when it is imported (into
# ray._private.ray_constants.ENABLE_RAY_CLUSTER): the processes it starts inherit the variable, and this process's
# copy of the constant is set for the start in case Ray was imported before.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayError(MedsimError):
    """The cluster could not be reached or the pipeline failed; what was committed is kept."""


class ActorSetupError(MedsimError):
    """An embedding actor could not start (no CUDA device, a bundle that does not match): Ray passes on only its
    message, which the driver turns back into one line."""


class RayExecutor:
    """Reading and embedding on a Ray cluster; see the module docstring.

    address: ``auto`` (the cluster this machine belongs to), ``ray://host:10001`` (Ray Client), ``host:port`` (the
    head's GCS), or None / ``local`` to start a Ray on this machine for the run (bound to 127.0.0.1, no dashboard, a
    small object store, as many CPUs as the machine has). actors: embedding actors (default: one per GPU, or half the cluster's CPUs when it has no GPU,
    so that decoding tasks keep the other half). items_per_task: files read by one decoding task (default: the
    embedding batch size)."""

    def __init__(self, address: str | None = None, actors: int | None = None, items_per_task: int | None = None):
        _check_reachable(address)  # before an index is created for nothing (Ray itself retries for minutes)
        self.address, self.actors, self.items_per_task = address, actors, items_per_task

    def embedder(self, bundle, batch_size: int):
        return None  # the actors embed; outcomes arrive with their vectors

    @contextmanager
    def outcomes(self, images, todo: list, bundle, batch_size: int, report: BuildReport):
        if not todo:  # nothing new: no cluster needed
            yield iter(())
            return
        started = _connect(self.address)
        import ray

        try:
            yield _RayOutcomes(self._dataset(ray, images, todo, bundle, batch_size), report)
        finally:
            if started:
                ray.shutdown()

    def _dataset(self, ray, images, todo: list, bundle, batch_size: int):
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-run execution plans on the console
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": ours
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the writer's bar is the one progress bar
        # in the files' order, as the local build: which of two files with one SOP UID is indexed must not depend on
        # which task finished first
        context.execution_options.preserve_order = True
        resources = ray.cluster_resources()
        actors, gpus_per_actor, device = self.plan(resources)
        threads = max(1, int(resources.get("CPU", 1)) // actors)
        per_task = self.items_per_task or batch_size
        items = ray.data.from_items([{"item": pickle.dumps(item)} for item in todo],
                                    override_num_blocks=max(1, math.ceil(len(todo) / per_task)))
        read = items.map_batches(_read_batch, batch_size=None, fn_kwargs={"task": images.task(bundle.preprocess)},
                                 num_cpus=1)
        env = {EMBED_MODE_ENV: os.environ[EMBED_MODE_ENV]} if os.environ.get(EMBED_MODE_ENV) else {}
        return read.map_batches(
            _Embed, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus_per_actor, num_cpus=1, memory=ACTOR_MEMORY_BYTES,
            fn_constructor_kwargs={"bundle_files": [ray.put(_bundle_files(bundle.path))],
                                   "fingerprint": bundle.fingerprint, "batch_size": batch_size,
                                   "device": device, "threads": threads, "env": env})

    def plan(self, resources: dict) -> tuple[int, int, str]:
        """(embedding actors, GPUs per actor, their device) for a cluster's resources (``ray.cluster_resources()``):
        one actor per GPU, each holding one (``cuda``), when the cluster has GPUs; else CPU actors.

        A CPU actor reserves one CPU but embeds with the cluster's CPUs / actors threads, as a local build embeds on
        every core while its decoding workers share them: decoding a 512-px image costs ~1/7 of embedding it, so the
        CPUs reserved for the decoding tasks would otherwise idle (one thread per actor on 2 cores: 78 % of the
        local build's steady rate, docs/performance.md)."""
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if gpus:
            return self.actors or gpus, 1, "cuda"
        return self.actors or max(1, cpus // 2), 0, "cpu"


class _RayOutcomes:
    """The pipeline's outcomes, each once (a task Ray re-ran after losing a node may deliver a file twice); records
    the embedding mode(s) the actors report in the build report."""

    def __init__(self, dataset, report: BuildReport):
        self.dataset, self.report = dataset, report
        self._modes: set[str] = set()

    def __iter__(self):
        seen: set[str] = set()
        try:
            for batch in self.dataset.iter_batches(batch_size=None, batch_format="numpy"):
                modes = {str(m) for m in batch["mode"] if m}
                if not modes <= self._modes:
                    self._modes |= modes
                    self.report.embed_mode = "; ".join(sorted(self._modes)) + " (Ray actors)"
                for blob in batch["outcome"]:
                    outcome = pickle.loads(blob)
                    if outcome.record.path not in seen:
                        seen.add(outcome.record.path)
                        yield outcome
        except (KeyboardInterrupt, MedsimError):
            raise
        except Exception as exc:  # noqa: BLE001 - Ray wraps what failed remotely in many exception types
            setup = re.search(rf"{ActorSetupError.__name__}: (.+)", str(exc))
            if setup:  # a node to fix, not a run to repeat
                raise RayError(f"an embedding actor could not start: {short(setup.group(1))}") from None
            raise RayError(f"the Ray pipeline failed ({short(f'{type(exc).__name__}: {exc}')}); every batch "
                           "committed before is kept: run the same command again to add the rest") from None


def _connect(address: str | None) -> bool:
    """Join the cluster at ``address`` or start a local Ray; True when this call initialised Ray (and must shut it
    down)."""
    local = address in (None, "", "local")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from a hospital's network
    if local:
        os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
    try:
        import ray
        import ray.data  # noqa: F401  (Ray without its Data library is not enough)
    except ImportError:
        raise RayError("build-index --ray needs Ray Data: pip install 'medsim[scale]'") from None
    if ray.is_initialized():
        return False
    try:
        if not local:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            from ray._private import ray_constants

            cluster_mode, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
            try:
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, _node_ip_address="127.0.0.1",
                         object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level=logging.WARNING)
            finally:
                ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayError(f"cannot start or reach Ray ({'local' if local else address}): {short(str(exc))}") from None
    return True


def _check_reachable(address: str | None) -> None:
    """An explicit HOST:PORT or ray://HOST:PORT must accept a TCP connection within a few seconds."""
    if address in (None, "", "local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except ValueError:
        raise RayError(f"--ray {address}: use auto, ray://HOST:PORT or HOST:PORT") from None
    except OSError as exc:
        raise RayError(f"the Ray cluster at {address} is unreachable: {exc.strerror or exc}") from None


def _bundle_files(folder: Path) -> dict[str, bytes]:
    """The bundle directory's files (weights, description, int8 calibration), by relative path."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(Path(folder).rglob("*")) if f.is_file()}


def _read_batch(batch: dict, task) -> dict:
    """Decoding task: one block of pickled items → pickled outcomes (never raises for bad input)."""
    _init_worker()
    outcomes = task([pickle.loads(blob) for blob in batch["item"]])
    return {"outcome": [pickle.dumps(o, protocol=5) for o in outcomes]}


def bundle_folders() -> Path:
    """Where embedding actors copy the bundle on a node: one folder per actor process, under the node's temp folder."""
    return process_temp_root(BUNDLE_COPIES)


def _actor_bundle_folder() -> Path:
    """An empty folder for this actor's copy of the bundle. Ray kills surplus or orphaned actors without running
    their cleanup, sometimes while they load: the folders of actors that are gone are removed first
    (:func:`medsim.files.process_temp_folder`), so a kill leaves at most one stale copy per node until the next
    actor starts."""
    folder = process_temp_folder(BUNDLE_COPIES)
    shutil.rmtree(folder, ignore_errors=True)  # a reused PID's leftovers
    folder.mkdir()
    return folder


class _Embed:
    """Embedding actor: the bundle written to a folder of the node (:func:`bundle_folders`), verified and loaded
    once, the folder removed; embeds the batch's prepared images and passes every outcome on with its vector (and
    without its image)."""

    def __init__(self, bundle_files: list, fingerprint: str, batch_size: int, device: str, threads: int, env: dict):
        import ray
        import torch

        from medsim.model import ModelBundle

        os.environ.update(env)
        context = ray.get_runtime_context()
        folder = _actor_bundle_folder()  # the files live only while the model loads
        try:
            for name, data in ray.get(bundle_files[0]).items():
                path = folder / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            bundle = ModelBundle.load(folder)
            if bundle.fingerprint != fingerprint:
                raise ModelMismatch(f"the bundle here is {bundle.fingerprint}, the index needs {fingerprint}")
            if device == "cpu":
                torch.set_num_threads(threads)
            self.embedder = bundle.embedder(device=device, batch_size=batch_size)  # embedding_plan's device and mode
        except MedsimError as exc:
            gpus = context.get_accelerator_ids().get("GPU") or []
            where = f"Ray node {ray.util.get_node_ip_address()} (ID {context.get_node_id()[:8]}" + \
                (f", given GPU {', '.join(gpus)}" if gpus else "") + ")"
            raise ActorSetupError(f"{where}: {exc}") from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.mode = self.embedder.describe()

    def __call__(self, batch: dict) -> dict:
        outcomes = [pickle.loads(blob) for blob in batch["outcome"]]
        prepared = [o for o in outcomes if o.image is not None]
        if prepared:
            for outcome, vector in zip(prepared, self.embedder.embed_prepared([o.image for o in prepared])):
                outcome.vector, outcome.image = vector, None
        return {"outcome": [pickle.dumps(o, protocol=5) for o in outcomes], "mode": [self.mode] * len(outcomes)}

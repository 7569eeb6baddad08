"""A real two-node Ray cluster on this machine's loopback interface, for tests/test_build_ray.py::

    from ray_fixtures import ray_cluster  # noqa: F401

A head node and a worker node, one CPU each, a small object store each, no dashboard, token authentication with a
token made for the session (nothing written to ~/.ray), every process bound to 127.0.0.1. The nodes are started with
Ray's own multi-node-on-one-host utility (``ray.cluster_utils.Cluster``: real GCS, raylets and workers, one set per
node) rather than ``ray start``: on Linux ``ray start --address 127.0.0.1:PORT`` rewrites a loopback address to the
machine's public one, and binding 127.0.0.1 needs Ray's single-machine mode, which ``ray start`` refuses for a
second node. :meth:`RayCluster.kill_worker` kills the worker node's raylet and workers (SIGKILL, no graceful
shutdown), as a lost machine would; the fixture stops every node it started, whatever happens.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass

import pytest

from medsim.build_ray import LOOPBACK_ONLY_ENV

NODE_OBJECT_STORE_BYTES = 160 * 2**20


@dataclass
class RayCluster:
    address: str
    cluster: object  # ray.cluster_utils.Cluster
    worker: object  # the worker node (ray._private.node.Node)

    def kill_worker(self) -> None:
        """The worker node dies (raylet and workers killed), and a fresh one joins, as a cluster manager (KubeRay)
        replaces a lost pod: with one CPU left the pipeline could not run its decoding tasks beside its actor."""
        self.cluster.remove_node(self.worker, allow_graceful=False)
        self.worker = _add_worker(self.cluster)


def _add_worker(cluster):
    return cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1, object_store_memory=NODE_OBJECT_STORE_BYTES)


@pytest.fixture(scope="module")
def ray_cluster():
    """The cluster; its address is for ``RayExecutor(address)`` / ``build-index --ray ADDRESS`` in this process."""
    env = {"RAY_USAGE_STATS_ENABLED": "0", LOOPBACK_ONLY_ENV: "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    temp_dir = tempfile.mkdtemp(prefix="medsim-ray-")  # short: Ray's socket paths live under it
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        import ray
        from ray._private import ray_constants
        from ray._raylet import AuthenticationTokenLoader
        from ray.cluster_utils import Cluster

        # both are read once per process: an earlier Ray in this session may have read them before
        patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        AuthenticationTokenLoader.instance().reset_cache()
        cluster = Cluster()
        try:
            cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1, include_dashboard=False,
                             object_store_memory=NODE_OBJECT_STORE_BYTES, temp_dir=temp_dir)
            yield RayCluster(cluster.address, cluster, _add_worker(cluster))
        finally:
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()
            AuthenticationTokenLoader.instance().reset_cache()
            shutil.rmtree(temp_dir, ignore_errors=True)


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses that these processes listen on (TCP, from /proc): the loopback check."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    addresses = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                addresses.add(_ip(fields[1].split(":")[0], width))
    return addresses


def _ip(hex_address: str, width: int) -> str:
    raw = bytes.fromhex(hex_address)
    if width == 8:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]  # four little-endian 32-bit words
    packed = b"".join(words)
    if packed[:12] == b"\0" * 10 + b"\xff\xff":
        return ".".join(str(b) for b in packed[12:])  # IPv4-mapped
    return ":".join(packed[i:i + 2].hex() for i in range(0, 16, 2))

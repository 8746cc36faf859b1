"""Real Redis servers for the Redis tier tests: a standalone server and a three-node Redis Cluster.

Each server is a ``redis-server`` process on a free 127.0.0.1 port with its
files in a temporary directory, no persistence, killed at teardown. The tests
are skipped (with the reason) when ``redis-server`` / ``redis-cli`` are not
on PATH; CI installs them (Debian: ``apt-get install redis-server``).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install 'redis>=5')")

START_SECONDS = 10.0


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not on PATH: install Redis (Debian/Ubuntu: apt-get install redis-server)")
    return path


def free_port(bus: bool = False) -> int:
    """A TCP port free on 127.0.0.1 now (and, with ``bus``, port + 10000 too, for the cluster bus)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not bus:
            return port
        if port + 10000 < 65536:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1:``port`` with its files in ``directory``."""

    def __init__(self, directory: Path, port: int | None = None, *extra: str):
        self.binary = require("redis-server")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port(bus=bool(extra))
        self.extra = extra
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> "RedisServer":
        with open(self.directory / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.directory), *self.extra],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.process.returncode}): "
                                   f"{(self.directory / 'redis.log').read_text()[-2000:]}")
            try:
                with self.client() as client:
                    if client.ping():
                        return self
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {START_SECONDS} s")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Kill the server (SIGKILL by default: a crash, no goodbye to clients)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)
        self.process = None


class RedisCluster:
    """Three ``redis-server`` nodes joined by ``redis-cli --cluster create``, no replicas."""

    def __init__(self, directory: Path, nodes: int = 3):
        cli = require("redis-cli")
        self.nodes = []
        for i in range(nodes):
            self.nodes.append(RedisServer(
                Path(directory) / f"node{i}", None, "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{i}.conf", "--cluster-node-timeout", "2000",
                # Keys of the nodes still up stay served when one node dies.
                "--cluster-require-full-coverage", "no"))
        try:
            for node in self.nodes:
                node.start()
            subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                            "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, capture_output=True, timeout=30)
            self._wait_ok()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            states = []
            for node in self.nodes:
                with node.client() as client:
                    states.append(client.execute_command("CLUSTER", "INFO").decode())
            if all("cluster_state:ok" in s and "cluster_slots_assigned:16384" in s for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok after 20 s: {states}")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def redis_server(tmp_path):
    """A fresh standalone redis-server (``.url``, ``.client()``, ``.stop()``, ``.start()``)."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory):
    """One standalone redis-server for a whole test module (tests isolate themselves by namespace)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """A three-node Redis Cluster for a whole test module (``.url``, ``.nodes``)."""
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def fresh_cluster(tmp_path):
    """A three-node Redis Cluster of one's own, for a test that kills a node."""
    cluster = RedisCluster(tmp_path / "cluster")
    yield cluster
    cluster.stop()

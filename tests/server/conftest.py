"""Fixtures for the cache server tests: real ``kvstore serve`` processes on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvstore.client import Connection

TOKEN = "test-token-0123456789abcdef"
_LISTEN = re.compile(r"listening on (kvstores?://[0-9.]+:\d+)")
_METRICS = re.compile(r"metrics on (http://[0-9.]+:\d+)/metrics")


class ServerProcess:
    """A ``kvstore serve`` subprocess: ``url``, ``metrics_url``; ``start``, ``stop`` (SIGTERM), ``kill`` (SIGKILL).

    ``restart()`` starts it again on the same data directory and the same port.
    """

    def __init__(self, data_dir: Path, *args: str, token: str | None = TOKEN, env: dict[str, str] | None = None):
        self.data_dir = Path(data_dir)
        self.args = list(args)
        self.token = token
        self.env = env or {}
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.metrics_url: str | None = None
        self.output: list[str] = []

    def start(self, timeout: float = 20.0) -> "ServerProcess":
        cmd = [sys.executable, "-m", "kvstore.cli", "serve", "--data-dir", str(self.data_dir),
               "--port", str(self.port), "--metrics-port", "0", *self.args]
        if self.token is not None:
            cmd += ["--token", self.token]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        # cwd: not the repository root, whose kvstore/ folder would shadow the installed package.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + timeout
        self.output = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited with {self.proc.wait()}: {''.join(self.output)}")
            self.output.append(line)
            if (m := _LISTEN.search(line)) is not None:
                self.url = m.group(1)
                self.port = int(self.url.rsplit(":", 1)[1])
            if (m := _METRICS.search(line)) is not None:
                self.metrics_url = m.group(1)
            if self.url and line.startswith(("kvstore serve: token ", "kvstore serve: unauthenticated,")) or (
                    line.startswith("kvstore serve: ") and "tenant(s):" in line):
                return self
        raise RuntimeError(f"server did not start within {timeout} s: {''.join(self.output)}")

    def connect(self, token: str | None = None, timeout: float = 10.0) -> Connection:
        return Connection(self.url, token or self.token, timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the exit status (0 after a graceful shutdown)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.output += self.proc.stdout.readlines()
        return code

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> "ServerProcess":
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def server_factory(tmp_path):
    """Start servers with ``server_factory(*flags, token=..., data_dir=...)``; all are killed at teardown."""
    started: list[ServerProcess] = []

    def start(*args: str, token: str | None = TOKEN, data_dir: Path | None = None,
              env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(data_dir or tmp_path / f"server{len(started)}", *args, token=token, env=env)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()
        if server.proc is not None and server.proc.stdout is not None:
            server.proc.stdout.close()


@pytest.fixture
def server(server_factory) -> ServerProcess:
    """One server with the test token, 64 MiB of RAM and 256 MiB of disk (fsync on)."""
    return server_factory("--host-bytes", "64MiB", "--disk-bytes", "256MiB")

"""``kvstore serve`` and ``kvstore stats`` from the command line.

Settings come from a TOML file (``--config``), ``KVSTORE_SERVER_*`` variables and flags, in that order
of precedence (flags win), checked on a real server through its STATS figures. ``kvstore stats``
prints a readable summary of a namespace, or a one-line error (exit 1, no traceback) when the
server cannot be reached.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys

import pytest

from conftest import TESTS_DIR

from kvstore.blockformat import BlockHeader
from kvstore.cli import main
from kvstore.server.config import FLAG_HELP, ServerConfig

from .conftest import TOKEN, ServerProcess

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kvstore(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``kvstore ARGS`` in a fresh process."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args], capture_output=True, text=True,
                          env=environ, timeout=timeout, cwd=TESTS_DIR)


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    """A server whose settings come from all three sources: the file sets host_bytes, disk_bytes and
    max_keys; the environment overrides host_bytes and disk_bytes; a flag overrides host_bytes again."""
    root = tmp_path_factory.mktemp("cli-srv")
    config = root / "server.toml"
    config.write_text('[server]\nhost_bytes = "8MiB"\ndisk_bytes = "32MiB"\nmax_keys = 100\n')
    server = ServerProcess(root / "data", "--config", str(config), "--host-bytes", "24MiB",
                           env={"KVSTORE_SERVER_HOST_BYTES": "16MiB", "KVSTORE_SERVER_DISK_BYTES": "48MiB"}).start()
    yield server
    server.kill()


def test_serve_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--host", "--port", "--data-dir", "--host-bytes", "--disk-bytes", "--disk-sync",
                 "--durable", "--tokens-file", "--token", "--max-frame-bytes", "--max-keys", "--max-connections",
                 "--max-inflight-bytes", "--metrics-port", "--tls-cert", "--shutdown-grace-seconds"):
        assert f"{flag} " in text or f"{flag}\n" in text, flag
    assert "KVSTORE_SERVER_" in text


def test_flags_override_the_environment_which_overrides_the_file(configured, capsys):
    assert main(["stats", "--url", configured.url, "--token", TOKEN, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["server"]["ram_capacity_bytes"] == 24 * MiB  # flag, over the environment and the file
    assert stats["server"]["disk_capacity_bytes"] == 48 * MiB  # environment, over the file
    conn = configured.connect()
    try:
        assert conn.welcome.max_keys == 100  # the file, over the default
        assert conn.welcome.quota_bytes == 48 * MiB  # no quota: the server's capacity
    finally:
        conn.close()
    assert "host RAM 24.0 MiB, disk 48.0 MiB" in "".join(configured.output)  # sizes as an operator writes them


def test_stats_prints_a_readable_summary(configured, capsys, tmp_path):
    payload = bytes(range(256)) * 8
    conn = configured.connect()
    try:
        keys = [b"cli-stats-%d" % i for i in range(3)]
        conn.put([(k, [BlockHeader.for_payload(k, b"F" * 16, payload).pack(), payload]) for k in keys])
        assert conn.get([keys[0], b"cli-stats-missing"], lambda i, size: [memoryview(bytearray(size))]) == [72 + len(payload), None]
        blocks = conn.stats()["blocks"]["blocks"]
    finally:
        conn.close()
    assert main(["stats", "--url", configured.url, "--token", TOKEN]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith(f"server {configured.url}: up ")
    assert f"namespace default: {blocks} blocks" in text
    assert "(quota none)" in text
    assert "1 hits (1 from RAM, 0 from disk), 1 misses (50.0% hit rate)" in text
    assert "3 stored, 0 already present, 0 rejected, 0 invalid" in text
    assert "host RAM" in text and "of 24.0 MiB" in text and "of 48.0 MiB" in text
    # the token from a file, as an operator would keep it
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert main(["stats", "--url", configured.url, "--token-file", str(token_file)]) == 0
    assert f"namespace default: {blocks} blocks" in capsys.readouterr().out


def test_stats_with_a_wrong_token_is_a_one_line_error(configured, capsys):
    assert main(["stats", "--url", configured.url, "--token", "not-the-token-0123456789"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("kvstore: error: ") and "UNAUTHORIZED" in captured.err
    assert "kvstore serve running" not in captured.err  # the server answered: no hint that it is down
    assert len(captured.err.strip().splitlines()) == 1


def test_stats_against_a_closed_port_exits_1_without_a_traceback():
    done = kvstore("stats", "--url", f"kvstore://127.0.0.1:{free_port()}", "--token", TOKEN, "--timeout", "2")
    assert done.returncode == 1, done
    assert done.stdout == ""
    assert done.stderr.startswith("kvstore: error: ") and "refused" in done.stderr.lower()
    assert "Traceback" not in done.stderr
    assert "kvstore://127.0.0.1:" in done.stderr and "kvstore serve" in done.stderr  # names the URL, says what to do


def one_line_error(done: subprocess.CompletedProcess, code: int = 1) -> str:
    """The one ``kvstore: error:`` line a misused command must print (no traceback, nothing else)."""
    assert done.returncode == code, done
    assert "Traceback" not in done.stderr and "Task was destroyed" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvstore: error: "), done.stderr
    return lines[0]


def test_a_second_server_on_a_held_data_dir_or_a_used_port_says_which_and_what_to_do(configured, tmp_path):
    held = one_line_error(kvstore("serve", "--data-dir", str(configured.data_dir), "--port", "0",
                                  "--metrics-port", "none", "--token", TOKEN))
    assert str(configured.data_dir) in held and "--data-dir" in held
    port = configured.port
    used = one_line_error(kvstore("serve", "--data-dir", str(tmp_path / "a"), "--port", str(port),
                                  "--metrics-port", "none", "--token", TOKEN))
    assert f"127.0.0.1:{port}" in used and "--port" in used and "in use" in used
    metrics_port = int(configured.metrics_url.rsplit(":", 1)[1].split("/")[0])
    used = one_line_error(kvstore("serve", "--data-dir", str(tmp_path / "b"), "--port", "0",
                                  "--metrics-port", str(metrics_port), "--token", TOKEN))
    assert f"127.0.0.1:{metrics_port}" in used and "--metrics-port" in used and "metrics" in used
    again = ServerProcess(tmp_path / "b", "--metrics-port", "none").start()  # the failed start let go of it
    try:
        assert again.metrics_url is None  # --metrics-port none turns the endpoint off
        assert not any("metrics on" in line for line in again.output)
    finally:
        again.kill()


@pytest.mark.parametrize("timeout", ["inf", "-1", "0", "1e300"])
def test_stats_with_a_timeout_no_socket_takes_is_a_one_line_error(timeout):
    done = kvstore("stats", "--url", f"kvstore://127.0.0.1:{free_port()}", "--token", TOKEN, "--timeout", timeout)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("kvstore: error: --timeout: expected seconds > 0")


def test_stats_without_a_token_file_says_where_a_token_comes_from(tmp_path):
    message = one_line_error(kvstore("stats", "--token-file", str(tmp_path / "nope")), code=2)
    assert str(tmp_path / "nope") in message and "--token" in message and "KVSTORE_REMOTE_TOKEN" in message


def test_stats_into_a_closed_pipe_ends_quietly(configured):
    done = subprocess.run(f"{shlex.quote(sys.executable)} -m kvstore.cli stats --url {configured.url} "
                          f"--token {TOKEN} | head -c 10", shell=True, capture_output=True, text=True,
                          cwd=TESTS_DIR, timeout=60)
    assert done.returncode == 0 and done.stdout == f"server {configured.url}"[:10]
    assert done.stderr == ""


def test_version_and_help_say_what_they_should():
    done = kvstore("--version")
    assert done.returncode == 0 and done.stdout.strip().startswith("kvstore ")
    text = kvstore("serve", "--help").stdout
    assert set(FLAG_HELP) == {f.name for f in dataclasses.fields(ServerConfig)}  # every setting described
    for help_text in FLAG_HELP.values():
        assert " ".join(help_text.split()[:3]) in " ".join(text.split())


def test_an_unknown_server_variable_stops_serve_and_is_named(tmp_path):
    done = kvstore("serve", "--data-dir", str(tmp_path / "data"), "--port", "0", "--metrics-port", "0",
                   "--token", TOKEN, env={"KVSTORE_SERVER_FOO": "1"})
    assert done.returncode == 2, done
    assert "KVSTORE_SERVER_FOO" in done.stderr and "Traceback" not in done.stderr
    assert "listening" not in done.stdout
    assert not (tmp_path / "data").exists()  # refused before anything was created


@pytest.mark.parametrize("args, message", [
    (["--host-bytes", "lots"], "host_bytes"),
    (["--durable", "maybe"], "--durable"),
    (["--host", "0.0.0.0", "--allow-unauthenticated", "true"], "allow_unauthenticated"),
])
def test_a_bad_setting_stops_serve_and_is_named(tmp_path, capsys, monkeypatch, args, message):
    # in-process: the settings are checked before anything is opened or bound (never serve from a test)
    monkeypatch.setattr("kvstore.server.run", lambda config: pytest.fail(f"serve accepted {args}: {config}"))
    assert main(["serve", "--data-dir", str(tmp_path / "data"), "--port", "0", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvstore: error: ") and message in err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("content, message", [("host_bytes: [unclosed\n", "not valid YAML"),
                                              ("1: 2\nfoo: 3\n", "expected setting names as strings")])
def test_a_config_file_that_does_not_parse_stops_serve_in_one_line(tmp_path, content, message):
    path = tmp_path / "server.yaml"
    path.write_text(content)
    done = kvstore("serve", "--config", str(path), "--data-dir", str(tmp_path / "data"), "--port", "0",
                   "--metrics-port", "0", "--token", TOKEN)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("kvstore: error: ") and message in done.stderr and str(path) in done.stderr


def test_a_disk_larger_than_the_machine_can_map_stops_serve_in_one_line(tmp_path):
    done = kvstore("serve", "--data-dir", str(tmp_path / "data"), "--disk-bytes", "1000TiB", "--port", "0",
                   "--metrics-port", "0", "--token", TOKEN)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "disk_bytes: expected a size this machine can map" in done.stderr


@pytest.mark.parametrize("content", [None, "not a certificate"])
def test_a_tls_file_that_is_missing_or_not_pem_stops_serve_naming_it(tmp_path, content):
    cert = tmp_path / "cert.pem"
    if content is not None:
        cert.write_text(content)
    done = kvstore("serve", "--tls-cert", str(cert), "--tls-key", str(cert), "--data-dir", str(tmp_path / "data"),
                   "--port", "0", "--metrics-port", "0", "--token", TOKEN)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "tls_cert, tls_key: expected a readable PEM certificate" in done.stderr and str(cert) in done.stderr

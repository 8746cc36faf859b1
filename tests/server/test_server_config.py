"""ServerConfig and the StoreConfig settings of the shared tiers: validation and precedence."""

from __future__ import annotations

import pytest

from kvstore import StoreConfig
from kvstore.server import ServerConfig


def test_server_defaults_are_loopback_and_bounded():
    config = ServerConfig()
    assert config.host == "127.0.0.1" and config.port == 8477 and config.metrics_port == 8478
    assert config.max_frame_bytes == 256 << 20 and config.max_inflight_bytes == 512 << 20
    assert config.host_bytes == 1 << 30 and config.disk_bytes == 16 << 30


@pytest.mark.parametrize("changes, message", [
    (dict(host="0.0.0.0", allow_unauthenticated=True), "loopback"),
    (dict(port=70000), "port"),
    (dict(max_frame_bytes="1GiB", max_inflight_bytes="512MiB"), "max_frame_bytes"),
    (dict(max_frame_bytes=16), "max_frame_bytes: expected at least 4096"),  # no HELLO would fit
    (dict(tls_cert="c.pem"), "tls_cert, tls_key"),
    (dict(loop="trio"), "loop"),
    (dict(host_bytes=0), "host_bytes"),
    (dict(durable="yes"), "durable"),
    # an empty host (an unset variable in a unit file) bound every interface; wrong types raised TypeError
    (dict(host=""), "host: expected a host name or address to listen on, got ''"),
    (dict(host=5), "host: expected a host name or address to listen on, got 5"),
    (dict(host=["a"]), "host: expected"),
    (dict(tls_cert=5, tls_key=6), "tls_cert: expected a file path, got 5"),
    (dict(tokens_file=5), "tokens_file: expected a file path, got 5"),
    (dict(token=7), "token: expected a token, got 7"),
    # read from a TOML file: infinity overflowed the server's waits; the flags refused it already
    (dict(shutdown_grace_seconds=float("inf")), r"shutdown_grace_seconds: expected a number > 0 and <= 86400"),
    (dict(request_timeout_seconds=1e300), r"request_timeout_seconds: expected a number > 0 and <= 86400"),
    (dict(hello_timeout_seconds=float("nan")), r"hello_timeout_seconds: expected"),
])
def test_server_config_errors_name_the_setting(changes, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(**changes)


def test_unauthenticated_is_allowed_on_loopback():
    assert ServerConfig(host="::1", allow_unauthenticated=True).allow_unauthenticated


def test_server_precedence_is_flags_then_env_then_file(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text('[server]\nhost_bytes = "2GiB"\ndisk_bytes = "3GiB"\nmax_keys = 10\n')
    env = {"KVSTORE_SERVER_DISK_BYTES": "4GiB", "KVSTORE_SERVER_DURABLE": "true", "KVSTORE_HOST_BYTES": "1GiB"}
    config = ServerConfig.load(path, env, max_keys=20)
    assert (config.host_bytes, config.disk_bytes, config.durable, config.max_keys) == (2 << 30, 4 << 30, True, 20)
    assert ServerConfig.load(None, {"KVSTORE_SERVER_METRICS_PORT": "none"}).metrics_port is None


def test_unknown_server_variable_is_named():
    with pytest.raises(ValueError, match="KVSTORE_SERVER_HOSTBYTES"):
        ServerConfig.load(None, {"KVSTORE_SERVER_HOSTBYTES": "1GiB"})


def test_store_config_ignores_server_variables_and_reads_remote_ones():
    env = {"KVSTORE_SERVER_PORT": "9", "KVSTORE_REMOTE_URL": "kvstore://10.0.0.1:8477",
           "KVSTORE_REMOTE_TIMEOUT_SECONDS": "0.5", "KVSTORE_REDIS_TTL_SECONDS": "60"}
    config = StoreConfig.load(None, env)
    assert config.remote_url == "kvstore://10.0.0.1:8477"
    assert config.remote_timeout_seconds == 0.5 and config.redis_ttl_seconds == 60.0


@pytest.mark.parametrize("changes, message", [
    (dict(remote_url="http://x:1"), "remote_url"),
    (dict(remote_url="kvstore://"), "remote_url"),
    (dict(redis_url="memcached://x"), "redis_url"),
    (dict(redis_ttl_seconds=0), "redis_ttl_seconds"),
    (dict(remote_connections=0), "remote_connections"),
    (dict(remote_codec="zip"), "codec"),
    (dict(remote_token=""), "remote_token"),
    (dict(remote_write_policy="sometimes"), "remote_write_policy"),
])
def test_store_config_shared_tier_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        StoreConfig(**changes)


def test_a_shared_tier_alone_is_a_store():
    config = StoreConfig(host_bytes=0, redis_url="redis://127.0.0.1:6379/0")
    assert config.tier_write_policy("redis") == "write_through"


def test_the_server_process_keeps_freed_blocks_for_lmdb_to_reuse():
    """``kvstore serve`` raises glibc's mmap threshold so LMDB's per-commit page buffers are reused (a fresh
    mapping per 32 MiB commit faults in 8,192 pages); done in a child process, as the server does it."""
    from conftest import run_python

    out = run_python("from kvstore.server.serve import keep_freed_memory; print(keep_freed_memory(256 << 20))")
    assert out.strip() == "True"

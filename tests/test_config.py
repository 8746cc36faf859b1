"""StoreConfig and parse_size: code, TOML, YAML and KVSTORE_* variables."""

from __future__ import annotations

import pytest

from kvstore.config import StoreConfig
from kvstore.sizes import parse_size

MiB = 1 << 20
GiB = 1 << 30


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512MiB", 512 * MiB),
        ("4GiB", 4 * GiB),
        ("4gib", 4 * GiB),
        (" 4 GiB ", 4 * GiB),
        ("1KiB", 1024),
        ("2TiB", 2 << 40),
        ("1.5GiB", 3 * GiB // 2),
        ("1GB", 10**9),
        ("3MB", 3 * 10**6),
        ("7k", 7000),
        ("123", 123),
        ("123B", 123),
        (0, 0),
        (536870912, 536870912),
        ("9007199254740993", 9007199254740993),  # exact: a float made it ...992
        ("9223372036854775807", 2**63 - 1),
        ("0.5KiB", 512),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected
    assert type(parse_size(text)) is int


@pytest.mark.parametrize("bad", ["lots", "", "4 GiBs", "-1", "1e9", "GiB", -5, True, 1.5, None,
                                 "\u0661\u0662\u0663",  # Arabic-Indic digits: \\d took them as 123
                                 "9223372036854775808", 2**63, "9" * 25 + "TiB",
                                 "1.5b", "0.5"])  # a fraction of a byte (it was cut to 1 and 0)
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError) as info:
        parse_size(bad, "host_bytes")
    assert str(info.value).startswith("host_bytes:")
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)


@pytest.mark.parametrize("bad", ["9" * 400, "1" + "0" * 309 + "GiB"])
def test_parse_size_of_hundreds_of_digits_is_a_value_error(bad):
    """It raised OverflowError (float infinity), which ``kvstore info`` and ``serve`` showed as a traceback."""
    with pytest.raises(ValueError, match="^host_bytes: expected a byte size up to"):
        parse_size(bad, "host_bytes")


def test_defaults_and_sizes_in_code():
    config = StoreConfig()
    assert config.host_bytes == GiB
    assert config.disk_bytes == 16 * GiB
    assert (config.model_id, config.disk_dir, config.write_policy, config.hash, config.promote,
            config.disk_sync) == ("default", None, "write_through", "sha256", True, True)
    config = StoreConfig(host_bytes="512MiB", disk_bytes="4GiB", disk_dir="/tmp/x")
    assert (config.host_bytes, config.disk_bytes) == (512 * MiB, 4 * GiB)
    assert StoreConfig(host_bytes=12345).host_bytes == 12345
    # replace validates again and keeps parsed sizes
    assert config.replace(host_bytes="1MiB").host_bytes == MiB
    with pytest.raises(ValueError, match="write_policy"):
        config.replace(write_policy="never")


def test_disk_dir_pathlike(tmp_path):
    config = StoreConfig(disk_dir=tmp_path)
    assert config.disk_dir == str(tmp_path)
    assert isinstance(config.disk_dir, str)


TOML = """\
model_id = "llama-3-8b"
host_bytes = "512MiB"
disk_dir = "{disk}"
disk_bytes = "4GiB"
write_policy = "write_back"
hash = "blake2b"
promote = false
disk_sync = false
"""

YAML = """\
model_id: llama-3-8b
host_bytes: 512MiB
disk_dir: {disk}
disk_bytes: 4GiB
write_policy: write_back
hash: blake2b
promote: false
disk_sync: false
"""


def _expected(disk):
    return StoreConfig(model_id="llama-3-8b", host_bytes=512 * MiB, disk_dir=str(disk), disk_bytes=4 * GiB,
                       write_policy="write_back", hash="blake2b", promote=False, disk_sync=False)


@pytest.mark.parametrize("suffix, template", [(".toml", TOML), (".yaml", YAML), (".yml", YAML)])
def test_file_top_level(tmp_path, suffix, template):
    path = tmp_path / f"kv{suffix}"
    path.write_text(template.format(disk=tmp_path / "d"))
    config = StoreConfig.from_file(path)
    assert config == _expected(tmp_path / "d")
    assert config.host_bytes == 536870912 and config.disk_bytes == 4294967296
    assert StoreConfig.load(path, environ={}) == config


def test_toml_kvstore_table(tmp_path):
    path = tmp_path / "serving.toml"
    body = "\n".join(f"  {line}" for line in TOML.format(disk=tmp_path / "d").splitlines())
    path.write_text("[kvstore]\n" + body + "\n")
    assert StoreConfig.from_file(path) == _expected(tmp_path / "d")


def test_yaml_kvstore_table(tmp_path):
    path = tmp_path / "serving.yaml"
    body = "\n".join(f"  {line}" for line in YAML.format(disk=tmp_path / "d").splitlines())
    path.write_text("kvstore:\n" + body + "\n")
    assert StoreConfig.from_file(path) == _expected(tmp_path / "d")


def test_kvstore_table_beside_other_tables_is_refused_naming_them(tmp_path):
    """It was read as the settings 'kvstore' and 'engine', both unknown."""
    path = tmp_path / "serving.toml"
    path.write_text('[kvstore]\nhost_bytes = "1MiB"\n[engine]\nx = 1\n')
    with pytest.raises(ValueError, match=r"expected the \[kvstore\] table alone, beside the \[server\] table or beside "
                                         r"top-level settings of the server, got \[kvstore\] beside \['engine'\]"):
        StoreConfig.from_file(path)


def test_one_file_holds_the_store_and_the_server_tables(tmp_path):
    from kvstore.server.config import ServerConfig

    path = tmp_path / "kvstore.toml"
    path.write_text(f'[kvstore]\nhost_bytes = "1MiB"\n[server]\nmax_keys = 10\ndata_dir = "{tmp_path / "s"}"\n')
    assert StoreConfig.from_file(path).host_bytes == 1 << 20
    assert ServerConfig.load(path, environ={}).max_keys == 10
    # the store's settings at the top level, beside the server's table
    path.write_text(f'host_bytes = "1MiB"\n[server]\nmax_keys = 10\ndata_dir = "{tmp_path / "s"}"\n')
    assert StoreConfig.from_file(path).host_bytes == 1 << 20
    assert ServerConfig.load(path, environ={}).max_keys == 10
    path.write_text('host_bytes = "1MiB"\n[kvstore]\nhost_bytes = "2MiB"\n[server]\nmax_keys = 10\n')  # whose?
    with pytest.raises(ValueError, match=r"beside \['host_bytes'\]"):
        StoreConfig.from_file(path)


def test_a_server_setting_above_the_server_table_is_refused_not_ignored(tmp_path):
    """Top-level settings beside ``[server]`` are the store's: the server's ``port`` there was silently dropped."""
    from kvstore.server.config import ServerConfig

    path = tmp_path / "kvstore.toml"
    path.write_text('port = 9999\nhost_bytes = "5MiB"\n[server]\nmax_keys = 16\n')
    with pytest.raises(ValueError, match=r"top-level settings beside the \[server\] table are the kvstore's; "
                                         r"\['port'\] are none of the kvstore's settings \(expected them in \[server\]\)"):
        ServerConfig.load(path, environ={})
    path.write_text('port = 1\nbogus = 2\n[kvstore]\nhost_bytes = "1MiB"\n')  # and the other way round
    with pytest.raises(ValueError, match=r"\['bogus'\] are none of the server's settings"):
        StoreConfig.from_file(path)
    path.write_text('port = 1\n[kvstore]\nhost_bytes = "1MiB"\n')
    assert StoreConfig.from_file(path).host_bytes == 1 << 20


@pytest.mark.parametrize(
    "suffix, content",
    [
        (".toml", 'host_bytes = "1MiB"\nhost_byte = "2MiB"\n'),
        (".yaml", "host_bytes: 1MiB\nhost_byte: 2MiB\n"),
        (".toml", '[kvstore]\nhost_byte = "2MiB"\n'),
    ],
)
def test_unknown_key_in_file(tmp_path, suffix, content):
    path = tmp_path / f"c{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        StoreConfig.from_file(path)
    message = str(info.value)
    assert "host_byte'" in message  # the unknown key, quoted
    assert str(path) in message
    assert "host_bytes" in message  # what was expected


@pytest.mark.parametrize(
    "field, toml_value, shown",
    [
        ("write_policy", '"sometimes"', "sometimes"),
        ("host_bytes", '"lots"', "lots"),
        ("disk_bytes", '"-3GiB"', "-3GiB"),
        ("hash", '"md5"', "md5"),
        ("promote", '"yes"', "yes"),
        ("model_id", '""', "''"),
    ],
)
def test_bad_value_in_file(tmp_path, field, toml_value, shown):
    path = tmp_path / "c.toml"
    path.write_text(f"{field} = {toml_value}\n")
    with pytest.raises(ValueError) as info:
        StoreConfig.from_file(path)
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert shown in message


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(write_policy="sometimes"), "write_policy"),
        (dict(host_bytes="lots"), "host_bytes"),
        (dict(hash="md5"), "hash"),
        (dict(disk_bytes=-1), "disk_bytes"),
        (dict(promote=1), "promote"),
        (dict(disk_sync="true"), "disk_sync"),
        (dict(host_bytes=0), "host_bytes"),  # no tier at all
        (dict(model_id="\ud800"), "model_id"),  # no UTF-8 encoding: the keys could not be made
        (dict(device="meta", device_bytes="4KiB"), "device"),  # holds no data: nothing could be read back
        (dict(device="bogus:x"), "device"),
        (dict(remote_url="kvstore://127.0.0.1:1", remote_timeout_seconds=float("inf")), "remote_timeout_seconds"),
        (dict(redis_url="redis://127.0.0.1:1", redis_timeout_seconds=1e300), "redis_timeout_seconds"),
        (dict(prefetch_timeout_base_seconds=float("inf")), "prefetch_timeout_base_seconds"),
        (dict(redis_url="redis://127.0.0.1:1", redis_ttl_seconds=float("inf")), "redis_ttl_seconds"),
        (dict(remote_url="kvstore://h:99999"), "remote_url"),
        (dict(remote_url="kvstore://h:abc"), "remote_url"),
        (dict(remote_url="kvstore://[::1"), "remote_url"),
        (dict(remote_url="kvstore://:5000"), "remote_url"),
        (dict(redis_url="redis://h:abc"), "redis_url"),
        (dict(redis_url="redis+cluster://a:1,b:x"), "redis_url"),
        # A database or query redis-py would misread (database 0) or reject only at KVStore(...) as "url:".
        (dict(redis_url="redis://h:1/abc"), "redis_url"),
        (dict(redis_url="redis://h:1/0?db=zz"), "redis_url"),
        (dict(redis_url="redis://h:1/0?socket_timeout=abc"), "redis_url"),
        # the query overrode the tier's own options: ?socket_timeout=8 made a hung server cost 8 s a call, not
        # redis_timeout_seconds, and ?socket_timeout=0 failed every call
        (dict(redis_url="redis://h:1/0?socket_timeout=8"), "redis_url"),
        (dict(redis_url="unix:///tmp/r.sock?socket_timeout=0"), "redis_url"),
        (dict(redis_url="redis://h:1?socket_connect_timeout=9"), "redis_url"),
        (dict(redis_url="redis://h:1?retry_on_timeout=yes"), "redis_url"),
        (dict(redis_url="redis+cluster://a:1,b:2/1"), "redis_url"),
        (dict(redis_url="redis+cluster://a:1?socket_timeout=3"), "redis_url"),
        (dict(host_codec="bogus"), "host_codec"),
        (dict(host_codec="zstd:foo=1"), "host_codec"),
        (dict(files_codec="zstd:level=1,level=2"), "files_codec"),
        # inf degraded a tier for ever after one error, or hid every slowness; 10**400 raised OverflowError
        (dict(degraded_seconds=float("inf")), "degraded_seconds"),
        (dict(degraded_seconds=1e300), "degraded_seconds"),
        (dict(slow_factor=float("inf")), "slow_factor"),
        (dict(slow_factor=10**400), "slow_factor"),
        (dict(prefill_tokens_per_second=float("inf")), "prefill_tokens_per_second"),
        (dict(prefill_tokens_per_second=10**400), "prefill_tokens_per_second"),
    ],
)
def test_bad_value_in_code(kwargs, field):
    with pytest.raises(ValueError) as info:
        StoreConfig(**kwargs)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


@pytest.mark.parametrize("kwargs", [dict(redis_url="redis://:pw@h:6379/0"), dict(redis_url="redis+cluster://a:1,b:2"),
                                    dict(redis_url="unix:///tmp/x.sock"), dict(remote_url="kvstore://[::1]:5000"),
                                    dict(remote_url="kvstore://h"), dict(redis_url="redis://h", redis_ttl_seconds=2**31 - 1),
                                    dict(redis_url="redis://h:1/3"), dict(redis_url="redis://h:1/"),
                                    dict(redis_url="unix:///tmp/x.sock?db=2"), dict(redis_url="redis+cluster://a:1/0"),
                                    dict(device="cuda:1")])
def test_good_addresses_and_bounds_are_accepted(kwargs):
    assert StoreConfig(**kwargs)


@pytest.mark.parametrize("suffix, content, expected", [
    (".yaml", "1: 2\nfoo: 3\n", "expected setting names as strings, got 1"),
    (".yaml", "host_bytes: [unclosed\n", "not valid YAML"),
    (".toml", "host_bytes = \n", "not valid TOML"),
])
def test_a_file_that_does_not_parse_is_a_value_error_naming_it(tmp_path, suffix, content, expected):
    path = tmp_path / f"c{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        StoreConfig.from_file(path)
    assert str(info.value).startswith(str(path)) and expected in str(info.value)


def test_host_bytes_zero_ok_with_disk(tmp_path):
    assert StoreConfig(host_bytes=0, disk_dir=str(tmp_path)).host_bytes == 0


def test_unsupported_file_suffix(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match=r"\.json"):
        StoreConfig.from_file(path)


@pytest.mark.parametrize("suffix, content, expected", [
    (".yaml", "host_bytes: 1MiB\nhost_bytes: 2MiB\n", "setting 'host_bytes' given twice"),  # the last one won
    (".yml", "kvstore:\n  disk_bytes: 1\n  disk_bytes: 2\n", "setting 'disk_bytes' given twice"),
])
def test_a_setting_given_twice_in_yaml_is_refused(tmp_path, suffix, content, expected):
    path = tmp_path / f"c{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=expected):
        StoreConfig.from_file(path)


@pytest.mark.parametrize("suffix, content", [(".toml", 'host_bytes = "2MiB"\n'), (".yaml", "host_bytes: 2MiB\n")])
def test_a_settings_file_with_a_byte_order_mark_reads_as_without(tmp_path, suffix, content):
    path = tmp_path / f"c{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    assert StoreConfig.from_file(path).host_bytes == 2 * MiB


@pytest.mark.parametrize("content", ["", "# nothing set yet\n"])
def test_an_empty_yaml_file_gives_the_defaults_as_an_empty_toml_file_does(tmp_path, content):
    for suffix in (".yaml", ".toml"):
        path = tmp_path / f"c{suffix}"
        path.write_text(content)
        assert StoreConfig.from_file(path) == StoreConfig()


@pytest.mark.parametrize("env, message", [
    ({"KVSTORE_FILES_IO_THREADS": "\u0661\u0662"}, "KVSTORE_FILES_IO_THREADS: expected an integer"),  # int() took 12
    ({"KVSTORE_FILES_IO_THREADS": "1_000"}, "KVSTORE_FILES_IO_THREADS: expected an integer"),
    ({"KVSTORE_SLOW_FACTOR": "\u0661\u0662.5"}, "KVSTORE_SLOW_FACTOR: expected a number"),
    ({"KVSTORE_SLOW_FACTOR": "nan"}, "KVSTORE_SLOW_FACTOR: expected a number"),
    ({"KVSTORE_DEGRADED_SECONDS": "1e400"}, "degraded_seconds: expected a finite number"),
    ({"KVSTORE_host_bytes": "1MiB"}, "KVSTORE_host_bytes: expected an upper-case setting name, KVSTORE_HOST_BYTES"),
])
def test_env_numbers_are_ascii_and_names_upper_case(env, message):
    with pytest.raises(ValueError, match=message):
        StoreConfig.load(environ=env)
    assert StoreConfig.load(environ={"KVSTORE_SLOW_FACTOR": "2.5e1"}).slow_factor == 25.0


def test_file_not_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping of settings, got list"):
        StoreConfig.from_file(path)


def test_env_overrides_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(TOML.format(disk=tmp_path / "d"))
    environ = {
        "KVSTORE_HOST_BYTES": "2GiB",
        "KVSTORE_DISK_BYTES": "1000",
        "KVSTORE_WRITE_POLICY": "write_through",
        "KVSTORE_PROMOTE": "yes",
        "KVSTORE_MODEL_ID": "other-model",
        "KVSTORE_CONFIG": "/does/not/matter/when/path/is/given.toml",
        "HOME": "/ignored",
        "KVSTOREX": "ignored, no underscore after the prefix",
    }
    config = StoreConfig.load(path, environ=environ)
    assert config == StoreConfig(model_id="other-model", host_bytes=2 * GiB, disk_dir=str(tmp_path / "d"),
                                 disk_bytes=1000, write_policy="write_through", hash="blake2b", promote=True,
                                 disk_sync=False)


def test_env_config_path_variable(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(YAML.format(disk=tmp_path / "d"))
    config = StoreConfig.load(environ={"KVSTORE_CONFIG": str(path), "KVSTORE_HASH": "sha256"})
    assert config == _expected(tmp_path / "d").replace(hash="sha256")


def test_env_only_and_disk_dir_none(tmp_path):
    config = StoreConfig.load(environ={"KVSTORE_HOST_BYTES": "64MiB", "KVSTORE_DISK_DIR": "none"})
    assert config == StoreConfig(host_bytes=64 * MiB)
    config = StoreConfig.load(environ={"KVSTORE_DISK_DIR": str(tmp_path), "KVSTORE_HOST_BYTES": "0"})
    assert (config.disk_dir, config.host_bytes) == (str(tmp_path), 0)
    assert StoreConfig.load(environ={}) == StoreConfig()


def test_env_unknown_variable(tmp_path):
    with pytest.raises(ValueError) as info:
        StoreConfig.load(environ={"KVSTORE_FOO": "1"})
    assert "KVSTORE_FOO" in str(info.value)
    assert "'foo'" in str(info.value)
    path = tmp_path / "c.toml"
    path.write_text('host_bytes = "1MiB"\n')
    with pytest.raises(ValueError, match="KVSTORE_FOO"):
        StoreConfig.load(path, environ={"KVSTORE_FOO": "1"})


@pytest.mark.parametrize("name", ["KVSTORE_MODEL_CACHE", "KVSTORE_SLOW", "KVSTORE_SHRINK", "KVSTORE_CRASH_CYCLES",
                                  "KVSTORE_BENCH_PROFILE"])
def test_env_variables_of_the_project_that_are_not_settings_are_left_alone(name):
    """``kvstore model``'s cache folder and the test suite's knobs (which the README sets for CI): with one
    of them set, ``load`` refused to start the store, and with it vLLM's and SGLang's connectors."""
    config = StoreConfig.load(environ={name: "1", "KVSTORE_HOST_BYTES": "2MiB"})
    assert config.host_bytes == 2 << 20


@pytest.mark.parametrize("build", [lambda: StoreConfig(host_byte=1), lambda: StoreConfig().replace(host_bytez=1)])
def test_an_unknown_keyword_is_a_value_error_naming_it_and_the_nearest_setting(build):
    """It was the dataclass's bare TypeError; it is still a TypeError too, for callers that catch that."""
    with pytest.raises(ValueError, match=r"^host_byte\w?: unknown setting of StoreConfig \(did you mean "
                                         r"'host_bytes'\?\)") as info:
        build()
    assert isinstance(info.value, TypeError)


def test_env_bad_value_names_field():
    with pytest.raises(ValueError) as info:
        StoreConfig.load(environ={"KVSTORE_HOST_BYTES": "lots"})
    assert str(info.value).startswith("host_bytes:") and "lots" in str(info.value)


@pytest.mark.parametrize(
    "text, expected",
    [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True), (" True ", True),
     ("0", False), ("false", False), ("False", False), ("no", False), ("off", False), ("OFF", False)],
)
def test_env_bool(text, expected):
    config = StoreConfig.load(environ={"KVSTORE_PROMOTE": text, "KVSTORE_DISK_SYNC": text})
    assert config.promote is expected
    assert config.disk_sync is expected


@pytest.mark.parametrize("text", ["", "2", "maybe", "y"])
def test_env_bool_rejects(text):
    with pytest.raises(ValueError) as info:
        StoreConfig.load(environ={"KVSTORE_PROMOTE": text})
    assert str(info.value).startswith("KVSTORE_PROMOTE:")
    assert repr(text) in str(info.value)


def test_a_settings_file_that_cannot_be_read_is_a_value_error_naming_it(tmp_path):
    """A missing (or unreadable) settings file was a bare OSError: SGLang's backend and the vLLM connector
    read ``kvstore_config`` / ``$KVSTORE_CONFIG`` at start-up, where a caller's bad setting is a ValueError."""
    missing = tmp_path / "missing.toml"
    with pytest.raises(ValueError, match=f"{missing}: No such file.*expected a readable TOML or YAML"):
        StoreConfig.load(str(missing))
    (tmp_path / "a-dir.yaml").mkdir()
    with pytest.raises(ValueError, match="a-dir.yaml: Is a directory"):
        StoreConfig.load(str(tmp_path / "a-dir.yaml"))


@pytest.mark.parametrize("content, expected", [
    ("<<: {host_bytes: 1MiB}\ndisk_bytes: 2MiB\n", (MiB, 2 * MiB)),
    ("kvstore:\n  <<: {host_bytes: 1MiB, disk_bytes: 2MiB}\n  host_bytes: 2MiB\n", (2 * MiB, 2 * MiB)),  # overridden
])
def test_yaml_merge_keys_are_read_as_yaml_says(tmp_path, content, expected):
    """The loader refusing a setting given twice took a merged key overridden for one given twice."""
    path = tmp_path / "c.yaml"
    path.write_text(content)
    config = StoreConfig.from_file(path)
    assert (config.host_bytes, config.disk_bytes) == expected


@pytest.mark.parametrize("content", ["? [a, b]\n: 1\n", "{[1]: 2}\n"])
def test_an_unhashable_yaml_key_is_a_value_error(tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match="not valid YAML: found unhashable key"):
        StoreConfig.from_file(path)

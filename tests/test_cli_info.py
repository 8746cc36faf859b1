"""``kvstore info`` reads a store without opening it, and ``kvstore bench`` points the full run to its script.

``info`` allocates no pool (a config with an 8 GiB host pool stays far below
that in peak RSS), takes no directory lock (it reports what a running
engine in another process has written while that engine holds the store
open) and turns every mistake a user can make into one line on stderr.
The full benchmark is ``python bench/run_bench.py`` in a checkout; the
installed command says so instead of importing the checkout's ``bench/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import lmdb
import pytest

from conftest import REPO_ROOT, TESTS_DIR, make_kv, tiny_layout
from kvstore.blockformat import HEADER_BYTES
from kvstore.cli import main
from kvstore.config import StoreConfig, hide_password
from kvstore.inventory import files_usage
from kvstore.tiers.files import FilesTier
from kvstore.tiers.lmdb import LmdbTier, inspect_directory

LAYOUT_ARGS = ("--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--block-tokens", "16", "--dtype", "float16")
BLOCK = 4096  # the tiny layout's full block: 16 tokens
GiB = 1 << 30


def _kvstore_cmd() -> list[str]:
    return [shutil.which("kvstore") or str(Path(sys.executable).with_name("kvstore"))]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(extra or {})
    return env


def _kvstore(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*_kvstore_cmd(), *args], capture_output=True, text=True, env=_env(env), cwd=cwd,
                          timeout=120)


def _main(monkeypatch, capsys, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``kvstore ARGS`` in this process (``kvstore.cli.main``): an exception it let escape fails the test."""
    for name in [n for n in os.environ if n.startswith("KVSTORE_")]:
        monkeypatch.delenv(name)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["kvstore", *args], code, out, err)


# Runs the installed command's entry point and, at exit, writes this process's peak RSS (VmHWM, KiB) to a file.
# (``ru_maxrss`` of a child is no good here: Linux carries the forking parent's peak across exec, and the
# test process itself may be gigabytes by then.)
_PEAK_RSS_RUNNER = """
import atexit, sys
def _peak():
    with open("/proc/self/status") as status, open(sys.argv[1], "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(_peak)
from kvstore.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _kvstore_peak_rss(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """``kvstore ARGS`` and the peak RSS (VmHWM) of that process itself, in bytes."""
    with tempfile.TemporaryDirectory() as folder:
        peak_file = Path(folder) / "peak"
        # cwd: not the checkout, whose kvstore/ folder would shadow the installed package
        result = subprocess.run([sys.executable, "-c", _PEAK_RSS_RUNNER, str(peak_file), *args],
                                capture_output=True, text=True, env=_env(), timeout=120, cwd=folder)
        peak = int(peak_file.read_text()) * 1024 if peak_file.exists() else 0
    return result, peak


def _write_config(path: Path, **settings: object) -> Path:
    separator = ": " if path.suffix in (".yaml", ".yml") else " = "  # JSON scalars are TOML and YAML values
    lines = [f"{name}{separator}{json.dumps(value)}" for name, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvstore: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _fill_lmdb(path: Path, blocks: int) -> int:
    """``blocks`` full blocks written by an LmdbTier (then closed); returns the bytes it counts as used."""
    layout = tiny_layout()
    tier = LmdbTier(path, 1 << 20, layout, sync=False)
    try:
        kv = make_kv(layout, 16 * blocks)
        tier.put_many([(b"key-%02d" % i, kv[:, :, 16 * i:16 * (i + 1)]) for i in range(blocks)])
        return tier.used_bytes()
    finally:
        tier.close()


def test_info_allocates_no_pool(tmp_path):
    disk = tmp_path / "disk"
    used = _fill_lmdb(disk, 3)
    config = _write_config(tmp_path / "kvstore.toml", model_id="tiny", host_bytes="8GiB", disk_dir=str(disk),
                           disk_bytes="4MiB")
    result, peak = _kvstore_peak_rss("info", "--config", str(config), *LAYOUT_ARGS)
    assert result.returncode == 0, result.stderr
    assert "host: 8.0 GiB pool" in result.stdout and "not allocated here" in result.stdout
    assert f"lmdb: 3 blocks, {used / 1024:.1f} KiB used of 4.0 MiB ({disk})" in result.stdout
    assert used == 3 * (BLOCK + HEADER_BYTES)
    assert peak < 1 * GiB, f"peak RSS {peak / GiB:.2f} GiB: the host pool was allocated"


ENGINE = """
    import json, sys
    from conftest import make_kv, make_tokens, tiny_layout
    from kvstore.config import StoreConfig
    from kvstore.store import KVStore

    disk_dir, files_dir = sys.argv[1:3]
    layout = tiny_layout()
    config = StoreConfig(host_bytes="1MiB", disk_dir=disk_dir, disk_bytes="4MiB", disk_sync=False,
                         files_dir=files_dir, files_bytes="4MiB", files_sync=False)
    store = KVStore(layout, config)

    def put(seed):
        store.put(make_tokens(64, seed=seed), make_kv(layout, 64, seed=seed))
        assert store.flush(timeout=30)

    def report():
        tiers = store.stats()["tiers"]
        print(json.dumps({name: [tiers[name]["blocks"], tiers[name]["used_bytes"]] for name in ("lmdb", "files")}),
              flush=True)

    put(1); put(2)
    report()
    for line in sys.stdin:  # the test runs kvstore info meanwhile, then says "more" or "close"
        if line.strip() == "more":
            put(3)
            report()
        else:
            break
    assert store.get(make_tokens(64, seed=2)).shape[2] == 64
    store.close()
    print("closed", flush=True)
"""


class Engine:
    """A real store in another process: it holds disk_dir's lock until told to close."""

    def __init__(self, disk: Path, files: Path):
        env = _env({"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])})
        self.proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(ENGINE), str(disk), str(files)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=str(TESTS_DIR))

    def read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise AssertionError(f"engine exited {self.proc.returncode}:\n{self.proc.stderr.read()}")
        return line.strip()

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def test_info_reads_a_store_an_engine_has_open(tmp_path):
    disk, files = tmp_path / "disk", tmp_path / "files"
    config = _write_config(tmp_path / "kvstore.yaml", disk_dir=str(disk), disk_bytes="4MiB", files_dir=str(files),
                           files_bytes="4MiB")
    engine = Engine(disk, files)
    try:
        held = json.loads(engine.read())
        assert held["lmdb"][0] == 8 and held["files"][0] == 8  # two 64-token prompts, four blocks each
        result = _kvstore("info", "--config", str(config), "--json", *LAYOUT_ARGS)
        assert result.returncode == 0, result.stderr
        tiers = json.loads(result.stdout)["tiers"]
        assert [tiers["lmdb"]["blocks"], tiers["lmdb"]["used_bytes"]] == held["lmdb"]
        assert [tiers["files"]["blocks"], tiers["files"]["used_bytes"]] == held["files"]
        assert tiers["lmdb"]["unreadable"] == 0 and tiers["lmdb"]["capacity_bytes"] == 4 << 20

        engine.send("more")  # the engine still writes after info read its directory
        held = json.loads(engine.read())
        assert held["lmdb"][0] == 12
        result = _kvstore("info", "--config", str(config), *LAYOUT_ARGS)
        assert result.returncode == 0, result.stderr
        assert f"lmdb: 12 blocks, {held['lmdb'][1] / 1024:.1f} KiB used of 4.0 MiB" in result.stdout
        assert f"files: 12 blocks, {held['files'][1] / 1024:.1f} KiB used of 4.0 MiB" in result.stdout

        engine.send("close")
        assert engine.read() == "closed"
        assert engine.proc.wait(timeout=30) == 0, engine.proc.stderr.read()
    finally:
        engine.kill()


def test_info_json_is_one_object(tmp_path):
    config = _write_config(tmp_path / "kvstore.toml", host_bytes="2MiB", files_dir=str(tmp_path / "none"),
                           remote_url="kvstore://127.0.0.1:1", remote_token="s3cret",
                           redis_url="redis://user:pw@127.0.0.1:1/0")
    result = _kvstore("info", "--config", str(config), "--json", *LAYOUT_ARGS)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["config"]["host_bytes"] == 2 << 20 and info["layout"]["block_bytes"] == BLOCK
    assert info["tiers"]["host"] == {"kind": "pool", "capacity_bytes": 2 << 20}
    assert info["tiers"]["files"]["blocks"] == 0 and info["tiers"]["files"]["exists"] is False
    # Shared tiers are named, not contacted (port 1 would refuse), and no secret is printed.
    assert info["tiers"]["remote"] == {"kind": "shared", "url": "kvstore://127.0.0.1:1", "contacted": False}
    assert info["tiers"]["redis"]["url"] == "redis://user:<hidden>@127.0.0.1:1/0"
    assert "s3cret" not in result.stdout and ":pw@" not in result.stdout


@pytest.mark.parametrize("name, text, fragments", [
    ("bad.toml", 'host_bytes = "1MiB\n', ("bad.toml", "not valid TOML")),
    ("bad.yaml", "host_bytes: [1MiB\n", ("bad.yaml", "not valid YAML")),
    ("bad.yaml", "- a list\n", ("bad.yaml", "expected a mapping")),
    ("unknown.toml", 'host_byts = "1MiB"\n', ("unknown.toml", "host_byts")),
    ("value.toml", 'host_bytes = "lots"\n', ("host_bytes", "'lots'")),
    ("kvstore.ini", "host_bytes = 1\n", ("kvstore.ini", ".toml")),
    ("binary.toml", None, ("binary.toml", "not a text file")),
])
def test_a_bad_config_file_is_one_line(tmp_path, monkeypatch, capsys, name, text, fragments):
    path = tmp_path / name
    if text is None:
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text(text)
    _assert_one_line_error(_main(monkeypatch, capsys, "info", "--config", str(path)), *fragments)


def test_other_mistakes_are_one_line(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing.toml"
    _assert_one_line_error(_main(monkeypatch, capsys, "info", "--config", str(missing)), str(missing),
                           "No such file")
    _assert_one_line_error(_main(monkeypatch, capsys, "info", env={"KVSTORE_CONFIG": str(missing)}), str(missing))
    _assert_one_line_error(_main(monkeypatch, capsys, "info", env={"KVSTORE_HOST_BYTEZ": "1"}), "KVSTORE_HOST_BYTEZ")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    for setting in ("disk_dir", "files_dir"):
        config = _write_config(tmp_path / f"{setting}.toml", **{setting: str(a_file)})
        _assert_one_line_error(_main(monkeypatch, capsys, "info", "--config", str(config)), setting, str(a_file),
                               "not a directory")
    not_lmdb = tmp_path / "not-lmdb"
    not_lmdb.mkdir()
    (not_lmdb / "data.mdb").write_bytes(b"\0" * 8192)
    config = _write_config(tmp_path / "not-lmdb.toml", disk_dir=str(not_lmdb))
    _assert_one_line_error(_main(monkeypatch, capsys, "info", "--config", str(config)), "disk_dir", str(not_lmdb))
    _assert_one_line_error(_main(monkeypatch, capsys, "info", "--dtype", "float7"), "dtype")


def test_the_command_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("host_bytes: [1MiB\n")  # PyYAML's message spans several lines
    _assert_one_line_error(_kvstore("info", "--config", str(bad)), str(bad), "not valid YAML")
    config = _write_config(tmp_path / "kvstore.toml", disk_dir=str(bad))
    _assert_one_line_error(_kvstore("info", "--config", str(config)), "disk_dir", "not a directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any directory")
def test_an_unreadable_directory_is_one_line(tmp_path, monkeypatch, capsys):
    disk, files = tmp_path / "disk", tmp_path / "files"
    _fill_lmdb(disk, 1)
    (files / "ab" / "cd").mkdir(parents=True)
    for folder, setting in ((disk, "disk_dir"), (files, "files_dir")):
        config = _write_config(tmp_path / f"{setting}.toml", **{setting: str(folder)})
        folder.chmod(0)
        try:
            _assert_one_line_error(_main(monkeypatch, capsys, "info", "--config", str(config)), setting, str(folder))
        finally:
            folder.chmod(0o755)


def test_inspect_directory_counts_unreadable_headers(tmp_path):
    disk = tmp_path / "disk"
    assert inspect_directory(disk) == {"blocks": 0, "used_bytes": 0, "unreadable": 0, "file_bytes": 0}
    disk.mkdir()
    (disk / "data.mdb").touch()  # what a store killed during its first open leaves
    assert inspect_directory(disk) == {"blocks": 0, "used_bytes": 0, "unreadable": 0, "file_bytes": 0}
    used = _fill_lmdb(disk, 2)
    env = lmdb.open(str(disk), max_dbs=2, subdir=True)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"key-other-version", b"KVSB\xff\xff" + b"\0" * 74)  # a header version this code does not know
        txn.put(b"key-torn", b"KV")
    env.close()
    usage = inspect_directory(disk)
    assert usage["blocks"] == 2 and usage["used_bytes"] == used and usage["unreadable"] == 2
    assert usage["file_bytes"] == (disk / "data.mdb").stat().st_size
    tier = LmdbTier(disk, 1 << 20, tiny_layout())  # nothing was left locked; the tier drops what it cannot read
    try:
        assert tier.stats()["blocks"] == 2 and tier.stats()["corrupt"] == 2
    finally:
        tier.close()
    assert inspect_directory(disk)["unreadable"] == 0


def test_files_usage_counts_regular_block_files_only(tmp_path):
    layout = tiny_layout()
    tier = FilesTier(tmp_path / "files", 1 << 20, layout, sync=False)
    kv = make_kv(layout, 48)
    tier.put_many([(b"key-%d" % i, kv[:, :, 16 * i:16 * (i + 1)]) for i in range(3)])
    expected = tier.used_bytes()
    tier.close()
    level1 = next(path for path in (tmp_path / "files").iterdir() if path.is_dir())
    outside = tmp_path / "outside.kvb"
    outside.write_bytes(b"x" * 100_000)
    (level1 / "abcd.kvb").symlink_to(outside)  # a link is not a block of this directory
    (level1 / "notes.kvb").write_bytes(b"x" * 10)  # not a hex name
    (level1 / "ef01.kvb").mkdir()  # not a regular file
    (level1 / ".ef02~host~1~t.tmp").write_bytes(b"x" * 10)  # a write in flight
    (tmp_path / "files" / "zz-not-fanout").mkdir()
    old = tmp_path / "files" / "ab" / "cd"  # the two-level layout of older versions: moved up on the next open
    old.mkdir(parents=True)
    (old / "abcd12.kvb").write_bytes(b"x" * 77)
    assert files_usage(tmp_path / "files") == {"blocks": 4, "used_bytes": expected + 77, "temp_files": 1}
    assert files_usage(tmp_path / "missing") == {"blocks": 0, "used_bytes": 0, "temp_files": 0}


def test_hide_password():
    assert hide_password("redis://:pw@h:6379/0") == "redis://:<hidden>@h:6379/0"
    assert hide_password("rediss+cluster://u:p@a:1,b:2") == "rediss+cluster://u:<hidden>@a:1,b:2"
    assert hide_password("redis://h:6379/0") == "redis://h:6379/0"
    assert hide_password("rediss+cluster://a:1,b:2?ssl_password=pw&ssl_ca_certs=/ca") == (
        "rediss+cluster://a:1,b:2?ssl_password=<hidden>&ssl_ca_certs=/ca")
    assert hide_password("unix:///run/redis.sock?password=pw&db=1") == "unix:///run/redis.sock?password=<hidden>&db=1"


@pytest.mark.parametrize("url", ["redis://:hunter2@h:6379/abc", "redis://u:hunter2@h:6379/0?socket_timeout=3",
                                 "redis+cluster://:hunter2@a:1,b:2/5", "redis://:hunter2@h:99999/0",
                                 "rediss+cluster://a:1?ssl_password=hunter2&db=3"])
def test_a_bad_redis_url_is_named_without_its_password(url):
    with pytest.raises(ValueError, match="redis_url") as error:
        StoreConfig(host_bytes="1MiB", redis_url=url)
    assert "hunter2" not in str(error.value) and "<hidden>" in str(error.value)
    assert hide_password("unix:///run/redis.sock") == "unix:///run/redis.sock"


def test_bench_without_quick_points_to_the_script(tmp_path, monkeypatch, capsys):
    result = _kvstore("bench", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "python bench/run_bench.py" in result.stderr and "kvstore bench --quick" in result.stderr
    monkeypatch.chdir(tmp_path)
    result = _main(monkeypatch, capsys, "bench", "--smoke", "--workloads", "agent")
    assert result.returncode == 2 and "python bench/run_bench.py --smoke --workloads agent" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing run
    result = _main(monkeypatch, capsys, "bench", "--quick", "--smoke")
    assert result.returncode == 2 and "--smoke" in result.stderr and len(result.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    result = _main(monkeypatch, capsys, "info", "--smoke")
    assert result.returncode == 2 and "unrecognized arguments: --smoke" in result.stderr


def test_the_bench_script_runs_from_anywhere(tmp_path):
    script = REPO_ROOT / "bench" / "run_bench.py"
    env = _env()
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--smoke" in result.stdout and "--no-peers" in result.stdout
    # Its own folder is put on sys.path: kvbench imports, and validates the settings before running anything.
    result = subprocess.run([sys.executable, str(script), "--workloads", "batch", "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "workloads: expected some of" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_the_cli_never_imports_the_checkouts_bench():
    source = (REPO_ROOT / "kvstore" / "cli.py").read_text()
    assert "sys.path" not in source and "kvbench" not in source

"""The ``kvstore`` console script, run as a real subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _kvstore(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("kvstore") or str(Path(sys.executable).with_name("kvstore"))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    full_env.update(env or {})
    return subprocess.run([exe, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300)


def test_help_lists_commands():
    result = _kvstore("--help")
    assert result.returncode == 0
    assert "info" in result.stdout and "bench" in result.stdout


def test_info_reports_config_and_tier_usage(tmp_path):
    config = tmp_path / "kvstore.toml"
    config.write_text(f'model_id = "tiny"\nhost_bytes = "1MiB"\ndisk_dir = "{tmp_path / "disk"}"\n'
                      f'disk_bytes = "4MiB"\n')
    result = _kvstore("info", "--config", str(config), "--layers", "2", "--kv-heads", "2", "--head-dim", "16",
                      "--dtype", "float16", "--block-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert "model_id = 'tiny'" in result.stdout
    assert "host: 1.0 MiB pool" in result.stdout  # configured, not allocated: info opens no store
    assert f"lmdb: 0 blocks, 0 B used of 4.0 MiB ({tmp_path / 'disk'}: not created yet)" in result.stdout
    assert not (tmp_path / "disk").exists()  # read-only: nothing created


def test_info_names_a_bad_setting(tmp_path):
    config = tmp_path / "kvstore.yaml"
    config.write_text("model_id: tiny\nhost_byts: 1MiB\n")
    result = _kvstore("info", "--config", str(config))
    assert result.returncode == 2
    assert "host_byts" in result.stderr
    result = _kvstore("info", env={"KVSTORE_HOST_BYTES": "lots"})
    assert result.returncode == 2
    assert "host_bytes" in result.stderr and "'lots'" in result.stderr


@pytest.mark.slow
def test_bench_quick_prints_every_figure_with_its_ceiling(tmp_path):
    result = _kvstore("bench", "--quick", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    ceilings_of = {"host put": ["Tensor.copy_"], "host get_into": ["Tensor.copy_"],
                   "lmdb put (fsync)": ["raw write+fsync, new", "raw write+fsync"],
                   "lmdb get (warm)": ["raw read (warm)"], "lmdb put (fsync, full)": ["raw write+fsync"],
                   "lmdb get (promoted)": ["raw read (warm)"]}
    for name, ceilings in ceilings_of.items():
        named = [line for line in lines if line.startswith(name + " ")]
        assert len(named) == len(ceilings), (name, lines)
        for line, ceiling in zip(named, ceilings):
            assert f"GB/s   {ceiling} " in line and "ratio" in line, (name, ceiling, line)
    assert sum("lookup 131072 tokens" in line for line in lines) == 5
    assert list((tmp_path / "data").iterdir()) == []  # its scratch data is removed


def test_codecs_prints_a_row_per_codec():
    result = _kvstore("codecs", "--codecs", "raw;int8;rq4", "--tokens", "64", "--layers", "1", "--no-peers",
                      "--no-model", "--no-real-model")
    assert result.returncode == 0, result.stderr
    assert "real model: off" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["raw", "int8", "rq4"]
    raw = rows[1].split("|")
    assert raw[2].strip() == "1.00x" and raw[3].strip() == "0.0000"  # raw is exact and the same size


def test_the_codec_table_shows_the_real_models_columns_first():
    from conftest import real_model
    from kvstore.compression.table import TableSettings, codec_table, format_table
    from kvstore.compression.text_check import TextCheck, TextCheckSettings

    check = TextCheck(*real_model(), TextCheckSettings(sequences=1, prefix_tokens=256, continuation_tokens=32))
    rows, context = codec_table(["raw", "int8"], TableSettings(tokens=64, layers=1, model=False, peers=False,
                                                                 text=check))
    header, raw, int8 = [line.split("|") for line in format_table(rows, context).splitlines()
                         if line.startswith("| ")][:3]
    assert header[3].strip() == "ratio on SmolLM2's KV" and header[4].strip() == "SmolLM2 ΔPPL"
    assert raw[3].strip() == "1.00x" and raw[4].strip() == "+0.00%"
    assert 1.9 < float(int8[3].strip().rstrip("x")) < 2.0 and abs(float(int8[4].strip().rstrip("%"))) < 1.0


def test_codecs_names_a_bad_codec():
    result = _kvstore("codecs", "--codecs", "kivi9", "--no-model", "--no-peers")
    assert result.returncode == 2
    assert "kivi9" in result.stderr and "kivi4" in result.stderr


def test_codecs_refuses_no_windows_of_text_before_loading_the_model():
    result = _kvstore("codecs", "--codecs", "ec4", "--windows", "0", "--no-model", "--no-peers")
    assert result.returncode == 2
    assert "--windows" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("case", ["data-dir-bench", "data-dir-demo", "data-dir-serve", "data-dir-under-a-file",
                                  "cache-dir-a-file", "url-port", "token-dir",
                                  "token-binary", "no-codecs", "huge-size", "env-not-a-setting", "codecs-float64",
                                  "codecs-int8"])
def test_user_mistakes_name_the_flag_or_setting_without_a_traceback(tmp_path, case):
    """Each printed a bare errno ("[Errno 17] File exists"), a bare parser message ("Port out of range"), a
    traceback (OverflowError from a size of hundreds of digits), exited 0 with an empty table, or refused
    to start because a variable of the project's own (``KVSTORE_MODEL_CACHE``) was taken for a setting."""
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"\xff\xfe\x00binary")
    args, expected, env = {
        "data-dir-bench": (["bench", "--quick", "--data-dir", str(a_file)], "--data-dir: expected a folder", None),
        "data-dir-demo": (["demo", "--quick", "--data-dir", str(a_file)], "--data-dir: expected a folder", None),
        "data-dir-serve": (["serve", "--data-dir", str(a_file)], "data_dir: expected a folder", None),
        # under a regular file: "[Errno 20] Not a directory", without the flag
        "data-dir-under-a-file": (["bench", "--quick", "--data-dir", str(a_file / "sub")],
                                  "--data-dir: expected a folder", None),
        "cache-dir-a-file": (["model", "--no-fetch", "--cache-dir", str(a_file)], "--cache-dir: expected a folder",
                             None),
        "url-port": (["stats", "--url", "kvstore://h:99999"], "--url: expected kvstore://host:port", None),
        "token-dir": (["stats", "--url", "kvstore://127.0.0.1:1", "--token-file", str(tmp_path)],
                      "--token-file: expected a readable UTF-8 file", None),
        "token-binary": (["stats", "--url", "kvstore://127.0.0.1:1", "--token-file", str(a_file)],
                         "--token-file: expected a readable UTF-8 file", None),
        "no-codecs": (["codecs", "--codecs", ";", "--no-model", "--no-peers"], "--codecs: expected codec specs",
                      None),
        "huge-size": (["info"], "host_bytes: expected a byte size up to", {"KVSTORE_HOST_BYTES": "9" * 400}),
        "env-not-a-setting": (["info"], None, {"KVSTORE_MODEL_CACHE": str(tmp_path), "KVSTORE_SLOW": "1"}),
        "codecs-float64": (["codecs", "--dtype", "float64", "--no-model", "--no-peers"],
                           "--dtype: expected float16, bfloat16 or float32, got 'float64'", None),
        "codecs-int8": (["codecs", "--dtype", "int8", "--no-model", "--no-peers"],
                        "--dtype: expected float16, bfloat16 or float32, got 'int8'", None),
    }[case]
    result = _kvstore(*args, env=env, cwd=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    if expected is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 2 and expected in result.stderr, result.stderr


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="drops root's override of permissions with setpriv")
@pytest.mark.parametrize("args", [["bench", "--quick", "--data-dir"], ["serve", "--data-dir"],
                                  ["model", "--no-fetch", "--cache-dir"]], ids=lambda a: a[0])
def test_a_folder_this_process_may_not_write_is_named_by_its_flag(tmp_path, args):
    """A bare "[Errno 13] Permission denied: 'noperm/d'" named no flag (as root without CAP_DAC_OVERRIDE,
    as any other user)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o000)
    exe = shutil.which("kvstore") or str(Path(sys.executable).with_name("kvstore"))
    try:
        result = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
                                 "-dac_override,-dac_read_search", "--", exe, *args, str(locked / "d")],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path,
                                env={k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")})
    finally:
        locked.chmod(0o755)
    flag = args[-1] if args[0] != "serve" else "data_dir"
    assert result.returncode == 2 and f"{flag}: expected a folder this process may write" in result.stderr, (
        result.stderr)
    assert "Traceback" not in result.stderr


def test_a_ctrl_c_while_the_command_is_still_importing_is_one_line():
    """Importing the CLI takes torch's import (about a second): a Ctrl-C then printed a KeyboardInterrupt
    traceback from deep inside it. ``import kvstore`` alone now imports no torch at all."""
    code = """
import sys
import kvstore.console
assert "torch" not in sys.modules, "import kvstore imported torch"
class Interrupted:  # a Ctrl-C that lands while kvstore.cli is being imported
    def find_spec(self, name, path, target=None):
        if name == "kvstore.cli":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupted())
sys.exit(kvstore.console.main())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and result.stderr == "kvstore: interrupted\n", result.stderr


def test_ctrl_c_stops_a_command_without_a_traceback(tmp_path):
    """SIGINT during ``kvstore bench --quick`` printed a KeyboardInterrupt traceback from deep in a tier."""
    import signal

    exe = shutil.which("kvstore") or str(Path(sys.executable).with_name("kvstore"))
    data = tmp_path / "data"
    proc = subprocess.Popen([exe, "bench", "--quick", "--data-dir", str(data)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,  # as a user runs it, not from the repo
                            env={k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")})
    try:
        assert proc.stdout.readline().startswith("kvstore bench")  # running: its first line is out
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "kvstore: interrupted" in err and "Traceback" not in err, err
    assert not any(data.iterdir())  # its data went with it

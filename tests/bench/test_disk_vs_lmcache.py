"""``bench/disk_vs_lmcache.py``: the files tier against LMCache's local disk, run after run."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from disk_vs_lmcache import main


@pytest.mark.parametrize("argv, expected", [(["--runs", "0"], "--runs: expected at least 1, got 0"),
                                            (["--lmcache-python", "/no/such/python"], "no such file")])
def test_a_bad_choice_is_refused_before_anything_runs(argv, expected, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and expected in capsys.readouterr().err


def test_a_python_without_lmcache_is_named_and_nothing_is_left_behind(tmp_path, capsys):
    # The peer reports itself skipped in a Python without lmcache, and kvstore's side is never run.
    if importlib.util.find_spec("lmcache") is not None:
        pytest.skip("this Python has lmcache")
    assert main(["--runs", "1", "--lmcache-python", sys.executable, "--workdir", str(tmp_path)]) == 1
    assert f"no lmcache in {sys.executable}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

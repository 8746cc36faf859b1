"""``bench/first_pass_ttft.py``: each configuration's first pass against the bare passes around it."""

from __future__ import annotations

import math

import pytest
from first_pass_ttft import first_pass_ratios, main
from kvbench.serving import ServingSettings
from kvbench.workloads import WorkloadSettings

from kvstore.integrations.demo import build_model

QUICK = ServingSettings.quick()


def test_every_configuration_gets_a_ratio_a_round(tmp_path):
    model, _ = build_model(QUICK.model)
    workloads = WorkloadSettings(vocab_size=QUICK.model.vocab_size).scaled(0.1)
    ratios = first_pass_ratios("no_reuse", ["host", "host+nvme+codec"], 2, model, QUICK, tmp_path, workloads)
    assert list(ratios) == ["host", "host+nvme+codec"]
    # a ratio each round, whatever the machine's load (speed is the benchmark's to report, not a test's)
    assert all(len(values) == 2 and all(v > 0 and math.isfinite(v) for v in values) for values in ratios.values())
    assert list(tmp_path.iterdir()) == []  # each store's data is removed after its pass


@pytest.mark.parametrize("argv", [["--workloads", "nope"], ["--configs", "remote"], ["--rounds", "0"]])
def test_a_bad_choice_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and "unknown or unsupported" in capsys.readouterr().err

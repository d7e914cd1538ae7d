"""The default precision follows the machine (bf16 only where it is faster) and is recorded."""

from __future__ import annotations

import pytest
import torch
from test_fit import toy_config, write_config

from clbench import precision
from clbench.compare.plan import resolved_config


@pytest.fixture
def unpinned(monkeypatch):
    monkeypatch.delenv("CLBENCH_DEFAULT_PRECISION")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("speedup, chosen", [(1.7, "bf16-mixed"), (1.1, "32-true"), (0.01, "32-true")])
def test_bf16_is_the_cpu_default_only_where_it_is_clearly_faster(unpinned, monkeypatch, speedup, chosen):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    assert precision.default_precision() == chosen


def test_the_probe_measures_this_cpu(unpinned):
    precision.cpu_bf16_speedup.cache_clear()
    speedup = precision.cpu_bf16_speedup()
    assert speedup > 0 and precision.default_precision() in ("bf16-mixed", "32-true")
    assert (precision.default_precision() == "bf16-mixed") == (speedup >= precision.BF16_SPEEDUP_NEEDED)


def test_the_probe_leaves_the_global_random_state_alone(unpinned):
    """It may run after seed_everything (bf16 set explicitly): a draw from torch's global generator
    there changed O-LoRA's later adapters, so one config gave two results."""
    precision.cpu_bf16_speedup.cache_clear()
    before = torch.get_rng_state()
    precision.cpu_bf16_speedup()
    assert torch.equal(torch.get_rng_state(), before)


def test_bf16_asked_for_on_a_slow_cpu_is_warned_about(unpinned, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.05)
    note = precision.slow_bf16_note("bf16-mixed", "cpu")
    assert note.startswith("trainer.precision bf16-mixed: bf16 matmuls are 20x slower")
    assert precision.slow_bf16_note("32-true", "cpu") is None
    assert precision.slow_bf16_note("bf16-mixed", "gpu") is None
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 1.7)
    assert precision.slow_bf16_note("bf16-mixed", "cpu") is None


def test_the_chosen_default_is_in_the_resolved_config_and_an_explicit_one_is_kept(
    unpinned, monkeypatch, tmp_path
):
    """config.yaml and compare's check resolve the same value, so runs of two precisions never mix."""
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 1.7)
    cfg = toy_config(tmp_path / "TRACE", tmp_path / "model", tmp_path / "runs")
    path = write_config(tmp_path / "toy.yaml", cfg)
    assert resolved_config(["--config", str(path)])["trainer"]["precision"] == "bf16-mixed"
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.05)
    assert resolved_config(["--config", str(path)])["trainer"]["precision"] == "32-true"
    cfg["trainer"]["precision"] = "bf16-mixed"
    write_config(path, cfg)
    assert resolved_config(["--config", str(path)])["trainer"]["precision"] == "bf16-mixed"

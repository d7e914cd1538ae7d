"""Priors scored under two-process FSDP2 equal one process's, for every estimator, and are not zero."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prior_worker import ESTIMATORS, priors
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from twoproc import ENV


@pytest.fixture(scope="module")
def sharded_priors(toy_setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded-priors")
    worker = Path(__file__).with_name("prior_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run = subprocess.run(
        [*cmd, str(worker), str(toy_setup / "model"), str(out)],
        env={**ENV, "PYTHONPATH": str(Path(__file__).parents[2])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process_priors(toy_setup) -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(toy_setup / "model")
    return priors(model, AutoTokenizer.from_pretrained(toy_setup / "model"))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fsdp2_priors_equal_one_process_priors(sharded_priors, one_process_priors, estimator):
    sharded, one = load_file(str(sharded_priors / f"{estimator}.safetensors")), one_process_priors[estimator]
    assert sharded.keys() == one.keys()
    for name, ref in one.items():
        assert sharded[name].shape == ref.shape
        assert torch.allclose(sharded[name], ref, atol=1e-5, rtol=0), (estimator, name)
    scored = [name for name, ref in one.items() if "norm" not in name]  # norm weights get no LRP relevance
    nonzero = [name for name in scored if sharded[name].abs().max() > 0]
    assert nonzero == scored  # not one tensor silently all zeros

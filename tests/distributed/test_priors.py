"""Priors scored under two-process FSDP2 equal one process's, for every estimator, and are not zero;
LRP splits the samples over the ranks and still gives one process's prior bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from prior_worker import ESTIMATORS, priors
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from twoproc import torchrun_worker


@pytest.fixture(scope="module")
def sharded_priors(toy_setup, tmp_path_factory) -> Path:
    return torchrun_worker("prior_worker.py", toy_setup / "model", tmp_path_factory.mktemp("sharded-priors"))


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
        if estimator.startswith("lrp"):  # the same maps folded in the same order: the same bits
            assert torch.equal(sharded[name], ref), (estimator, name)
        else:
            assert torch.allclose(sharded[name], ref, atol=1e-5, rtol=0), (estimator, name)
    scored = [name for name, ref in one.items() if "norm" not in name]  # norm weights get no LRP relevance
    nonzero = [name for name in scored if sharded[name].abs().max() > 0]
    assert nonzero == scored  # not one tensor silently all zeros


def test_lrp_splits_the_samples_over_the_ranks(sharded_priors):
    """Each rank's engine scored its own chunks only (plus one spare sample in a round where it has
    none), where the gradient estimators still score every sample on every rank."""
    scored = [json.loads((sharded_priors / f"scored-rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["lrp"] for s in scored] == [4, 2]  # chunks [0:4] and [4:6]
    assert [s["lrp-chunk2"] for s in scored] == [4, 2 + 1]  # [0:2], [4:6] | [2:4], a spare sample
    assert all("grad_x_weight" not in s for s in scored)  # no LRP engine there

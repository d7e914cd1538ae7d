"""Every merge under two-process FSDP2 gives one process's weights bit for bit, task after task, and
the same records: the rules are elementwise on each rank's shards, and what needs the whole model is
reduced exactly (TIES's threshold and majority sign, the counts, the budget gate) or in fp64 and then
rounded to fp32 (Fisher merging's norm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from merge_worker import CASES, TASKS, merges
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from twoproc import torchrun_worker


@pytest.fixture(scope="module")
def sharded(toy_setup, tmp_path_factory) -> Path:
    return torchrun_worker("merge_worker.py", toy_setup / "model", tmp_path_factory.mktemp("sharded-merges"))


@pytest.fixture(scope="module")
def one_process(toy_setup, tmp_path_factory) -> tuple[dict, dict]:
    model = AutoModelForCausalLM.from_pretrained(toy_setup / "model")
    return merges(model, tmp_path_factory.mktemp("one-process-merges"))


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_merges_equal_one_process_bit_for_bit(sharded, one_process, case):
    got, records = (
        load_file(str(sharded / "weights.safetensors")),
        json.loads((sharded / "records.json").read_text()),
    )
    weights, one_records = one_process
    keys = [k for k in weights if k.startswith(f"{case}/")]
    assert keys and {k for k in got if k.startswith(f"{case}/")} == set(keys)
    for key in keys:
        assert torch.equal(got[key], weights[key]), key
    assert records[case] == one_records[case]
    last, before = (
        {k.split("/", 2)[2]: weights[k] for k in keys if k.startswith(f"{case}/{t}/")}
        for t in (TASKS - 1, TASKS - 2)
    )
    assert any(not torch.equal(last[n], before[n]) for n in last)  # the merges moved the weights

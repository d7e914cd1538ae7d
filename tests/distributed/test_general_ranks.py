"""General ability (lm-eval) under FSDP2 and DDP on two gloo ranks: every rank runs the whole
evaluation, so the scores equal one process's, and the exported FSDP2 checkpoint gives the same
numbers through the `lm_eval` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from twoproc import clbench, fit, results

from clbench.testing import write_general_tasks

sys.path.insert(0, str(Path(__file__).parents[1] / "evaluation"))
from test_general import assert_same_numbers, lm_eval_cli  # noqa: E402


@pytest.fixture(scope="module")
def general_args(toy_setup) -> tuple[str, ...]:
    tasks = write_general_tasks(toy_setup / "general")
    general = ("--general.tasks", json.dumps(tasks), "--general.batch_size", "4")
    return ("--strategy", "seqft", *general, "--run.checkpoints", "last")


def test_two_ranks_measure_what_one_process_does(toy_setup, general_args):
    one = results(fit(toy_setup, "general/one", 1, *general_args))["general"]["rows"]
    assert sorted(one) == ["0", "3"] and one["3"] != one["0"]
    for sharding in ("fsdp", "ddp"):
        two = fit(toy_setup, f"general/{sharding}", 2, "--trainer.strategy", sharding, *general_args)
        got = results(two)
        assert got["world_size"] == 2 and got["general"]["rows"] == one, sharding
        assert (two / "general" / "after_3" / "toy_choice.jsonl").is_file()
    # the FSDP2 run's last checkpoint, exported, gives lm_eval the numbers clbench measured
    run = toy_setup / "general" / "fsdp" / "run"
    out = toy_setup / "general" / "exported"
    clbench(toy_setup, "export", str(run / "checkpoints" / "task3-upper"), str(out))
    tasks = json.loads(general_args[3])
    cli = lm_eval_cli(f"pretrained={out},dtype=float32", tasks, 4, toy_setup / "general" / "lm_eval")
    assert_same_numbers(results(run)["general"]["rows"]["3"], cli)


@pytest.mark.parametrize("sharding", ["fsdp", "ddp"])
def test_bf16_mixed_on_two_ranks_measures_it_too(toy_setup, general_args, sharding):
    """GPU runs' setting: the evaluation runs under the run's autocast, on sharded (FSDP2) or
    replicated (DDP) parameters."""
    run = fit(
        toy_setup,
        f"general/bf16-{sharding}",
        2,
        "--trainer.strategy",
        sharding,
        "--trainer.precision",
        "bf16-mixed",
        *general_args,
    )
    got = results(run)
    assert got["status"] == "complete" and sorted(got["general"]["rows"]) == ["0", "3"]
    assert got["general"]["mean_change"] is not None
    # bf16 really ran: the starting model's log-likelihoods differ from the fp32 one-process run's
    one = toy_setup / "general" / "one" / "run"
    if not (one / "results.json").is_file():
        one = fit(toy_setup, "general/one", 1, *general_args)
    resps = [
        [
            json.loads(x)["resps"]
            for x in (r / "general" / "after_0" / "toy_choice.jsonl").read_text().splitlines()
        ]
        for r in (one, run)
    ]
    assert len(resps[0]) == len(resps[1]) == 12 and resps[0] != resps[1]

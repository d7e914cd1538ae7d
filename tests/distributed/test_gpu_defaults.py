"""The settings of every GPU run, proven on CPU processes over gloo: every registered strategy and
docs/plugins.md's example, with full fine-tuning and with LoRA, in one process, under FSDP2 on two
ranks and under DDP on two ranks, at bf16-mixed and at 32-true (a 2-task slice of the toy stream).

What holds, and is asserted:
- every cell completes, with no exception on any rank;
- 32-true: two ranks give one process's accuracy matrix, per-step losses and weights;
- bf16-mixed: two ranks' per-step losses are within BF16_LOSS_RTOL (3%) of one process's (their
  batches differ in shape, so bf16 rounds differently; the accuracy matrix is not asserted: one
  flipped answer changes it), and differ from the 32-true run's (bf16 really computed);
- a kill after task 1 and `--resume` under FSDP2 at bf16-mixed ends with the uninterrupted run's
  matrix and losses, exactly, for seqft, O-LoRA, SSR and attribution.

The runs of one setting and precision share one process (tests/distributed/matrix_worker.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from twoproc import (
    ENV,
    LORA,
    STRATEGY_ARGS,
    assert_same_run,
    clbench,
    fit_args,
    results,
    start_fit,
    wait_for_first_task,
)

import strategies

FULL_ONLY = ("progressive_prompts", "l2p", "lfpt5")  # soft prompts on a frozen model: LoRA refused
FULL_OR_LORA = {n: args for n, args in STRATEGY_ARGS.items() if n not in ("o_lora", *FULL_ONLY)}
VARIANTS = {
    **FULL_OR_LORA,
    **{f"{name}-lora": (*args, *LORA) for name, args in FULL_OR_LORA.items()},
    "o_lora-lora": STRATEGY_ARGS["o_lora"],  # LoRA only
    **{name: STRATEGY_ARGS[name] for name in FULL_ONLY},
}
SETTINGS = {
    "one": (1, ()),
    "fsdp": (2, ("--trainer.strategy", "fsdp")),
    "ddp": (2, ("--trainer.strategy", "ddp")),
}
PRECISIONS = ("bf16-mixed", "32-true")
# Measured (2026-12-07, AMD EPYC with AVX512-BF16, 38 two-rank runs against one process): the largest
# relative gap between per-step losses at bf16-mixed was 9.9e-3 (SSR under FSDP2: its training
# examples are generated, and bf16 changed some), 6.3e-4 for every other run, median 6e-5; at 32-true
# the same runs agree to 1e-5. Three times the worst, for CPUs whose bf16 kernels round otherwise.
BF16_LOSS_RTOL = 0.03


def test_the_matrix_holds_every_registered_strategy():
    covered = {args[args.index("--strategy") + 1] for args in VARIANTS.values()}
    assert set(strategies.REGISTRY) <= covered


@pytest.fixture(scope="session")
def matrix(toy_setup):
    """run(setting, precision) -> (folder, outcome): every variant fitted in that setting, the runs
    sharing one process (per rank), made once."""
    config = yaml.safe_load((toy_setup / "toy.yaml").read_text())
    tasks = config["stream"]["tasks"][:2]
    config["stream"]["tasks"] = [{**t, "n_train": 12, "n_test": 4, "max_new_tokens": 3} for t in tasks]
    (toy_setup / "matrix.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    made: dict[tuple[str, str], tuple[Path, dict]] = {}

    def run(setting: str, precision: str) -> tuple[Path, dict]:
        if (setting, precision) not in made:
            made[setting, precision] = _fit_all(toy_setup, setting, precision)
        return made[setting, precision]

    return run


def _fit_all(root: Path, setting: str, precision: str) -> tuple[Path, dict]:
    ranks, extra = SETTINGS[setting]
    out = f"matrix/{setting}-{precision}"
    specs = [
        fit_args(
            out, ranks, *extra, "--trainer.precision", precision, *args, config="matrix.yaml", name=name
        )[1:]
        for name, args in VARIANTS.items()
    ]
    spec = root / f"{setting}-{precision}.json"
    spec.write_text(json.dumps(specs), encoding="utf-8")
    worker = [sys.executable, str(Path(__file__).with_name("matrix_worker.py")), str(spec)]
    path = os.pathsep.join(filter(None, [str(root), ENV.get("PYTHONPATH")]))  # the plugin's file, first
    env = {**ENV, "PYTHONPATH": path}
    done = subprocess.run(worker, cwd=root, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]  # no rank printed one, even one it survived
    outcome = {}
    for rank in range(ranks):
        for name, said in json.loads(spec.with_suffix(f".rank{rank}.json").read_text()).items():
            outcome.setdefault(name, []).append(said)
    return root / out, outcome


CELLS = [(v, s, p) for p in PRECISIONS for s in SETTINGS for v in VARIANTS]


@pytest.mark.parametrize("variant, setting, precision", CELLS)
def test_every_cell_completes(matrix, variant, setting, precision):
    folder, outcome = matrix(setting, precision)
    assert outcome[variant] == ["ok"] * SETTINGS[setting][0], outcome[variant]
    done = results(folder / variant)
    assert done["status"] == "complete"
    assert done["world_size"] == SETTINGS[setting][0]
    assert all(row is not None and None not in row for row in done["matrix"])


@pytest.mark.parametrize("variant, setting", [(v, s) for s in ("fsdp", "ddp") for v in VARIANTS])
def test_fp32_two_ranks_equal_one_process(matrix, variant, setting):
    one, two = matrix("one", "32-true")[0] / variant, matrix(setting, "32-true")[0] / variant
    assert_same_run(one, two)


def losses(run: Path) -> torch.Tensor:
    done = results(run)
    return torch.tensor([x for task in done["tasks"] for x in done["per_task"][task]["train_loss"]])


@pytest.mark.parametrize("variant, setting", [(v, s) for s in ("fsdp", "ddp") for v in VARIANTS])
def test_bf16_two_ranks_within_tolerance_of_one_process(matrix, variant, setting):
    one, two = matrix("one", "bf16-mixed")[0] / variant, matrix(setting, "bf16-mixed")[0] / variant
    a, b = losses(one), losses(two)
    assert a.shape == b.shape and a.numel() > 0
    gap = ((b - a).abs() / a.abs()).max().item()
    assert gap <= BF16_LOSS_RTOL, (variant, setting, gap)
    fp32 = losses(matrix(setting, "32-true")[0] / variant)
    assert not torch.equal(b, fp32)  # bf16 really computed


@pytest.mark.parametrize("variant", ["seqft", "o_lora-lora", "ssr", "attribution"])
def test_bf16_fsdp2_killed_after_task_1_resumes_to_the_uninterrupted_run(matrix, toy_setup, variant):
    """SIGKILL to both ranks once task 1's state is saved; `fit --resume` ends with the uninterrupted
    FSDP2 bf16-mixed run's matrix and per-step losses, bit for bit."""
    whole = matrix("fsdp", "bf16-mixed")[0] / variant
    out = f"matrix/killed/{variant}"
    args = ("--trainer.strategy", "fsdp", "--trainer.precision", "bf16-mixed", *VARIANTS[variant])
    proc = start_fit(toy_setup, out, 2, *args, config="matrix.yaml")
    run = toy_setup / out / "run"
    wait_for_first_task(proc, run)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert results(run)["status"] == "running"
    clbench(toy_setup, "fit", "--resume", str(run))
    a, b = results(whole), results(run)
    assert b["status"] == "complete" and b["matrix"] == a["matrix"]
    assert torch.equal(losses(run), losses(whole))

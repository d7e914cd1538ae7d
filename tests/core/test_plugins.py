"""docs/plugins.md's example strategy, run as the page tells a plugin author to run it."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from plugin_example import write_plugin_example
from test_fit import toy_config, write_config

from clbench.cli import main
from clbench.data.tasks import Example, Task, TaskStream
from clbench.module import CLModule
from clbench.testing import fit_task, make_context


@pytest.fixture
def l2_pull(tmp_path, monkeypatch):
    """The example's module, imported from a folder on the path as PYTHONPATH would put it."""
    monkeypatch.syspath_prepend(str(write_plugin_example(tmp_path / "plugin")))
    sys.modules.pop("l2_pull", None)
    yield importlib.import_module("l2_pull")
    sys.modules.pop("l2_pull", None)


def _stream() -> TaskStream:
    tasks = [
        Task(name=n, train=[Example(f"{n} {i}:", a) for i in range(16)], test=[Example(f"{n} 99:", a)])
        for n, a in (("first", "yes"), ("second", "no"))
    ]
    return TaskStream(name="two", tasks=tasks)


def test_the_pull_is_strength_times_the_distance_to_the_previous_weights(l2_pull, tiny_model_dir, tmp_path):
    module = CLModule(model=str(tiny_model_dir), lr=1e-2)
    strategy, ctx = l2_pull.L2Pull(strength=0.5), make_context(module, _stream(), 0, tmp_path)
    strategy.on_task_end(ctx)
    params = module.trainable_parameters()
    torch.manual_seed(1)
    moved = {n: torch.randn_like(p) for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.add_(moved[n])
            p.grad = torch.ones_like(p)
    strategy.on_before_optimizer_step(ctx, None)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, 1 + 0.5 * moved[n])


def test_a_strong_pull_keeps_the_previous_tasks_weights(l2_pull, tiny_model_dir, tmp_path):
    def drift(strength: float) -> float:
        torch.manual_seed(0)
        module, stream = CLModule(model=str(tiny_model_dir), lr=1e-2), _stream()
        strategy = l2_pull.L2Pull(strength=strength)
        fit_task(module, strategy, make_context(module, stream, 0, tmp_path), steps=4)
        before = {n: p.detach().clone() for n, p in module.trainable_parameters().items()}
        fit_task(module, strategy, make_context(module, stream, 1, tmp_path), steps=8)
        after = module.trainable_parameters()
        return sum((after[n].detach() - before[n]).norm().item() ** 2 for n in before) ** 0.5

    free, pulled = drift(0.0), drift(1e3)
    assert pulled < 0.7 * free, (pulled, free)


def test_fit_runs_the_plugin_by_its_class_path_and_checks_its_argument(
    l2_pull, trace_dir, tiny_model_dir, tmp_path, capsys
):
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    cfg["stream"]["tasks"] = cfg["stream"]["tasks"][:2]
    path = write_config(tmp_path / "toy.yaml", cfg)
    plugin = ["--strategy", "l2_pull.L2Pull", "--strategy.strength", "0.5"]
    assert main(["fit", "--config", str(path), *plugin]) == 0
    results = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert results["status"] == "complete" and results["strategy"] == "l2pull"
    source = hashlib.sha256((tmp_path / "plugin" / "l2_pull.py").read_bytes()).hexdigest()
    assert results["identity"]["code"]["strategy_source_sha256"] == source  # editing it changes the run

    argv = ["fit", "--config", str(path), "--run.name", "bad", "--strategy", "l2_pull.L2Pull"]
    capsys.readouterr()
    assert main([*argv, "--strategy.strength", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "strength must be >= 0" in err, err


def test_compare_child_fits_find_the_plugin_through_pythonpath(trace_dir, tiny_model_dir, tmp_path):
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    cfg["stream"]["tasks"] = cfg["stream"]["tasks"][:2]
    path = write_config(tmp_path / "toy.yaml", cfg)
    env = {**os.environ, "PYTHONPATH": str(write_plugin_example(tmp_path / "plugin"))}
    code = "import sys; from clbench.cli import main; sys.exit(main())"
    argv = [sys.executable, "-c", code, "compare", "--config", str(path), "--strategies", "l2_pull.L2Pull"]
    out = subprocess.run([*argv, "--seeds", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = tmp_path / "runs" / "compare-toy" / "runs"
    results = json.loads(next(runs.glob("*/results.json")).read_text())
    assert results["status"] == "complete" and results["strategy"] == "l2pull"


BUGGY = '''"""A plugin with a bug: its hook raises mid-run, in the second task's first optimizer step."""

from l2_pull import L2Pull


class Buggy(L2Pull):
    def on_before_optimizer_step(self, ctx, optimizer):
        if ctx.task_index == 1:
            raise ValueError("a bug in the plugin's own code")  # line 9
        super().on_before_optimizer_step(ctx, optimizer)
'''


def test_a_bug_in_a_plugin_s_hook_shows_its_traceback_and_fails_the_run(trace_dir, tiny_model_dir, tmp_path):
    """A ValueError from a strategy's hook is a bug, not bad input: the traceback names the plugin's
    file and line (no one-line message hides it), and results.json says "failed"."""
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    cfg["stream"]["tasks"] = [{**t, "epochs": 1} for t in cfg["stream"]["tasks"][:2]]
    path = write_config(tmp_path / "toy.yaml", cfg)
    folder = write_plugin_example(tmp_path / "plugin")
    (folder / "buggy.py").write_text(BUGGY, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(folder), "OMP_NUM_THREADS": "1"}
    env.pop("CLBENCH_TRACEBACK", None)
    argv = [sys.executable, "-m", "clbench", "fit", "--config", str(path), "--strategy", "buggy.Buggy"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback (most recent call last)" in out.stderr
    assert f'File "{folder / "buggy.py"}", line 9, in on_before_optimizer_step' in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "ValueError: a bug in the plugin's own code"
    results = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert results["status"] == "failed" and results["error"] == "ValueError: a bug in the plugin's own code"

"""Every registered strategy builds from defaults, runs two tasks on a tiny model, and
round-trips its state; an outside strategy plugs in by class path and sees every hook."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_fit import toy_config, write_config

import clbench
import strategies
from clbench.cli import main
from strategies import CLStrategy

CALLS: list[tuple] = []


class RecordingStrategy(CLStrategy):
    """Records every hook call with the task index it saw."""

    def prepare_model(self, ctx):
        CALLS.append(("prepare_model", ctx.task_index))

    def setup(self, ctx):
        CALLS.append(("setup", ctx.task_index))

    def on_task_start(self, ctx):
        CALLS.append(("on_task_start", ctx.task_index))

    def training_examples(self, ctx, examples):
        CALLS.append(("training_examples", ctx.task_index))
        return examples

    def training_penalty(self, ctx, batch, outputs):
        CALLS.append(("training_penalty", ctx.task_index))
        return None

    def on_before_optimizer_step(self, ctx, optimizer):
        CALLS.append(("on_before_optimizer_step", ctx.task_index))

    def update_gate(self, ctx):
        CALLS.append(("update_gate", ctx.task_index))
        return None

    def on_after_optimizer_step(self, ctx, optimizer):
        CALLS.append(("on_after_optimizer_step", ctx.task_index))

    def on_task_end(self, ctx):
        CALLS.append(("on_task_end", ctx.task_index))

    def answer(self, ctx, batch):
        CALLS.append(("answer", ctx.task_index))
        return None


def _two_task_config(trace_dir: Path, model_dir: Path, out: Path, strategy: str) -> dict:
    cfg = toy_config(trace_dir, model_dir, out, strategy)
    cfg["stream"]["tasks"] = cfg["stream"]["tasks"][:2]
    for task in cfg["stream"]["tasks"]:
        task["epochs"] = 1
    cfg["trainer"]["accumulate_grad_batches"] = 3
    cfg["run"]["evaluate"] = "needed"
    return cfg


def test_outside_strategy_by_class_path_sees_every_hook(trace_dir, tiny_model_dir, tmp_path):
    CALLS.clear()
    cfg = write_config(
        tmp_path / "c.yaml", _two_task_config(trace_dir, tiny_model_dir, tmp_path / "runs", "seqft")
    )
    assert main(["fit", "--config", str(cfg), "--strategy", "test_strategy_contract.RecordingStrategy"]) == 0
    for t in (0, 1):
        names = [name for name, task in CALLS if task == t and name not in ("prepare_model", "setup")]
        # 24 examples, batch 8: 3 batches, 3 accumulated -> 1 optimizer step per task
        assert names.count("training_penalty") == 3
        steps = ("on_before_optimizer_step", "update_gate", "on_after_optimizer_step")
        assert [names.count(hook) for hook in steps] == [1, 1, 1]
        assert [n for n in names if n in steps] == list(steps)  # in this order, once per step
        assert names[:2] == ["on_task_start", "training_examples"]
        # row t is evaluated after the task's end, every prompt batch through answer (test: 8 prompts
        # in batches of at most the eval batch size, for each task of the row)
        end = names.index("on_task_end")
        assert end == len(names) - 1 - names.count("answer") and set(names[end + 1 :]) == {"answer"}
        assert names.count("answer") >= t + 1
    assert CALLS[:2] == [("prepare_model", 0), ("setup", 0)]
    res = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert res["strategy"] == "recordingstrategy"


def test_every_strategy_file_is_registered():
    # a strategy is a file, or a package (its machinery inside) whose strategies live in it
    folder = Path(strategies.__file__).parent
    files = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    packages = {p.parent.name for p in folder.glob("*/__init__.py")}
    modules = {target.split(":")[0].removeprefix("strategies.") for target in strategies.REGISTRY.values()}
    registered = {module.split(".")[0] for module in modules}
    assert files | packages == registered


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_registered_strategy_runs_two_tasks_and_round_trips(name, trace_dir, tiny_model_dir, tmp_path):
    cfg = _two_task_config(trace_dir, tiny_model_dir, tmp_path / "runs", name)
    if name == "freeze":
        cfg["strategy"] = {"class_path": name, "init_args": {"lower_layers": 1}}
    if name == "o_lora":  # an adapter per task beside model.lora's
        cfg["model"]["lora"] = {"r": 4}
    assert main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    run = tmp_path / "runs" / "run"
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "complete" and res["strategy"] == name
    steps = res["timings"]["steps"]
    # 24 examples, batch 8, 3 accumulated: 1 step; replay, multitask and ssr add earlier examples
    assert steps["parity"] == 1 and steps["reverse"] == (2 if name in ("multitask", "replay", "ssr") else 1)
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    cls = strategies.load(name)
    fresh = cls(**resolved["strategy"].get("init_args", {}))
    ckpt = run / "checkpoints" / "task2-reverse" / "strategy.safetensors"
    if ckpt.exists():
        from safetensors.torch import load_file

        state = load_file(str(ckpt))
        fresh.load_state_dict(state)
        again = fresh.state_dict()
        assert again.keys() == state.keys()
        assert all(torch.equal(again[k].cpu(), state[k]) for k in state)


def test_the_core_imports_no_strategy_module():
    """clbench/ reaches strategies only through the registry (`strategies` itself), never a strategy's
    module or machinery: a method's code lives beside its strategy file."""
    import ast

    core = Path(clbench.__file__).parent
    folder = Path(strategies.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} | {p.parent.name for p in folder.glob("*/__init__.py")}
    offenders = []
    for path in core.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module == "strategies":  # from strategies import ewc
                names = [f"strategies.{a.name}" for a in node.names if a.name in modules]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if isinstance(node, ast.Constant) and isinstance(node.value, str):  # import_module("...")
                names = [node.value] if node.value.startswith("strategies.") else []
            offenders += [f"{path.relative_to(core)}: {n}" for n in names if n.startswith("strategies.")]
    assert offenders == []


def test_registry_classes_are_where_it_says_and_importing_it_or_clbench_help_loads_no_strategy():
    """The registry is lazy and the CLI only dispatches: `import strategies` and `clbench --help`
    import neither torch nor any strategy (well under a second; BENCHMARKS.md)."""
    code = (
        "import sys, strategies; from clbench.cli import main; assert main(['--help']) == 0; "
        "assert 'torch' not in sys.modules and not any(m.startswith('strategies.') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    for name in strategies.REGISTRY:
        cls = strategies.load(name)
        assert issubclass(cls, CLStrategy)
        assert strategies.name_for(f"{cls.__module__}.{cls.__qualname__}") == name


@pytest.mark.parametrize("form", [["--strategy.help", "ewc"], ["--strategy.help=ewc"]])
def test_strategy_help_takes_a_registry_name(form, capsys):
    """`clbench fit --strategy.help ewc` lists EWC's options (it took only a class path before)."""
    with pytest.raises(SystemExit) as done:
        main(["fit", *form])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--strategy.ewc_lambda" in out and "--strategy.fisher_batches" in out

"""Bad input: a non-zero exit, one line naming what is wrong, and an earlier run left as it was."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_fit import toy_config, write_config

from clbench.cli import main
from clbench.strategy import CLStrategy


def task(c: dict, i: int) -> dict:
    return c["stream"]["tasks"][i]


def write(path: Path, data: bytes | str) -> None:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def pickle_only_model(c: dict, d: Path) -> None:
    """A copy of the model folder whose weights are a pickle (pytorch_model.bin) only."""
    import torch
    from safetensors.torch import load_file

    src, out = Path(c["model"]["model"]), d.parent / "pickled-model"
    out.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(str(src / "model.safetensors")), out / "pytorch_model.bin")
    c["model"]["model"] = str(out)


CASES = {
    # data files
    "empty answer": (
        lambda c, d: write(d / "parity" / "train.json", '[{"prompt": "a", "answer": ""}]'),
        "item 1: field 'answer' is empty",
    ),
    "blank answer": (
        lambda c, d: write(d / "reverse" / "test.json", '[{"prompt": "a", "answer": "  "}]'),
        "field 'answer' is empty",
    ),
    "answer not a string": (
        lambda c, d: write(d / "upper" / "train.json", '[{"prompt": "a", "answer": 3}]'),
        "field 'answer' is missing or not a string",
    ),
    "missing prompt": (lambda c, d: write(d / "upper" / "train.json", '[{"answer": "x"}]'), "field 'prompt'"),
    "item not an object": (lambda c, d: write(d / "upper" / "train.json", '["x"]'), "item 1 is str"),
    "not JSON": (lambda c, d: write(d / "parity" / "eval.json", "[{"), "not valid JSON"),
    "not UTF-8": (
        lambda c, d: write(d / "parity" / "train.json", b'[{"prompt": "\xff\xfe", "answer": "x"}]'),
        "not UTF-8 text",
    ),
    "empty split": (lambda c, d: write(d / "upper" / "test.json", "[]"), "the split is empty"),
    "missing split": (lambda c, d: (d / "parity" / "test.json").unlink(), "test.json: file not found"),
    "missing data root": (lambda c, d: c["stream"].update(data_root=str(d / "nowhere")), "file not found"),
    # numbers
    "epochs 0": (lambda c, d: task(c, 0).update(epochs=0), "epochs: must be a positive count"),
    "max_prompt_tokens 0": (
        lambda c, d: task(c, 1).update(max_prompt_tokens=0),
        "max_prompt_tokens: must be a positive",
    ),
    "max_new_tokens negative": (
        lambda c, d: task(c, 2).update(max_new_tokens=-1),
        "max_new_tokens: must be a positive",
    ),
    "max_answer_tokens 0": (
        lambda c, d: task(c, 0).update(max_answer_tokens=0),
        "max_answer_tokens: must be a positive",
    ),
    "max_steps 0": (lambda c, d: task(c, 0).update(max_steps=0), "max_steps: must be positive, or -1"),
    "n_train 0": (lambda c, d: task(c, 0).update(n_train=0), "n_train: must be a positive count"),
    "batch_size 0": (lambda c, d: c["stream"].update(batch_size=0), "stream.batch_size: must be a positive"),
    "eval_batch_size 0": (lambda c, d: c["stream"].update(eval_batch_size=0), "stream.eval_batch_size"),
    "negative lr": (lambda c, d: c["model"].update(lr=-1.0), "model.lr must be positive"),
    "strategy option of the wrong type": (
        lambda c, d: c.update(strategy={"class_path": "ewc", "init_args": {"ewc_lambda": "abc"}}),
        "bad.yaml: strategy.ewc_lambda: expected float, got 'abc'",
    ),
    "unknown strategy option": (
        lambda c, d: c.update(strategy={"class_path": "ewc", "init_args": {"nosuch": 1}}),
        "bad.yaml: strategy.nosuch: not an option of ewc; its options: ewc_lambda, gamma",
    ),
    "bad strategy option": (
        lambda c, d: c.update(strategy={"class_path": "ewc", "init_args": {"ewc_lambda": -1}}),
        "ewc_lambda must be >= 0",
    ),
    # names and paths
    "run name escapes": (lambda c, d: c["run"].update(name="../escape"), "run.name: '../escape' names files"),
    "absolute run name": (lambda c, d: c["run"].update(name="/tmp/abs"), "run.name: '/tmp/abs'"),
    "run name with a separator": (lambda c, d: c["run"].update(name="a/b"), "run.name: 'a/b'"),
    "task name escapes": (lambda c, d: task(c, 0).update(name="../../x"), "stream.tasks.name: '../../x'"),
    "stream name with a separator": (lambda c, d: c["stream"].update(name="x/y"), "stream.name: 'x/y'"),
    "repeated task names": (lambda c, d: task(c, 1).update(name="parity"), "task names repeat"),
    "over-long task name": (
        lambda c, d: task(c, 0).update(name="t" * 300),
        "300 characters long; at most 100",
    ),
    "two tasks on the same files": (
        lambda c, d: task(c, 1).update(path="parity"),
        "stream.tasks[reverse].path: reads the same data as task parity",
    ),
    "unwritable output folder": (
        lambda c, d: (write(d / "file", "x"), c["run"].update(output_dir=str(d / "file" / "runs"))),
        "run.output_dir: cannot create",
    ),
    # config
    "config file missing": (lambda c, d: c.update(__file__="gone.yaml"), "gone.yaml: config file not found"),
    "unknown key": (lambda c, d: c["stream"].update(batchsize=3), "does not accept"),
    "unknown metric": (lambda c, d: task(c, 0).update(metric="bleu"), "unknown metric 'bleu'"),
    "unknown strategy": (lambda c, d: c.update(strategy="nosuch"), "unknown strategy 'nosuch'"),
    "o_lora without lora": (lambda c, d: c.update(strategy="o_lora"), "set model.lora"),
    "progressive_prompts with lora": (
        lambda c, d: (c.update(strategy="progressive_prompts"), c["model"].update(lora={"r": 4})),
        "progressive_prompts trains soft prompts on a frozen model: unset model.lora",
    ),
    "lfpt5 with lora": (
        lambda c, d: (c.update(strategy="lfpt5"), c["model"].update(lora={"r": 4})),
        "lfpt5 trains one soft prompt on a frozen model: unset model.lora",
    ),
    "bad precision": (lambda c, d: c["trainer"].update(precision="fp7"), "precision"),
    # models
    "missing model folder": (
        lambda c, d: c["model"].update(model=str(d / "no-model")),
        "no-model: no such folder",
    ),
    "missing model folder (relative)": (
        lambda c, d: c["model"].update(model="./models/no-model"),
        "model.model: ./models/no-model: no such folder",
    ),
    "hub id not cached, offline": (
        lambda c, d: c["model"].update(model="nosuch-org/nosuch-model"),
        "model.model: 'nosuch-org/nosuch-model' is neither a local folder nor in the Hugging Face cache",
    ),
    "pickled weights only": (pickle_only_model, "pickled weights only"),
}


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        h.update(str(f.relative_to(folder)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_with_one_line_and_touches_no_earlier_run(
    case, trace_dir, tiny_model_dir, tmp_path, capsys
):
    mutate, expected = CASES[case]
    runs = tmp_path / "runs"
    earlier = runs / "earlier"  # stands for a finished run in the same output folder
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text('{"status": "complete"}')
    (earlier / "config.yaml").write_text("model: {}\n")
    before = digest(runs)
    cfg = toy_config(trace_dir, tiny_model_dir, runs)
    mutate(cfg, trace_dir)
    config = cfg.pop("__file__", None) or str(write_config(tmp_path / "bad.yaml", cfg))
    code = main(["fit", "--config", config])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert expected in err, err
    assert digest(runs) == before  # nothing written beside or into the earlier run
    assert not Path("/tmp/abs").exists() and not (tmp_path / "escape").exists()


def test_more_than_available_warns_and_uses_all(trace_dir, tiny_model_dir, tmp_path, capsys):
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    cfg["stream"]["tasks"] = cfg["stream"]["tasks"][:1]
    cfg["stream"]["tasks"][0].update(epochs=1, n_test=1000)
    assert main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    assert re.search(
        r"warning: stream.tasks\[parity\].n_test: 1000 asked, .* holds 8; using all", capsys.readouterr().out
    )
    res = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert res["per_task"]["parity"]["n_test"] == 8


def strict_json(path: Path) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"{path} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_nan_loss_stops_the_run_as_diverged(trace_dir, tiny_model_dir, tmp_path, capsys):
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    cfg["model"]["lr"] = 1e10  # the weights blow up after one step
    code = main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))])
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1
    assert "diverged: task parity: the training loss is" in err and "at step" in err
    res = strict_json(tmp_path / "runs" / "run" / "results.json")
    assert res["status"] == "diverged" and "task parity" in res["error"]
    assert res["matrix"][1] == [None, None, None]  # nothing scored after the diverged task
    assert all(x is None or x == x for x in res["per_task"]["parity"]["train_loss"])


def test_a_collapsed_run_stops_as_diverged_and_a_working_one_does_not(
    trace_dir, tiny_model_dir, tmp_path, capsys
):
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    cfg["model"]["lr"] = 1e6  # no NaN: the weights reach ~1e6 and the loss sits at ln(V)
    code = main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))])
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1, err
    assert re.search(r"diverged: task parity: the training loss is [\d.]+ at step \d+ .* ln\(V\)", err), err
    assert "training collapsed" in err
    res = strict_json(tmp_path / "runs" / "run" / "results.json")
    assert res["status"] == "diverged" and res["summary"] is None and res["matrix"][1] == [None] * 3
    losses = res["per_task"]["parity"]["train_loss"]
    assert all(math.isfinite(x) for x in losses)  # caught although no loss was NaN

    cfg["model"]["lr"] = 3e-3  # the toy runs' working rate, 10x-grown weights never seen
    cfg["run"]["name"] = "working"
    assert main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    res = strict_json(tmp_path / "runs" / "working" / "results.json")
    assert res["status"] == "complete"
    assert all(0.5 < d["weight_growth"] < 2.0 for d in res["per_task"].values())  # far from 10x


class Boom(CLStrategy):
    """Stands for a bug: a strategy whose hook raises after the first task trained."""

    def on_task_end(self, ctx) -> None:
        raise RuntimeError(f"boom after {ctx.task.name}")


def test_a_crash_leaves_a_failed_run_with_its_error(trace_dir, tiny_model_dir, tmp_path):
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs", strategy="test_bad_input.Boom")
    with pytest.raises(RuntimeError, match="boom"):
        main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))])
    res = strict_json(tmp_path / "runs" / "run" / "results.json")
    assert res["status"] == "failed" and res["error"] == "RuntimeError: boom after parity"
    assert res["matrix"][0] != [None, None, None]  # what was measured before the crash is kept
    assert res["pid"] == os.getpid()


class StuckOnStop(CLStrategy):
    """Stands for a fit that does not end when SIGTERM's SystemExit reaches it: a clean-up that
    waits (a collective whose peer is gone, a hung writer)."""

    def on_task_start(self, ctx) -> None:
        (ctx.run_dir / "stuck").write_text("")
        try:
            time.sleep(600)
        except SystemExit:
            time.sleep(600)


SIGTERM_PHASES = {
    # the first task trains (its TensorBoard folder exists)
    "training": ("seqft", lambda run: (run / "tensorboard" / "task1-parity").is_dir(), "interrupted"),
    # stuck where the SystemExit cannot end it: the watchdog ends the process
    "stuck": ("test_bad_input.StuckOnStop", lambda run: (run / "stuck").is_file(), "forced exit"),
}


@pytest.mark.parametrize("phase", list(SIGTERM_PHASES))
def test_sigterm_stops_a_fit_within_seconds(phase, trace_dir, tiny_model_dir, tmp_path):
    strategy, ready, recorded = SIGTERM_PHASES[phase]
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs", strategy=strategy)
    for t in cfg["stream"]["tasks"]:
        t["epochs"] = 200  # long enough to be killed while training
    path = write_config(tmp_path / "c.yaml", cfg)
    # PYTHONFAULTHANDLER: a run that does not end after SIGTERM prints every thread's stack on SIGABRT
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    log = (tmp_path / "fit.log").open("w")  # a file, not a pipe: a full pipe would stall the run
    cmd = [sys.executable, "-m", "clbench", "fit", "--config", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    run = tmp_path / "runs" / "run"
    deadline = time.time() + 120
    while time.time() < deadline and not ready(run):
        assert proc.poll() is None, (tmp_path / "fit.log").read_text()[-2000:]
        time.sleep(0.2)
    running = strict_json(run / "results.json")
    assert running["status"] == "running" and running["pid"] == proc.pid and running["heartbeat"]
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        proc.wait(timeout=60)
        pytest.fail(f"no exit 60 s after SIGTERM; the stacks: {(tmp_path / 'fit.log').read_text()[-6000:]}")
    took = time.monotonic() - sent
    assert took < 5.0 + 10.0, took  # the watchdog's 5 s grace, and the exit itself on a loaded machine
    assert proc.returncode != 0
    final = strict_json(run / "results.json")
    assert final["status"] == "interrupted", (tmp_path / "fit.log").read_text()[-2000:]
    assert recorded in final["status"] + final.get("error", "")


def test_pickled_weights_load_only_when_allowed(trace_dir, tiny_model_dir, tmp_path):
    from clbench.errors import ConfigError
    from clbench.module import CLModule

    cfg = {"model": {"model": str(tiny_model_dir)}}
    pickle_only_model(cfg, trace_dir)
    with pytest.raises(ConfigError, match="pickled weights only"):
        CLModule(model=cfg["model"]["model"])
    loaded = CLModule(model=cfg["model"]["model"], allow_pickle=True)
    reference = CLModule(model=str(tiny_model_dir))
    for (name, p), q in zip(loaded.model.named_parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_mistake_on_the_command_line_is_not_blamed_on_the_config(
    trace_dir, tiny_model_dir, tmp_path, capsys
):
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs", strategy="ewc")
    path = str(write_config(tmp_path / "c.yaml", cfg))
    for extra, expected in (
        (["--strategy.ewc_lambda", "abc"], "command line: strategy.ewc_lambda: expected float, got 'abc'"),
        (["--strategy.ewc_lambda", "-1"], "command line: strategy: ewc.ewc_lambda must be >= 0"),
        (["--model.lr", "fast"], "command line: model.lr: expected float, got fast"),
        (["--stream.batchsize", "3"], "command line: --stream.batchsize: not an option of clbench fit"),
    ):
        assert main(["fit", "--config", path, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err and "c.yaml" not in err, err
        assert "Namespace" not in err and "<class" not in err
    assert not (tmp_path / "runs").exists()


def test_a_blocked_pickle_is_one_line_and_runs_nothing(trace_dir, tiny_model_dir, tmp_path, capsys):
    import pickle

    evil = tmp_path / "evil-model"
    evil.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (evil / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    cfg = toy_config(trace_dir, evil, tmp_path / "runs")
    cfg["model"]["allow_pickle"] = True
    assert main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torch's safe loader refused its pickled weights" in err, err
    assert not marker.exists()


def test_one_test_example_reports_no_standard_error(trace_dir, tiny_model_dir, tmp_path):
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    cfg["stream"]["tasks"] = cfg["stream"]["tasks"][:1]
    cfg["stream"]["tasks"][0].update(epochs=1, n_test=1)
    assert main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    run = tmp_path / "runs" / "run"
    assert strict_json(run / "results.json")["per_task"]["parity"]["final_stderr"] is None
    assert re.search(r"\| parity \| exact_match \| 1 \| .* \| n/a \|", (run / "results.md").read_text())


def test_fsdp_on_a_model_without_decoder_layers_is_bad_input_not_a_bug():
    from torch import nn

    from clbench.distributed import fsdp_units
    from clbench.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot find the decoder layers of Linear"):
        fsdp_units(nn.Linear(2, 2))


def test_a_config_file_that_is_not_text_is_one_line(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_bytes(b"model:\n  lr: \xff\xfe\n")
    assert main(["fit", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}: cannot be read as a UTF-8 text file" in err

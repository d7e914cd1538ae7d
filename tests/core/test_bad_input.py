"""Bad input: a non-zero exit, one line naming what is wrong, and an earlier run left as it was."""

from __future__ import annotations

import hashlib
import json
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
        "item 0: field 'answer' is empty",
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
    "item not an object": (lambda c, d: write(d / "upper" / "train.json", '["x"]'), "item 0 is str"),
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
    "bad precision": (lambda c, d: c["trainer"].update(precision="fp7"), "precision"),
    # models
    "missing model folder": (lambda c, d: c["model"].update(model=str(d / "no-model")), "model"),
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


def test_sigterm_leaves_an_interrupted_run(trace_dir, tiny_model_dir, tmp_path):
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    for t in cfg["stream"]["tasks"]:
        t["epochs"] = 200  # long enough to be killed while training
    path = write_config(tmp_path / "c.yaml", cfg)
    # PYTHONFAULTHANDLER: a run that does not end after SIGTERM prints every thread's stack on SIGABRT
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    log = (tmp_path / "fit.log").open("w")  # a file, not a pipe: a full pipe would stall the run
    cmd = [sys.executable, "-m", "clbench", "fit", "--config", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    results = tmp_path / "runs" / "run" / "results.json"
    deadline = time.time() + 120
    while (
        time.time() < deadline and not (tmp_path / "runs" / "run" / "tensorboard" / "task1-parity").is_dir()
    ):
        time.sleep(0.5)  # row 0 is evaluated and the first task trains
    running = strict_json(results)
    assert running["status"] == "running" and running["pid"] == proc.pid and running["heartbeat"]
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        proc.wait(timeout=60)
        pytest.fail(f"no exit 120 s after SIGTERM; the stacks: {(tmp_path / 'fit.log').read_text()[-6000:]}")
    assert proc.returncode != 0
    assert strict_json(results)["status"] == "interrupted", (tmp_path / "fit.log").read_text()[-2000:]


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

"""What a person sees while a run goes: progress in every long phase, lines as they happen."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from test_fit import toy_config, write_config

from clbench.cli import main
from clbench.models import _no_gguf_bar


def test_the_gguf_reader_draws_no_bar_while_clbench_loads_and_again_after():
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    with _no_gguf_bar():
        assert gguf_utils.tqdm(range(3), file=io.StringIO()).disable
    assert not gguf_utils.tqdm(range(3), file=io.StringIO()).disable


def _two_task_config(trace_dir, tiny_model_dir, tmp_path, bars: bool) -> dict:
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    cfg["stream"]["tasks"] = cfg["stream"]["tasks"][:2]
    for task in cfg["stream"]["tasks"]:
        task["epochs"] = 1
    cfg["trainer"]["enable_progress_bar"] = bars
    cfg["run"].update(checkpoints="none", evaluate_start=True)
    return cfg


def test_evaluation_shows_its_progress_and_follows_enable_progress_bar(
    trace_dir, tiny_model_dir, tmp_path, capsys
):
    cfg = _two_task_config(trace_dir, tiny_model_dir, tmp_path, bars=True)
    assert main(["fit", "--config", str(write_config(tmp_path / "on.yaml", cfg))]) == 0
    err = capsys.readouterr().err
    # every task of the start row and of the last row, prompts counted
    for label in ("row 0: parity (1/2)", "row 0: reverse (2/2)", "row 2: reverse (2/2)"):
        assert label in err, err[-2000:]
    assert "8/8" in err  # the toy test split's 8 prompts

    cfg = _two_task_config(trace_dir, tiny_model_dir, tmp_path, bars=False)
    cfg["run"]["name"] = "quiet"
    assert main(["fit", "--config", str(write_config(tmp_path / "off.yaml", cfg))]) == 0
    assert "row 0:" not in capsys.readouterr().err


def test_console_lines_arrive_as_they_happen_through_a_pipe(trace_dir, tiny_model_dir, tmp_path):
    """Through a pipe Python buffers stdout in blocks: without line buffering compare's 'started'
    line would arrive only when compare exits, after the fit it starts has finished."""
    cfg = _two_task_config(trace_dir, tiny_model_dir, tmp_path, bars=False)
    path = write_config(tmp_path / "toy.yaml", cfg)
    code = "import sys; from clbench.cli import main; sys.exit(main())"
    argv = [sys.executable, "-c", code, "compare", "--config", str(path), "--strategies", "seqft"]
    argv += ["--seeds", "1", "--jobs", "2"]  # with --jobs, each fit writes to its own log
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        first = proc.stdout.readline()
        results = tmp_path / "runs" / "compare-toy" / "runs" / "seqft-seed1" / "results.json"
        done = results.is_file() and json.loads(results.read_text()).get("status") == "complete"
        assert "started seqft-seed1" in first and not done, first
    finally:
        proc.stdout.read()
        assert proc.wait(timeout=300) == 0

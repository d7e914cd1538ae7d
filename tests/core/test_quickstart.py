"""The quickstart config on the bundled model, shortened: few examples, few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from clbench.cli import main
from clbench.data.loaders import StreamConfig, TaskConfig, load_stream

ROOT = Path(__file__).resolve().parents[2]


def test_bundled_stream_loads_through_the_trace_loader():
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    stream_cfg = {**cfg["stream"], "tasks": [TaskConfig(**t) for t in cfg["stream"]["tasks"]]}
    stream_cfg["data_root"] = str(ROOT / stream_cfg["data_root"])
    stream = load_stream(StreamConfig(**stream_cfg))
    assert len(stream) >= 4 and all(len(t.test) >= 100 for t in stream)
    assert stream.tasks[0].labels and stream.tasks[0].majority_baseline() is not None


@pytest.mark.slow
def test_shortened_quickstart_on_bundled_model(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["stream"]["data_root"] = str(ROOT / cfg["stream"]["data_root"])
    for task in cfg["stream"]["tasks"]:
        task.update(n_train=16, n_test=4, max_steps=2)
    cfg["run"].update(output_dir=str(tmp_path), name="short", evaluate="needed", checkpoints="none")
    cfg["general"].update(tasks=[str(ROOT / t) for t in cfg["general"]["tasks"]], limit=4)
    cfg["trainer"]["enable_progress_bar"] = False
    path = tmp_path / "quickstart-short.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path)]) == 0
    res = json.loads((tmp_path / "short" / "results.json").read_text())
    assert res["status"] == "complete" and len(res["tasks"]) == len(cfg["stream"]["tasks"])
    assert all(res["timings"]["steps"][t] == 2 for t in res["tasks"])
    assert res["summary"]["OP"] is not None and res["summary"]["BWT_TRACE"] is not None
    assert (tmp_path / "short" / "heatmap.png").exists()
    # the bundled general-ability suite, before and after the stream, in the report
    assert sorted(res["general"]["rows"]) == ["0", str(len(res["tasks"]))]
    assert set(res["general"]["change"]) == {"clb_arith", "clb_currency"}
    assert "## General ability (lm-eval)" in (tmp_path / "short" / "results.md").read_text()

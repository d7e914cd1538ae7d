"""`clbench analyze importance`: the overlap measures, and a 3-task attribution run end to end."""

from __future__ import annotations

import json

import pytest
import torch
from test_fit import toy_config, write_config

from clbench.cli import main
from clbench.studies.importance import layer_of, spearman, topk_overlap


def test_overlap_and_spearman_on_known_maps():
    a = torch.arange(100.0)
    assert topk_overlap(a, a, 0.1) == 1.0 and topk_overlap(a, -a, 0.1) == 0.0
    assert spearman(a, a**3) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    # ties take their average rank: ranks (0.5, 0.5, 2) against (0, 1, 2)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.75**0.5)
    assert layer_of("base_model.model.model.layers.12.mlp.up_proj.lora_A.default.weight") == "layer 12"
    assert layer_of("model.embed_tokens.weight") == "embed" and layer_of("lm_head.weight") == "head"


def test_analyze_needs_an_attribution_run(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")  # a run folder, of another strategy
    assert main(["analyze", "importance", str(tmp_path)]) == 2
    assert "used.json not found" in capsys.readouterr().err


def test_analyze_names_a_missing_or_wrong_kind_of_folder(tmp_path, capsys):
    run = tmp_path / "cmp" / "runs" / "seqft-seed1"
    run.mkdir(parents=True)
    (run / "results.json").write_text("{}")
    for argv, expected in (
        (["importance", str(tmp_path / "gone")], f"{tmp_path / 'gone'}: no such folder"),
        (
            ["importance", str(tmp_path / "cmp")],
            "holds no results.json: a comparison folder; give one of its",
        ),
        (["select", str(run)], "holds no runs/ folder: a run folder; give the comparison folder"),
        (["budget", str(tmp_path / "gone")], "no such folder"),
    ):
        assert main(["analyze", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err


def test_attribution_run_then_analyze_writes_table_and_plot(trace_dir, tiny_model_dir, tmp_path):
    cfg = toy_config(trace_dir, tiny_model_dir, tmp_path / "runs")
    for task in cfg["stream"]["tasks"]:
        task["epochs"] = 1
    cfg["run"]["evaluate"] = "needed"
    cfg["strategy"] = {
        "class_path": "strategies.attribution.Attribution",
        "init_args": {
            "gate_target": "update",
            "correct_threshold": 0.0,
            "max_prior_samples": 6,
            "top_k": 4,
            "score_last_task": True,
            "record_continual": True,
            "prior_dir": str(tmp_path / "priors"),
        },
    }
    assert main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    run = tmp_path / "runs" / "run"
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "complete" and res["strategy"] == "attribution"
    used = json.loads((run / "importance" / "used.json").read_text())["maps"]
    assert sorted((m["task"], m["kind"]) for m in used) == sorted(
        [(t, k) for t in ("parity", "reverse", "upper") for k in ("single_task", "continual")]
    )
    assert len(list((tmp_path / "priors").glob("*.safetensors"))) == 3
    assert main(["analyze", "importance", str(run)]) == 0
    table = (run / "importance" / "overlap.md").read_text()
    assert "parity vs reverse" in table and "reverse: single vs continual" in table
    assert all(f"| layer {i} |" in table for i in (0, 1)) and "| embed |" in table
    assert (run / "importance" / "overlap.png").stat().st_size > 1000

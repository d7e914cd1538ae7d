"""Baselines' settings are chosen on eval-split runs only, by the best mean over seeds per strategy."""

from __future__ import annotations

import json

import pytest
import yaml

from clbench.analyze import main
from clbench.errors import ConfigError
from clbench.studies.selection import select


def write_run(root, name, seed, op, bwt, class_path, split="eval"):
    folder = root / "runs" / f"{name}-seed{seed}"
    folder.mkdir(parents=True)
    results = {"status": "complete", "tasks": ["a", "b"], "matrix": [[None, None], [0.8, None], [0.6, 0.7]]}
    results["summary"] = {"OP": op, "BWT_TRACE": bwt}
    (folder / "results.json").write_text(json.dumps(results))
    config = {"seed_everything": seed, "strategy": {"class_path": class_path}}
    config["stream"] = {"score_split": split}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


def test_the_best_mean_per_strategy_on_shared_seeds_is_chosen(tmp_path):
    ewc, replay = "strategies.ewc.EWC", "strategies.replay.Replay"
    write_run(tmp_path, "ewc-l1e2", 1, 0.46, -0.10, ewc)
    write_run(tmp_path, "ewc-l1e2", 2, 0.60, -0.10, ewc)  # a lucky seed the others did not run
    write_run(tmp_path, "ewc-l1e4", 1, 0.48, -0.05, ewc)  # best OP on the shared seed 1
    write_run(tmp_path, "ewc-l1e4", 3, 0.10, -0.05, ewc)  # (seed 3 not shared either)
    write_run(tmp_path, "ewc-l1e8", 1, 0.20, 0.00, ewc)  # best BWT: learns nothing
    write_run(tmp_path, "replay-r01", 1, 0.55, -0.02, replay)
    assert select(tmp_path) == {"ewc": "ewc-l1e4", "replay": "replay-r01"}
    assert select(tmp_path, by="BWT")["ewc"] == "ewc-l1e8"
    table = (tmp_path / "selection.md").read_text()
    assert "| ewc | ewc-l1e2 | 1 | 0.460 |" in table and "| ewc | ewc-l1e4 | 1 | 0.480 |" in table


def test_test_split_runs_are_refused(tmp_path):
    write_run(tmp_path, "ewc-l1e2", 1, 0.5, -0.1, "strategies.ewc.EWC", split="test")
    with pytest.raises(ConfigError, match="score_split"):
        main(["select", str(tmp_path)])


def test_tuning_folders_run_side_by_side_are_chosen_from_together(tmp_path):
    ewc = "strategies.ewc.EWC"
    write_run(tmp_path / "tune", "ewc-l1e2", 1, 0.46, -0.10, ewc)
    write_run(tmp_path / "tune-b", "ewc-l1e4", 1, 0.48, -0.05, ewc)
    main(["select", str(tmp_path / "tune"), str(tmp_path / "tune-b")])
    table = (tmp_path / "tune" / "selection.md").read_text()
    assert "| ewc | ewc-l1e4 | 1 | 0.480 | -0.050 |" in table and "**yes**" in table.split("ewc-l1e4")[1]
    write_run(tmp_path / "tune-b", "ewc-l1e2", 1, 0.50, -0.10, ewc)  # the same run in both folders
    with pytest.raises(ConfigError, match="two finished runs of ewc-l1e2 seed 1"):
        select([tmp_path / "tune", tmp_path / "tune-b"])


def test_classes_with_different_model_settings_are_chosen_separately_but_not_mixed_within(tmp_path):
    """O-LoRA's presets (LoRA) and SSR's (full fine-tuning) in one folder: each class is chosen among
    its own; a class whose presets differ in model settings is still refused."""
    write_run(tmp_path, "o_lora-l5", 1, 0.45, -0.01, "o_lora")
    write_run(tmp_path, "o_lora-l05", 1, 0.40, -0.08, "o_lora")
    write_run(tmp_path, "ssr-s20", 1, 0.57, -0.02, "ssr")
    for name in ("o_lora-l5", "o_lora-l05"):
        config = tmp_path / "runs" / f"{name}-seed1" / "config.yaml"
        config.write_text(config.read_text() + "model: {lora: {r: 8}}\n")
    assert select(tmp_path) == {"o_lora": "o_lora-l5", "ssr": "ssr-s20"}
    config = tmp_path / "runs" / "o_lora-l05-seed1" / "config.yaml"
    config.write_text(config.read_text().replace("{lora: {r: 8}}", "{lora: {r: 8}, lr: 0.01}"))
    assert select(tmp_path)["o_lora"] == "o_lora-l5"  # a preset may tune the optimiser (prompt methods' lr)
    config.write_text(config.read_text().replace("r: 8", "r: 4"))
    with pytest.raises(ConfigError, match="different model settings"):
        select(tmp_path)


def test_presets_are_read_from_the_run_record_not_the_folder_name(tmp_path):
    """compare records each run's entry (run.entry); a run folder renamed or moved keeps its preset.
    Runs recorded before the field fall back to their run.name, as compare named them."""
    ewc = "strategies.ewc.EWC"
    write_run(tmp_path, "ewc-l1e2", 1, 0.46, -0.10, ewc)
    write_run(tmp_path, "ewc-l1e4", 1, 0.48, -0.05, ewc)
    renamed = (("ewc-l1e2-seed1", "first", "ewc-l1e2"), ("ewc-l1e4-seed1", "second", "ewc-l1e4"))
    for old, new, entry in renamed:
        folder = (tmp_path / "runs" / old).rename(tmp_path / "runs" / new)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config["run"] = {"name": old, "entry": entry}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    assert select(tmp_path) == {"ewc": "ewc-l1e4"}
    config = yaml.safe_load((tmp_path / "runs" / "second" / "config.yaml").read_text())
    config["run"] = {"name": "ewc-l1e8-seed1"}  # no entry: an older record, named by compare
    (tmp_path / "runs" / "second" / "config.yaml").write_text(yaml.safe_dump(config))
    assert "| ewc | ewc-l1e8 | 1 | 0.480 |" in (select(tmp_path) and (tmp_path / "selection.md").read_text())

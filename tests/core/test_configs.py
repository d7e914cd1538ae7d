"""Every shipped config parses, and configs/trace.yaml runs on a miniature TRACE folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from clbench.cli import main
from clbench.testing import write_trace_folder
from strategies import name_for

ROOT = Path(__file__).resolve().parents[2]
TRACE_ORDER = [
    "C-STANCE",
    "FOMC",
    "MeetingBank",
    "Py150",
    "ScienceQA",
    "NumGLUE-cm",
    "NumGLUE-ds",
    "20Minuten",
]


STREAM_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
PRESETS = sorted((ROOT / "configs").glob("*/*.yaml"))  # per-strategy presets beside a stream config


def _print_config(capsys, *configs: Path) -> dict:
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", STREAM_CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_prints(path, capsys):
    printed = _print_config(capsys, path)
    assert printed["strategy"]["class_path"].startswith("strategies.")
    assert printed["stream"]["tasks"] and printed["trainer"]["strategy"] == "auto"  # Lightning's, untouched


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_strategy_preset_parses_over_its_stream(preset, capsys):
    stream_config = ROOT / "configs" / f"{preset.parent.name}.yaml"
    printed = _print_config(capsys, stream_config, preset)
    given = yaml.safe_load(preset.read_text())
    wanted = given["strategy"]
    assert name_for(printed["strategy"]["class_path"]) == wanted["class_path"]  # its registry name
    for key, value in wanted.get("init_args", {}).items():
        assert printed["strategy"]["init_args"][key] == value
    for key, value in given.get("model", {}).items():  # e.g. the LoRA presets' rank and lr
        got = printed["model"][key]
        assert {k: got[k] for k in value} == value if isinstance(value, dict) else got == value


def test_trace_config_matches_trace():
    cfg = yaml.safe_load((ROOT / "configs" / "trace.yaml").read_text())
    tasks = cfg["stream"]["tasks"]
    assert [t["name"] for t in tasks] == TRACE_ORDER
    assert [t["epochs"] for t in tasks] == [5, 3, 7, 5, 3, 5, 5, 7]
    metrics = {t["name"]: t["metric"] for t in tasks}
    assert metrics["MeetingBank"] == "rouge_l" and metrics["Py150"] == "edit_similarity"
    assert metrics["20Minuten"] == "sari" and metrics["ScienceQA"] == "first_char"
    assert {metrics[n] for n in ("C-STANCE", "FOMC", "NumGLUE-cm", "NumGLUE-ds")} == {"exact_match"}
    assert cfg["model"]["model"] == "meta-llama/Llama-3.2-3B-Instruct"
    # TRACE's general-ability benchmarks, by lm-eval's names (each one lm-eval knows)
    assert cfg["general"]["tasks"] == ["mmlu", "gsm8k", "bbh", "tydiqa_goldp_en", "boolq", "piqa"]
    from clbench.evaluation.general import GeneralConfig, check_tasks

    assert check_tasks(GeneralConfig(**cfg["general"])) == cfg["general"]["tasks"]


def test_trace_config_runs_on_miniature_trace(tiny_model_dir, tmp_path):
    rows = {
        name: {
            split: [{"prompt": f"[{name}] item {i}: say {i % 3}", "answer": str(i % 3)} for i in range(n)]
            for split, n in (("train", 4), ("eval", 2), ("test", 3))
        }
        for name in TRACE_ORDER
    }
    data = write_trace_folder(tmp_path / "TRACE", rows)
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "trace.yaml"),
        "--model.model",
        str(tiny_model_dir),
        "--trainer.precision",
        "32-true",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--stream.data_root",
        str(data),
        "--run.output_dir",
        str(tmp_path / "runs"),
        "--run.name",
        "mini",
        "--general.tasks",
        "[]",  # TRACE's general benchmarks need the hub's data
    ]
    assert main(args) == 0
    res = json.loads((tmp_path / "runs" / "mini" / "results.json").read_text())
    assert res["tasks"] == TRACE_ORDER and len(res["matrix"]) == 9
    # epochs come from the config: 4 examples, batch 4, accumulate 4 -> 1 optimizer step per epoch
    assert [res["timings"]["steps"][n] for n in TRACE_ORDER] == [5, 3, 7, 5, 3, 5, 5, 7]


def test_study_config_is_the_quickstart_run_with_less_evaluation():
    """The study's numbers are about the quickstart: its model, stream and training must not drift."""
    study, quick = (
        yaml.safe_load((ROOT / "configs" / f"{n}.yaml").read_text()) for n in ("study", "quickstart")
    )
    for key in ("model", "trainer", "stream", "seed_everything", "strategy", "general"):
        assert study[key] == quick[key], key
    assert study["run"]["evaluate"] == "needed" and study["run"]["checkpoints"] == "none"

"""tools/gpu_perf.py: the MFU arithmetic and peak lookup against hand computations, and its step
meter given to `clbench fit` as a trainer callback (the way tools/gpu_check.sh gives it)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from clbench.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def gpu_perf(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))  # as gpu_check.sh's PYTHONPATH, for class_path
    yield importlib.import_module("gpu_perf")
    sys.modules.pop("gpu_perf", None)


def test_bf16_peaks_by_device_name(gpu_perf):
    assert gpu_perf.bf16_peak("NVIDIA H100 80GB HBM3")[0] == 989.5  # SXM
    assert gpu_perf.bf16_peak("NVIDIA H100 PCIe")[0] == 756.5
    assert gpu_perf.bf16_peak("NVIDIA H100 NVL")[0] == 835.5
    assert gpu_perf.bf16_peak("NVIDIA H200")[0] == 989.5
    assert gpu_perf.bf16_peak("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert gpu_perf.bf16_peak("Tesla V100-SXM2-16GB") is None
    assert gpu_perf.bf16_peak("cpu") is None


def test_mfu_and_docs_state_of_the_3b_shape(gpu_perf):
    # Llama-3.2-3B: 3,212,749,824 parameters (tied embedding once); 10,000 tokens/s on an H100 SXM:
    # 6 x 3,212,749,824 x 10,000 = 1.9276e14 FLOP/s of 9.895e14
    assert gpu_perf.mfu(3_212_749_824, 10_000, 989.5) == pytest.approx(0.194810, abs=1e-6)
    assert gpu_perf.docs_state_gb("seqft", 3_212_749_824, 1) == pytest.approx(51.40, abs=0.01)
    assert gpu_perf.docs_state_gb("attribution", 3_212_749_824, 8) == pytest.approx(8.03, abs=0.01)
    assert gpu_perf.docs_state_gb("replay", 3_212_749_824, 1) is None


def test_steady_drops_each_fits_first_batch(gpu_perf):
    fits = [{"seconds": [9.0, 1.0, 2.0], "tokens": [5, 10, 20]}, {"seconds": [7.0], "tokens": [4]}]
    assert gpu_perf.steady(fits) == ([1.0, 2.0, 7.0], 34)


def test_step_meter_in_a_fit_and_the_table(gpu_perf, trace_dir, tiny_model_dir, tmp_path):
    cfg = {
        "strategy": "seqft",
        "model": {"model": str(tiny_model_dir), "lr": 3e-3},
        "trainer": {
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "logger": False,
            "callbacks": [{"class_path": "gpu_perf.StepMeter"}],
        },
        "stream": {
            "name": "toy",
            "data_root": str(trace_dir),
            "batch_size": 8,
            "tasks": [{"name": n, "path": n, "max_new_tokens": 4} for n in ("parity", "reverse")],
        },
        "run": {"output_dir": str(tmp_path / "runs"), "name": "run", "evaluate": "needed"},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["fit", "--config", str(path)]) == 0
    run = tmp_path / "runs" / "run"
    record = json.loads((run / "steps.json").read_text())
    steps = json.loads((run / "results.json").read_text())["timings"]["steps"]
    assert [len(f["seconds"]) for f in record["fits"]] == [steps["parity"], steps["reverse"]] == [3, 3]
    assert all(0 < t <= 8 * 256 for f in record["fits"] for t in f["tokens"])
    assert record["sharding"] == "none" and record["device"] == "cpu"
    row = gpu_perf.row(run)
    assert row["mfu"] is None and row["reserved_gib"] is None and row["steps"] == 4
    line = gpu_perf.table([row]).splitlines()[2]
    assert line.startswith("| runs/run | seqft | ") and line.endswith("| n/a |")
    assert "(peak RSS) / n/a" in line


def test_a_real_shapes_vocabulary_may_exceed_the_tokenizers(tmp_path):
    from transformers import AutoConfig

    from clbench.testing import save_tiny_model

    corpus = ["Is 4 even? Answer: yes", "Reverse cat: tac"] * 8
    folder = save_tiny_model(tmp_path / "m", corpus, vocab_size=1000, tie_word_embeddings=True)
    assert AutoConfig.from_pretrained(folder).vocab_size == 1000
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        save_tiny_model(tmp_path / "small", corpus, vocab_size=10)

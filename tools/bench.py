"""clbench's benchmark suite: every strategy's cost, measured side by side, written to BENCHMARKS.md.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python tools/bench.py [--models smollm2-135m-instruct,tiny]
        [--only memory,steps,wall,scoring_vs_training,scoring_vs_training_n32,generation,gate_growth,
               scoring_vs_seq_len,overhead_train,overhead_generate,ranks_memory,ranks_scoring] [--write]

Sections (each a ratio measured in one process or one sitting, so a shared machine moves A and B
alike; `--write` puts each (section, model) into its own marked part of BENCHMARKS.md with the
command, the commit and the machine, replacing that part only):

- memory: the peak memory of a whole run (training, priors, evaluation) of every strategy on a
  3-task stream of 16 training examples per task (the quickstart's tasks; attribution scores 8
  samples per prior, every one of them: correct_threshold 0), each run a `clbench fit` process of
  its own; as a ratio to seqft's, and in bytes per trainable parameter above the process floor (the
  peak of a process that imported the same libraries and loaded nothing). From those bytes, the
  projection per GPU for Llama-3.2-3B (full fine-tuning and LoRA r 8) on 1 and 8 GPUs under FSDP2,
  which shards every per-parameter state alike; activations and the runtime are not in it.
- steps: training step time of every strategy against seqft's (tools/bench_gate.py).
- wall (bundled model only): whole quickstart runs (configs/quickstart.yaml, as a user runs it, no
  checkpoints) of seqft, attribution scoring new priors and attribution reusing them, one after the
  other, each a `clbench fit` process: wall and CPU time as ratios to seqft's, and where an
  attribution run's extra time goes (side training, generation for the correct-sample filter,
  scoring; importance/used.json).
- scoring_vs_training (8 samples) and scoring_vs_training_n32 (32: more than K, as in a run's
  prior), generation, gate_growth, scoring_vs_seq_len: task-prior scoring against a training
  forward + backward, batched against one-at-a-time generation, the attribution gate's memory after
  1-8 tasks, and scoring time and memory against sequence length (tools/bench_scaling.py).
- overhead_train, overhead_generate: clbench's seqft training step and its evaluation generation
  against the bare PyTorch loop and `model.generate` a user would write (tools/bench_overhead.py).
- ranks_memory, ranks_scoring (once, with the bundled model's run; their models are built in code):
  per-rank peak memory of a Llama with Llama-3.2-1B's widths under FSDP2 on 1, 2 and 4 gloo
  processes against docs/memory.md's bytes per parameter, and LRP scoring time on 1 and 2 processes
  (tools/bench_ranks.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from shapes import LLAMA_3B  # noqa: E402  (Llama-3.2-3B: configs/trace.yaml's model)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUNDLED = "smollm2-135m-instruct"
ATTRIBUTION = [
    "--strategy",
    "attribution",
    "--strategy.correct_threshold",
    "0",
    "--strategy.max_prior_samples",
    "8",
]
RUNS: dict[str, list[str]] = {
    "seqft": ["--strategy", "seqft"],
    "replay": ["--strategy", "replay"],
    "ewc": ["--strategy", "ewc"],
    "lwf": ["--strategy", "lwf"],
    "freeze": ["--strategy", "freeze", "--strategy.lower_layers", "1"],
    "multitask": ["--strategy", "multitask"],
    "attribution": ATTRIBUTION,  # offload "auto": disk when training on the CPU
    "attribution, offload memory": [*ATTRIBUTION, "--strategy.offload", "memory"],
    "ssr": ["--strategy", "ssr"],  # ssr-s20's settings (the defaults): keeps its starting model
}
LORA_RUNS = ("seqft", "attribution", "attribution, offload memory")
LORA_ONLY = {"o_lora": ["--strategy", "o_lora", "--strategy.lambda_1", "5"]}  # o_lora-l5; needs LoRA


# -- memory of whole runs ----------------------------------------------------------------------
def mini_config(folder: Path, model: str) -> Path:
    """The quickstart's first 3 tasks at 16 training and 8 test examples, needed evaluation only."""
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["model"]["model"] = model
    cfg["stream"]["tasks"] = cfg["stream"]["tasks"][:3]
    for task in cfg["stream"]["tasks"]:
        task.update(n_train=16, n_eval=8, n_test=8)
    cfg["stream"]["data_root"] = str(ROOT / "data" / "quickstart")
    cfg["run"] = {
        "output_dir": str(folder / "runs"),
        "evaluate": "needed",
        "evaluate_start": False,
        "checkpoints": "none",
        "resumable": False,
    }
    path = folder / "mini.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def slug(name: str) -> str:
    return name.replace(", ", "-").replace(" ", "-")


def fit_peak_mb(config: Path, args: list[str], name: str, folder: Path) -> float:
    """Peak memory (results.json: resident set on CPU, allocated on CUDA) of one `clbench fit`."""
    extra = ["--strategy.prior_dir", str(folder / f"priors-{name}")] if "attribution" in args else []
    cmd = [sys.executable, "-m", "clbench", "fit", "--config", str(config), *args, *extra, "--run.name", name]
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    results = json.loads((folder / "runs" / name / "results.json").read_text())
    return results["timings"]["peak_memory_mb"]


def floor_mb() -> float:
    """Peak resident set of a process that imports what `clbench fit` imports and loads nothing."""
    code = (
        "import clbench.fit, strategies, torch, transformers, lightning, peft\n"
        "from clbench.recorder import peak_memory_mb\n"
        "print(peak_memory_mb())"
    )
    return float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )


def trainable_count(model: str, lora_r: int | None) -> int:
    from clbench.models import LoRA, add_lora, load_causal_lm

    m = load_causal_lm(model)
    if lora_r:
        m = add_lora(m, LoRA(r=lora_r))
    return sum(p.numel() for p in {id(p): p for p in m.parameters() if p.requires_grad}.values())


def llama_3b_counts(lora_r: int = 8) -> tuple[int, int]:
    """(all parameters, LoRA r adapters on every linear layer) of Llama-3.2-3B, built on meta."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from clbench.models import LoRA, add_lora

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_3B))
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    lora = add_lora(model, LoRA(r=lora_r))
    return total, sum(p.numel() for p in lora.parameters() if p.requires_grad)


def memory(model: str, model_path: str, folder: Path, lora: bool = True) -> dict:
    """Peak of a whole run per strategy (full fine-tuning, and LoRA r 8 for LORA_RUNS)."""
    config, floor = mini_config(folder, model_path), floor_mb()
    out: dict = {"floor_mb": floor, "full": {}, "lora": {}}
    out["trainable_full"] = trainable_count(model_path, None)
    for name, args in RUNS.items():
        out["full"][name] = fit_peak_mb(
            config, args, f"full-{name.replace(', ', '-').replace(' ', '-')}", folder
        )
    if lora:
        out["trainable_lora"] = trainable_count(model_path, 8)
        for name, run in [*((n, RUNS[n]) for n in LORA_RUNS), *LORA_ONLY.items()]:
            args = [*run, "--model.lora.r", "8"]
            out["lora"][name] = fit_peak_mb(
                config, args, f"lora-{name.replace(', ', '-').replace(' ', '-')}", folder
            )
    return out


def memory_markdown(result: dict, model: str) -> str:
    floor, n = result["floor_mb"], result["trainable_full"]
    seq = result["full"]["seqft"]
    lines = [
        f"### Peak memory of a whole run: {model}",
        "",
        f"Process floor (libraries imported, nothing loaded): {floor / 1024:.2f} GB; "
        f"{n / 1e6:.1f} M trainable parameters (full fine-tuning).",
        "",
        "| strategy | peak | vs seqft | bytes / trainable parameter above the floor |",
        "|---|---|---|---|",
    ]
    for name, mb in result["full"].items():
        per = (mb - floor) * 2**20 / n
        lines.append(f"| {name} | {mb / 1024:.2f} GB | **{mb / seq:.2f}x** | {per:.1f} |")
    if result["lora"]:
        n_lora, base = result["trainable_lora"], result["lora"]["seqft"]
        lines += ["", f"LoRA r 8 on every linear layer ({n_lora / 1e6:.2f} M trainable):", ""]
        lines += ["| strategy | peak | vs LoRA seqft |", "|---|---|---|"]
        for name, mb in result["lora"].items():
            lines.append(f"| {name} | {mb / 1024:.2f} GB | **{mb / base:.2f}x** |")
    return "\n".join(lines)


def projection_markdown(result: dict) -> str:
    """Per-GPU memory for Llama-3.2-3B from the measured bytes per trainable parameter: full fine-tuning
    holds them for every parameter; LoRA holds the frozen weights (fp32, 4 B) plus them per adapter
    parameter. FSDP2 shards all of it over the GPUs; activations are not included."""
    total, adapters = llama_3b_counts()
    floor, n = result["floor_mb"], result["trainable_full"]
    lines = [
        f"### Projection: Llama-3.2-3B ({total / 1e9:.2f} B parameters; LoRA r 8: {adapters / 1e6:.1f} M)",
        "",
        "From the bundled model's bytes per trainable parameter above the floor (which include its "
        "small activations); states only, sharded by FSDP2, no activations, per GPU.",
        "",
        "| strategy | full FT, 1 GPU | full FT, 8 GPUs | LoRA r 8, 1 GPU | LoRA r 8, 8 GPUs |",
        "|---|---|---|---|---|",
    ]
    for name, mb in result["full"].items():
        per = (mb - floor) * 2**20 / n
        full, lora = per * total, 4 * total + per * adapters
        cells = [f"{b / gpus / 1e9:.1f} GB" for b in (full, lora) for gpus in (1, 8)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    return "\n".join(lines)


# -- wall time of whole runs -------------------------------------------------------------------
# attribution with up to 128 prior samples, as BENCHMARKS.md measured it (the default is 64 since)
ATTRIBUTION_128 = ["--strategy", "attribution", "--strategy.max_prior_samples", "128"]
WALL_RUNS = {
    "seqft": ["--strategy", "seqft"],
    "attribution, new priors": ATTRIBUTION_128,
    "attribution, cached priors": ATTRIBUTION_128,  # the same key: every prior reused
}


def wall_times(model: str, folder: Path) -> dict:
    """Each WALL_RUNS entry as one quickstart `clbench fit` child: wall and CPU seconds (the child's
    user + system time: with OMP_NUM_THREADS=1 the work done, whatever else shares the machine), its
    train and eval seconds, and the seconds of each prior part its used.json records."""
    out = {}
    for name, args in WALL_RUNS.items():
        where = ["--run.output_dir", str(folder / "runs"), "--run.name", slug(name)]
        extra = ["--strategy.prior_dir", str(folder / "priors")] if "attribution" in args else []
        cmd = [sys.executable, "-m", "clbench", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml")]
        cmd += [
            *args,
            *extra,
            "--model.model",
            model,
            "--stream.data_root",
            str(ROOT / "data" / "quickstart"),
        ]
        cmd += [*where, "--run.checkpoints", "none", "--run.resumable", "false"]
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
        done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
        wall, after = time.time() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        run = folder / "runs" / slug(name)
        timings = json.loads((run / "results.json").read_text())["timings"]
        parts: dict[str, float] = {}
        used = run / "importance" / "used.json"
        for entry in json.loads(used.read_text())["maps"] if used.is_file() else []:
            for part, sec in entry.get("seconds", {}).items():
                parts[part] = parts.get(part, 0.0) + sec
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        out[name] = {
            "wall": wall,
            "cpu": cpu,
            "train": timings["train_s"],
            "eval": timings["eval_s"],
            **parts,
        }
    return out


def wall_markdown(result: dict) -> str:
    base = result["seqft"]
    lines = [
        "### Wall time of whole quickstart runs: seqft against attribution",
        "",
        "`configs/quickstart.yaml` (4 tasks, full matrix), checkpoints off; attribution as the defaults "
        "set it (single-task priors, LRP, up to 128 samples, correct-sample filter). Train and eval "
        "are the run's own clocks; an attribution run's priors are scored inside its train time "
        "(side training, the filter's generation, scoring: seconds summed over its priors).",
        "",
        "| run | wall | vs seqft (wall) | CPU | vs seqft (CPU) | train | eval | side training | filter "
        "| scoring |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result.items():
        parts = [f"{r[p]:.0f} s" if p in r else "–" for p in ("side_fit", "filter", "score")]
        lines.append(
            f"| {name} | {r['wall']:.0f} s | **{r['wall'] / base['wall']:.2f}x** | {r['cpu']:.0f} s "
            f"| {r['cpu'] / base['cpu']:.2f}x | {r['train']:.0f} s | {r['eval']:.0f} s | "
            + " | ".join(parts)
            + " |"
        )
    return "\n".join(lines)


# -- the suite ---------------------------------------------------------------------------------
def tiny_path(folder: Path) -> str:
    from bench_gate import tiny_model_dir

    return tiny_model_dir(folder / "tiny-model")


def cpu_model() -> str:
    """lscpu's model name (the machines these ran on differ in bf16 support, so the name matters)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    names = [line.split(":", 1)[1].strip() for line in out if line.startswith("Model name")]
    return names[0] if names else platform.processor() or platform.machine()


def machine() -> str:
    import torch

    cores = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (
        f"{cpu_model()} ({platform.machine()}), {cores} cores, {gpu}; torch {torch.__version__}; "
        f"OMP_NUM_THREADS={threads}"
    )


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "clbench", "strategies", "tools"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def sections() -> dict[str, Callable[[str, str, Path], str | None]]:
    """name -> (model name, model path, scratch folder) -> markdown (None: not for this model)."""

    def mem(model: str, path: str, folder: Path) -> str:
        result = memory(model, path, folder, lora=model == BUNDLED)
        text = memory_markdown(result, model)
        return text + ("\n\n" + projection_markdown(result) if model == BUNDLED else "")

    def steps(model: str, path: str, folder: Path) -> str:
        import bench_gate

        return bench_gate.markdown(bench_gate.measure(model=model), model)

    def wall(model: str, path: str, folder: Path) -> str | None:
        return wall_markdown(wall_times(path, folder)) if model == BUNDLED else None

    def scaling(name: str) -> Callable[[str, str, Path], str]:
        def run(model: str, path: str, folder: Path) -> str:
            import bench_scaling

            return bench_scaling.markdown(name, getattr(bench_scaling, name)(model), model)

        return run

    def overhead(name: str) -> Callable[[str, str, Path], str]:
        def run(model: str, path: str, folder: Path) -> str:
            import bench_overhead

            return bench_overhead.markdown(name, bench_overhead.MEASUREMENTS[name](model), model)

        return run

    def ranks(name: str) -> Callable[[str, str, Path], str | None]:
        def run(model: str, path: str, folder: Path) -> str | None:
            import bench_ranks

            if model != BUNDLED:  # the models are built in code: once per suite run
                return None
            if name == "ranks_memory":
                return bench_ranks.memory_markdown(bench_ranks.memory([1, 2, 4], 2, print))
            return bench_ranks.scoring_markdown(bench_ranks.scoring([1, 2], 16, 3, print))

        return run

    names = (
        "scoring_vs_training",
        "scoring_vs_training_n32",
        "generation",
        "gate_growth",
        "scoring_vs_seq_len",
    )
    return {
        "memory": mem,
        "steps": steps,
        "wall": wall,
        **{n: scaling(n) for n in names},
        **{n: overhead(n) for n in ("overhead_train", "overhead_generate")},
        **{n: ranks(n) for n in ("ranks_memory", "ranks_scoring")},
    }


def write(key: str, block: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Replace the part of BENCHMARKS.md marked with `key` (append it the first time), so that one
    section can be measured again without touching the others."""
    start, end = f"<!-- tools/bench.py {key} -->", f"<!-- end tools/bench.py {key} -->"
    text = path.read_text()
    part = f"{start}\n{block}\n{end}"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + part + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + part + "\n"
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=f"{BUNDLED},tiny")
    p.add_argument("--only", help="comma-separated section names (default: all)")
    p.add_argument("--write", action="store_true", help="replace these sections' parts of BENCHMARKS.md")
    args = p.parse_args()
    table = sections()
    chosen = args.only.split(",") if args.only else list(table)
    unknown = set(chosen) - set(table)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; known: {', '.join(table)}")
    malloc = "".join(f"{k}={v} " for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    command = (
        f"HF_HUB_OFFLINE=1 OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} {malloc}.venv/bin/python"
    )
    with tempfile.TemporaryDirectory(prefix="clbench-bench-") as tmp:
        folder = Path(tmp)
        for model in args.models.split(","):
            path = tiny_path(folder) if model == "tiny" else model
            for name in chosen:
                scratch = folder / f"{model}-{name}"
                scratch.mkdir()
                started = time.time()
                text = table[name](model, path, scratch)
                if text is None:
                    continue
                took = (time.time() - started) / 60
                how = (
                    f"`{command} tools/bench.py --models {model} --only {name}`: commit {commit()}; "
                    f"{machine()}; {time.strftime('%Y-%m-%d')}, {took:.0f} min. Written by the command."
                )
                print(text + "\n\n" + how + "\n", flush=True)
                if args.write:  # the ranks_* sections build their own models: one part each
                    write(name if name.startswith("ranks_") else f"{name} {model}", text + "\n\n" + how)


if __name__ == "__main__":
    main()

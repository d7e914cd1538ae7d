"""What tools/gpu_check.sh measures and the table it ends with: a random model of a real shape that
loads offline, a callback that times training steps, and the table of every measured run.

    python tools/gpu_perf.py model --shape 3b|smollm2|tiny --data data/quickstart FOLDER
    clbench fit ... --trainer.callbacks+=gpu_perf.StepMeter      # with tools/ on PYTHONPATH
    python tools/gpu_perf.py table OUT_DIR                       # every run under OUT_DIR with steps.json

Why a callback: clbench's results.json times whole tasks (loss probes, priors and strategy hooks
included) and counts no tokens, so step time, tokens/s and MFU need their own record. It writes
RUN_DIR/steps.json: per training fit (each task's, and a strategy's side fits), each batch's wall
time (device synchronised) and tokens, and the process's memory peak at the fit's end through
clbench's own peak_memory_mb (CUDA max_memory_allocated, else the peak resident set) with CUDA's
max_memory_reserved beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_ranks import TABLE_BYTES  # noqa: E402  (docs/memory.md's bytes per parameter)
from shapes import LLAMA_3B, SMOLLM2  # noqa: E402

SHAPES = {"3b": LLAMA_3B, "smollm2": SMOLLM2, "tiny": {}}  # tiny: clbench.testing's TINY as it is
STEPS_FILE = "steps.json"

# bf16 dense tensor-core peaks (no structured sparsity), TFLOP/s, from NVIDIA's datasheets, which give
# the sparse figure (twice these) for Hopper: H100 SXM 1,979 and PCIe 1,513 (H100 datasheet), H100
# NVL 1,671, H200 SXM 1,979 and H200 NVL 1,671 (H200 datasheet); A100 312 dense, 624 sparse (A100
# datasheet, SXM and PCIe alike). First match of the device name (torch.cuda.get_device_name) wins.
BF16_DENSE_TFLOPS = (
    ("H100 NVL", 835.5, "NVIDIA H100 datasheet (NVL): 1,671 sparse / 2"),
    ("H100 PCIe", 756.5, "NVIDIA H100 datasheet (PCIe): 1,513 sparse / 2"),
    ("H100", 989.5, "NVIDIA H100 datasheet (SXM): 1,979 sparse / 2"),
    ("H200 NVL", 835.5, "NVIDIA H200 datasheet (NVL): 1,671 sparse / 2"),
    ("H200", 989.5, "NVIDIA H200 datasheet (SXM): 1,979 sparse / 2"),
    ("A100", 312.0, "NVIDIA A100 datasheet: 312 dense"),
)
# docs/memory.md's phases of each strategy's per-parameter state (its table's rows)
STATE_PHASES = {
    "seqft": ("seqft",),
    "ewc": ("ewc",),
    "attribution": ("attribution train", "attribution score"),
}
SHARDING = {"SingleDeviceStrategy": "none", "FSDP2Strategy": "FSDP2", "ModelParallelStrategy": "FSDP2"}


def save_model(folder: Path, shape: str, data: Path) -> Path:
    """A random Llama of `shape` with a byte-level BPE tokenizer learnt from the TRACE tasks under
    `data`, saved as a hub model (clbench.testing.save_tiny_model): loads with no download. Built on
    the GPU when there is one (a 3B initialises in seconds there, minutes on a CPU)."""
    from clbench.testing import save_tiny_model

    corpus = [
        f"{row['prompt']} {row['answer']}"
        for split in sorted(data.glob("*/train.json"))
        for row in json.loads(split.read_text(encoding="utf-8"))
    ]
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return save_tiny_model(folder, corpus, **SHAPES[shape])


class StepMeter(pl.Callback):
    """Writes RUN_DIR/steps.json (module docstring): the measurements results.json lacks."""

    def __init__(self) -> None:
        self.fits: list[dict] = []
        self._start, self._tokens = 0.0, 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = {id(p): p for p in pl_module.parameters()}.values()  # a tied embedding once
        self.fits.append(
            {
                "parameters": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
                "seconds": [],
                "tokens": [],
            }
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx
    ) -> None:
        mask = batch.get("attention_mask")
        tokens = mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel())
        self._tokens = int(trainer.strategy.reduce(tokens.to(pl_module.device), reduce_op="sum"))
        _synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        _synchronize(pl_module.device)
        self.fits[-1]["seconds"].append(time.perf_counter() - self._start)
        self.fits[-1]["tokens"].append(self._tokens)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from clbench.files import write_json
        from clbench.recorder import peak_memory_mb

        cuda = pl_module.device.type == "cuda"
        self.fits[-1]["peak_memory_mb"] = peak_memory_mb()
        self.fits[-1]["peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20 if cuda else None
        if trainer.is_global_zero:
            record = {
                "device": torch.cuda.get_device_name(pl_module.device) if cuda else "cpu",
                "precision": str(trainer.precision),
                "sharding": SHARDING.get(type(trainer.strategy).__name__, type(trainer.strategy).__name__),
                "world_size": trainer.world_size,
                "fits": self.fits,
            }
            write_json(Path(trainer.default_root_dir) / STEPS_FILE, record)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_peak(device: str) -> tuple[float, str] | None:
    """The device's bf16 dense peak (TFLOP/s) and where the number comes from; None if not known."""
    return next(((tf, src) for name, tf, src in BF16_DENSE_TFLOPS if name in device), None)


def mfu(parameters: int, tokens_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: 6 N FLOPs per trained token (forward 2N, backward 4N; attention's
    score and value products not counted) over the peak."""
    return 6 * parameters * tokens_per_s / (peak_tflops * 1e12)


def steady(fits: list[dict]) -> tuple[list[float], int]:
    """Every fit's batch times and their tokens without each fit's first batch (kernel choice,
    optimizer state allocation); a fit of one batch keeps it."""
    seconds, tokens = [], 0
    for fit in fits:
        skip = 1 if len(fit["seconds"]) > 1 else 0
        seconds += fit["seconds"][skip:]
        tokens += sum(fit["tokens"][skip:])
    return seconds, tokens


def docs_state_gb(strategy: str, parameters: int, ranks: int) -> float | None:
    """docs/memory.md's per-GPU state for this strategy (the largest of its phases): bytes per
    parameter x parameters / ranks, in GB (1e9 B, as that table); None where it has no row."""
    phases = STATE_PHASES.get(strategy)
    return max(TABLE_BYTES[p] for p in phases) * parameters / ranks / 1e9 if phases else None


def row(run: Path) -> dict:
    """One table row from a run folder's steps.json and results.json."""
    record = json.loads((run / STEPS_FILE).read_text())
    strategy = json.loads((run / "results.json").read_text())["strategy"]
    fits, last = record["fits"], record["fits"][-1]
    sharding, ranks = record["sharding"], record["world_size"]
    seconds, tokens = steady(fits)
    tokens_per_s = tokens / sum(seconds)
    peak = bf16_peak(record["device"])
    return {
        "run": f"{run.parent.name}/{run.name}",
        "strategy": strategy,
        "parameters": last["parameters"],
        "precision": record["precision"],
        "sharding": sharding if sharding == "none" else f"{sharding} x{ranks}",
        "device": record["device"],
        "peak_gib": last["peak_memory_mb"] / 1024,
        "reserved_gib": None if last["peak_reserved_mb"] is None else last["peak_reserved_mb"] / 1024,
        "docs_gb": docs_state_gb(strategy, last["parameters"], ranks),
        "step_s": statistics.median(seconds),
        "steps": len(seconds),
        "tokens_per_s": tokens_per_s,
        "mfu": None if peak is None else mfu(last["parameters"], tokens_per_s, peak[0]),
        "peak_source": None if peak is None else f"{peak[0]:g} TFLOP/s, {peak[1]}",
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e8 else f"{n / 1e6:.3g} M"


def _or_na(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def table(rows: list[dict]) -> str:
    """The markdown table gpu_check.sh ends with, and the notes that say what each column is."""
    lines = [
        "| run | strategy | parameters | precision | sharding | peak memory GiB (allocated / reserved) "
        "| docs/memory.md state GB | step s (median) | tokens/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reserved = r["reserved_gib"]
        memory = (
            f"{r['peak_gib']:.2f} (peak RSS) / n/a"
            if reserved is None
            else f"{r['peak_gib']:.2f} / {reserved:.2f}"
        )
        lines.append(
            f"| {r['run']} | {r['strategy']} | {_count(r['parameters'])} | {r['precision']} "
            f"| {r['sharding']} "
            f"| {memory} | {_or_na(r['docs_gb'], '.3g')} | {r['step_s']:.3g} ({r['steps']} steps) "
            f"| {r['tokens_per_s']:.4g} | {_or_na(r['mfu'], '.1%')} |"
        )
    devices = sorted({r["device"] for r in rows})
    sources = sorted({r["peak_source"] for r in rows if r["peak_source"]})
    notes = [
        f"device: {', '.join(devices)}; bf16 dense peak: {'; '.join(sources) or 'n/a (no GPU of the list)'}",
        "peak memory: the process's peak up to the end of its last training fit (CUDA max_memory_allocated "
        "and max_memory_reserved; on a CPU the peak resident set, libraries included), rank 0",
        "docs/memory.md state: its bytes per parameter (seqft 16, attribution the larger of training 20 and "
        "scoring at K 8 20, EWC 24) x parameters / ranks; activations, autocast's bf16 weight copies, "
        "optimizer temporaries and the runtime come on top",
        "step: one training batch (forward, backward, optimizer step, strategy hooks), device synchronised, "
        "each fit's first batch left out; tokens/s: non-padding tokens of those batches over their time, "
        "all ranks",
        "MFU: 6 x parameters x tokens/s / peak (parameters: all, a tied embedding once; attention's score "
        "and value products not counted)",
    ]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="save a random model of a real shape with an offline tokenizer")
    model.add_argument("--shape", choices=sorted(SHAPES), required=True)
    model.add_argument("--data", type=Path, required=True, help="TRACE tasks whose text trains the tokenizer")
    model.add_argument("folder", type=Path)
    report = sub.add_parser("table", help="the table of every run under a folder that has steps.json")
    report.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "model":
        print(save_model(args.folder, args.shape, args.data))
    else:
        runs = sorted(p.parent for p in args.out.rglob(STEPS_FILE))
        if not runs:
            raise SystemExit(f"no {STEPS_FILE} under {args.out}")
        print(table([row(run) for run in runs]))


if __name__ == "__main__":
    main()

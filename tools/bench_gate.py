"""Training-step time of the gating and penalty strategies relative to sequential fine-tuning.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python tools/bench_gate.py [--model tiny] [--rounds 4]

One CLModule (the bundled SmolLM2-135M-Instruct, or `--model tiny`: a random 2-layer Llama) trains
under a Lightning Trainer with bf16-mixed precision (torch.autocast("cpu", torch.bfloat16)) and
CLModule's own AdamW, so every strategy runs through its real hooks: seqft; attribution with
gate_target "grad" and "update" under a random gate in [0, 1] on every trainable element; EWC with
an existing (random) Fisher, i.e. its penalty on every step and no Fisher estimation. "update"
measures the update mass it removes on every `mass_every`-th step only, which a median leaves out:
"update, mass" measures it on every step (the amortised cost is 1 / mass_every of the difference).
Each round fits every strategy in turn for one warm-up and `--steps` timed optimizer steps (the
machine may be shared: interleaving hits all alike); a strategy's ratio is the median over rounds
of its median step time over seqft's in the same round, by the wall clock and by the process's CPU
time (with OMP_NUM_THREADS=1 the CPU time is the work done, whatever else the machine runs).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from clbench.data.tasks import TaskStream  # noqa: E402
from clbench.module import CLModule  # noqa: E402
from clbench.strategy import CLStrategy, StrategyContext  # noqa: E402
from strategies.attribution import Attribution  # noqa: E402
from strategies.ewc import EWC  # noqa: E402
from strategies.seqft import SeqFT  # noqa: E402

BUNDLED = "smollm2-135m-instruct"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class StepTimer(pl.Callback):
    """Seconds of every training batch (forward, backward, strategy hooks, optimizer step), by the
    wall clock and by this process's CPU time (robust to other jobs' load when it runs one thread)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {clock: [] for clock in CLOCKS}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = {clock: now() for clock, now in CLOCKS.items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        for clock, now in CLOCKS.items():
            self.times[clock].append(now() - self._start[clock])


def tiny_model_dir(folder: Path) -> str:
    """bench_attribution's tiny Llama with the bundled model's tokenizer, saved to `folder`."""
    from bench_attribution import tiny_llama  # tools/ is this script's folder, first on the path

    from clbench.models import load_tokenizer

    tok = load_tokenizer(BUNDLED)
    tiny_llama(torch.float32, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def strategies(module: CLModule) -> dict[str, CLStrategy]:
    """The strategies timed, each with the state a later task trains under (random in [0, 1])."""
    params = module.trainable_parameters()
    g = torch.Generator().manual_seed(0)
    rbar = {f"rbar.{n}": torch.rand(p.shape, generator=g) for n, p in params.items()}
    grad, update, measured = (Attribution(gate_target=target) for target in ("grad", "update", "update"))
    for strategy in (grad, update, measured):
        strategy.load_state_dict(rbar)
    measured.mass_every = 1
    ewc = EWC()
    ewc.fisher = {n: torch.rand(p.shape, generator=g) * 1e-4 for n, p in params.items()}
    ewc.anchor = {n: p.detach().float().clone() for n, p in params.items()}
    return {
        "seqft": SeqFT(),
        "attribution grad": grad,
        "attribution update": update,
        "update, mass": measured,
        "ewc": ewc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=(BUNDLED, "tiny"), default=BUNDLED)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per strategy and round")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (TRACE: 0)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # Lightning's advice on workers, logging without a logger, ...
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # and its banner at every fit
    with tempfile.TemporaryDirectory() as tmp:
        name = BUNDLED if args.model == BUNDLED else tiny_model_dir(Path(tmp) / "tiny")
        module = CLModule(model=name, weight_decay=args.weight_decay)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(100, module.model.config.vocab_size, (args.batch, args.tokens), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        batches = [batch] * (args.steps + 1)
        ctx = StrategyContext(module, TaskStream("bench", []), task_index=1, run_dir=Path(tmp))
        timed = strategies(module)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; model {args.model}; "
            f"batch {args.batch} x {args.tokens} tokens, bf16-mixed, AdamW weight decay {args.weight_decay}; "
            f"{args.rounds} rounds x {args.steps} timed steps",
            flush=True,
        )
        rounds: list[dict[str, dict[str, float]]] = []
        for _ in range(args.rounds):
            seconds: dict[str, dict[str, float]] = {}
            for label, strategy in timed.items():
                timer = StepTimer()
                trainer = pl.Trainer(
                    max_steps=args.steps + 1,
                    precision="bf16-mixed",
                    accelerator="cpu",
                    logger=False,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    callbacks=[timer],
                )
                module.attach(strategy, ctx)
                trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
                # the first step warms up
                seconds[label] = {clock: statistics.median(t[1:]) for clock, t in timer.times.items()}
            rounds.append(seconds)
            print(
                "  round (wall): " + ", ".join(f"{k} {v['wall']:.3f}s" for k, v in seconds.items()),
                flush=True,
            )
        for label in timed:
            parts = []
            for clock in CLOCKS:
                ratios = [r[label][clock] / r["seqft"][clock] for r in rounds]
                step = statistics.median(r[label][clock] for r in rounds)
                parts.append(
                    f"{clock} {step:6.3f} s/step {statistics.median(ratios):5.2f}x "
                    f"(rounds {min(ratios):.2f}-{max(ratios):.2f})"
                )
            print(f"{label:<20} " + "   ".join(parts), flush=True)


if __name__ == "__main__":
    main()

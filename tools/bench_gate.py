"""Training-step time of every registered strategy relative to sequential fine-tuning (issue 11).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python tools/bench_gate.py [--model tiny] [--rounds 4]

One CLModule (the bundled SmolLM2-135M-Instruct, or `--model tiny`: bench_attribution's random
2-layer Llama with the bundled tokenizer) trains under a Lightning Trainer with bf16-mixed precision
(torch.autocast("cpu", torch.bfloat16)) and CLModule's own AdamW, so every strategy of the registry
(strategies/__init__.py) runs through its real hooks, at the second task of a two-task stream of
random-word examples, with the state a later task trains under:

  seqft                 no hook does anything
  replay                training_examples: task 1 plus the buffer that task 0's on_task_end kept
  multitask             training_examples: tasks 0 and 1
  freeze                on_task_start freezes its quickstart preset's share: the lower half of the
                        blocks (15 of SmolLM2's 30, 1 of tiny's 2) and the tied embeddings
  lwf                   on_task_start takes the teacher (the runner's frozen_copy service); every
                        batch runs it forward and adds the distillation term
  ewc                   an existing (random) Fisher and anchor: the penalty's gradient is added in
                        on_before_optimizer_step; its value (for the log) is computed on every
                        `penalty_every`-th step only, which a median leaves out: "ewc, value"
                        computes it on every step (amortised: 1 / penalty_every of the difference)
  attribution grad      a random gate in [0, 1] on every trainable element, g <- (1 - gate) g
  attribution update    the same gate folded into AdamW's step; the update mass it removes is
                        measured on every `mass_every`-th step only: "update, mass" measures it on
                        every step (amortised: 1 / mass_every of the difference)
  ssr                   training_examples: task 1 plus the 20 synthetic examples task 0's end kept
                        (ssr-s20; their writing at a task's end is not a training step and is not
                        timed here: BENCHMARKS.md has what the study runs recorded)
  o_lora                on a second module with LoRA (r 8 on every linear layer, the study's preset)
                        at the last task of a four-task stream: the three earlier adapters act,
                        frozen, and every step adds the orthogonality penalty against their A
                        matrices (lambda_1 5, o_lora-l5); its reference is "lora-seqft", the same
                        module training model.lora's adapter alone; "o_lora, no penalty" (lambda_1
                        0) splits the cost of the acting adapters from the penalty's

replay, multitask and ssr change only which examples train, so their step is a seqft step on a batch of
the same shape (batch x tokens, every token labelled); their cost is the number of steps a task
takes, the "examples" column (at the second task: replay's buffer is TRACE's 10% of task 0, multitask
trains both tasks; later tasks take more).

Each round fits every strategy in turn, each round starting at another one: made afresh with its
state (so the process holds one strategy's state at a time), started (`on_task_start`) and fitted
by a fresh Trainer for one warm-up step (step 0 of the task: the one that measures EWC's value and
the update mass) and `steps` timed optimizer steps (the machine may be shared: interleaving hits all
alike). A strategy's ratio is the median over rounds of its median step time over seqft's in the
same round, by the wall clock and by the process's CPU time (with OMP_NUM_THREADS=1 the CPU time is
the work done, whatever else the machine runs; the wall clock also counts the waits for a CPU).
`measure` returns them and `markdown` renders them; tools/bench.py imports both with tools/ on
sys.path.

The measurement runs in a fresh process (whatever the caller's heap holds), by default with glibc's
malloc keeping the memory it frees (MALLOC: no mmap'ed chunks, no heap trimming). With glibc's
defaults a step's time depends on where the heap's holes are: a strategy that merely holds another
1.1 GB (SmolLM2's EWC Fisher and anchor, or any two model-sized fp32 tensors) can make every step
fault in about 1 GB of fresh pages and take 0.5 s (25-30%) longer, with no more work done; seqft
faults none. `--malloc default` measures that way (what a CPU run with the default allocator sees).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from clbench.data.tasks import Example, Task, TaskStream  # noqa: E402
from clbench.module import CLModule  # noqa: E402
from clbench.strategy import CLStrategy, StrategyContext, examples_json, json_tensor  # noqa: E402
from strategies import REGISTRY, load  # noqa: E402
from strategies.attribution import Attribution  # noqa: E402
from strategies.ewc import EWC  # noqa: E402
from strategies.freeze import Freeze  # noqa: E402
from strategies.lwf import LwF  # noqa: E402
from strategies.multitask import Multitask  # noqa: E402
from strategies.o_lora import OLoRA  # noqa: E402
from strategies.replay import Replay  # noqa: E402
from strategies.seqft import SeqFT  # noqa: E402
from strategies.ssr import SSR  # noqa: E402

BUNDLED = "smollm2-135m-instruct"
MODELS = (BUNDLED, "tiny")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# glibc malloc that keeps what it frees: no mmap'ed chunks (each returned to the kernel when freed)
# and no trimming of the heap, so a step's temporaries reuse pages the last step touched
MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


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
    from bench_attribution import tiny_llama  # tools/ is on the path (this script's folder)

    from clbench.models import load_tokenizer

    tok = load_tokenizer(BUNDLED)
    tiny_llama(torch.float32, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


class BenchServices:
    """The one runner service a timed strategy asks for at a task start (LwF's teacher)."""

    def __init__(self, module: CLModule) -> None:
        self.module = module

    def frozen_copy(self) -> torch.nn.Module:
        return self.module.frozen_copy()


def random_stream(n: int, tokens: int, seed: int = 0, tasks: int = 2) -> TaskStream:
    """`tasks` tasks of n examples each, random words (every example tokenises to more than `tokens`)."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud paper light seven green quiet".split()
    names = ("first", "second", "third", "fourth")[:tasks]
    tasks = []
    for name in names:
        train = [Example(" ".join(rng.choices(words, k=tokens + 8)), rng.choice(words)) for _ in range(n)]
        tasks.append(Task(name=name, train=train, test=train[:1]))
    return TaskStream("bench", tasks)


def batches_of(examples: list[Example], tokenizer, n: int, batch: int, tokens: int) -> list[dict]:
    """n batches of `batch` examples (a seeded shuffle, as a training loader draws them), each row
    the first `tokens` tokens of prompt + answer, every token labelled: the same shape for all."""
    rows = random.Random(1).sample(examples, len(examples))
    out = []
    for i in range(n):
        chunk = [rows[(i * batch + j) % len(rows)] for j in range(batch)]
        ids = torch.tensor([tokenizer(f"{e.prompt} {e.answer}")["input_ids"][:tokens] for e in chunk])
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def strategy_makers(module: CLModule, ctx0: StrategyContext) -> dict[str, Callable[[], CLStrategy]]:
    """Every registered strategy (attribution with both gate targets) and the two measurement
    variants, each made afresh with the state it has at the start of the second task (built for
    each fit and dropped after it, so the process holds one strategy's state at a time)."""
    shapes = {n: p.shape for n, p in module.trainable_parameters().items()}

    def uniform(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {n: torch.rand(shape, generator=g) for n, shape in shapes.items()}

    def attribution(target: str, mass_every: int | None = None) -> Callable[[], CLStrategy]:
        def make() -> CLStrategy:
            strategy = Attribution(gate_target=target)
            strategy.load_state_dict({f"rbar.{n}": r for n, r in uniform(0).items()})
            strategy.mass_every = mass_every or strategy.mass_every
            return strategy

        return make

    def ewc(penalty_every: int | None = None) -> Callable[[], CLStrategy]:
        def make() -> CLStrategy:
            strategy = EWC()
            params = module.trainable_parameters()
            fisher = {f"fisher.{n}": f.mul_(1e-4) for n, f in uniform(1).items()}
            anchor = {f"anchor.{n}": p.detach().float().clone() for n, p in params.items()}
            strategy.load_state_dict({**fisher, **anchor})
            strategy.penalty_every = penalty_every or strategy.penalty_every
            return strategy

        return make

    def replay() -> CLStrategy:
        strategy = Replay()  # TRACE's 10% of every finished task
        strategy.on_task_end(ctx0)
        return strategy

    def ssr() -> CLStrategy:  # ssr-s20 after task 0: 20 kept examples (their text does not matter here)
        kept = [(0, ex) for ex in ctx0.task.train[:20]]
        strategy = SSR(synthetic=20)
        strategy.load_state_dict({"synthetic": json_tensor({"counts": {}, "examples": examples_json(kept)})})
        return strategy

    layers = module.model.config.num_hidden_layers
    makers: dict[str, Callable[[], CLStrategy]] = {
        "seqft": SeqFT,
        "replay": replay,
        "multitask": Multitask,
        "freeze": lambda: Freeze(lower_layers=max(1, layers // 2), freeze_embeddings=True),  # the preset
        "lwf": LwF,
        "ewc": ewc(),
        "ewc, value": ewc(penalty_every=1),
        "attribution grad": attribution("grad"),
        "attribution update": attribution("update"),
        "update, mass": attribution("update", mass_every=1),
        "ssr": ssr,
    }
    return makers


def quiet_trainer(steps: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        precision="bf16-mixed",
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def measure(
    model: str = "tiny",
    batch: int = 8,
    tokens: int = 64,
    rounds: int = 4,
    steps: int = 3,
    weight_decay: float = 0.0,
    log: Callable[[str], None] | None = None,
    malloc: str = "keep",
) -> dict[str, dict[str, float]]:
    """Step time of every strategy relative to seqft's: strategy -> {"cpu", "wall": the median over
    rounds of the ratio of its median step time to seqft's in the same round; "cpu_min", "cpu_max",
    "wall_min", "wall_max": the ratio's range over rounds; "seconds", "cpu_seconds": its median step
    time, s (wall clock and CPU time); "examples": its training examples at the second task over
    seqft's}. `log` receives one line per round.

    Runs in a fresh process (this script with --worker), whatever the caller's heap holds, with
    glibc's malloc keeping what it frees (`malloc` "keep", see MALLOC) or as it comes ("default")."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if malloc not in ("keep", "default"):
        raise ValueError(f"malloc must be 'keep' or 'default', got {malloc!r}")
    env = {k: v for k, v in os.environ.items() if k not in MALLOC}
    env.update({"HF_HUB_OFFLINE": "1", **(MALLOC if malloc == "keep" else {})})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--model", model]
        cmd += ["--batch", str(batch), "--tokens", str(tokens), "--rounds", str(rounds)]
        cmd += ["--steps", str(steps), "--weight-decay", str(weight_decay)]
        tail: list[str] = []
        pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        with subprocess.Popen(cmd, env=env, **pipe) as proc:
            for line in proc.stdout:
                tail = [*tail[-20:], line.rstrip()]
                if log is not None and line.startswith("  round"):
                    log(line.rstrip())
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"bench_gate's worker failed ({proc.returncode}):\n" + "\n".join(tail))
        return json.loads(out.read_text())


def _measure_here(
    model: str,
    batch: int,
    tokens: int,
    rounds: int,
    steps: int,
    weight_decay: float,
    log: Callable[[str], None],
) -> dict[str, dict[str, float]]:
    """`measure` in this process."""
    warnings.filterwarnings("ignore")  # Lightning's advice on workers, logging without a logger, ...
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # and its banner at every fit
    with tempfile.TemporaryDirectory() as tmp:
        name = BUNDLED if model == BUNDLED else tiny_model_dir(Path(tmp) / "tiny")
        module = CLModule(model=name, weight_decay=weight_decay)
        stream = random_stream(max(32, batch * (steps + 1)), tokens)
        services = BenchServices(module)
        ctx0, ctx = (StrategyContext(module, stream, t, Path(tmp), services=services) for t in (0, 1))
        makers = strategy_makers(module, ctx0)
        examples, covered = {}, set()
        for label, make in makers.items():  # replay and multitask add examples, the others keep them
            strategy = make()
            covered.add(type(strategy))
            examples[label] = strategy.training_examples(ctx, ctx.task.train)
            del strategy
        covered.add(OLoRA)  # timed on a LoRA module by lora_rounds
        missing = [name for name in REGISTRY if load(name) not in covered]
        assert not missing, f"bench_gate does not time {missing}"
        tok = module.tokenizer
        data = {label: batches_of(ex, tok, steps + 1, batch, tokens) for label, ex in examples.items()}
        results = timed_rounds(module, ctx, makers, data, rounds, steps, "seqft", log)
        for label, out in results.items():
            out["examples"] = len(examples[label]) / len(examples["seqft"])
        del module, makers, data
        gc.collect()
        lora = lora_rounds(name, batch, tokens, rounds, steps, weight_decay, Path(tmp), log)
        return results | {label: out | {"examples": 1.0} for label, out in lora.items()}


def timed_rounds(
    module: CLModule,
    ctx: StrategyContext,
    makers: dict[str, Callable[[], CLStrategy]],
    data: dict[str, list[dict]],
    rounds: int,
    steps: int,
    reference: str,
    log: Callable[[str], None] | None,
) -> dict[str, dict[str, float]]:
    """Each round fits every strategy for a warm-up and `steps` timed steps, starting at another one
    each round; per strategy the median over rounds of its step time over `reference`'s."""
    per_round: list[dict[str, dict[str, float]]] = []
    labels = list(makers)
    for r in range(rounds):
        seconds: dict[str, dict[str, float]] = {}
        shift = r * max(1, len(labels) // rounds)  # each round starts elsewhere: no strategy always first
        for label in labels[shift % len(labels) :] + labels[: shift % len(labels)]:
            strategy = makers[label]()
            strategy.on_task_start(ctx)  # freeze freezes, LwF copies its teacher, EWC restarts, O-LoRA
            saved = dict(module.carried_optimizer_state)  # freeze's fit keeps only what it trained
            timer = StepTimer()
            module.attach(strategy, ctx)
            loader = DataLoader(data[label], batch_size=None)
            quiet_trainer(steps + 1, [timer]).fit(module, train_dataloaders=loader)
            module.carried_optimizer_state = {**saved, **module.carried_optimizer_state}
            module.attach(SeqFT(), ctx)
            del strategy  # its state (LwF's teacher, EWC's Fisher, the gate) goes before the next
            if not module.adapter_names():
                for p in module.model.parameters():
                    p.requires_grad_(True)  # what freeze froze
            gc.collect()
            # the first step warms up (and measures EWC's value and the update mass)
            seconds[label] = {clock: statistics.median(v[1:]) for clock, v in timer.times.items()}
        per_round.append(seconds)
        if log is not None:
            log("  round (cpu s/step): " + ", ".join(f"{k} {seconds[k]['cpu']:.3f}" for k in labels))
    results = {}
    for label in makers:
        out: dict[str, float] = {}
        for clock in CLOCKS:
            ratios = [r[label][clock] / r[reference][clock] for r in per_round]
            out[clock] = statistics.median(ratios)
            out[f"{clock}_min"], out[f"{clock}_max"] = min(ratios), max(ratios)
        out["seconds"] = statistics.median(r[label]["wall"] for r in per_round)
        out["cpu_seconds"] = statistics.median(r[label]["cpu"] for r in per_round)
        results[label] = out
    return results


def lora_rounds(
    name: str,
    batch: int,
    tokens: int,
    rounds: int,
    steps: int,
    weight_decay: float,
    tmp: Path,
    log: Callable[[str], None] | None,
) -> dict[str, dict[str, float]]:
    """o_lora against lora-seqft: a module with model.lora (r 8, every linear layer) at the last task
    of a four-task stream, O-LoRA's three earlier adapters active and frozen. lora-seqft trains
    model.lora's adapter alone on the same module and batches."""
    from clbench.models import LoRA

    module = CLModule(model=name, lora=LoRA(r=8), weight_decay=weight_decay)
    stream = random_stream(max(32, batch * (steps + 1)), tokens, tasks=4)
    ctx = StrategyContext(module, stream, 3, tmp, services=BenchServices(module))
    OLoRA().prepare_model(ctx)  # adds the adapters of tasks 1-3 (fresh A, B = 0: the cost is the same)
    adapters = module.adapter_names()

    def lora_seqft() -> CLStrategy:
        module.set_adapters(adapters[:1], trainable=adapters[:1])
        return SeqFT()

    def o_lora(lambda_1: float) -> Callable[[], CLStrategy]:
        def make() -> CLStrategy:
            strategy = OLoRA(lambda_1=lambda_1)
            strategy.prepare_model(ctx)  # finds the adapters prepared above
            return strategy

        return make

    batches = batches_of(ctx.task.train, module.tokenizer, steps + 1, batch, tokens)
    makers = {"lora-seqft": lora_seqft, "o_lora": o_lora(5.0), "o_lora, no penalty": o_lora(0.0)}
    return timed_rounds(module, ctx, makers, dict.fromkeys(makers, batches), rounds, steps, "lora-seqft", log)


def markdown(results: dict[str, dict[str, float]], model: str) -> str:
    """`measure`'s results as a markdown table under a one-line caption."""
    lines = [
        f"Training step time relative to seqft ({model}, bf16-mixed; median over rounds, range in "
        "brackets), and the training examples of the second task relative to seqft's; lora-seqft and "
        "o_lora relative to lora-seqft (a LoRA module, the last of four tasks):",
        "",
        "| strategy | step time vs seqft (cpu) | step time vs seqft (wall) | s/step (cpu) | examples |",
        "|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['cpu']:.2f}x ({r['cpu_min']:.2f}-{r['cpu_max']:.2f}) "
            f"| {r['wall']:.2f}x ({r['wall_min']:.2f}-{r['wall_max']:.2f}) "
            f"| {r['cpu_seconds']:.3f} | {r['examples']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default=BUNDLED)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per strategy and round")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (TRACE: 0)")
    parser.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="glibc malloc keeps what it frees, or not",
    )
    parser.add_argument(
        "--worker", type=Path, help=argparse.SUPPRESS
    )  # measure's process: results to this file
    args = parser.parse_args()
    sizes = (args.model, args.batch, args.tokens, args.rounds, args.steps, args.weight_decay)
    if args.worker is not None:
        results = _measure_here(*sizes, log=lambda line: print(line, flush=True))
        args.worker.write_text(json.dumps(results))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; model {args.model}; "
        f"batch {args.batch} x {args.tokens} tokens, bf16-mixed, AdamW weight decay {args.weight_decay}; "
        f"{args.rounds} rounds x {args.steps} timed steps; malloc {args.malloc}",
        flush=True,
    )
    results = measure(*sizes, log=lambda line: print(line, flush=True), malloc=args.malloc)
    print(markdown(results, args.model), flush=True)


if __name__ == "__main__":
    main()

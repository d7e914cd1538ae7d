"""clbench's own overhead against the loop a user would write by hand (issue 27, part 3).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python tools/bench_overhead.py [--model tiny] \
        [--only train,generate]

Two measurements, each a ratio inside one process (the runs alternate in rounds after a warm-up of
each, and a ratio is the median of the per-round ratios, by the wall clock and by this process's CPU
time), imported by tools/bench.py as its sections `overhead_train` and `overhead_generate`:

  train     `steps` optimizer steps of full fine-tuning on the same batches (8 x 64 tokens, every
            token labelled, no padding), the same starting weights, AdamW (lr 5e-5, betas 0.9 / 0.95,
            no weight decay), bf16 autocast and gradient clipping at norm 1: a bare PyTorch loop
            (autocast forward with labels, backward, clip_grad_norm_, AdamW step, zero_grad) against
            clbench's seqft training (CLModule under a Lightning Trainer configured as the runner
            configures a task's fit: bf16-mixed, gradient_clip_val 1, TensorBoard logger,
            LearningRateMonitor and the loss recorder; no progress bar). Reported per step (the
            median interval between consecutive steps' starts, so the loader, the hooks and the
            logging between steps count) and for the whole fit call (its setup included). Both copies
            see the same batches, so their first-step losses must agree.
  generate  the quickstart's evaluation of one task's test prompts (FortuneTopic: 100 prompts,
            eval_batch_size 32, 5 new tokens; PyNextLine: 32 prompts, 24) through clbench
            (Runner.evaluator.generate: Trainer.predict, bf16-mixed, CLModule.generate) against
            `model.generate` under bf16 autocast with the same greedy settings on the same left-padded
            batches, which both timings build with clbench's prompt loader (tokenising and collating,
            as a user's loop must too), each followed by batch_decode; the answers must agree. What
            is left is the framework's: a Trainer and its predict loop per call, the hooks.

Target for both: clbench at most 1.05x the bare loop.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_scaling import BUNDLED, CLOCKS, interleaved, model_folder, quiet, summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.05
LR, BETAS = 5e-5, (0.9, 0.95)


def fixed_batches(tokenizer, n: int, batch: int, tokens: int) -> list[dict]:
    """n batches of `batch` rows of `tokens` tokens from the quickstart's training text, every token
    labelled (no padding: the two loops then run the very same computation)."""
    rows = json.loads((ROOT / "data" / "quickstart" / "PyNextLine" / "train.json").read_text())
    text = " ".join(r["prompt"] + " " + r["answer"] for r in rows)
    ids = tokenizer(text)["input_ids"]
    out = []
    for i in range(n):
        start = i * batch * tokens
        chunk = torch.tensor(ids[start : start + batch * tokens]).view(batch, tokens)
        out.append({"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()})
    return out


class Starts:
    """Seconds at the start of every training batch (Lightning callback), by each clock."""

    def __init__(self) -> None:
        self.t: dict[str, list[float]] = {clock: [] for clock in CLOCKS}

    def on_train_batch_start(self, *args) -> None:
        for clock, now in CLOCKS.items():
            self.t[clock].append(now())


def train(model: str = BUNDLED, steps: int = 12, batch: int = 8, tokens: int = 64, repeats: int = 3) -> dict:
    """Bare PyTorch loop against clbench's seqft training: per-step and whole-fit ratios (see above)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from clbench.module import CLModule
    from clbench.runner import LossRecorder

    with quiet():
        module = CLModule(model=model_folder(model), lr=LR, betas=BETAS)
    bare = copy.deepcopy(module.model).train()
    data = fixed_batches(module.tokenizer, steps, batch, tokens)
    bare_opt = torch.optim.AdamW(bare.parameters(), lr=LR, betas=BETAS, weight_decay=0.0)
    scratch = Path(tempfile.mkdtemp(prefix="bench_overhead-"))
    first_loss: dict[str, float] = {}
    per_step: dict[str, list[dict[str, float]]] = {"bare": [], "clbench": []}

    class Callback(Starts, pl.Callback):  # Starts first: its hook, not Callback's no-op
        pass

    def bare_loop() -> None:
        starts = Starts()
        for b in data:
            starts.on_train_batch_start()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = bare(
                    input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]
                ).loss
            first_loss.setdefault("bare", loss.item())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)
        starts.on_train_batch_start()  # the end of the last step
        per_step["bare"].append(_intervals(starts))

    def clbench_fit() -> None:
        starts, recorder = Callback(), LossRecorder("bench")
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            precision="bf16-mixed",
            gradient_clip_val=1.0,
            max_epochs=1,
            max_steps=-1,
            default_root_dir=str(scratch),
            logger=TensorBoardLogger(str(scratch), name="tensorboard"),
            callbacks=[LearningRateMonitor(logging_interval="step"), recorder, starts],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        with quiet():
            trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
        for clock, now in CLOCKS.items():
            starts.t[clock].append(now())  # fit returned: the last step and Lightning's teardown
        first_loss.setdefault("clbench", recorder.losses[0])
        per_step["clbench"].append(_intervals(starts))
        module.trainer.strategy.optimizers = []  # as call_trainer does after a fit

    rounds = interleaved({"bare": bare_loop, "clbench": clbench_fit}, repeats)
    fit = summary(rounds, "clbench", "bare")
    step = {}
    for clock in CLOCKS:
        ratios = [c[clock] / b[clock] for b, c in zip(per_step["bare"][1:], per_step["clbench"][1:])]
        step[clock] = statistics.median(ratios)
        step[f"{clock}_range"] = [min(ratios), max(ratios)]
    return {
        "measurement": "overhead_train",
        "model": model,
        "steps": steps,
        "batch": batch,
        "tokens": tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "bare_step_s": statistics.median(s["wall"] for s in per_step["bare"][1:]),
        "clbench_step_s": statistics.median(s["wall"] for s in per_step["clbench"][1:]),
        "step_ratio": step,
        "fit": fit,
        "bare_fit_s": statistics.median(r["bare"]["wall"] for r in rounds),
        "first_loss": first_loss,
        "target": TARGET,
    }


def _intervals(starts: Starts) -> dict[str, float]:
    """Median seconds between consecutive step starts (the last interval ends at the loop's end)."""
    return {clock: statistics.median(b - a for a, b in zip(t, t[1:])) for clock, t in starts.t.items()}


def generate(model: str = BUNDLED, repeats: int = 3) -> dict:
    """clbench's evaluation generation against model.generate on the same batches (see above)."""
    import lightning.pytorch as pl
    from transformers import GenerationConfig

    from clbench.data.loaders import StreamConfig, TaskConfig, load_stream
    from clbench.module import CLModule
    from clbench.runner import RunConfig, Runner
    from clbench.strategy import CLStrategy

    tasks = [
        TaskConfig(name="FortuneTopic", path="FortuneTopic", metric="exact_match", n_train=1, n_test=100,
                   max_new_tokens=5),
        TaskConfig(name="PyNextLine", path="PyNextLine", metric="edit_similarity", postprocess="first_line",
                   n_train=1, n_test=32, max_new_tokens=24),
    ]  # fmt: skip
    stream = load_stream(StreamConfig(name="bench", data_root=str(ROOT / "data" / "quickstart"), tasks=tasks))
    scratch = Path(tempfile.mkdtemp(prefix="bench_overhead-"))

    def trainer_factory(**kwargs) -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", **kwargs)

    with quiet():
        module = CLModule(model=model_folder(model))
        runner = Runner(
            module,
            stream,
            CLStrategy(),
            trainer_factory,
            RunConfig(output_dir=str(scratch)),
            eval_batch_size=32,
        )
    tok, net = module.tokenizer, module.model
    out: dict = {"measurement": "overhead_generate", "model": model, "repeats": repeats, "tasks": {}}
    for task in stream.tasks:
        examples = task.test
        batches = list(runner.evaluator.prompt_loader(task, examples))
        answers: dict[str, list[str]] = {}

        def through_clbench(task=task, examples=examples, answers=answers) -> None:
            with quiet():
                answers["clbench"] = runner.evaluator.generate(task, examples)

        def bare(task=task, examples=examples, answers=answers) -> None:
            config = GenerationConfig(
                do_sample=False,
                max_new_tokens=task.max_new_tokens,
                use_cache=True,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            texts = []
            net.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                for b in runner.evaluator.prompt_loader(task, examples):  # as clbench tokenizes them
                    ids = b["input_ids"]
                    gen = net.generate(
                        input_ids=ids, attention_mask=b["attention_mask"], generation_config=config
                    )
                    texts += tok.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
            answers["bare"] = texts

        rounds = interleaved({"bare": bare, "clbench": through_clbench}, repeats)
        out["tasks"][task.name] = {
            "prompts": len(examples),
            "batches": len(batches),
            "new_tokens": task.max_new_tokens,
            "bare_s": statistics.median(r["bare"]["wall"] for r in rounds),
            "clbench_s": statistics.median(r["clbench"]["wall"] for r in rounds),
            "ratio": summary(rounds, "clbench", "bare"),
            "same_answers": sum(a == b for a, b in zip(answers["bare"], answers["clbench"])),
        }
    out["threads"], out["target"] = torch.get_num_threads(), TARGET
    return out


def _verdict(ratio: float) -> str:
    return "met" if ratio <= TARGET else "**missed**"


def markdown(name: str, res: dict, label: str) -> str:
    """One measurement as a caption and a small table."""
    if name == "overhead_train":
        s, f = res["step_ratio"], res["fit"]
        lines = [
            f"**clbench's training step against a bare PyTorch loop** ({label}; {res['threads']} "
            f"thread(s)): {res['steps']} AdamW steps of full fine-tuning on the same {res['batch']} x "
            f"{res['tokens']}-token batches from the same weights, bf16 autocast, clipping at norm 1; the "
            "bare loop against CLModule under a Trainer configured as the runner's (bf16-mixed, "
            "TensorBoard logger, learning-rate monitor, loss recorder); median of "
            f"{res['repeats']} interleaved rounds after a warm-up. Target: at most {TARGET}x.",
            "",
            "| what | bare loop | clbench | ratio (wall) | rounds | ratio (CPU) |",
            "|---|---|---|---|---|---|",
            f"| one step (start to next start) | {res['bare_step_s']:.3f} s "
            f"| {res['clbench_step_s']:.3f} s | **{s['wall']:.3f}x** "
            f"| {s['wall_range'][0]:.3f}-{s['wall_range'][1]:.3f} | {s['cpu']:.3f}x |",
            f"| whole fit call ({res['steps']} steps, setup included) | {res['bare_fit_s']:.2f} s | "
            f"{f['s']:.2f} s | **{f['ratio']:.3f}x** | {f['ratio_range'][0]:.3f}-{f['ratio_range'][1]:.3f} "
            f"| {f['ratio_cpu']:.3f}x |",
            "",
            f"Per step: target {_verdict(s['wall'])}; whole fit: target {_verdict(f['ratio'])}. First-step "
            f"loss: bare {res['first_loss']['bare']:.6f}, clbench {res['first_loss']['clbench']:.6f}.",
        ]
        return "\n".join(lines) + "\n"
    lines = [
        f"**clbench's evaluation generation against `model.generate`** ({label}; {res['threads']} "
        "thread(s)): "
        "one task's test prompts, greedy, through Runner.evaluator.generate (Trainer.predict, bf16-mixed) "
        "against model.generate under bf16 autocast on the same left-padded batches of 32, both decoded; "
        f"median of {res['repeats']} interleaved rounds after a warm-up. Target: at most {TARGET}x.",
        "",
        "| task | prompts (batches) | new tokens | model.generate | clbench | ratio (wall) | rounds "
        "| ratio (CPU) | same answers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name_, t in res["tasks"].items():
        r = t["ratio"]
        lines.append(
            f"| {name_} | {t['prompts']} ({t['batches']}) | {t['new_tokens']} | {t['bare_s']:.3f} s "
            f"| {t['clbench_s']:.3f} s | **{r['ratio']:.3f}x** "
            f"| {r['ratio_range'][0]:.3f}-{r['ratio_range'][1]:.3f} "
            f"| {r['ratio_cpu']:.3f}x | {t['same_answers']} of {t['prompts']} |"
        )
    worst = max(t["ratio"]["ratio"] for t in res["tasks"].values())
    lines.append(f"\nTarget {_verdict(worst)} (worst task {worst:.3f}x).")
    return "\n".join(lines) + "\n"


MEASUREMENTS: dict[str, Callable[..., dict]] = {"overhead_train": train, "overhead_generate": generate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED, choices=(BUNDLED, "tiny"))
    parser.add_argument("--only", default="train,generate")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name in args.only.split(","):
        key = f"overhead_{name}"
        start = time.perf_counter()
        res = MEASUREMENTS[key](args.model, repeats=args.repeats)
        print(markdown(key, res, args.model), flush=True)
        print(f"({key}: {time.perf_counter() - start:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()

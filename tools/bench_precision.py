"""Speed of one training step and of batched greedy generation on the bundled model,
fp32 against bf16 autocast (Lightning's bf16-mixed) and bf16 weights (bf16-true), in one process.

    python tools/bench_precision.py [--batch 8] [--tokens 64] [--new 8] [--repeats 3]

Prints seconds per call and ratios to fp32; timings on a shared CPU are noisy, ratios less so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time

import torch

from clbench.data.collate import position_ids_for
from clbench.models import load_causal_lm, load_tokenizer


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--new", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tok = load_tokenizer("smollm2-135m-instruct")
    base = load_causal_lm("smollm2-135m-instruct")
    ids = torch.randint(100, 40000, (args.batch, args.tokens))
    mask = torch.ones_like(ids)
    setups = {
        "fp32": (base, contextlib.nullcontext),
        "bf16-mixed": (base, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        "bf16-true": (copy.deepcopy(base).to(torch.bfloat16), contextlib.nullcontext),
    }
    results = {}
    for name, (model, ctx) in setups.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def step(model=model, ctx=ctx, opt=opt):
            with ctx():
                loss = model(
                    input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), labels=ids
                ).loss
            loss.backward()
            opt.step()
            opt.zero_grad()

        def generate(model=model, ctx=ctx):
            with torch.no_grad(), ctx():
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=args.new,
                    min_new_tokens=args.new,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )

        results[name] = (timed(step, args.repeats), timed(generate, args.repeats))
    fp32_train, fp32_gen = results["fp32"]
    threads = torch.get_num_threads()
    print(f"batch {args.batch} x {args.tokens} tokens, {args.new} new tokens, torch threads {threads}")
    print(f"{'setup':12} {'train step s':>12} {'ratio':>6} {'generate s':>11} {'ratio':>6}")
    for name, (train_s, gen_s) in results.items():
        print(f"{name:12} {train_s:12.3f} {train_s / fp32_train:6.2f} {gen_s:11.3f} {gen_s / fp32_gen:6.2f}")


if __name__ == "__main__":
    main()

"""Peak host memory of scoring one task prior (LRP, K = 8) on SmolLM2-135M-Instruct, by top-K storage.

    .venv/bin/python tools/bench_prior_memory.py --samples 8

Each storage dtype runs in a process of its own (peak resident memory is per process): the model is
loaded, the peak counter reset, and `task_prior` scores the samples 4 at a time. Prints the peak
above the loaded model, in GB and in bytes per parameter, and the bf16/fp32 ratio. (How far the
bf16 prior is from the fp32 one: tests/attribution/test_lean_prior.py bounds it.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = [
    "Translate to French: The cat sleeps on the warm window sill.",
    "What is the capital of Australia? Answer in one word.",
    "Reverse the word 'planet':",
    "Summarise: The meeting was moved to Thursday because the room was booked.",
    "Is 17 a prime number? Answer yes or no.",
    "Complete the sentence: The quick brown fox",
    "Give a synonym for 'happy':",
    "Sort these numbers: 9, 2, 7, 4.",
]


def status(field: str) -> float:
    """A /proc/self/status memory field, in bytes."""
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def score(dtype: str, samples: int) -> dict:
    from clbench.models import load_causal_lm, load_tokenizer
    from strategies.attribution.importance import task_prior

    model, tok = load_causal_lm("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")
    batch = dict(tok((PROMPTS * 16)[:samples], return_tensors="pt", padding=True))
    params = dict(model.named_parameters())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current resident set
    base = status("VmRSS")
    _, n = task_prior(model, params, [batch], "lrp", 8, store_dtype=getattr(torch, dtype))
    extra = status("VmHWM") - base
    return {
        "dtype": dtype,
        "samples": n,
        "extra_gb": extra / 1e9,
        "bytes_per_param": extra / model.num_parameters(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one dtype in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(score(args.one, args.samples)), flush=True)
        return
    rows = {}
    for dtype in ("float32", "bfloat16"):
        out = subprocess.run(
            [sys.executable, __file__, "--one", dtype, "--samples", str(args.samples)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows[dtype] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{dtype}: +{rows[dtype]['extra_gb']:.2f} GB, {rows[dtype]['bytes_per_param']:.1f} B/parameter")
    print(f"bf16 / fp32 peak: {rows['bfloat16']['extra_gb'] / rows['float32']['extra_gb']:.2f}")


if __name__ == "__main__":
    main()

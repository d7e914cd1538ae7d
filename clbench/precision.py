"""The Trainer's default precision, chosen for the machine: bf16 is not faster on every CPU.

bf16-mixed (fp32 master weights, bf16 matmuls) is about 1.7x faster than fp32 on a CPU with native
bf16 (AVX512-BF16, AMX), and 11-18x slower for a SmolLM2 training step on one without it (an AMD
EPYC with AVX only, where torch falls back to a scalar bf16 matmul: BENCHMARKS.md). So when a config
leaves `trainer.precision` unset, clbench times one matmul in each dtype and takes bf16-mixed only
where bf16 wins clearly; on CUDA it takes bf16-mixed where the device supports it. The choice is a
default, so it lands in the run's config.yaml like any other value, and `clbench compare` refuses
to mix runs that ran in different precisions. A precision set explicitly is kept, and
CLBENCH_DEFAULT_PRECISION pins the default for machines that must agree (the test suite: 32-true).
"""

from __future__ import annotations

import functools
import os
import time

import torch

# bf16 must be this much faster than fp32 to be chosen: a CPU where the two are close gets fp32
# (no rounding for no gain), and timing noise near 1x cannot flip the choice between runs.
BF16_SPEEDUP_NEEDED = 1.25


def _matmul_seconds(dtype: torch.dtype, n: int = 256, repeats: int = 2) -> float:
    # A generator of its own: the timing runs after seed_everything when the precision is set
    # explicitly, and drawing from torch's global one there would change every later random draw
    # (a strategy's adapters may be initialised after it) by whether and when the timing ran.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, 2 * n, generator=g).to(dtype), torch.randn(2 * n, n, generator=g).to(dtype)
    a @ b  # warm-up: kernel selection, first-touch allocation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 matmul time over bf16 matmul time on this CPU (above 1: bf16 is faster)."""
    return _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)


def default_precision() -> str:
    """bf16-mixed where bf16 is native and faster, else 32-true (fp32)."""
    if pinned := os.environ.get("CLBENCH_DEFAULT_PRECISION"):
        return pinned
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_bf16_speedup() >= BF16_SPEEDUP_NEEDED else "32-true"


def slow_bf16_note(precision: object, accelerator: object) -> str | None:
    """A warning for bf16 asked for explicitly on a CPU where it is much slower than fp32."""
    on_cpu = str(accelerator) == "cpu" or (str(accelerator) == "auto" and not torch.cuda.is_available())
    if not on_cpu or not str(precision).startswith("bf16"):
        return None
    speedup = cpu_bf16_speedup()
    if speedup >= 1 / BF16_SPEEDUP_NEEDED:
        return None
    return (
        f"trainer.precision {precision}: bf16 matmuls are {1 / speedup:.0f}x slower than fp32 on this "
        "CPU (no native bf16); leave precision unset or use 32-true"
    )

"""How large per-parameter LRP relevance is, and what that does to Eq. 10's log(1 + |R|).

    .venv/bin/python tools/relevance_scale.py --n 4

Scores the first N training prompts of each quickstart task (as raw text, the quickstart's
prompt format) with the bundled SmolLM2-135M-Instruct (fp32) and prints, over every (sample,
tensor) pair with nonzero relevance:
- the tensor's peak |R| and the sample's total relevance (conservation: about the seed logit);
- log(1 + peak) / peak: 1 means the log does nothing, so Eq. 10 reduces to |R| / max |R|;
- the share of the tensor's elements whose normalised value (Eq. 10) exceeds 0.01, 0.1 and 0.5:
  how few elements one sample marks as important (a prior averages each element's top K samples).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clbench.models import load_causal_lm, load_tokenizer  # noqa: E402
from strategies.attribution.importance import normalise  # noqa: E402
from strategies.attribution.lrp import stream_parameter_relevance  # noqa: E402

TASKS = ("FortuneTopic", "WordAnalogy", "WordNetDefWord", "PyNextLine")
THRESHOLDS = (0.01, 0.1, 0.5)


def quantiles(values: list[float]) -> str:
    if not values:
        return "none"
    v = sorted(values)
    pick = [v[min(len(v) - 1, int(q * len(v)))] for q in (0.1, 0.5, 0.9)]
    return " / ".join(f"{x:.3g}" for x in pick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="prompts per task")
    parser.add_argument("--data", type=Path, default=Path("data/quickstart"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_causal_lm("smollm2-135m-instruct").eval()
    tok = load_tokenizer("smollm2-135m-instruct")
    peaks, linearity, totals = [], [], []
    shares = {t: [] for t in THRESHOLDS}
    for task in TASKS:
        rows = json.loads((args.data / task / "train.json").read_text(encoding="utf-8"))[: args.n]
        enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
        sample_total = torch.zeros(len(rows), dtype=torch.float64)

        def consume(name: str, relevance: torch.Tensor, total: torch.Tensor = sample_total) -> None:
            flat = relevance.flatten(1)
            total.add_(flat.double().sum(1))
            peak = flat.abs().amax(1)
            normed = normalise(relevance).flatten(1)
            for k in range(flat.shape[0]):
                if peak[k] > 0:
                    p = peak[k].item()
                    peaks.append(p)
                    linearity.append(math.log1p(p) / p)
                    for t in THRESHOLDS:
                        shares[t].append((normed[k] > t).float().mean().item())

        seeds = stream_parameter_relevance(model, enc["input_ids"], enc["attention_mask"], consume)
        totals += sample_total.tolist()
        print(f"{task}: seed logits {[round(x, 2) for x in seeds.logit.tolist()]}", flush=True)
    print(f"(sample, tensor) pairs: {len(peaks)}; quantiles 10% / 50% / 90%")
    print(f"  peak |R| per tensor:          {quantiles(peaks)}")
    print(f"  log(1 + peak) / peak:         {quantiles(linearity)}")
    print(f"  total relevance per sample:   {quantiles(totals)}")
    for t in THRESHOLDS:
        if shares[t]:
            print(f"  share of elements with R^ > {t:<4}: mean {statistics.mean(shares[t]):.4%}")


if __name__ == "__main__":
    main()

"""Priors of one task on a model sharded with FSDP2 over the ranks torchrun starts; rank 0 saves
them whole, and every rank how many samples the LRP engine scored in it.
Usage: torchrun --nproc-per-node 2 prior_worker.py MODEL_DIR OUT_DIR"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM, AutoTokenizer

import strategies.attribution.importance as importance
from clbench import distributed as dist
from clbench.data.collate import LeftPadCollator, TokenizedTask
from clbench.data.tasks import Example, Task
from strategies.attribution.importance import NEEDS_ANSWERS, task_prior

# case -> (estimator, chunk): 6 samples in batches of 4 (4 + 2) make 2 chunks of up to 4, or 3 of 2
# (with 2 ranks, the second round of "lrp-chunk2" has one chunk: a rank without one)
CASES = {
    "lrp": ("lrp", 4),
    "lrp-chunk2": ("lrp", 2),
    "grad_x_weight": ("grad_x_weight", 4),
    "fisher": ("fisher", 4),
}
ESTIMATORS = tuple(CASES)
TOP_K = 3


def scoring_batches(tokenizer, with_answer: bool) -> list[dict]:
    """Six samples of different lengths in batches of 4 (a full and a partial batch), left-padded."""
    words = ["cat", "dog", "sun", "map", "red", "tea"]
    examples = [Example(f"Reverse {w * (1 + i % 3)}:", w[::-1]) for i, w in enumerate(words)]
    task = Task(name="reverse", train=examples, test=examples[:1], max_new_tokens=4)
    data = TokenizedTask(examples, task, tokenizer, "raw", with_answer=with_answer)
    collate = LeftPadCollator(tokenizer.pad_token_id)
    return [collate([data[i] for i in range(s, min(s + 4, len(data)))]) for s in range(0, len(data), 4)]


def counting_engine(counts: dict[str, int], case: list[str]) -> None:
    """Count the samples the LRP engine scores in this process, per case (case[0] is the current one)."""
    engine = importance.stream_parameter_relevance

    def counted(model, input_ids, *args, **kwargs):
        counts[case[0]] = counts.get(case[0], 0) + input_ids.shape[0]
        return engine(model, input_ids, *args, **kwargs)

    importance.stream_parameter_relevance = counted


def priors(model, tokenizer, counts: dict[str, int] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{case: {name: whole prior}} of every parameter, sharded or not."""
    params = dict(model.named_parameters())
    out, current = {}, [""]
    if counts is not None:
        counting_engine(counts, current)
    for case, (estimator, chunk) in CASES.items():
        current[0] = case
        batches = scoring_batches(tokenizer, with_answer=estimator in NEEDS_ANSWERS)
        prior, n = task_prior(model, params, batches, estimator, TOP_K, chunk=chunk)
        assert n == 6
        out[case] = {name: dist.full(t).cpu() for name, t in prior.items()}
    return out


def main(model_dir: str, out_dir: str) -> None:
    tdist.init_process_group("gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dist.apply_fsdp(model, init_device_mesh("cpu", (tdist.get_world_size(),)), "32-true")
    assert all(dist.is_sharded(p) for p in model.parameters())
    counts: dict[str, int] = {}
    result = priors(model, tokenizer, counts)
    rank = tdist.get_rank()
    (Path(out_dir) / f"scored-rank{rank}.json").write_text(json.dumps(counts))
    if rank == 0:
        for case, prior in result.items():
            save_file(prior, str(Path(out_dir) / f"{case}.safetensors"))
    tdist.barrier()  # no rank leaves while another still works
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""Orthogonal Gradient Descent: each step's gradient loses its components along gradient directions
that earlier tasks' examples span.

Farajtabar et al. 2020, "Orthogonal Gradient Descent for Continual Learning" (AISTATS). After each
task (but the last), for `directions_per_task` of its training examples (a seeded random subset) the
gradient of the model's output at that example is stored, orthonormalised against every direction
kept so far (Gram-Schmidt, twice for numerical safety; a direction already in their span, norm below
1e-6 of its own, is dropped). Each optimizer step of a later task, after all accumulated backward
passes and before clipping and AdamW:

    g <- g - sum_i (g . v_i) v_i

so, to first order, the step leaves the model's outputs at the stored examples where they were.

The output differentiated is the paper's best variant, OGD-GTL (the ground-truth logit), read for a
language model as the mean over the example's answer tokens of the logit of the true next token. The
paper trains with SGD; here AdamW follows the projected gradient, so its moments are built from
projected gradients but its per-element scaling can leave the span a little (as in TRACE's code).

What it stores, and its cost. Every direction is a full vector over the trainable parameters, fp32,
laid out like them (under FSDP2 each rank keeps its shards): trainable parameters x 4 bytes each, so
0.54 GB per direction for the 135M model fully fine-tuned, 4.9 GB at 1.2B (Llama-3.2-1B) and 12.8 GB
at 3.2B; at directions_per_task = 8 over 7 earlier tasks that is 56 directions: 30 GB, 276 GB and
717 GB. Full fine-tuning beyond the smallest models is therefore out of reach, as the paper's own
scale says; with LoRA the directions cover the adapters only (r = 8 on a 1B model: tens of MB each),
which is the reading for large models. The checkpoint holds every direction. Per step the projection
costs two passes over n directions (n dot products, in one all-reduce under FSDP2; then the update);
per task end, one forward and backward per stored example.

Several ranks: every rank computes each example's gradient on the same example (under FSDP2 the
reduce-scatter averages equal gradients into each rank's shards; under DDP each rank computes the
whole gradient itself), and the dot products are whole-model sums (shard sums all-reduced).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info

from clbench.files import write_json
from clbench.gradients import Tensors, add_combination_, dots, grads_of, module_device, rows
from clbench.strategy import CLStrategy, StrategyContext, json_tensor, tensor_json

DROP = 1e-6  # a direction whose residual norm is below DROP x its own norm is already spanned


def ground_truth_logit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over answer tokens of the logit of the true next token (OGD-GTL's output)."""
    targets = labels[:, 1:]
    mask = targets != -100
    picked = logits[:, :-1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked[mask].float().mean()


class OGD(CLStrategy):
    """Project every step's gradient onto the orthogonal complement of the stored directions.

    Args:
        directions_per_task: Examples of each finished task whose output gradient is stored (each
            costs one copy of the trainable parameters; see the module docstring).
    """

    def __init__(self, directions_per_task: int = 8) -> None:
        if directions_per_task < 1:
            raise ValueError(f"ogd.directions_per_task must be >= 1, got {directions_per_task}")
        self.directions_per_task = directions_per_task
        self.basis: list[Tensors] = []
        self.kept: dict[str, int] = {}  # per task: directions kept after orthonormalisation

    def on_task_end(self, ctx: StrategyContext) -> None:
        if ctx.task_index == len(ctx.stream.tasks) - 1:
            return  # no later task would be projected
        rng = random.Random(f"ogd-{ctx.seed}-{ctx.task_index}")
        train = ctx.task.train
        chosen = rng.sample(train, min(self.directions_per_task, len(train)))
        params, device = ctx.module.trainable_parameters(), module_device(ctx)
        module, was_training = ctx.module, ctx.module.training
        module.eval()  # the model's output at the example, dropout off
        kept = 0
        try:
            with torch.enable_grad(), module.precision_context():
                for batch in ctx.service().make_loader(chosen, False):
                    for row in rows(batch):
                        row = move_data_to_device(row, device)
                        output = ground_truth_logit(module(row).logits, row["labels"])
                        kept += self._add({n: g.float() for n, g in grads_of(output, params).items()})
        finally:
            module.train(was_training)
        self.kept[ctx.task.name] = kept
        self._record(ctx)

    @torch.no_grad()
    def _add(self, g: Tensors) -> int:
        """Orthonormalise g against the basis and keep it; 1 if kept, 0 if already spanned."""
        norm = dots(g, [g]).sqrt().item()
        for _ in range(2):
            if self.basis:
                add_combination_(g, self.basis, (-dots(g, self.basis)).tolist())
        residual = dots(g, [g]).sqrt().item()
        if residual <= DROP * norm:
            return 0
        for t in g.values():
            t.div_(residual)
        self.basis.append(g)
        return 1

    @torch.no_grad()
    def on_before_optimizer_step(self, ctx: StrategyContext, optimizer: torch.optim.Optimizer) -> None:
        if not self.basis:
            return
        params = ctx.module.trainable_parameters()
        for p in params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._follow(params)
        grad = {name: p.grad for name, p in params.items()}
        add_combination_(grad, self.basis, (-dots(grad, self.basis)).tolist())

    def _follow(self, params: Tensors) -> None:
        # a resume loads the directions on the CPU: move them where the parameters are, once
        for v in self.basis:
            for name, p in params.items():
                if v[name].device != p.device:
                    v[name] = v[name].to(p.device)

    def _record(self, ctx: StrategyContext) -> None:
        size = sum(t.numel() * t.element_size() for t in self.basis[0].values()) if self.basis else 0
        rank_zero_info(
            f"clbench: ogd kept {self.kept[ctx.task.name]} directions of {ctx.task.name}; "
            f"{len(self.basis)} in all, {len(self.basis) * size / 2**30:.2f} GiB (whole model)"
        )
        if ctx.writes:
            path = Path(ctx.run_dir) / "ogd" / "directions.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"kept": self.kept, "directions": len(self.basis), "bytes_each": size})

    def state_dict(self) -> dict[str, torch.Tensor]:
        basis = {f"basis.{i}.{name}": t for i, v in enumerate(self.basis) for name, t in v.items()}
        return {**basis, "kept": json_tensor(self.kept)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        basis: dict[int, Tensors] = {}
        self.kept = tensor_json(state["kept"])
        for key, t in state.items():
            if key == "kept":
                continue
            _, i, name = key.split(".", 2)
            basis.setdefault(int(i), {})[name] = t.float()
        self.basis = [basis[i] for i in sorted(basis)]

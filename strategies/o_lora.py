"""O-LoRA: one LoRA adapter per task, each new one trained orthogonal to the earlier ones' subspaces.

Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning" (Findings of
EMNLP 2023, arXiv 2310.14152). Task t trains a fresh adapter (A_t, B_t) while the adapters of tasks
0..t-1 stay frozen and keep acting; the loss adds

    lambda_1 * sum_{i < t} sum_m ||A_i^m (A_t^m)^T||_F^2  +  lambda_2 * ||theta_t||^2

over every LoRA'd module m, where A (peft's lora_A weight, r x d_in) is the down-projection whose
rows span the inputs an adapter reads (the paper writes the same product as A_i^T A_t with A as
d_in x r), and theta_t is every tensor of the new adapter (A_t and B_t). Inference sums all adapters
trained so far: no task id, no replay. The paper's code sums |A_old A_t^T| (an L1 form) and the
plain norm of theta_t; this file follows the paper's equations. The paper runs lambda_1 = 0.5, and
lambda_2 = 0 in most of its scripts.

The adapters: model.lora's own ("default") is task 0's; `prepare_model` adds one more per later task
with the same settings, before the model is sharded, so every run of the stream (one process, DDP,
FSDP2, a resume) has the same parameters from the start. An adapter not yet trained has B = 0 and
does not act. The earlier adapters' A are frozen, so they are gathered once per task (whole, even
when sharded) and concatenated per module: ||A_old A_t^T||^2 over the stacked rows is the sum over i.
The penalty is row-separable in A_t, so under FSDP2 each rank takes its own rows of A_t (its shard)
and every element's gradient is complete on the rank that owns it; the value logged is the whole
penalty on every rank (the other ranks' share enters as a constant, as in EWC's reference penalty).

After each task RUN_DIR/o_lora/overlap.json records, per earlier task, sum_m ||A_i A_t^T||_F^2 (how
orthogonal the new adapter ended up); the adapters themselves are model weights and checkpoint,
resume and export with the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from clbench.distributed import all_reduce_, full, is_sharded, local
from clbench.errors import ConfigError
from clbench.files import write_json
from clbench.strategy import CLStrategy, StrategyContext

DOWN = re.compile(r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")


def down_projections(named: dict[str, torch.Tensor], adapter: str) -> dict[str, torch.Tensor]:
    """The lora_A weight (r x d_in) of one adapter, by the module it adapts."""
    out = {}
    for name, p in named.items():
        match = DOWN.match(name)
        if match and match["adapter"] == adapter:
            out[match["module"]] = p
    return out


def orthogonality(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over modules m of ||old_m new_m^T||_F^2, in fp32 (autocast off): old_m stacks earlier
    adapters' A rows ((sum r_i) x d_in), new_m is A_t or some of its rows."""
    device = next(iter(new.values())).device
    total = torch.zeros((), device=device)
    with torch.autocast(device.type, enabled=False):  # bf16-mixed would run the matmul in bf16
        for module, a_new in new.items():
            if module in old:
                a_old = old[module].to(device, torch.float32)
                total = total + (a_new.float() @ a_old.T).square().sum()  # (rows_t, sum r_i)
    return total


def squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum of squares of every element, in fp32."""
    return sum((t.float().square().sum() for t in tensors), torch.zeros((), device=tensors[0].device))


class OLoRA(CLStrategy):
    """A fresh LoRA adapter per task, pushed orthogonal to the frozen earlier ones; all of them act.

    Needs model.lora (its settings shape every adapter, e.g. `--model.lora.r 8`).

    Args:
        lambda_1: Weight of the orthogonality term sum_i sum_m ||A_i A_t^T||_F^2 (paper: 0.5).
        lambda_2: Weight of the L2 term ||theta_t||^2 on the new adapter's tensors (paper: 0).
    """

    def __init__(self, lambda_1: float = 0.5, lambda_2: float = 0.0) -> None:
        if lambda_1 < 0:
            raise ValueError(f"o_lora.lambda_1 must be >= 0, got {lambda_1}")
        if lambda_2 < 0:
            raise ValueError(f"o_lora.lambda_2 must be >= 0, got {lambda_2}")
        self.lambda_1, self.lambda_2 = lambda_1, lambda_2
        self.adapters: list[str] = []  # adapter of task t at position t
        self.old: dict[str, torch.Tensor] = {}  # per module: earlier adapters' A rows, whole, frozen
        self.overlap: dict[str, dict[str, float]] = {}

    def prepare_model(self, ctx: StrategyContext) -> None:
        names = ctx.module.adapter_names()
        wanted = names[:1] + [f"o_lora_task{t}" for t in range(1, len(ctx.stream))]
        if names and names == wanted:  # a module another O-LoRA instance prepared
            self.adapters = wanted
            return
        if len(names) != 1:
            raise ConfigError(
                f"o_lora trains one LoRA adapter per task beside model.lora's: set model.lora "
                f"(e.g. --model.lora.r 8); the model has adapters {names}"
            )
        self.adapters = wanted
        for name in self.adapters[1:]:
            ctx.module.add_adapter(name)

    def setup(self, ctx: StrategyContext) -> None:
        ctx.module.set_adapters(self.adapters[:1])  # untrained (B = 0): the starting model is evaluated

    def on_task_start(self, ctx: StrategyContext) -> None:
        t = ctx.task_index
        ctx.module.set_adapters(self.adapters[: t + 1], trainable=self.adapters[t : t + 1])
        self.old = self._stacked(ctx, self.adapters[:t])

    def training_penalty(self, ctx: StrategyContext, batch: dict, outputs: object) -> torch.Tensor | None:
        orthogonal = bool(self.old) and self.lambda_1 > 0
        if not orthogonal and self.lambda_2 == 0:
            return None
        new = down_projections(dict(ctx.model.named_parameters()), self.adapters[ctx.task_index])
        total = torch.zeros((), device=local(next(iter(new.values()))).device)
        if orthogonal:  # this rank's rows of A_t (all of them unless sharded)
            total = total + self.lambda_1 * orthogonality(self.old, {m: local(a) for m, a in new.items()})
        if self.lambda_2 > 0:  # the new adapter's tensors are the only ones that train
            mine = [local(p) for p in ctx.module.trainable_parameters().values()]
            total = total + self.lambda_2 * squared_norm(mine)
        if any(is_sharded(a) for a in new.values()):  # the other ranks' rows, as a constant
            part = total.detach()
            total = total + (all_reduce_(part.clone()) - part)
        return total

    @torch.no_grad()
    def on_task_end(self, ctx: StrategyContext) -> None:
        """Record how orthogonal the new adapter ended up to each earlier one (every rank computes it)."""
        t = ctx.task_index
        new = self._stacked(ctx, self.adapters[t : t + 1])
        path = Path(ctx.run_dir) / "o_lora" / "overlap.json"
        if not self.overlap and path.is_file():  # after a resume: the tasks before it
            self.overlap = json.loads(path.read_text())
        self.overlap[ctx.task.name] = {
            ctx.stream.tasks[i].name: orthogonality(self._stacked(ctx, [name]), new).item()
            for i, name in enumerate(self.adapters[:t])
        }
        self.old = {}
        if ctx.writes:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, self.overlap)

    @staticmethod
    @torch.no_grad()
    def _stacked(ctx: StrategyContext, adapters: list[str]) -> dict[str, torch.Tensor]:
        """Per module, the A rows of `adapters` stacked, whole and detached, in fp32 (under FSDP2 a
        collective: every rank gathers the same tensors in the same order)."""
        named = dict(ctx.model.named_parameters())
        parts = [down_projections(named, name) for name in adapters]
        modules = parts[0] if parts else {}
        return {m: torch.cat([full(part[m]).float() for part in parts]) for m in modules}

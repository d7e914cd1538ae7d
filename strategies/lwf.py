"""Learning without Forgetting: distil the previous model's answers on the new task's inputs.

Li & Hoiem 2017, "Learning without Forgetting" (TPAMI 40(12)); the knowledge-distillation loss of
Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network"). At the start of task t > 0 a
frozen copy of the model (the teacher, as it was after task t-1) is kept; every training batch
adds

    alpha * T^2 * mean over answer positions of KL( softmax(old / T) || softmax(new / T) )

where old / new are the teacher's and the model's next-token logits at the positions whose next
token is an answer token (labels != -100). The T^2 factor keeps gradient sizes comparable across
temperatures (Hinton et al.). TRACE's LwF uses T = 2.

The teacher is a frozen copy of the whole model (a peft model copies base and adapters; under
FSDP2 a twin sharded like the model, since a sharded model cannot be deep-copied), made where the
model is and moved to the batch's device on first use; it is dropped at the end of the task.
Nothing is checkpointed: a resumed run starts at a task boundary, where the teacher is rebuilt
from the restored model. With dropout on (LoRA dropout, for one) the penalty
is not exactly zero at the teacher's weights, as the student runs in training mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clbench.data.collate import position_ids_for
from clbench.distributed import local
from clbench.strategy import CLStrategy, StrategyContext


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits that predict an answer token: (batch, seq, vocab) -> (n_answer_tokens, vocab)."""
    predicts_answer = labels[:, 1:] != -100  # logits at position i predict token i + 1
    return logits[:, :-1][predicts_answer]


def distillation_kl(
    new: torch.Tensor, old: torch.Tensor, temperature: float, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(old / T) || softmax(new / T)), in fp32.

    `rows`: divide the sum by this instead of the local row count (under several ranks, the global
    batch's answer-token count / world size, so the rank average is the global batch's mean)."""
    log_q = F.log_softmax(new.float() / temperature, dim=-1)
    log_p = F.log_softmax(old.float() / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # (rows,)
    if rows is not None:
        return temperature**2 * kl.sum() / rows
    return temperature**2 * kl.mean() if kl.numel() else log_q.sum() * 0.0


class LwF(CLStrategy):
    """Keep the model's answers close to the previous model's while it learns a new task.

    Args:
        alpha: Weight of the distillation term against the task loss.
        temperature: Softmax temperature T of both distributions (TRACE: 2).
    """

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0) -> None:
        if alpha < 0:
            raise ValueError(f"lwf.alpha must be >= 0, got {alpha}")
        if temperature <= 0:
            raise ValueError(f"lwf.temperature must be positive, got {temperature}")
        self.alpha, self.temperature = alpha, temperature
        self.teacher: torch.nn.Module | None = None

    def on_task_start(self, ctx: StrategyContext) -> None:
        self.teacher = None
        if ctx.task_index > 0:
            self.teacher = ctx.service().frozen_copy()

    def training_penalty(self, ctx: StrategyContext, batch: dict, outputs: object) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        old = self._teacher_logits(batch)
        labels = batch["labels"]
        new = answer_logits(outputs.logits, labels)
        rows = ctx.module.token_share(batch)
        return self.alpha * distillation_kl(new, answer_logits(old, labels), self.temperature, rows)

    @torch.no_grad()
    def _teacher_logits(self, batch: dict) -> torch.Tensor:
        device = batch["input_ids"].device
        if local(next(self.teacher.parameters())).device != device:
            self.teacher.to(device)
        mask = batch["attention_mask"]
        return self.teacher(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_for(mask)
        ).logits

    def on_task_end(self, ctx: StrategyContext) -> None:
        self.teacher = None  # free the copy before evaluation

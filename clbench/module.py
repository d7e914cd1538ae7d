"""CLModule: the LightningModule around a Hugging Face causal LM, calling strategy hooks."""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import torch
from transformers import GenerationConfig

from clbench.data.collate import position_ids_for
from clbench.models import LoRA, add_lora, load_causal_lm, load_tokenizer
from strategies.base import CLStrategy, StrategyContext


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate: linear warmup, then constant, linear or cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class CLModule(pl.LightningModule):
    """A causal LM trained task after task; the continual-learning strategy plugs in via hooks.

    Args:
        model: Hugging Face hub id, local folder, or a bundled short name (smollm2-135m-instruct).
        lora: LoRA adapters through peft; None trains every weight.
        lr: AdamW learning rate (TRACE: 1e-5 full fine-tuning, 1e-4 LoRA).
        weight_decay: AdamW decoupled weight decay.
        betas: AdamW betas (TRACE: 0.9, 0.95).
        warmup_steps: Linear warmup steps at the start of every task.
        schedule: Learning-rate shape after warmup within a task.
        keep_optimizer_state: Carry AdamW moments from task to task (TRACE does); False resets them.
        dtype: Weight dtype at load; use the Trainer's precision (bf16-mixed) for mixed precision.
        attn_implementation: "eager", "sdpa", ...; None lets transformers choose.
        trust_remote_code: Allow model code from the hub; off unless asked.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        lora: LoRA | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        schedule: Literal["constant", "linear", "cosine"] = "constant",
        keep_optimizer_state: bool = True,
        dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be positive, got {lr}")
        self.model_name = model
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        lm = load_causal_lm(model, dtype, attn_implementation, trust_remote_code)
        self.model = add_lora(lm, lora) if lora is not None else lm
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.schedule = warmup_steps, schedule
        self.keep_optimizer_state = keep_optimizer_state
        self.cl_strategy: CLStrategy = CLStrategy()
        self.ctx: StrategyContext | None = None
        self._saved_optimizer_state: dict[str, dict] = {}

    def attach(self, strategy: CLStrategy, ctx: StrategyContext) -> None:
        """Point the hooks at the current strategy and task context (the runner calls this per task)."""
        self.cl_strategy, self.ctx = strategy, ctx

    def forward(self, batch: dict) -> object:
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids_for(batch["attention_mask"]),
            labels=batch.get("labels"),
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        outputs = self(batch)
        loss = outputs.loss
        size = batch["input_ids"].shape[0]
        self.log("train/task_loss", loss, batch_size=size)
        penalty = self.cl_strategy.training_penalty(self.ctx, batch, outputs)
        if penalty is not None:
            self.log("train/penalty", penalty, batch_size=size)
            loss = loss + penalty
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self(batch).loss, batch_size=batch["input_ids"].shape[0])

    @torch.no_grad()
    def generate(self, batch: dict) -> list[str]:
        """Greedy continuations of left-padded prompts, KV cache on, special tokens dropped."""
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=batch["max_new_tokens"],
            use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        out = self.model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=config
        )
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        return self.generate(batch)

    def configure_optimizers(self) -> dict:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.warmup_steps, total, self.schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        self.model.train()  # HF models load in eval mode and Lightning no longer switches them

    def on_train_start(self) -> None:
        if self.keep_optimizer_state and self._saved_optimizer_state:
            self._restore_optimizer_state(self.trainer.optimizers[0])

    def on_train_end(self) -> None:
        if self.keep_optimizer_state:
            self._saved_optimizer_state = self._named_optimizer_state(self.trainer.optimizers[0])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.cl_strategy.on_before_optimizer_step(self.ctx, optimizer)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.cl_strategy.on_after_optimizer_step(self.ctx, optimizer)

    def _named_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
        # Keyed by parameter name, so a strategy that freezes or unfreezes tensors between tasks
        # still gets each surviving tensor's own moments back.
        names = {p: n for n, p in self.model.named_parameters()}
        return {
            names[p]: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in st.items()}
            for p, st in optimizer.state.items()
        }

    def _restore_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        in_optimizer = {p for group in optimizer.param_groups for p in group["params"]}
        for name, p in self.model.named_parameters():
            if p in in_optimizer and name in self._saved_optimizer_state:
                optimizer.state[p] = dict(self._saved_optimizer_state[name])

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Named parameters that train (LoRA adapters only, when LoRA is on)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

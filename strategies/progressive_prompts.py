"""Progressive Prompts: a new soft prompt per task, the earlier ones frozen and kept in front of it.

Razdaibiedina et al. 2023, "Progressive Prompts: Continual Learning for Language Models" (ICLR 2023,
arXiv 2301.12314). The language model stays frozen; task t learns only its prompt P_t (prompt_length
virtual tokens, initialised from the embeddings of random vocabulary tokens) and trains and is
evaluated with

    [P_t; P_{t-1}; ...; P_1; x]

the newest prompt first, as the paper's equation and its code (the new prompt concatenated in front
of the previous ones) order them. The earlier prompts neither train nor leave: what they learned is
kept bit for bit, and every task's inputs see all of them, so inference needs no task id. The
paper's residual MLP reparameterisation of each prompt (optional there) is not built here.

The prompts are model parameters (clbench.prompts, through CLModule.add_prompt): `prepare_model`
adds every task's prompt before the model is sharded, so one process, DDP, FSDP2 and a resume all
have the same structure from the start, and they checkpoint, resume and shard with the model. After
each task RUN_DIR/progressive_prompts/prompts.json records every prompt's norm per task (the earlier
ones do not move). Prompt tuning wants a much larger learning rate than fine-tuning: model.lr
applies to the prompts (the paper trains T5's prompts at 0.3).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clbench.distributed import full
from clbench.errors import ConfigError
from clbench.files import write_json
from clbench.prompts import refuse_adapters
from clbench.strategy import CLStrategy, StrategyContext


class ProgressivePrompts(CLStrategy):
    """One soft prompt per task in front of the earlier ones; only the newest trains, the model is frozen.

    Args:
        prompt_length: Virtual tokens per task's prompt (the authors' example run: 10, T5-large at lr 0.3).
    """

    def __init__(self, prompt_length: int = 10) -> None:
        if prompt_length < 1:
            raise ValueError(f"progressive_prompts.prompt_length must be >= 1, got {prompt_length}")
        self.prompt_length = prompt_length
        self.prompts: list[str] = []  # the prompt of task t at position t
        self.norms: dict[str, dict[str, float]] = {}

    def prepare_model(self, ctx: StrategyContext) -> None:
        refuse_adapters(ctx.module, "progressive_prompts trains soft prompts")
        self.prompts = [f"progressive_task{t}" for t in range(len(ctx.stream))]
        names = ctx.module.prompt_names()
        if names == self.prompts:  # a module another instance prepared (a resume builds it anew)
            return
        if names:
            raise ConfigError(f"progressive_prompts: the model has other soft prompts already: {names}")
        for t, name in enumerate(self.prompts):  # vocabulary rows drawn from the run's seed and t
            ctx.module.add_prompt(name, self.prompt_length, seed=ctx.seed * 100_003 + t)

    def setup(self, ctx: StrategyContext) -> None:
        ctx.module.set_prompts([])  # the starting model is evaluated as it is

    def on_task_start(self, ctx: StrategyContext) -> None:
        t = ctx.task_index
        ctx.module.freeze_backbone()
        ctx.module.set_prompts(self.active(t), trainable=[self.prompts[t]])

    def active(self, t: int) -> list[str]:
        """The prompts in front of task t's inputs, newest first: [P_t, P_{t-1}, ..., P_0]."""
        return self.prompts[t::-1]

    @torch.no_grad()
    def on_task_end(self, ctx: StrategyContext) -> None:
        """Record every prompt's norm (every rank computes it: under FSDP2 a collective)."""
        path = Path(ctx.run_dir) / "progressive_prompts" / "prompts.json"
        if not self.norms and path.is_file():  # after a resume: the tasks before it
            self.norms = json.loads(path.read_text())
        named = dict(ctx.model.named_parameters())
        norms = {}
        for name in self.prompts:
            p = next(p for n, p in named.items() if n.endswith(f".prompts.{name}"))
            norms[name] = full(p).double().norm().item()
        self.norms[ctx.task.name] = norms
        if ctx.writes:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, self.norms)

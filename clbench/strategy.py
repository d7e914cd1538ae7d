"""The continual-learning strategy interface (not Lightning's `trainer.strategy`) and its context.

A strategy overrides two or three of these hooks. Once per run the runner calls
`prepare_model(ctx)` (before the model is sharded or sent to other ranks) and `setup(ctx)`;
then, in this order for each task t of the stream:

    on_task_start(ctx)
    training_examples(ctx, examples)          -> what this task trains on
    per batch:  training_penalty(ctx, batch, outputs) -> added to the loss
    per optimizer step: on_before_optimizer_step(ctx, optimizer)   (grads final, unscaled)
                        update_gate(ctx)              -> what the step withholds (after clipping)
                        on_after_optimizer_step(ctx, optimizer)
    on_task_end(ctx)                           (before the evaluation of row t)
    per evaluated prompt batch: answer(ctx, batch)  -> the strategy's own answers, or None

Hooks return what they contribute instead of mutating the module. The core owns this interface;
strategies/ depends on it, never the reverse.

Several processes (DDP, FSDP2): every rank runs every hook. Per-parameter state must be laid out
like its parameter (clbench.distributed.shard_like); a parameter's gradient is read from `p.grad`
after `backward()` (under FSDP2 autograd.grad returns None for sharded parameters).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from clbench.data.tasks import Example, Task, TaskStream

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from clbench.module import CLModule


@dataclass(frozen=True)
class TrainingSettings:
    """What a model trained on one task depends on besides model, data and seed.

    A strategy that caches what a side fit produces keys the cache by it: two runs with equal
    settings train the same single-task model. `batch_size` is per rank; `global_batch` =
    batch_size x world_size x accumulate_grad_batches is what one optimizer step sees.
    """

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    warmup_steps: int
    schedule: str
    epochs: int | None
    max_steps: int
    batch_size: int
    world_size: int
    accumulate_grad_batches: int
    global_batch: int
    precision: str
    gradient_clip_val: float | None


class Services(Protocol):
    """What a strategy may ask the runner for.

    `make_loader(examples, shuffle, task)` batches examples as training does (tokenizer, prompt
    format, collator), one global batch at a time on every rank (the same batches everywhere, so
    a side computation under FSDP gives every rank the same per-sample quantities).
    `make_prompt_loader(examples, task)` batches prompts only, as generation sees them.
    `predict(task, examples)` returns greedy answers, post-processed as the evaluator does, the
    same list on every rank. `side_fit(task, examples)` trains the module with a fresh Trainer
    and the task's epochs, no strategy hooks and without the continual optimizer state.
    `training_settings(task)` is what such a fit depends on. `frozen_copy()` is an evaluation-mode
    copy of the model that trains nothing (sharded like the model under FSDP2).
    `generate_text(prompts, max_new_tokens, model, temperature, seed)` is free text from raw prompts
    (no prompt format, no post-processing) by `model` (a frozen copy, say; default the model being
    trained), greedy at temperature 0 or sampled from `seed`, under the run's precision, the same list
    on every rank (CLModule.generate_text). With `ended=True` it returns (texts, ends), ends[i] whether
    continuation i ended (wrote EOS) within max_new_tokens rather than stopping at the limit.
    """

    def make_loader(self, examples: list[Example], shuffle: bool, task: Task | None = None) -> DataLoader: ...

    def make_prompt_loader(self, examples: list[Example], task: Task | None = None) -> DataLoader: ...

    def predict(self, task: Task, examples: list[Example]) -> list[str]: ...

    def side_fit(self, task: Task, examples: list[Example]) -> None: ...

    def training_settings(self, task: Task) -> TrainingSettings: ...

    def frozen_copy(self) -> torch.nn.Module: ...

    def generate_text(
        self,
        prompts: list[str],
        max_new_tokens: int,
        model: torch.nn.Module | None = None,
        temperature: float = 0.0,
        seed: int = 0,
        ended: bool = False,
    ) -> list[str] | tuple[list[str], list[bool]]: ...


@dataclass(frozen=True)
class UpdateGate:
    """What one optimizer step withholds, elementwise: the step moves parameter p to
    lerp(theta_step, theta_old, held[p]) (0: the optimizer's own step, 1: p stays where it was,
    weight decay and momentum included); parameters not in `held` step as usual.

    `held[p]` is shaped like p's local shard, on its device, in its dtype. With `mass` (float64,
    two elements, on the parameters' device) the step also adds to it the L1 mass of the held
    tensors' ungated update that the gate removed, sum held |theta_step - theta_old|, and in all,
    sum |theta_step - theta_old| (extra passes over the tensors: ask on some steps only).
    """

    held: dict[torch.Tensor, torch.Tensor]
    mass: torch.Tensor | None = None


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy may see of task t: the module, the stream, the run folder, the services.

    `rank` and `world_size` are the process's place among the ranks (0 and 1 in one process);
    only rank 0 writes files. The device mesh, when sharded, is each parameter's own
    (`p.device_mesh`).
    """

    module: CLModule
    stream: TaskStream
    task_index: int
    run_dir: Path
    seed: int = 0
    services: Services | None = None
    rank: int = 0
    world_size: int = 1

    @property
    def task(self) -> Task:
        return self.stream.tasks[self.task_index]

    @property
    def model(self) -> torch.nn.Module:
        """The Hugging Face model being trained (a peft model when LoRA is on)."""
        return self.module.model

    @property
    def seen_tasks(self) -> list[Task]:
        """Tasks 0..t, the current one included."""
        return self.stream.tasks[: self.task_index + 1]

    @property
    def writes(self) -> bool:
        """True on the one rank that writes files (rank 0)."""
        return self.rank == 0

    def service(self) -> Services:
        """The runner's services; a clear error for a context built without them."""
        if self.services is None:
            raise ValueError("this strategy needs the runner's services (loader, predict, side fit)")
        return self.services


def json_tensor(doc: Any) -> torch.Tensor:
    """A JSON document as a uint8 tensor of its UTF-8 bytes: text state (replay's buffer, SSR's
    synthetic examples) in a strategy's flat name -> tensor state, which safetensors writes."""
    return torch.frombuffer(bytearray(json.dumps(doc).encode()), dtype=torch.uint8)


def tensor_json(t: torch.Tensor) -> Any:
    """The JSON document `json_tensor` packed."""
    return json.loads(t.cpu().numpy().tobytes().decode())


def examples_json(kept: list[tuple[int, Example]]) -> list[list]:
    """Examples kept with their task index, as JSON rows [t, prompt, answer] (for json_tensor)."""
    return [[t, ex.prompt, ex.answer] for t, ex in kept]


def kept_batches(ctx: StrategyContext, kept: list[tuple[int, Example]]) -> list[dict[str, torch.Tensor]]:
    """Training-style batches of examples kept with their task index (a memory, a replay buffer):
    grouped by task, each in its own task's prompt format and limits, unshuffled, the same on every
    rank (Services.make_loader)."""
    by_task: dict[int, list[Example]] = {}
    for t, ex in kept:
        by_task.setdefault(t, []).append(ex)
    loader = ctx.service().make_loader
    return [b for t, exs in by_task.items() for b in loader(exs, False, ctx.stream.tasks[t])]


def json_examples(rows: list[list]) -> list[tuple[int, Example]]:
    """The inverse of examples_json."""
    return [(t, Example(prompt, answer)) for t, prompt, answer in rows]


class CLStrategy:
    """Base class of continual-learning strategies: every hook is a no-op by default,
    which is exactly naive sequential fine-tuning.

    `placement_only` names init arguments that decide only where state waits or is cached, never
    a number a run produces (an offload setting, a cache folder): compare treats runs that differ
    only in them as the same run."""

    placement_only: tuple[str, ...] = ()

    def prepare_model(self, ctx: StrategyContext) -> None:
        """Once per run (and again on a resume), first of all: change the model's structure here, e.g.
        add LoRA adapters (`ctx.module.add_adapter`). The model is not yet sharded nor sent to the other
        ranks, and a resume restores the weights afterwards, into the same structure. The processes
        are not yet connected (no collective, no service but `ctx.module`) and the run folder may not
        exist yet: a ConfigError (clbench.errors) here refuses the model or a setting in one line and
        stops the run before anything is written."""

    def setup(self, ctx: StrategyContext) -> None:
        """Once per run, before the first task (and again after a resume)."""

    def on_task_start(self, ctx: StrategyContext) -> None:
        """Before task t trains."""

    def training_examples(self, ctx: StrategyContext, examples: list[Example]) -> list[Example]:
        """The examples task t trains on; replay or multitask add earlier tasks' here."""
        return examples

    def training_penalty(
        self, ctx: StrategyContext, batch: dict[str, torch.Tensor], outputs: Any
    ) -> torch.Tensor | None:
        """A term added to the training loss of this batch (e.g. EWC), or None."""
        return None

    def on_before_optimizer_step(self, ctx: StrategyContext, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step, after all accumulated backward passes, grads unscaled."""

    def update_gate(self, ctx: StrategyContext) -> UpdateGate | None:
        """Once per optimizer step, inside it (grads final and clipped): the share of each element's
        update that the step withholds, or None for the optimizer's plain step. The optimizer folds
        it into its own step (clbench.module.GatedAdamW), with no copy of the weights."""
        return None

    def on_after_optimizer_step(self, ctx: StrategyContext, optimizer: torch.optim.Optimizer) -> None:
        """Right after the optimizer stepped."""

    def on_task_end(self, ctx: StrategyContext) -> None:
        """After task t trained, before the matrix row t is evaluated."""

    def answer(self, ctx: StrategyContext, batch: dict[str, torch.Tensor]) -> list[str] | None:
        """Raw continuations of one left-padded prompt batch, as CLModule.generate returns them, when
        the strategy answers itself (MbPA++ adapts the model to each input first); None: the model's
        greedy generation. Every evaluation and `Services.predict` goes through it.

        Called inside Lightning's predict loop: the module in eval mode, inference mode on (leave it
        with `torch.inference_mode(False)` and clone the batch to train), on this rank's share of the
        prompt batches (clbench.evaluation.Evaluator); under FSDP2 every rank must run the same
        forwards, so a strategy that trains here gathers the ranks' batches and answers them all."""
        return None

    def used(self) -> dict[str, Any]:
        """What the strategy really used where that can differ from its settings (a count capped by a
        task's size, say), as JSON, for results.json's `strategy_used`: two settings that came to the
        same thing show as the same run (compare's report names such entries). Empty by default."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint with the run (flat name -> tensor, safetensors-ready)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned. An unsharded resume hands the tensors over on the CPU
        (move them where the parameters are when used); a sharded one in the layout they were saved
        in. Under several ranks, a tensor that is not a DTensor must be the same on every rank (the
        sharded resume state keeps one copy of it)."""

"""What a strategy may ask the run for (clbench.strategy.Services), for one task of the stream.

The runner makes one per task (`Runner.services(t)`): the task index is explicit, so the loaders
it builds are seeded for that task whoever asks (the loop, a strategy's side fit, the evaluator),
and nothing depends on which task the runner touched last.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from clbench import distributed as dist
from clbench.console import say
from clbench.data.collate import LeftPadCollator, TokenizedTask
from clbench.data.tasks import Example, Task, TaskStream
from clbench.evaluation.evaluator import Evaluator
from clbench.module import CLModule, call_trainer
from clbench.strategy import CLStrategy, TrainingSettings


class RunServices:
    """The services of task `task_index` of a run (clbench.strategy.Services, documented there).

    Args:
        trainer_factory: Trainer(**overrides) with the run's settings (the fit's Trainer).
        quiet_trainer: A Trainer with no logger, checkpoint or progress bar (probes, generation).
        evaluator: The run's generation path, so predictions are the evaluation's.
    """

    def __init__(
        self,
        module: CLModule,
        stream: TaskStream,
        task_index: int,
        run_dir: Path,
        trainer_factory: Callable[..., pl.Trainer],
        quiet_trainer: Callable[[], pl.Trainer],
        evaluator: Evaluator,
        prompt_format: str = "raw",
        batch_size: int = 8,
        eval_batch_size: int = 16,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        self.module, self.stream, self.task_index, self.run_dir = module, stream, task_index, run_dir
        self.trainer_factory, self.quiet_trainer, self.evaluator = trainer_factory, quiet_trainer, evaluator
        self.prompt_format, self.batch_size, self.eval_batch_size = prompt_format, batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers

    def make_loader(self, examples: list[Example], shuffle: bool, task: Task | None = None) -> DataLoader:
        """Training-style batches (prompt + answer, answer-only labels), one global batch at a time
        and the same on every rank (batch_size x world size examples)."""
        data = self._tokenized(examples, task, with_answer=True)
        return self._loader(data, self.batch_size * dist.world_size(), shuffle, ranked=False)

    def make_prompt_loader(self, examples: list[Example], task: Task | None = None) -> DataLoader:
        """Prompt-only batches (left-padded, no answer), as generation sees them."""
        data = self._tokenized(examples, task, with_answer=False)
        return self._loader(data, self.eval_batch_size, False, ranked=False)

    def train_loader(self, examples: list[Example], task: Task | None = None) -> DataLoader:
        """This rank's share of each global batch (per-rank batch_size), in the run's seeded order."""
        data = self._tokenized(examples, task, with_answer=True)
        return self._loader(data, self.batch_size, True, ranked=True)

    def probe_loader(self, examples: list[Example], task: Task | None = None) -> DataLoader:
        """Training-style batches of batch_size, unshuffled, the same on every rank (loss probes)."""
        return self._loader(self._tokenized(examples, task, True), self.batch_size, False, ranked=False)

    def predict(self, task: Task, examples: list[Example]) -> list[str]:
        """Greedy answers to the examples' prompts, post-processed like the evaluator's."""
        return self.evaluator.predict(task, examples)

    def side_fit(self, task: Task, examples: list[Example]) -> None:
        """Train the module on examples without strategy hooks or the continual optimizer state."""
        say(f"clbench: side training on {task.name}: {len(examples)} examples, no strategy hooks")
        saved_state, hooks = self.module.carried_optimizer_state, (self.module.cl_strategy, self.module.ctx)
        self.module.carried_optimizer_state = {}
        self.module.attach(CLStrategy(), self.module.ctx)
        try:
            trainer = self.trainer_factory(
                max_epochs=task.epochs,
                max_steps=task.max_steps,
                logger=False,
                enable_checkpointing=False,
                callbacks=[],
                default_root_dir=str(self.run_dir),
            )
            loader = self.train_loader(examples, task)
            call_trainer(trainer, "fit", self.module, train_dataloaders=loader)
        finally:
            self.module.carried_optimizer_state = saved_state
            self.module.attach(*hooks)

    def training_settings(self, task: Task) -> TrainingSettings:
        trainer, module, world = self.quiet_trainer(), self.module, dist.world_size()
        accumulate = int(trainer.accumulate_grad_batches)
        return TrainingSettings(
            lr=module.lr,
            weight_decay=module.weight_decay,
            betas=tuple(module.betas),
            warmup_steps=module.warmup_steps,
            schedule=module.schedule,
            epochs=task.epochs,
            max_steps=task.max_steps,
            batch_size=self.batch_size,
            world_size=world,
            accumulate_grad_batches=accumulate,
            global_batch=self.batch_size * world * accumulate,
            precision=str(trainer.precision),
            gradient_clip_val=trainer.gradient_clip_val,
        )

    def frozen_copy(self) -> torch.nn.Module:
        return self.module.frozen_copy()

    def generate_text(
        self,
        prompts: list[str],
        max_new_tokens: int,
        model: torch.nn.Module | None = None,
        temperature: float = 0.0,
        seed: int = 0,
        ended: bool = False,
    ) -> list[str] | tuple[list[str], list[bool]]:
        """Free text from raw prompts (CLModule.generate_text), in the evaluation's batch size and
        precision; with `ended`, also whether each continuation ended (EOS) within max_new_tokens."""
        with self.quiet_trainer().precision_plugin.forward_context():
            return self.module.generate_text(
                prompts, max_new_tokens, model, self.eval_batch_size, temperature, seed, ended
            )

    def _tokenized(self, examples: list[Example], task: Task | None, with_answer: bool) -> TokenizedTask:
        task = task or self.stream.tasks[self.task_index]
        return TokenizedTask(
            examples, task, self.module.tokenizer, self.prompt_format, with_answer=with_answer
        )

    def _loader(self, data: TokenizedTask, batch_size: int, shuffle: bool, ranked: bool) -> DataLoader:
        # Every DataLoader iterator draws from the global RNG, evaluation's too; a generator of
        # its own per task keeps the training order the same whatever was evaluated before.
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.task_index)
        world, rank = (dist.world_size(), dist.rank()) if ranked else (1, 0)
        sampler = dist.RankBatchSampler(len(data), batch_size, shuffle, generator, world, rank)
        # the loader draws its workers' base seed from the same generator first (as a shuffled
        # DataLoader with this generator always did), never from the global RNG
        return DataLoader(
            data,
            batch_sampler=sampler,
            generator=generator,
            collate_fn=LeftPadCollator(self.module.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

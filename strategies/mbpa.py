"""MbPA++: sparse experience replay while training, and local adaptation to each test input.

de Masson d'Autume et al. 2019, "Episodic Memory in Lifelong Language Learning" (NeurIPS).

Memory: every training example of each finished task (or `memory_per_task` of them, a seeded
subset), each with a key: a frozen encoder's reading of its prompt. The paper's encoder is a frozen
pretrained BERT; here it is a frozen copy of the starting model (its mean last hidden state over the
prompt's tokens, clbench.encoding), taken in `setup` (before a resume restores trained weights, so a
resumed run keys with the same encoder).

Training: sparse experience replay. The paper replays 100 memory examples after every 10,000 new
ones, a 1% rate; here `replay_rate` x (the task's examples) memory examples, drawn without
replacement (seeded per task), are shuffled into the task's training data (the same amount, mixed
in rather than in separate steps).

Inference (every evaluation, and `Services.predict`): for each test input, its `neighbours` (K)
nearest memory examples by Euclidean distance between keys (ties: the earlier example); a copy of
the weights takes `adapt_steps` (L) plain gradient steps on

    mean answer-token loss on the K examples + adapt_lambda * ||theta - theta_trained||^2

at `adapt_lr`, answers that input greedily, and the trained weights come back bit for bit. The
paper's values are K = 32, L = 30, lr 1e-3, lambda 1e-3; the defaults here are smaller (K 8, L 5),
since every test input pays L forward and backward passes over K examples. That cost is the method's
point: RUN_DIR/mbpa/inference.json records, per evaluated row, the prompts rank 0 answered and the
seconds it spent on them (retrieval, adaptation and generation), beside results.json's evaluation
times.

The "copy" is the model itself: the trainable parameters are set aside (one copy: the
full model's 0.54 GB at 135M, the adapters with LoRA), changed in place and restored, so no second
model is built. Only evaluation adapts; lm-eval's general-ability benchmarks see the trained model
without local adaptation (their inputs are not the stream's; the paper adapts on its tasks' test
inputs only).

TRACE's code (model/Replay/MbPAplusplus.py) differs: it keys with the model being trained (the first
token's last hidden state, which in a decoder depends on that token alone, so prompts that start alike
share a key) by dot product, and it restores the weights from a list of the parameters themselves, so
every adaptation stays in the model. Here the encoder is frozen, the distance Euclidean (the paper's),
and the trained weights come back.

Several ranks: the evaluator gives each rank its share of the prompt batches. Under DDP each rank
adapts its own inputs on its own replica (the module's forward bypasses DDP's reducer: no gradient
is averaged with another rank's). Under FSDP2 a forward needs every rank, and a backward averages
the ranks' gradients, so every rank answers every rank's batch in turn, each on the same input, and
keeps its own answers: the same numbers as one process, at the cost of every rank adapting to
every input.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from clbench import distributed as dist
from clbench.data.tasks import Example
from clbench.encoding import mean_last_hidden
from clbench.files import write_json
from clbench.gradients import Tensors, mean_loss_grads, module_device, rows
from clbench.strategy import (
    CLStrategy,
    StrategyContext,
    examples_json,
    json_examples,
    json_tensor,
    kept_batches,
    tensor_json,
)


def nearest(keys: torch.Tensor, query: torch.Tensor, k: int) -> list[int]:
    """Indices of the k rows of `keys` nearest `query` by Euclidean distance, nearest first (a stable
    sort: of equal distances, the earlier row)."""
    distances = torch.cdist(query.reshape(1, -1).double(), keys.double())[0]
    return torch.argsort(distances, stable=True)[:k].tolist()


class MbPA(CLStrategy):
    """Sparse replay from an episodic memory, and local adaptation to each test input's nearest memory
    examples before it is answered (see the module docstring).

    Args:
        replay_rate: Memory examples replayed per new training example (the paper: 0.01).
        memory_per_task: Training examples of each finished task written to memory; None: all of them
            (the paper writes every example).
        neighbours: K, memory examples each test input adapts on (the paper: 32).
        adapt_steps: L, gradient steps of local adaptation (the paper: 30; 0 answers with the trained
            model, as without MbPA++'s inference).
        adapt_lr: Learning rate of those plain gradient steps (the paper: 1e-3).
        adapt_lambda: Weight of the pull to the trained weights, lambda ||theta - theta_trained||^2
            (the paper: 1e-3).
    """

    def __init__(
        self,
        replay_rate: float = 0.01,
        memory_per_task: int | None = None,
        neighbours: int = 8,
        adapt_steps: int = 5,
        adapt_lr: float = 1e-3,
        adapt_lambda: float = 1e-3,
    ) -> None:
        if replay_rate < 0:
            raise ValueError(f"mbpa.replay_rate must be >= 0, got {replay_rate}")
        if memory_per_task is not None and memory_per_task < 1:
            raise ValueError(f"mbpa.memory_per_task must be >= 1 or None, got {memory_per_task}")
        if neighbours < 1:
            raise ValueError(f"mbpa.neighbours must be >= 1, got {neighbours}")
        if adapt_steps < 0:
            raise ValueError(f"mbpa.adapt_steps must be >= 0, got {adapt_steps}")
        if adapt_lr <= 0 or adapt_lambda < 0:
            raise ValueError(
                f"mbpa.adapt_lr must be > 0 and mbpa.adapt_lambda >= 0, got {adapt_lr}, {adapt_lambda}"
            )
        self.replay_rate, self.memory_per_task, self.neighbours = replay_rate, memory_per_task, neighbours
        self.adapt_steps, self.adapt_lr, self.adapt_lambda = adapt_steps, adapt_lr, adapt_lambda
        self.memory: list[tuple[int, Example]] = []
        self.keys = torch.zeros(0)
        self.cost: dict[str, dict[str, float]] = {}  # per evaluated row: prompts and adaptation seconds
        self.encoder: torch.nn.Module | None = None

    def setup(self, ctx: StrategyContext) -> None:
        self.encoder = ctx.service().frozen_copy()  # the starting model: before a resume restores weights
        # timings differ between ranks, so they are not state: a resume reads back what rank 0 wrote
        path = Path(ctx.run_dir) / "mbpa" / "inference.json"
        self.cost = json.loads(path.read_text()) if ctx.writes and path.is_file() else {}

    def training_examples(self, ctx: StrategyContext, examples: list[Example]) -> list[Example]:
        n = min(round(self.replay_rate * len(examples)), len(self.memory))
        if n == 0:
            return examples
        rng = random.Random(f"mbpa-replay-{ctx.seed}-{ctx.task_index}")
        return examples + [ex for _, ex in rng.sample(self.memory, n)]

    def on_task_end(self, ctx: StrategyContext) -> None:
        train = ctx.task.train
        if self.memory_per_task is not None and self.memory_per_task < len(train):
            train = random.Random(f"mbpa-keep-{ctx.seed}-{ctx.task_index}").sample(
                train, self.memory_per_task
            )
        device = module_device(ctx)
        keys = [
            mean_last_hidden(self.encoder, b["input_ids"].to(device), b["attention_mask"].to(device)).cpu()
            for b in ctx.service().make_prompt_loader(train, ctx.task)
        ]
        self.memory += [(ctx.task_index, ex) for ex in train]
        self.cost[ctx.task.name] = {"prompts": 0, "adapt_s": 0.0}  # the row evaluated next (again)
        self.keys = torch.cat([self.keys.reshape(-1, keys[0].shape[1]), *keys])

    def answer(self, ctx: StrategyContext, batch: dict[str, torch.Tensor]) -> list[str] | None:
        if not self.memory or self.adapt_steps == 0:
            return None
        started = time.perf_counter()
        with torch.inference_mode(False):
            mine = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
            if not dist.is_fully_sharded(ctx.model):
                texts = self._adapted_answers(ctx, mine)
            else:  # every rank answers every rank's batch, in rank order, and keeps its own
                parts = dist.gather_objects(
                    {k: v.cpu() if torch.is_tensor(v) else v for k, v in mine.items()}
                )
                texts = [self._adapted_answers(ctx, part) for part in parts][dist.rank()]
        cost = self.cost.setdefault(ctx.task.name, {"prompts": 0, "adapt_s": 0.0})
        cost["prompts"] += len(texts)
        cost["adapt_s"] += time.perf_counter() - started
        if ctx.writes:
            path = Path(ctx.run_dir) / "mbpa" / "inference.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, self.cost)
        return texts

    def _adapted_answers(self, ctx: StrategyContext, batch: dict) -> list[str]:
        device = module_device(ctx)
        batch = move_data_to_device(batch, device)
        queries = mean_last_hidden(self.encoder, batch["input_ids"], batch["attention_mask"]).cpu()
        texts = []
        for row, query in zip(rows(batch), queries, strict=True):
            chosen = nearest(self.keys, query, self.neighbours)
            texts += self.adapted(ctx, [self.memory[i] for i in chosen], ctx.module.generate, row)
        return texts

    def adapted(
        self, ctx: StrategyContext, examples: list[tuple[int, Example]], then: Callable, *args: Any
    ) -> Any:
        """`then(*args)` called with the model adapted to `examples`; the trained weights restored after."""
        params = ctx.module.trainable_parameters()
        trained = {name: dist.local(p).detach().clone() for name, p in params.items()}
        batches = kept_batches(ctx, examples)
        try:
            for _ in range(self.adapt_steps):
                self._step(mean_loss_grads(ctx.module, batches, params), params, trained)
            return then(*args)
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    dist.local(p).copy_(trained[name])

    @torch.no_grad()
    def _step(self, grads: Tensors, params: Tensors, trained: Tensors) -> None:
        """theta -= lr (grad + 2 lambda (theta - theta_trained)), shard by shard."""
        for name, p in params.items():
            theta = dist.local(p)
            pull = (theta.float() - trained[name].float()).mul_(2 * self.adapt_lambda)
            theta.sub_((dist.local(grads[name]) + pull).to(theta.dtype), alpha=self.adapt_lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"memory": json_tensor(examples_json(self.memory)), "keys": self.keys}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.memory, self.keys = json_examples(tensor_json(state["memory"])), state["keys"].float()

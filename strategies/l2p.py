"""L2P: a pool of soft prompts with learnable keys, each input choosing its own by key-query matching.

Wang et al. 2022, "Learning to Prompt for Continual Learning" (CVPR 2022, arXiv 2112.08654). The
pretrained model stays frozen; what trains is a pool of M prompts P_1..P_M (prompt_length virtual
tokens each) and one key k_i per prompt (a hidden-sized vector). An input x is read by a frozen
pretrained encoder into a query q(x); the N keys nearest q(x) by cosine similarity choose N prompts,
which go in front of x. Training minimises

    task loss + key_lambda * mean over the batch of  sum over the chosen i of (1 - cos(q(x), k_i))

(the paper's surrogate loss, gamma there the cosine distance, which pulls the chosen keys toward the
queries that chose them; the top-N choice itself passes no gradient). Inference chooses the same
way, with no task id.

The decoder-LM reading:

- The query is the frozen starting model's last hidden state averaged over the input's prompt
  tokens (clbench.encoding.mean_last_hidden, as MbPA++ keys its memory), where the paper takes the
  frozen ViT's [CLS]. The frozen copy is taken in `setup`, before a resume restores trained weights,
  so a resumed run asks the same encoder. During training the row holds prompt, answer and EOS: the
  query averages the prompt positions only (the causal model's states there are what the prompt alone
  gives), so training and evaluation query the same text.
- The N chosen prompts are concatenated in the order of their index, not of their similarity. The
  paper's ViT adds no position embedding to the prompt tokens and attends to them in any order, so
  there the chosen set is what acts; a causal LM with rotary positions reads a different prefix for
  each order, and index order keeps "the same prompts chosen, the same prefix", as the ViT has it
  (the authors' code takes top-k order, which for their ViT is the same thing).
- The selection happens inside the model's forward (`set_prompts([], trainable, select=...)`), so
  every caller sees it: the training forward, the evaluation's generation, generate_text and lm-eval
  (whose log-likelihood calls pass prompt and continuation together: there the query reads both).
- Prompts start as the embeddings of random vocabulary tokens (Lester et al., as Progressive
  Prompts); the authors' code draws them uniform in [-1, 1], far off an LM's embedding scale. Keys
  are drawn uniform in [-1, 1] as there (only their direction counts).
- The pool is one M * prompt_length x hidden parameter, not M: DDP wants every trainable parameter
  used by every step, and a prompt no row chose would be unused. Unchosen prompts get a zero
  gradient; AdamW moves a prompt only while its moments are nonzero, so one never chosen stays bit
  for bit (with weight decay 0, the default), one chosen earlier drifts on its momentum, as in the
  authors' code (one pool tensor under Adam).

The paper's optional diversified selection is built, off by default (`diversify`): while task t > 0
trains, each key's cosine distance is multiplied by its prompt's normalised frequency of choice over
tasks 0..t-1 (the paper's H_t, from the task boundaries clbench trains by), so a prompt never chosen
(distance 0) is taken first; evaluation always chooses by plain cosine. Not built: the authors'
code's task-boundary key masking (each task its own slice of the pool, a task-incremental setting)
and its "batchwise prompt" (a whole test batch taking its most frequent prompts).
RUN_DIR/l2p/selection.json records how often each prompt was chosen while each task trained, which
shows whether the pool is shared or split between tasks.

Prompt tuning wants a much larger learning rate than fine-tuning: model.lr applies to the prompts
and keys (about 1e-2 to 0.3; the paper trains its ViT's pool with Adam at a constant 0.03).
LoRA is refused (the model is frozen; the adapters would stay at zero). Cost: the frozen copy (the
model's size again) and its forward on every input's prefill, in training and in generation; the
backward reaches the prompts only, through the frozen layers.

Several ranks: every rank runs the frozen encoder on its own rows inside the forward (under FSDP2 it
is sharded like the model, so every rank's forward takes part). The key-matching loss is computed in
`training_penalty`, where under FSDP2 the keys are shards: they are gathered whole with a gradient
that averages over the ranks (reduce-scatter), as the model's own gradients are, and each rank's
term is scaled by the global batch's rows, so two ranks give one process's loss and gradients. At
bf16-mixed, FSDP2 gathers the keys for the forward in bf16, so the choice there is made from
bf16-rounded keys (one process: fp32 keys under autocast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clbench import distributed as dist
from clbench.data.collate import IGNORE_INDEX
from clbench.encoding import mean_last_hidden
from clbench.errors import ConfigError
from clbench.files import write_json
from clbench.prompts import SoftPrompts, refuse_adapters
from clbench.strategy import CLStrategy, StrategyContext

POOL, KEYS = "l2p_pool", "l2p_keys"  # the soft prompts' names (model parameters)


def choose(
    queries: torch.Tensor, keys: torch.Tensor, n: int, frequency: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, n) long: for each query, the indices of the n keys of highest cosine similarity, in index
    order (of equal similarities, the lower index is chosen); with `frequency` (M), the n smallest
    cosine distances scaled by it (the paper's diversified selection). Elementwise in fp32, so
    autocast leaves it alone."""
    sim = cosine(queries.float().unsqueeze(1), keys.float().unsqueeze(0))  # (B, M)
    if frequency is None:
        top = torch.argsort(sim, dim=1, descending=True, stable=True)[:, :n]
    else:
        top = torch.argsort((1 - sim) * frequency.to(sim), dim=1, stable=True)[:, :n]
    return top.sort(dim=1).values


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dimension, broadcast, as an elementwise product and sum."""
    a = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return (a * b).sum(-1)


class L2P(CLStrategy):
    """A prompt pool with keys, each input's query picking top_n prompts, on a frozen model.

    The module docstring gives the method, its decoder-LM reading and where it departs from the paper.

    Args:
        pool_size: M, prompts in the pool (the paper: 10).
        prompt_length: L_p, virtual tokens per prompt (the paper: 5).
        top_n: N, prompts chosen per input, N * prompt_length tokens in front of it (the paper: 5).
        key_lambda: Weight of the key-matching (surrogate) loss (the authors' code: 0.1); 0 leaves the
            keys where they started.
        diversify: The paper's optional diversified selection while training: from the second task on,
            each key's cosine distance is multiplied by how often its prompt was chosen in the earlier
            tasks (normalised to sum 1), so little-used prompts are taken first; inference unchanged.
    """

    def __init__(
        self,
        pool_size: int = 10,
        prompt_length: int = 5,
        top_n: int = 5,
        key_lambda: float = 0.1,
        diversify: bool = False,
    ) -> None:
        if pool_size < 1 or prompt_length < 1:
            raise ValueError(
                f"l2p.pool_size and l2p.prompt_length must be >= 1, got {pool_size}, {prompt_length}"
            )
        if not 1 <= top_n <= pool_size:
            raise ValueError(f"l2p.top_n must be in 1..pool_size ({pool_size}), got {top_n}")
        if key_lambda < 0:
            raise ValueError(f"l2p.key_lambda must be >= 0, got {key_lambda}")
        self.pool_size, self.prompt_length, self.top_n = pool_size, prompt_length, top_n
        self.key_lambda, self.diversify = key_lambda, diversify
        self._frequency: torch.Tensor | None = None  # diversify: earlier tasks' choices, normalised
        self.encoder: torch.nn.Module | None = None
        self.selection = torch.zeros(0, pool_size)  # (tasks done, M): rows that chose each prompt
        self._counts = torch.zeros(pool_size, dtype=torch.float64)  # this task's, this rank's rows
        self._batch: dict | None = None  # the training batch whose forward is in flight
        self._chosen: tuple[dict, torch.Tensor, torch.Tensor] | None = None  # (batch, queries, choice)
        self._hook: Any = None
        self._soft: SoftPrompts | None = None  # the model's prompts (read at each call: FSDP2 swaps them)

    def prepare_model(self, ctx: StrategyContext) -> None:
        refuse_adapters(ctx.module, "l2p trains a prompt pool")
        names = ctx.module.prompt_names()
        if names == [POOL, KEYS]:  # a module another instance prepared (a resume builds it anew)
            return
        if names:
            raise ConfigError(f"l2p: the model has other soft prompts already: {names}")
        lm = dist.fsdp_root(ctx.model)
        hidden = lm.get_input_embeddings().embedding_dim
        seed = ctx.seed * 100_003
        ctx.module.add_prompt(POOL, self.pool_size * self.prompt_length, seed=seed)  # vocabulary rows
        generator = torch.Generator().manual_seed(seed + 1)
        keys = torch.rand(self.pool_size, hidden, generator=generator) * 2 - 1  # the authors' code's uniform
        ctx.module.add_prompt(KEYS, self.pool_size, init=keys.to(lm.get_input_embeddings().weight.dtype))

    def setup(self, ctx: StrategyContext) -> None:
        self._soft = SoftPrompts.of(dist.fsdp_root(ctx.model))
        ctx.module.set_prompts([])  # the starting model is evaluated, and copied, as it is
        self.encoder = ctx.service().frozen_copy()
        if self._hook is not None:
            self._hook.remove()
        # the training batch (its labels tell the prompt from the answer) before its forward reaches `select`
        self._hook = ctx.module.register_forward_pre_hook(self._see_batch)

    def _see_batch(self, module: torch.nn.Module, args: tuple) -> None:
        batch = args[0] if args else None
        labelled = isinstance(batch, dict) and batch.get("labels") is not None
        self._batch = batch if labelled and module.training and torch.is_grad_enabled() else None

    def on_task_start(self, ctx: StrategyContext) -> None:
        ctx.module.freeze_backbone()
        trainable = [POOL, KEYS] if self.key_lambda > 0 else [POOL]
        ctx.module.set_prompts([], trainable=trainable, select=self.select)
        self._counts = torch.zeros(self.pool_size, dtype=torch.float64)
        earlier = self.selection.reshape(-1, self.pool_size)[: ctx.task_index].sum(0)
        use = self.diversify and earlier.sum() > 0
        self._frequency = earlier / earlier.sum() if use else None

    def select(
        self, ids: torch.Tensor | None, embeds: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The rows in front of each input (B, top_n * prompt_length, d), called inside the forward."""
        if ids is None:
            raise ValueError("l2p's query needs input_ids: the frozen encoder reads the input's tokens")
        mask = torch.ones_like(ids) if mask is None else mask
        batch, over = self._batch, None
        if (
            batch is not None
            and batch["input_ids"].shape == ids.shape
            and torch.equal(batch["input_ids"], ids)
        ):
            over = mask.bool() & (batch["labels"] == IGNORE_INDEX)  # the prompt's tokens, not the answer's
            over = torch.where(over.any(1, keepdim=True), over, mask.bool())
        else:
            batch = None
        queries = mean_last_hidden(self.encoder, ids, mask, over)  # (B, d) fp32
        prompts = self._soft.prompts
        frequency = self._frequency if batch is not None else None  # diversified: training only
        chosen = choose(queries, prompts[KEYS].detach(), self.top_n, frequency)  # the keys whole here
        pool = prompts[POOL].view(self.pool_size, self.prompt_length, -1)
        if batch is not None:  # a training step: its penalty and the record need what was chosen
            self._chosen = (batch, queries, chosen)
            self._counts += torch.bincount(chosen.flatten().cpu(), minlength=self.pool_size).double()
        return pool[chosen].flatten(1, 2)  # (B, N * L_p, d), prompt after prompt

    def training_penalty(
        self, ctx: StrategyContext, batch: dict[str, torch.Tensor], outputs: Any
    ) -> torch.Tensor | None:
        """key_lambda * mean over the (global) batch of sum over the chosen keys of (1 - cos(q, k))."""
        chosen, self._chosen, self._batch = self._chosen, None, None
        if self.key_lambda == 0:
            return None
        if chosen is None or chosen[0] is not batch:
            raise RuntimeError("l2p: the training forward of this batch chose no prompts")
        _, queries, choice = chosen
        keys = whole(self._soft.prompts[KEYS])
        distance = (1 - cosine(queries.unsqueeze(1), keys.float()[choice])).sum()
        rows = torch.tensor(float(len(queries)), device=queries.device)
        if ctx.world_size > 1:  # each rank's sum over the global batch's rows, times the ranks: the
            rows = dist.all_reduce_(rows) / ctx.world_size  # gradient average is the global mean's
        return self.key_lambda * distance / rows

    @torch.no_grad()
    def on_task_end(self, ctx: StrategyContext) -> None:
        """Add this task's row to the selection counts (summed over the ranks) and write the record."""
        counts = dist.all_reduce_(self._counts.to(dist.local(self._soft.prompts[KEYS]).device)).cpu()
        done = self.selection.reshape(-1, self.pool_size)[: ctx.task_index]
        self.selection = torch.cat([done, counts.float().unsqueeze(0)])
        if ctx.writes:
            path = Path(ctx.run_dir) / "l2p" / "selection.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            tasks = [task.name for task in ctx.stream.tasks[: len(self.selection)]]
            record = {"prompt_length": self.prompt_length, "top_n": self.top_n, "diversify": self.diversify}
            record["chosen_while_training"] = {
                name: [int(c) for c in row.tolist()] for name, row in zip(tasks, self.selection)
            }
            write_json(path, record)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"selection": self.selection.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.selection = state["selection"].float().reshape(-1, self.pool_size)


def whole(p: torch.Tensor) -> torch.Tensor:
    """A parameter whole on every rank, differentiably. Under FSDP2 (outside the forward it is a
    shard) an all-gather, whose gradient is reduce-scattered as an average over the ranks, as FSDP2
    averages the model's own gradients; the parameter itself otherwise."""
    if not isinstance(p, torch.distributed.tensor.DTensor):
        return p
    from torch.distributed.tensor import Partial, Replicate

    return p.redistribute(p.device_mesh, [Replicate()] * p.device_mesh.ndim).to_local(
        grad_placements=[Partial("avg")] * p.device_mesh.ndim
    )

"""CLModule: the LightningModule around a Hugging Face causal LM, calling strategy hooks."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from transformers import GenerationConfig

from clbench import distributed as dist
from clbench.data.collate import position_ids_for
from clbench.errors import ConfigError
from clbench.models import LoRA, add_lora, load_causal_lm, load_tokenizer
from clbench.prompts import Selector, SoftPrompts, set_trainable, vocab_init
from clbench.strategy import CLStrategy, StrategyContext, UpdateGate


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate: linear warmup, then constant, linear or cosine decay.

    Not transformers.get_scheduler: its warmup gives the first step a learning rate of 0 (step /
    warmup), which wastes a step of every task; here step s of the warmup trains at (s + 1) / warmup.
    After the warmup the shapes are the same as get_scheduler's."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def gated_adamw_(
    param: torch.Tensor,
    state: dict,
    group: dict,
    held: torch.Tensor,
    mass: torch.Tensor | None = None,
) -> None:
    """One AdamW step of one tensor that withholds the share `held` of each element's update.

    Mirrors torch's default AdamW (torch/optim/adam.py `_single_tensor_adam` with decoupled weight
    decay, no amsgrad, maximize, capturable or differentiable) operation by operation, except that
    the step lands in the denominator's buffer: theta_step is AdamW's own, bit for bit, and
    lerp(theta_step, theta_old, held) written into the parameter is exactly theta_step at held 0 and
    theta_old at held 1 (the former copy-then-lerp, without the copy). Elementwise on local shards,
    so under FSDP2 each rank steps its own; `mass`: see clbench.strategy.UpdateGate.
    """
    p, grad = dist.local(param), dist.local(param.grad)
    exp_avg, exp_avg_sq = dist.local(state["exp_avg"]), dist.local(state["exp_avg_sq"])
    lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
    state["step"] += 1
    start = p.mul(1 - lr * weight_decay) if weight_decay != 0 else p
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = state["step"].item()
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = exp_avg_sq.sqrt().div_(bias_correction2**0.5).add_(group["eps"])
    stepped = torch.addcdiv(start, exp_avg, denom, value=-step_size, out=denom)
    if mass is not None:
        moved = (stepped - p).abs_()
        mass[0] += (held * moved).sum(dtype=torch.float64)
        mass[1] += moved.sum(dtype=torch.float64)
    torch.lerp(stepped, p, held, out=p)


# The optimizer state a task hands the next through torch's state_dict API; strict=False lets
# tensors without carried state start fresh.
_CARRY = StateDictOptions(strict=False)


def flat_state(named: dict[str, dict]) -> dict[str, object]:
    """Per-parameter optimizer state as one flat dict ("name::field" keys), for files and offload."""
    return {f"{n}::{k}": v for n, st in named.items() for k, v in st.items()}


def nested_state(flat: dict[str, object]) -> dict[str, dict]:
    """The inverse of flat_state."""
    named: dict[str, dict] = {}
    for key, value in flat.items():
        name, field = key.rsplit("::", 1)
        named.setdefault(name, {})[field] = value
    return named


class GatedAdamW(torch.optim.AdamW):
    """torch's AdamW (default settings) whose step withholds what `gate()` asks for, once per step
    after the closure (the strategy's `update_gate`: grads final and clipped).

    Held tensors step through `gated_adamw_`, every other one through torch's AdamW itself (hidden
    from it by a `grad` of None for that call), so a tensor that no gate touches moves exactly as
    under plain AdamW, and so does an element held 0: bit for bit on CPU, where torch's AdamW runs
    the same single-tensor code; on CUDA torch defaults to its foreach kernels, the same operations
    in the same order (bit equality there is not tested).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        gate: Callable[[], UpdateGate | None],
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay)
        self.gate = gate

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gate = self.gate()
        hidden: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups if gate is not None else ():
            for p in group["params"]:
                if p.grad is None or p not in gate.held:
                    continue
                state = self.state[p]
                if not state:  # torch's initial state (capturable and fused off)
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                gated_adamw_(p, state, group, gate.held[p], gate.mass)
                hidden[p], p.grad = p.grad, None
        try:
            _unhooked(torch.optim.AdamW.step)(self)
        finally:
            for p, grad in hidden.items():
                p.grad = grad
        return loss


def _unhooked(step: Callable) -> Callable:
    """A parent class's `step` without torch's optimizer-hook wrapper. torch wraps each optimizer class's
    step with the step hooks once an instance of that class exists (a plain AdamW anywhere in the
    process); GatedAdamW's own step is wrapped already, so the parent's wrapper would run every
    registered step hook a second time."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step


@contextmanager
def cached_casts(device_type: str) -> Iterator[None]:
    """Inside an enabled autocast: autocast's cast cache on (each weight cast to low precision once,
    kept until the outer autocast ends) and grad mode off instead of inference mode, where the cache
    is never used. Nothing otherwise.

    Why: Lightning's mixed precision runs autocast with the cache off and predicts under inference
    mode, so under bf16-mixed every decode step of `generate` cast every weight again: clbench's
    evaluation took 1.08-1.23x the time of `model.generate` under a plain `torch.autocast` and
    `torch.no_grad` (tools/bench_overhead.py, SmolLM2). The cache holds what the casts give, so the
    tokens are the same; it costs the cast copies (2 B per fp32 weight in bf16) while a batch
    generates, as a plain autocast does."""
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    dtype = torch.get_autocast_dtype(device_type)
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(device_type, dtype, cache_enabled=True):
        yield


class CLModule(pl.LightningModule):
    """A causal LM trained task after task; the continual-learning strategy plugs in via hooks.

    Several ranks: rank 0 loads the weights into host memory in `__init__`; every other rank builds
    the architecture on the meta device (no weights, no memory; a rank knows it is not rank 0 from
    the environment its launcher gave it). `configure_model`, when the process group exists,
    shards the model under FSDP2 (each rank keeps only its shard on the accelerator) and fills the
    other ranks' empty tensors from rank 0 by broadcast; so no rank but rank 0 ever holds the
    whole model, and rank 0 only in host memory while it loads.

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
        allow_pickle: Load pickled weights (pytorch_model.bin) when a model has no safetensors;
            unpickling runs code from the file, so only for weights you trust. Off: safetensors only.
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
        allow_pickle: bool = False,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be positive, got {lr}")
        self.model_name = model
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        empty = dist.world_size() > 1 and dist.rank() != 0  # filled from rank 0 in configure_model
        lm = load_causal_lm(model, dtype, attn_implementation, trust_remote_code, empty, allow_pickle)
        self.model = add_lora(lm, lora) if lora is not None else lm
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.schedule = warmup_steps, schedule
        self.keep_optimizer_state = keep_optimizer_state
        self.cl_strategy: CLStrategy = CLStrategy()
        self.ctx: StrategyContext | None = None
        # AdamW's per-parameter state after the last task, keyed by parameter name (the tensors
        # themselves): what the next task's optimizer starts from with keep_optimizer_state. Public
        # so resume, the runner's side fits and strategies' side computations can carry or set it
        # aside (flat_state / nested_state give it as one flat dict of tensors and back).
        self.carried_optimizer_state: dict[str, dict] = {}
        self._carry_pending = False  # carried moments not yet in this task's optimizer
        self._share: tuple[dict | None, torch.Tensor | None] = (None, None)  # token_share's last batch

    def attach(self, strategy: CLStrategy, ctx: StrategyContext) -> None:
        """Point the hooks at the current strategy and task context (the runner calls this per task)."""
        self.cl_strategy, self.ctx = strategy, ctx

    def configure_model(self) -> None:
        """Several ranks: shard the model once under FSDP2 (clbench's "fsdp"; later Trainers find it
        sharded), and give ranks that built it empty rank 0's weights."""
        trainer = self._trainer
        if trainer is None:
            return
        device, several = trainer.strategy.root_device, dist.world_size() > 1
        if isinstance(trainer.strategy, ModelParallelStrategy) and not dist.is_fully_sharded(self.model):
            mesh = self.device_mesh
            if mesh["tensor_parallel"].size() > 1:
                raise ConfigError("trainer.strategy: clbench shards with FSDP2 only; use strategy 'fsdp'")
            whole = self.model.state_dict() if dist.rank() == 0 else {}  # views of rank 0's host copy
            dist.apply_fsdp(self.model, mesh["data_parallel"], str(trainer.precision))
            if several and dist.any_rank(self._is_empty(), device):
                self._materialize(device)
                dist.load_whole_from_rank0(self.model, whole)
        elif several and dist.any_rank(self._is_empty(), device):  # DDP and other replicated layouts
            self._materialize(device)
            dist.broadcast_module_(self.model)

    def _is_empty(self) -> bool:
        return any(t.is_meta for t in (*self.model.parameters(), *self.model.buffers()))

    def _materialize(self, device: torch.device) -> None:
        if self._is_empty():
            self.model.to_empty(device=device)
            if not dist.is_fully_sharded(self.model):
                dist.fsdp_root(self.model).tie_weights()  # to_empty makes tied weights two tensors

    def forward(self, batch: dict, num_items_in_batch: torch.Tensor | None = None) -> object:
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids_for(batch["attention_mask"]),
            labels=batch.get("labels"),
            **extra,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        outputs = self(batch, self.token_share(batch))
        loss = outputs.loss
        size, sync = batch["input_ids"].shape[0], dist.world_size() > 1
        self.log("train/task_loss", loss, batch_size=size, sync_dist=sync)
        penalty = self.cl_strategy.training_penalty(self.ctx, batch, outputs)
        if penalty is not None:
            self.log("train/penalty", penalty, batch_size=size, sync_dist=sync)
            loss = loss + penalty
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=sync)
        return loss

    def token_share(self, batch: dict) -> torch.Tensor | None:
        """Under several ranks: the global batch's answer-token count / world size (None in one process).

        Each rank's loss is then its token-loss sum x world / global count, and the gradient
        average over ranks (DDP, FSDP2) is exactly the gradient of the global batch's token mean,
        as one process with the whole batch computes it, however the tokens fall on the ranks.
        A penalty that averages over answer tokens divides its sum by the same share."""
        world = dist.world_size()
        if world == 1:
            return None
        if self._share[0] is not batch:  # one all-reduce per batch, however many ask (loss, LwF)
            count = (batch["labels"][:, 1:] != -100).sum().float()  # the causal shift: labels 1..T
            self._share = (batch, dist.all_reduce_(count) / world)
        return self._share[1]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self(batch).loss, batch_size=batch["input_ids"].shape[0])

    @torch.no_grad()
    def generate(self, batch: dict) -> list[str]:
        """Greedy continuations of left-padded prompts, KV cache on, special tokens dropped."""
        with cached_casts(batch["input_ids"].device.type):
            out = self.model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                generation_config=self._greedy(batch["max_new_tokens"]),
                synced_gpus=dist.is_fully_sharded(self.model),  # every rank joins every sharded forward
            )
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    def _greedy(self, max_new_tokens: int) -> GenerationConfig:
        return GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        own = self.cl_strategy.answer(self.ctx, batch) if self.ctx is not None else None
        return own if own is not None else self.generate(batch)

    @torch.no_grad()
    def generate_text(
        self,
        prompts: list[str],
        max_new_tokens: int,
        model: torch.nn.Module | None = None,
        batch_size: int = 16,
        temperature: float = 0.0,
        seed: int = 0,
        ended: bool = False,
    ) -> list[str] | tuple[list[str], list[bool]]:
        """Continuations of raw text prompts by `model` (default: the model being trained), in order:
        no prompt format, no post-processing, special tokens dropped. Greedy at temperature 0, else
        sampled from a generator seeded with `seed` (the global one is left as it was).

        For strategies that prompt a model freely, such as SSR's in-context generation with a frozen
        copy of the starting model (`frozen_copy`). Every rank generates every prompt in the same
        batches from the same seed, so each holds the same list (a sharded model needs every rank in
        every forward anyway). A prompt longer than the model's context minus `max_new_tokens` keeps
        its last tokens. With `ended`, (texts, ends): ends[i] says whether continuation i ended, that
        is wrote EOS within `max_new_tokens` (False: it stopped at the token limit, its text cut
        short; the decoded text alone cannot tell)."""
        model = self.model if model is None else model
        device = dist.local(next(model.parameters())).device
        context = getattr(dist.fsdp_root(model).config, "max_position_embeddings", None)
        keep = max(1, context - max_new_tokens) if context else None
        config, was_training, texts, ends = self._greedy(max_new_tokens), model.training, [], []
        if temperature > 0:  # plain sampling: no top-k or top-p cut
            config.update(do_sample=True, temperature=temperature, top_k=None, top_p=None)
        forked = [device] if device.type == "cuda" else []
        model.eval()
        try:
            with torch.random.fork_rng(devices=forked):
                torch.manual_seed(seed)
                for start in range(0, len(prompts), batch_size):
                    chunk = prompts[start : start + batch_size]
                    ids = [self.tokenizer(p)["input_ids"][-keep if keep else 0 :] for p in chunk]
                    batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)  # left
                    out = model.generate(
                        **batch, generation_config=config, synced_gpus=dist.is_fully_sharded(model)
                    )
                    new = out[:, batch["input_ids"].shape[1] :]
                    texts += self.tokenizer.batch_decode(new, skip_special_tokens=True)
                    # a row stops at EOS (and is padded after it); one without EOS ran to the limit
                    ends += (new == config.eos_token_id).any(-1).tolist()
        finally:
            model.train(was_training)
        return (texts, ends) if ended else texts

    def configure_optimizers(self) -> dict:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = GatedAdamW(
            params,
            lambda: self.cl_strategy.update_gate(self.ctx),
            lr=self.lr,
            betas=self.betas,
            weight_decay=self.weight_decay,
        )
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.warmup_steps, total, self.schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        self.model.train()  # HF models load in eval mode and Lightning no longer switches them

    def on_train_start(self) -> None:
        dist.follow_trainable(self.model)  # what trains may have changed since the first forward
        # The carried moments go in at the task's first optimizer step, once gradients exist: on an
        # optimizer with neither state nor gradients torch's loader first runs a set-up step that
        # allocates a second, zero optimizer state beside the carried one.
        self._carry_pending = self.keep_optimizer_state and bool(self.carried_optimizer_state)

    def on_train_end(self) -> None:
        if self.keep_optimizer_state and not self._carry_pending:  # a task without a step keeps it
            self.carried_optimizer_state = self._named_optimizer_state(self.trainer.optimizers[0])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._carry_pending:
            self._restore_optimizer_state(self.trainer.optimizers[0])
            self._carry_pending = False
        self.cl_strategy.on_before_optimizer_step(self.ctx, optimizer)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.cl_strategy.on_after_optimizer_step(self.ctx, optimizer)

    def _named_optimizer_state(self, optimizer: GatedAdamW) -> dict[str, dict]:
        # Keyed by parameter name (torch.distributed.checkpoint's state_dict API: the same names under
        # FSDP2, the moments sharded DTensors), so a strategy that freezes or unfreezes tensors between
        # tasks still gets each surviving tensor's own moments back. The tensors themselves, not
        # copies: call_trainer drops the finished Trainer's optimizer, so these are their only holders.
        # New dicts around them: the API hands out the optimizer's own, and Lightning's teardown
        # (one device, DDP) then swaps CPU copies into those, which would be what is carried.
        if not optimizer.state:  # no step this task: nothing to carry (and no set-up step to run)
            return {}
        state = get_optimizer_state_dict(self.model, optimizer, options=_CARRY)["state"]
        return {name: dict(fields) for name, fields in state.items()}

    def _restore_optimizer_state(self, optimizer: GatedAdamW) -> None:
        # Only the moments cross tasks. The param groups (lr, its schedule's start) are this task's
        # own: loading the last task's would resume its decayed lr. strict=False: a tensor with no
        # carried state (newly trainable, a new adapter) starts from AdamW's zero state. Called once
        # the first step's gradients exist, so torch runs no set-up step (see on_train_start).
        own = get_optimizer_state_dict(self.model, optimizer, options=_CARRY)
        carried = {"state": self.carried_optimizer_state, "param_groups": own["param_groups"]}
        set_optimizer_state_dict(self.model, optimizer, carried, options=_CARRY)

    def frozen_copy(self) -> torch.nn.Module:
        """An evaluation-mode copy of the model that trains nothing (LwF's teacher).

        Sharded models cannot be deep-copied: the twin is built on the meta device, sharded the same
        way, and each rank copies its own shards (and the unsharded buffers) into it."""
        if not dist.is_fully_sharded(self.model):
            return copy.deepcopy(self.model).eval().requires_grad_(False)
        with torch.device("meta"):
            twin = _same_architecture(self.model)
        dist.apply_fsdp(twin, self.device_mesh["data_parallel"], str(self.trainer.precision))
        twin.to_empty(device=self.device)
        with torch.no_grad():
            sources = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
            for name, t in (*twin.named_parameters(), *twin.named_buffers()):
                dist.local(t).copy_(dist.local(sources[name]))
        return twin.eval().requires_grad_(False)

    @property
    def accumulate_grad_batches(self) -> int:
        """Micro-batches per optimizer step of the attached Trainer (the fit in progress or the last
        one; 1 before any)."""
        trainer = self._trainer  # Lightning's `trainer` property raises when none is attached
        return trainer.accumulate_grad_batches if trainer is not None else 1

    def precision_context(self) -> AbstractContextManager:
        """The run's precision for a forward a strategy runs itself outside the training step (a memory
        gradient, a probe): the attached Trainer's forward context (bf16-mixed: autocast to bf16;
        32-true: nothing). Lightning enters it around training_step only, so a hook is in fp32 unless it
        asks. Without a Trainer, nothing."""
        trainer = self._trainer
        return trainer.precision_plugin.forward_context() if trainer is not None else nullcontext()

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Named parameters that train (LoRA adapters only, when LoRA is on)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def adapter_names(self) -> list[str]:
        """The model's LoRA adapters in the order they were added ("default" first, from model.lora);
        empty without LoRA."""
        return list(getattr(self.model, "peft_config", None) or {})

    def add_adapter(self, name: str) -> None:
        """One more LoRA adapter `name`, with the settings of model.lora: freshly initialised (B = 0, so
        the model computes what it did), frozen and inactive until `set_adapters` names it.

        The model's structure changes, so only before it is sharded or its weights go to the other
        ranks: in `CLStrategy.prepare_model`. Its initial weights come from the global generator, as
        model.lora's own adapter's do (rank 0's reach the other ranks with the model)."""
        if not self.adapter_names():
            raise ValueError("model.lora is not set: a LoRA adapter can only be added beside model.lora's")
        if name in self.adapter_names():
            raise ValueError(f"LoRA adapter {name!r} exists already")
        if dist.is_fully_sharded(self.model):
            raise RuntimeError("add_adapter on a sharded model: call it from CLStrategy.prepare_model")
        config = copy.deepcopy(self.model.peft_config[self.adapter_names()[0]])
        self.model.add_adapter(name, config)  # peft leaves it frozen and inactive, the others as they were

    def set_adapters(self, active: Sequence[str], trainable: Sequence[str] = ()) -> None:
        """The LoRA adapters that act in every forward (training, evaluation, generation; their updates
        add up) and those of them that train. Every tensor of an adapter not in `trainable` is frozen
        (requires_grad False), so the next task's optimizer never holds it and it stays bit-identical.
        Between tasks only (each task's Trainer builds its optimizer from the trainable tensors)."""
        known = set(self.adapter_names())
        if not known:
            raise ValueError("model.lora is not set: the model has no LoRA adapters")
        if not active or not set(active) <= known or not set(trainable) <= set(active):
            raise ValueError(
                f"set_adapters: active {list(active)} and trainable {list(trainable)} must be non-empty, "
                f"trainable within active, all among {sorted(known)}"
            )
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.model.base_model.set_adapter(list(active))  # peft makes every active adapter trainable
        for layer in self.model.modules():
            if isinstance(layer, BaseTunerLayer):
                for attribute in layer.adapter_layer_names:
                    for adapter, part in getattr(layer, attribute).items():
                        part.requires_grad_(adapter in trainable)

    def prompt_names(self) -> list[str]:
        """The model's soft prompts in the order they were added (clbench.prompts); empty without any."""
        prompts = SoftPrompts.of(dist.fsdp_root(self.model))
        return list(prompts.prompts) if prompts is not None else []

    def add_prompt(self, name: str, n_tokens: int, init: torch.Tensor | None = None, seed: int = 0) -> None:
        """One more soft prompt `name` of n_tokens x hidden, frozen and inactive until `set_prompts` names
        it: `init` (n_tokens x hidden), or by default the input embeddings of n_tokens vocabulary tokens
        drawn from `seed`. A parameter of the causal LM (clbench.prompts), so it checkpoints, resumes,
        shards and syncs with the model.

        The model's structure changes, so only before it is sharded or its weights go to the other
        ranks: in `CLStrategy.prepare_model` (on the ranks that build the model empty, the prompt is
        empty too and comes from rank 0 with the model)."""
        if dist.is_fully_sharded(self.model):
            raise RuntimeError("add_prompt on a sharded model: call it from CLStrategy.prepare_model")
        if n_tokens < 1:
            raise ValueError(f"soft prompt {name!r}: n_tokens must be >= 1, got {n_tokens}")
        lm = dist.fsdp_root(self.model)
        SoftPrompts.attach(lm).add(name, vocab_init(lm, n_tokens, seed) if init is None else init)

    def set_prompts(
        self,
        active: Sequence[str],
        trainable: Sequence[str] = (),
        select: Selector | None = None,
    ) -> None:
        """The soft prompts in front of every input (training, evaluation, generation, lm-eval), in that
        order, and those of them that train; every other prompt is frozen (requires_grad False), so it
        stays bit-identical. `select` (input_ids, inputs_embeds, attention_mask) -> (B, n, d) instead
        chooses each row's prompt rows inside the forward (a pool looked up per input; `active` then
        empty, and `trainable` any prompts, the pool's and its keys'); None: `active` for every row.
        Between tasks only, as set_adapters. Empty `active` and no `select`: no prompt."""
        lm = dist.fsdp_root(self.model)
        prompts = SoftPrompts.of(lm)
        if prompts is None:
            raise ValueError("set_prompts: the model has no soft prompts (add_prompt in prepare_model)")
        set_trainable(prompts, active, trainable, pool=select is not None)
        prompts.select = select

    def freeze_backbone(self) -> None:
        """Every parameter but the soft prompts frozen (LoRA adapters included): only the prompts that
        `set_prompts` makes trainable train (prompt tuning)."""
        lm = dist.fsdp_root(self.model)
        prompts = SoftPrompts.of(lm)
        own = {id(p) for p in prompts.parameters()} if prompts is not None else set()
        for p in self.model.parameters():
            if id(p) not in own:
                p.requires_grad_(False)


def _same_architecture(model: torch.nn.Module) -> torch.nn.Module:
    """A new, uninitialised model of the same class, configuration, adapters and soft prompts as `model`."""
    from transformers import AutoModelForCausalLM

    peft = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft else model
    dtype = next(base.parameters()).dtype
    twin = AutoModelForCausalLM.from_config(base.config, dtype=dtype)
    if peft:
        from peft import get_peft_model

        twin = get_peft_model(twin, next(iter(peft.values())))
    prompts = SoftPrompts.of(dist.fsdp_root(model))
    if prompts is not None:  # the same soft prompts, acting alike (their values: copied by the caller)
        theirs = SoftPrompts.attach(dist.fsdp_root(twin))
        for name, p in prompts.prompts.items():
            theirs.add(name, torch.empty(p.shape, dtype=p.dtype))
        theirs.active, theirs.select = list(prompts.active), prompts.select
    return twin


def call_trainer(trainer: pl.Trainer, method: str, module: CLModule, **kwargs) -> object:
    """`trainer.<method>(module, **kwargs)` ("fit", "validate", "predict"), then the module back on
    the trainer's device: Lightning's single-device and DDP teardown moves it to the CPU after every
    call, and the next Trainer, a strategy's side computation or a checkpoint expects it in place.
    After a fit the Trainer's optimizer is dropped: the module still points at its Trainer, which
    would otherwise keep two moments per parameter alive through evaluation and prior scoring
    (the moments carried to the next task live in the module, by name)."""
    out = getattr(trainer, method)(module, **kwargs)
    module.to(trainer.strategy.root_device)
    if method == "fit":
        trainer.strategy.optimizers, trainer.strategy.lr_scheduler_configs = [], []
    return out

"""Soft prompts: trained vectors in front of every input of a causal LM, for prompt-based strategies.

`SoftPrompts` is a submodule of the Hugging Face causal LM itself (`clbench.distributed.fsdp_root`:
inside a peft wrapper, the model it wraps, whose forward and generate every caller reaches), so its
tensors are model parameters: the optimizer, DDP's gradient sync, FSDP2's root unit, checkpoints and
resume all see them. Two hooks on that causal LM rewrite every call while prompts act, so the
training forward, CLModule.generate, generate_text and lm-eval's HFLM all see them, none changed:

    prefill (no cache, or an empty one), n prompt rows in all:
        inputs_embeds  = [prompt rows, embed(input_ids)]                  (B, n + L, d)
        attention_mask = [1 x n, mask]; position_ids + n, the prompt at 0..n-1 (caller's ids), or
                         from the new mask (clbench.data.collate.position_ids_for) when none came
        labels         = [-100 x (n + 1), labels[:, 1:]]: the loss counts the tokens it counted
                         without prompts (labels[:, 0] is never predicted there either)
        logits (and hidden states) of the prompt rows dropped afterwards: callers index them as
                         without prompts (LwF, lm-eval's log-likelihoods)
    decode (a cache holding the prompt): attention_mask = [1 x n, mask], position_ids + n

Left padding stays right: [P P pad pad x1 x2], mask [1 1 0 0 1 1], x1 at position n, as in training.
transformers 5.x passes no cache_position (it was removed); positions come from position_ids, which
generate derives from the attention mask and grows by one per step.

The prompt rows are either the named prompts made active (`active`, concatenated in that order and
the same for every row) or, when a strategy sets `select`, what it returns for the batch: a callable
(input_ids, inputs_embeds, attention_mask) -> (B, n, d), called inside the forward on the prefill
(L2P's per-input pool lookup). Under FSDP2 the hooks run after FSDP's own pre-forward (registered
with prepend=True, so first whatever the order of registration), which has gathered the root's
parameters: embeddings and prompts are whole inside them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from clbench.data.collate import IGNORE_INDEX, position_ids_for
from clbench.errors import ConfigError

Selector = Callable[[Tensor | None, Tensor, Tensor | None], Tensor]

ATTRIBUTE = "clbench_soft_prompts"  # the submodule's name on the causal LM


class SoftPrompts(nn.Module):
    """Named prompt tensors (n_i x hidden each), which of them act and in what order.

    Attach it with `SoftPrompts.attach(causal_lm)`; it then rewrites that model's calls (module
    docstring)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.prompts = nn.ParameterDict()
        self.active: list[str] = []
        self.select: Selector | None = None
        self._kept: int | None = None  # the caller's length L on a prefill in flight (for the logits)

    @staticmethod
    def of(lm: nn.Module) -> SoftPrompts | None:
        return getattr(lm, ATTRIBUTE, None)

    @staticmethod
    def attach(lm: nn.Module) -> SoftPrompts:
        """The SoftPrompts of causal LM `lm`, made and hooked in on first use."""
        prompts = SoftPrompts.of(lm)
        if prompts is None:
            prompts = SoftPrompts(lm.get_input_embeddings().embedding_dim)
            lm.add_module(ATTRIBUTE, prompts)
            # bound methods, not closures: a deep copy of the model (a frozen copy) hooks its own copy
            lm.register_forward_pre_hook(prompts._before, with_kwargs=True)
            lm.register_forward_hook(prompts._after)
        return prompts

    def add(self, name: str, init: Tensor) -> None:
        if not name.isidentifier() or name in self.prompts:
            raise ValueError(f"soft prompt {name!r}: a new name of letters, digits and underscores")
        if init.dim() != 2 or init.shape[1] != self.hidden:
            raise ValueError(
                f"soft prompt {name!r}: init must be (n_tokens, {self.hidden}), got {tuple(init.shape)}"
            )
        self.prompts[name] = nn.Parameter(init.detach().clone(), requires_grad=False)

    @property
    def acting(self) -> bool:
        return bool(self.active) or self.select is not None

    def rows(self, ids: Tensor | None, embeds: Tensor, mask: Tensor | None) -> Tensor:
        """The prompt rows of this batch, (B, n, d) in the embeddings' dtype."""
        if self.select is not None:
            rows = self.select(ids, embeds, mask)
        else:
            rows = torch.cat([self.prompts[name] for name in self.active])  # (n, d)
            rows = rows.unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return rows.to(embeds.dtype)

    def _before(self, lm: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        self._kept = None
        if not self.acting:
            return None
        kwargs = dict(zip(_argument_names(type(lm).forward), args)) | kwargs  # lm-eval: input_ids by position
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            return (), self._prefill(lm, kwargs)
        return (), _decode(kwargs, cache.get_seq_length())

    def _prefill(self, lm: nn.Module, kwargs: dict) -> dict:
        ids, embeds, mask = kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
        if embeds is None:
            embeds = lm.get_input_embeddings()(ids)
        prompt = self.rows(ids, embeds, mask)  # (B, n, d)
        (batch, n), length = prompt.shape[:2], embeds.shape[1]
        kwargs["input_ids"], kwargs["inputs_embeds"] = None, torch.cat([prompt, embeds], 1)
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], 1)
        positions = kwargs.get("position_ids")
        if positions is not None:
            front = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(batch, n)
            kwargs["position_ids"] = torch.cat([front, positions + n], 1)
        elif mask is not None:
            kwargs["position_ids"] = position_ids_for(kwargs["attention_mask"])
        labels = kwargs.get("labels")
        if labels is not None:
            kwargs["labels"] = torch.cat([labels.new_full((batch, n + 1), IGNORE_INDEX), labels[:, 1:]], 1)
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, Tensor):  # indices into the caller's positions
            kwargs["logits_to_keep"] = keep + n
        self._kept = length
        return kwargs

    def _after(self, lm: nn.Module, args: tuple, out: object) -> object:
        length, self._kept = self._kept, None
        if length is None or not hasattr(out, "logits"):
            return out
        if out.logits is not None and out.logits.shape[1] > length:
            out.logits = out.logits[:, -length:]  # logits_to_keep 0: every position, the prompt's too
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(h[:, -length:] for h in out.hidden_states)
        return out


@functools.cache
def refuse_adapters(module: nn.Module, what: str) -> None:
    """One line for a prompt method given model.lora: it freezes the backbone, so LoRA adapters
    beside its prompts would stay frozen at zero. `what`: "<strategy> trains <its prompts>"."""
    if module.adapter_names():
        why = "LoRA adapters would stay frozen at zero"
        raise ConfigError(f"{what} on a frozen model: unset model.lora ({why})")


def _argument_names(forward: Callable) -> list[str]:
    return list(inspect.signature(forward).parameters)[1:]  # after self


def _decode(kwargs: dict, past: int) -> dict:
    """A decode step: the cache holds the prompt; the mask and positions, the caller's tokens only."""
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is None:  # positions then default to the cache's length, which counts the prompt
        return kwargs
    step = (kwargs.get("inputs_embeds") if kwargs.get("input_ids") is None else kwargs["input_ids"]).shape[1]
    n = past + step - mask.shape[1]  # the mask covers the caller's past and present tokens
    kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], 1)
    if positions is not None:
        kwargs["position_ids"] = positions + n
    return kwargs


def vocab_init(lm: nn.Module, n_tokens: int, seed: int) -> Tensor:
    """The input embeddings of n_tokens vocabulary tokens drawn at random from `seed` (Lester et al.'s
    and Progressive Prompts' initialisation), (n_tokens, d), detached."""
    table = lm.get_input_embeddings().weight
    tokens = torch.randint(table.shape[0], (n_tokens,), generator=torch.Generator().manual_seed(seed))
    return table.detach()[tokens.to(table.device)].clone()


def set_trainable(prompts: SoftPrompts, active: Sequence[str], trainable: Sequence[str], pool: bool) -> None:
    """Which named prompts act (in order) and which train (within `active`, or any of them for a
    `pool` that a selector draws from); every other one is frozen."""
    known = set(prompts.prompts)
    if not set(active) <= known or not set(trainable) <= (known if pool else set(active)):
        within = "among them" if pool else "within active"
        raise ValueError(
            f"set_prompts: active {list(active)} and trainable {list(trainable)} must be among "
            f"{sorted(known)}, trainable {within}"
        )
    prompts.active = list(active)
    for name, p in prompts.prompts.items():
        p.requires_grad_(name in trainable)

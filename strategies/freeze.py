"""Freeze: keep chosen parameters fixed (lower transformer blocks, embeddings, a name pattern).

Zheng et al. 2025, "Spurious Forgetting in Continual Learning of Language Models" (ICLR 2025):
much of the forgetting seen after fine-tuning on a new task is a loss of task alignment in the
bottom layers, and freezing the lower blocks (and the input embeddings) protects it.

Freezing sets `requires_grad = False` in `on_task_start`, before the runner builds the Trainer, so
`CLModule.configure_optimizers` never hands those tensors to AdamW: they stay bit-identical. Once
frozen, a tensor stays frozen for the rest of the run. By default it applies from the first task
(`from_task` = 0), as Zheng et al. freeze throughout; `from_task` = 1 lets the first task train
everything and protects what it learned.

Layers are the numbered blocks of the usual layouts (`model.layers.12.` in Llama/Qwen/Mistral,
`transformer.h.3.` in GPT-2, `gpt_neox.layers.5.`), found under peft prefixes too. Embeddings and
the LM head are found by identity through `get_input_embeddings` / `get_output_embeddings`, so a
tied pair (SmolLM2) is one tensor: freezing either freezes both.
"""

from __future__ import annotations

import re

import torch

from clbench.errors import ConfigError
from clbench.models import layer_index
from clbench.strategy import CLStrategy, StrategyContext


def parse_layers(spec: str) -> set[int]:
    """Layer indices of a spec such as "0-5", "0-3,8" or "7"; ranges are inclusive."""
    indices: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"freeze.layers: cannot read {part!r} in {spec!r}; write e.g. '0-5' or '0-3,8'")
        lo, hi = int(match[1]), int(match[2] or match[1])
        if hi < lo:
            raise ValueError(f"freeze.layers: range {part!r} runs backwards")
        indices.update(range(lo, hi + 1))
    return indices


class Freeze(CLStrategy):
    """Stop chosen parameters from training, from task `from_task` on.

    Args:
        layers: Blocks to freeze, as inclusive ranges such as "0-5" or "0-3,8".
        lower_layers: Freeze the lowest N blocks (0..N-1); an alternative to `layers`.
        pattern: Regular expression; parameters whose name it matches (re.search) are frozen too.
        freeze_embeddings: Freeze the input token embeddings (Zheng et al. freeze them with the lower blocks).
        freeze_lm_head: Freeze the output head (the same tensor as the embeddings when they are tied).
        from_task: First task index (0-based) trained with the parameters frozen.
    """

    def __init__(
        self,
        layers: str | None = None,
        lower_layers: int | None = None,
        pattern: str | None = None,
        freeze_embeddings: bool = True,
        freeze_lm_head: bool = False,
        from_task: int = 0,
    ) -> None:
        if layers is not None and lower_layers is not None:
            raise ValueError("freeze.layers and freeze.lower_layers are alternatives; give one")
        if lower_layers is not None and lower_layers < 1:
            raise ValueError(f"freeze.lower_layers must be >= 1, got {lower_layers}")
        if from_task < 0:
            raise ValueError(f"freeze.from_task must be >= 0, got {from_task}")
        try:
            self.regex = re.compile(pattern) if pattern is not None else None
        except re.error as e:
            raise ValueError(f"freeze.pattern {pattern!r} is not a regular expression: {e}") from None
        self.layers = parse_layers(layers) if layers is not None else None
        if lower_layers is not None:
            self.layers = set(range(lower_layers))
        self.freeze_embeddings, self.freeze_lm_head = freeze_embeddings, freeze_lm_head
        self.from_task = from_task

    def on_task_start(self, ctx: StrategyContext) -> None:
        if ctx.task_index < self.from_task:
            return
        for p in self.selected(ctx.model).values():
            p.requires_grad_(False)

    def selected(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The named parameters this strategy freezes in `model` (trainable or not)."""
        named = dict(model.named_parameters())  # tied tensors appear once, under their first name
        chosen = {n: p for n, p in named.items() if self._by_name(n)}
        if (self.layers is not None or self.regex is not None) and not chosen:
            layers = sorted(self.layers or [])
            raise ConfigError(f"freeze.layers={layers} / freeze.pattern={self.pattern!r} match no parameter")
        special = self._special(model)
        chosen.update({n: p for n, p in named.items() if id(p) in special})
        return chosen

    @property
    def pattern(self) -> str | None:
        return self.regex.pattern if self.regex is not None else None

    def _by_name(self, name: str) -> bool:
        index = layer_index(name)
        in_layers = self.layers is not None and index is not None and index in self.layers
        return in_layers or (self.regex is not None and self.regex.search(name) is not None)

    def _special(self, model: torch.nn.Module) -> set[int]:
        ids: set[int] = set()
        for wanted, module in (
            (self.freeze_embeddings, model.get_input_embeddings()),
            (self.freeze_lm_head, model.get_output_embeddings()),
        ):
            if wanted and module is not None:
                ids.update(id(p) for p in module.parameters())
        return ids

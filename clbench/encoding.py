"""What a frozen model says about an input: its last hidden states averaged over the input's tokens.

SSR selects diverse synthetic inputs by it and MbPA++ keys its episodic memory by it (a frozen
encoder, so the space does not drift while the model trains).
"""

from __future__ import annotations

import torch

from clbench.data.collate import position_ids_for


@torch.no_grad()
def mean_last_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    over: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, d) fp32: each row's last-layer hidden states averaged over its unmasked tokens (left padding
    and positions from the mask, as the model is trained), or over the tokens `over` (B, T) marks (the
    prompt of a prompt-and-answer row: in a causal model they are what the prompt alone gives). A
    sharded model needs every rank to call it together (each may pass its own rows)."""
    hidden = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        output_hidden_states=True,
    ).hidden_states[-1]
    weights = (attention_mask if over is None else over).unsqueeze(-1).float()
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1)

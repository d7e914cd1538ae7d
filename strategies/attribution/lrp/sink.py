"""Collects per-sample parameter relevance during the backward and hands it on, one tensor at a time.

A parameter can be used more than once (tied embeddings: the input lookup and lm_head), so the
sink counts uses during the forward and emits a parameter's (B, *shape) map once its last use has
reported in the backward. Row contributions (embedding lookups, the seed row of lm_head) stay
sparse until then, so a tied embedding never holds two dense (B, vocab, d) maps; with `row_maps`, a
parameter that only row pieces reach is handed on as a RowMap and never becomes dense at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class RowMap:
    """A per-sample map (B, *shape) that is zero outside a few rows: what an embedding gets (B x vocab
    x d floats dense, 113 MB a sample for SmolLM2) when a batch looks up a few hundred tokens.

    Args:
        rows: (n,) distinct row indices, ascending: the rows some sample of the batch touches.
        values: (B, n, *shape[1:]) the map's rows: values[k, i] is row rows[i] of sample k.
        shape: The parameter's shape (the per-sample map's).
    """

    rows: Tensor
    values: Tensor
    shape: tuple[int, ...]

    def dense(self) -> Tensor:
        out = self.values.new_zeros((self.values.shape[0], *self.shape))
        out[:, self.rows] = self.values
        return out

    def between(self, lo: int, hi: int) -> RowMap:
        """Rows lo..hi-1 as a map of that slice of the parameter (a rank's shard of rows)."""
        keep = (self.rows >= lo) & (self.rows < hi)
        return RowMap(self.rows[keep] - lo, self.values[:, keep], (hi - lo, *self.shape[1:]))


Consumer = Callable[[str, Tensor | RowMap], None]


class RelevanceSink:
    """Per-parameter bookkeeping for one scoring pass.

    Args:
        model: The module whose named_parameters() give the names handed to the consumer.
        batch: Number of samples B.
        dtype: Accumulation dtype of the relevance maps (fp32, or fp64 for fp64 models).
        consumer: Called as consumer(name, relevance) with relevance of shape (B, *param.shape).
        row_maps: Hand on a RowMap, not a dense tensor, for a parameter that only row pieces reach
            (embedding lookups, the lm_head seed row; both for tied weights).
    """

    def __init__(
        self, model: nn.Module, batch: int, dtype: torch.dtype, consumer: Consumer, row_maps: bool = False
    ) -> None:
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.params = {id(p): p for _, p in model.named_parameters()}
        self.batch = batch
        self.dtype = dtype
        self.consumer = consumer
        self.row_maps = row_maps
        self.uses: dict[int, int] = {}
        self.zero: set[int] = set()
        self.pending: dict[int, list] = {}
        self.emitted: set[int] = set()

    def use(self, param: Tensor) -> None:
        """Forward: `param` will report one contribution in the backward."""
        self.uses[id(param)] = self.uses.get(id(param), 0) + 1

    def declare_zero(self, param: Tensor | None) -> None:
        """Forward: `param` gets no relevance (norm weights, inactive adapters)."""
        if param is not None:
            self.zero.add(id(param))

    def check_coverage(self, model_type: str) -> None:
        """Refuse a model with parameters the engine does not know how to score."""
        unknown = [n for i, n in self.names.items() if i not in self.uses and i not in self.zero]
        if unknown:
            raise ValueError(
                f"parameter attribution does not support these parameters of a {model_type!r} model: "
                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
            )

    def add(self, param: Tensor, relevance: Tensor) -> None:
        """Backward: a dense contribution of shape (B, *param.shape)."""
        self._report(param, relevance)

    def add_rows(self, param: Tensor, rows: Tensor, values: Tensor) -> None:
        """Backward: relevance `values` (B, n, *param.shape[1:]) of the rows `rows` (B, n) of `param`."""
        self._report(param, (rows, values))

    def _report(self, param: Tensor, piece) -> None:
        key = id(param)
        self.pending.setdefault(key, []).append(piece)
        if len(self.pending[key]) == self.uses[key]:
            self._emit(key, self.pending.pop(key))

    def _emit(self, key: int, pieces: list) -> None:
        param = self.params[key]
        self.emitted.add(key)
        if self.row_maps and not any(isinstance(p, Tensor) for p in pieces):
            self.consumer(self.names[key], _row_map(tuple(param.shape), pieces, self.dtype))
            return
        dense = [p for p in pieces if isinstance(p, Tensor)]
        total = dense[0] if dense else param.new_zeros((self.batch, *param.shape), dtype=self.dtype)
        for extra in dense[1:]:
            total = total + extra
        for rows, values in (p for p in pieces if not isinstance(p, Tensor)):
            _scatter_rows(total, rows, values)
        self.consumer(self.names[key], total)

    def finish(self) -> None:
        """After the backward: emit zeros for the zero-relevance parameters, in model order."""
        if self.pending:
            missing = [self.names[k] for k in self.pending]
            raise RuntimeError(f"attribution backward did not reach every use of {missing}")
        for key, name in self.names.items():
            if key not in self.emitted:
                param = self.params[key]
                self.consumer(name, param.new_zeros((self.batch, *param.shape), dtype=self.dtype))


def _scatter_rows(total: Tensor, rows: Tensor, values: Tensor) -> None:
    """total[k, rows[k, t]] += values[k, t] for every sample k and slot t (repeats add up)."""
    batch, vocab = total.shape[:2]
    flat = total.view(batch * vocab, *total.shape[2:])  # (B * V, *rest)
    index = (rows + vocab * torch.arange(batch, device=rows.device)[:, None]).reshape(-1)
    flat.index_add_(0, index, values.reshape(-1, *total.shape[2:]).to(total.dtype))


def _row_map(shape: tuple[int, ...], pieces: list, dtype: torch.dtype) -> RowMap:
    """Row pieces as one RowMap over the rows any sample touches, repeats added up in the order
    _scatter_rows adds them (so its rows are bit for bit those of the dense map)."""
    rows = torch.cat([r for r, _ in pieces], 1)  # (B, n)
    values = torch.cat([v.to(dtype) for _, v in pieces], 1)  # (B, n, *rest)
    union, slot = torch.unique(rows, return_inverse=True)
    merged = values.new_zeros((rows.shape[0], len(union), *shape[1:]))
    _scatter_rows(merged, slot, values)
    return RowMap(union, merged, shape)

"""Importance priors (arXiv 2605.05285 section 4.2, Eq. 10-13): per-sample scores, normalisation,
streaming top-K mean, the historical gate, and a cache of priors on disk.

See docs/attribution.md section 5. For a parameter tensor W and a sample k with relevance R_k(W):

    Eq. 10   R^_k = sign(R_k) log(1 + |R_k|) / (max over W's elements of log(1 + |R_k|) + eps)
    Eq. 11   prior(W) = per element, the mean of the K largest R^_k over the scored samples
    Eq. 12   Rbar = clamp(max over earlier tasks of prior, min=0)   (one tensor per parameter)
    Eq. 13   g <- (1 - Rbar) * g

"Largest" is over signed values (reading 3.8): negatively relevant parameters are never protected.
With fewer than K samples the mean is over the samples there are. The K values per element are kept in
bf16 by default (about 3 significant digits; values lie in [-1, 1]) or in fp32, exactly.

Estimators (the ablations of the importance source's scoring rule), all normalised by Eq. 10:
  lrp            parameter-level LRP of the argmax logit at the last prompt position (the paper);
  grad_x_weight  signed gradient x weight of the same logit (first-order Taylor, one sample at a time);
  fisher         squared gradients of the answer loss (empirical Fisher, one sample at a time);
  magnitude      |theta| of the model itself (no samples; the trivial baseline), normalised alike.
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from clbench import distributed as dist
from clbench.console import progress
from clbench.errors import ConfigError
from clbench.files import atomic_path
from clbench.gradients import grads_of, squared_grads
from strategies.attribution.lrp import scoring_scope, stream_parameter_relevance
from strategies.attribution.lrp.sink import RowMap

EPS = 1e-8
Tensors = dict[str, Tensor]
Consumer = Callable[[str, Tensor | RowMap], None]
METADATA_KEY = "clbench.prior"
SPAN = 1 << 20  # elements per slot row that TopKMean works on at once: bounds its temporaries


def normalise(relevance: Tensor | RowMap, eps: float = EPS, sharded: bool = False) -> Tensor | RowMap:
    """Eq. 10 per sample and per tensor: (B, *shape) -> (B, *shape) in [-1, 1], fp32.

    `sharded`: `relevance` is this rank's shard of each sample's map; the maximum over the whole
    tensor is then a MAX all-reduce of the shards' maxima (every rank must call it). A RowMap stays
    one: its untouched elements are 0 and log1p(0) = 0 never raises the maximum over its rows."""
    if isinstance(relevance, RowMap):
        return RowMap(relevance.rows, normalise(relevance.values, eps, sharded), relevance.shape)
    # one temporary the size of the maps: sign(R) log1p|R| / d == copysign(log1p|R| / d, R) exactly
    out = relevance.abs().float().log1p_()  # (B, *shape)
    peak = out.reshape(out.shape[0], -1).amax(1) if out[0].numel() else out.new_zeros(out.shape[0])
    if sharded:
        dist.all_reduce_(peak, "max")
    out.div_(peak.view(-1, *[1] * (out.dim() - 1)) + eps)
    return out.copysign_(relevance.float() if relevance.dtype != torch.float32 else relevance)


class TopKMean:
    """Eq. 11, streaming: the K largest values seen per element, and their mean.

    K slots per element in `dtype` (bf16: 2K bytes per element; fp32 is exact), merged in place one
    sample at a time: while fewer than K samples are in, a sample fills the next slot; the sample
    that finds them full sorts them (descending, per element) and is inserted, and so is every later
    one: an insertion network of K max/min pairs over contiguous slot rows keeps each element's K
    largest values sorted, and the smallest falls out. Why not "replace each element's smallest
    slot": its min and scatter over the K-strided slots cost 6x the network per element and sample,
    and a prior folds up to max_prior_samples samples into every element. `mean` is fp32 and, in
    fp32, bit for bit the mean of the values in arrival order (n <= K) or sorted descending (n > K,
    the order torch.topk gives). A RowMap's untouched elements count as the value 0.
    """

    def __init__(self, k: int, dtype: torch.dtype = torch.bfloat16) -> None:
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {k}")
        self.k, self.dtype = k, dtype
        self.slots: Tensors = {}  # (K, *shape) in dtype; the first min(n, K) are filled
        self.count: dict[str, int] = {}

    def add(self, name: str, values: Tensor | RowMap) -> None:
        """Fold in a batch of per-sample values (B, *shape), dense or a RowMap."""
        sparse = isinstance(values, RowMap)
        dense, shape = (values.values, values.shape) if sparse else (values, tuple(values.shape[1:]))
        if name not in self.slots:
            self.slots[name] = torch.empty((self.k, *shape), dtype=self.dtype, device=dense.device)
            self.count[name] = 0
        slots = self.slots[name]
        for sample in dense.to(slots.device, self.dtype):
            if sparse:
                _fold_rows(slots, self.count[name], values.rows.to(slots.device), sample)
            else:
                _fold(slots.view(self.k, -1), self.count[name], sample.reshape(-1))
            self.count[name] += 1

    def mean(self, name: str) -> Tensor:
        """The fp32 mean of each element's slots."""
        n = self.count[name]
        kept = self.slots[name][: min(n, self.k)]  # n > K: sorted descending by the folds
        if kept.dtype == torch.float32:
            return kept.mean(0)  # the reduction of the contiguous (K, *shape) topk values: the same bits
        out = torch.zeros(kept.shape[1:], dtype=torch.float32, device=kept.device)
        flat = out.view(-1)
        for row in kept.reshape(len(kept), -1):  # one slot at a time: no fp32 copy of all K
            for cols in _spans(flat.numel()):  # and span by span: on the CPU `fp32 += bf16` first
                flat[cols] += row[cols]  # casts the whole bf16 operand, a tensor-sized fp32 temporary
        return out.div_(len(kept))  # in place: no second fp32 tensor either

    def pop(self, name: str) -> Tensor:
        """`mean(name)`, then its slots freed: all slots and the whole fp32 prior are never held together."""
        out = self.mean(name)
        del self.slots[name], self.count[name]
        return out


def _spans(n: int) -> Iterator[slice]:
    return (slice(start, start + SPAN) for start in range(0, n, SPAN))


def _fold(slots: Tensor, filled: int, value: Tensor) -> None:
    """One sample's `value` ((N,), or a 0-dim tensor for all) into `slots` (K, N), in place."""
    if filled < slots.shape[0]:
        slots[filled] = value
        return
    for cols in _spans(slots.shape[1]):
        _insert(slots[:, cols], filled, value[cols] if value.dim() else value)


def _insert(part: Tensor, filled: int, value: Tensor) -> None:
    """`value` ((n,) or 0-dim) into full slots `part` (K, n), kept sorted descending per element
    (sorted here when they first become full, `filled` == K); the smallest of the K + 1 drops out."""
    if filled == part.shape[0]:
        part.copy_(part.sort(0, descending=True).values)
    value, spare = value.expand(part.shape[1:]).clone(), torch.empty_like(part[0])
    for row in part:  # row i keeps the larger, the smaller moves on to row i + 1
        torch.minimum(row, value, out=spare)
        torch.maximum(row, value, out=row)
        value, spare = spare, value


def _fold_rows(slots: Tensor, filled: int, rows: Tensor, value: Tensor) -> None:
    """One sample of a RowMap, `value` (n, *rest) on `rows` (n,), into `slots` (K, V, *rest): 0 into
    every element, except that the touched rows fold their values instead."""
    touched = slots[:, rows]  # (K, n, *rest), a copy
    _fold(slots.view(slots.shape[0], -1), filled, value.new_zeros(()))
    _fold(touched.view(slots.shape[0], -1), filled, value.reshape(-1))
    slots[:, rows] = touched


def fold_max(rbar: Tensors, prior: Tensors) -> None:
    """Eq. 12, incrementally: Rbar <- max(Rbar, clamp(prior, 0)), in place, on Rbar's device."""
    for name, p in prior.items():
        p = p.float().clamp(min=0)
        if name in rbar:
            torch.maximum(rbar[name], p.to(rbar[name].device), out=rbar[name])
        else:
            rbar[name] = p.clone()


# -- per-sample scores ------------------------------------------------------------------------


def _lrp(model: nn.Module, batch: dict, params: Tensors, consume: Consumer) -> None:
    # Under FSDP2 the engine reads whole weights (unsharded, every rank the same samples) and each
    # rank keeps its rows of every map: per-sample maps are never summed across ranks.
    def keep(name: str, relevance: Tensor | RowMap) -> None:
        if name in params:
            consume(name, _local_rows(params[name], relevance))

    with dist.unsharded(model):
        stream_parameter_relevance(model, batch["input_ids"], batch["attention_mask"], keep, row_maps=True)


def _local_rows(param: Tensor, relevance: Tensor | RowMap) -> Tensor | RowMap:
    """This rank's rows of a per-sample map (dist.local_rows); a RowMap is cut without densifying
    when `param` is sharded on dim 0 over a 1-D mesh (FSDP2's layout), densified otherwise."""
    if not dist.is_sharded(param):
        return relevance
    if not isinstance(relevance, RowMap):
        return dist.local_rows(param, relevance)
    from torch.distributed.tensor import Shard

    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        return dist.local_rows(param, relevance.dense())
    size = -(-param.shape[0] // param.device_mesh.size())  # torch.chunk's rows per rank
    lo = min(param.device_mesh.get_local_rank() * size, param.shape[0])
    return relevance.between(lo, lo + dist.local(param).shape[0])


def _unpadded(batch: dict, i: int) -> dict:
    """Row i of a left-padded batch without its padding, as a batch of one."""
    keep = batch["attention_mask"][i].bool()
    return {k: v[i : i + 1, keep] for k, v in batch.items() if k in ("input_ids", "labels")}


def _grad_x_weight(model: nn.Module, batch: dict, params: Tensors, consume: Consumer) -> None:
    for i in range(batch["input_ids"].shape[0]):
        row = _unpadded(batch, i)
        logits = model(input_ids=row["input_ids"]).logits[0, -1]  # (V,) at the seed position
        for name, g in grads_of(logits.max(), params).items():
            consume(name, dist.local(g.float() * params[name].detach().float())[None])


def _fisher(model: nn.Module, batch: dict, params: Tensors, consume: Consumer) -> None:
    for i in range(batch["input_ids"].shape[0]):
        row = _unpadded(batch, i)
        loss = model(input_ids=row["input_ids"], labels=row["labels"]).loss
        for name, g in squared_grads(loss, params).items():
            consume(name, dist.local(g)[None])


ESTIMATORS: dict[str, Callable[[nn.Module, dict, Tensors, Consumer], None]] = {
    "lrp": _lrp,
    "grad_x_weight": _grad_x_weight,
    "fisher": _fisher,
}
NEEDS_ANSWERS = {"fisher"}  # batches with answers (training layout) rather than prompts only


def task_prior(
    model: nn.Module,
    params: Tensors,
    batches: Iterable[dict],
    estimator: str,
    k: int,
    eps: float = EPS,
    chunk: int = 4,
    store_dtype: torch.dtype = torch.bfloat16,
    desc: str = "scoring",
) -> tuple[Tensors, int]:
    """The prior (Eq. 10-11) of `params` over the samples in `batches`; returns it (fp32, on the CPU,
    or laid out like the parameters when they are sharded) and the number of samples. No sample: a
    zero prior. The top-K values are kept in `store_dtype` (TopKMean). A progress bar (`desc`)
    counts the samples scored.

    Batches are scored `chunk` rows at a time: per-sample maps are (B, *param.shape) (LRP hands the
    embeddings on as RowMaps of the looked-up rows), so memory, not speed, sets the scoring batch.

    Several ranks (every rank passes the same batches): LRP on parameters sharded by FSDP2 splits
    the chunks over the ranks (`_split_lrp`), so N ranks score about N times faster, with the prior
    one process computes bit for bit. The gradient estimators score every sample on every rank:
    their per-sample gradients come from FSDP2's backward, whose reduce-scatter averages the ranks'
    gradients, so each rank must differentiate the same sample."""
    agg, n = TopKMean(k, store_dtype), 0
    device = dist.local(next(iter(params.values()))).device
    parts = [
        {k_: v[start : start + chunk].to(device) if torch.is_tensor(v) else v for k_, v in batch.items()}
        for batch in batches
        for start in range(0, batch["input_ids"].shape[0], chunk)
    ]
    total = sum(part["input_ids"].shape[0] for part in parts)
    with scoring_scope(model), progress(desc, total, "sample") as advance:
        model.eval()  # dropout off (the LRP engine does so itself)
        if estimator == "lrp" and _split_mesh(params) is not None:
            n = _split_lrp(model, params, parts, agg, eps, advance)
        else:
            score = ESTIMATORS[estimator]

            def consume(name: str, r: Tensor | RowMap) -> None:
                agg.add(name, normalise(r, eps, sharded=dist.is_sharded(params[name])))

            for part in parts:
                score(model, part, params, consume)
                n += part["input_ids"].shape[0]
                advance(part["input_ids"].shape[0])
    return {name: _laid_out(p, agg.pop(name) if n else None) for name, p in params.items()}, n


def _split_mesh(params: Tensors) -> object | None:
    """The 1-D device mesh every parameter is sharded on dim 0 over (FSDP2's layout), when it spans
    more than one rank: then LRP can split its samples over the ranks. None otherwise."""
    from torch.distributed.tensor import Shard

    meshes = {id(p.device_mesh): p.device_mesh for p in params.values() if dist.is_sharded(p)}
    if len(meshes) != 1 or not all(dist.is_sharded(p) for p in params.values()):
        return None
    mesh = next(iter(meshes.values()))
    layout_ok = all(tuple(p.placements) == (Shard(0),) for p in params.values())
    return mesh if mesh.ndim == 1 and mesh.size() > 1 and layout_ok else None


def _split_lrp(
    model: nn.Module,
    params: Tensors,
    parts: list[dict],
    agg: TopKMean,
    eps: float,
    advance: Callable[[int], None],
) -> int:
    """LRP priors with the chunks split over the ranks; returns the number of samples (all ranks').

    Why: with the whole model gathered, every rank can score any sample, and each element's top-K
    only needs every sample's value of that element. Rounds of W chunks (W ranks): rank r scores
    chunk iW + r, normalises each per-sample map whole (Eq. 10's max over the whole tensor, as one
    process does) and sends every rank the rows of its shard, in the slots' dtype; each rank then
    folds what it received in rank order, which is the chunks' global order. Every map is the one
    process's (same chunk, same padding, same weights) and is folded in the same order, so the
    prior is bit for bit one process's. A rank without a chunk in the last round scores one sample
    of the first chunk and sends nothing (the engine's per-tensor calls, and so the exchanges, stay
    in step on every rank). The model is gathered once for all rounds."""
    mesh = _split_mesh(params)
    world, me, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()
    spare = {k_: v[:1] if torch.is_tensor(v) else v for k_, v in parts[0].items()} if parts else None

    with dist.unsharded(model):
        for first in range(0, len(parts), world):
            mine = parts[first + me] if first + me < len(parts) else None

            def keep(name: str, relevance: Tensor | RowMap, real: bool = mine is not None) -> None:
                if name in params:
                    sent = relevance if real else None
                    for got in _exchange_rows(name, params[name], sent, agg, eps, group):
                        if got is not None:
                            agg.add(name, got)

            part = mine if mine is not None else spare
            stream_parameter_relevance(model, part["input_ids"], part["attention_mask"], keep, row_maps=True)
            advance(sum(p["input_ids"].shape[0] for p in parts[first : first + world]))
    return sum(part["input_ids"].shape[0] for part in parts)


def _exchange_rows(
    name: str, param: Tensor, relevance: Tensor | RowMap | None, agg: TopKMean, eps: float, group: object
) -> list[Tensor | RowMap | None]:
    """Every rank's Eq. 10-normalised map of `name` (None: it scored nothing this round), cut to this
    rank's rows of `param`, in rank order; a RowMap stays one. Values travel in the slots' dtype
    (TopKMean.add casts to it anyway). One header exchange (who sends how much), then the payload."""
    world, me, tag = group.size(), group.rank(), zlib.crc32(name.encode())
    bounds, rest, dtype = dist.dim0_bounds(param.shape[0], world), tuple(param.shape[1:]), agg.dtype
    device = dist.local(param).device
    header = torch.tensor([[tag, 0, 0]] * world, dtype=torch.int64, device=device)  # tag, samples, rows
    send: list[list[tuple[Tensor, torch.dtype]]] = [[] for _ in range(world)]
    if relevance is not None:
        normed = normalise(relevance, eps)  # the whole map's max, as in one process
        for q, (lo, hi) in enumerate(bounds):
            if isinstance(normed, RowMap):
                cut = normed.between(lo, hi)
                header[q, 1], header[q, 2] = cut.values.shape[0], cut.rows.numel()
                send[q] = [(cut.rows, torch.int64), (cut.values, dtype)]
            else:
                header[q, 1], header[q, 2] = normed.shape[0], -1  # dense: this rank's rows, all of them
                send[q] = [(normed[:, lo:hi], dtype)]
    got = dist.all_to_all_bytes([[(h, torch.int64)] for h in header], [3 * 8] * world, device, group)
    headers = [h.view(torch.int64).tolist() for h in got]
    lo, hi = bounds[me]
    row_bytes = int(np.prod(rest, dtype=np.int64)) * dtype.itemsize
    for h in headers:
        if h[0] != tag:
            raise RuntimeError(f"attribution: ranks out of step while exchanging the relevance of {name}")
    expect = [n * 8 + b * n * row_bytes if n >= 0 else b * (hi - lo) * row_bytes for _, b, n in headers]
    payload = dist.all_to_all_bytes(send, expect, device, group)
    del send
    out: list[Tensor | RowMap | None] = []
    for (_, b, n), data in zip(headers, payload):
        if b == 0:
            out.append(None)
        elif n >= 0:
            rows, values = data[: n * 8].view(torch.int64), data[n * 8 :].view(dtype).view(b, n, *rest)
            out.append(RowMap(rows, values, (hi - lo, *rest)))
        else:
            out.append(data.view(dtype).view(b, hi - lo, *rest))
    return out


def _laid_out(param: Tensor, local_prior: Tensor | None) -> Tensor:
    """A prior from this rank's part (None: zeros): a CPU tensor, or a DTensor like `param`."""
    if not dist.is_sharded(param):
        return local_prior.cpu() if local_prior is not None else torch.zeros(param.shape, dtype=torch.float32)
    from torch.distributed.tensor import DTensor

    shard = dist.local(param)
    values = local_prior if local_prior is not None else torch.zeros(shard.shape, dtype=torch.float32)
    return DTensor.from_local(
        values.to(shard.device), param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )


def magnitude_prior(params: Tensors, eps: float = EPS) -> Tensors:
    """|theta| through Eq. 10 per tensor, laid out like `params`: the importance a source that looks
    at no data would give (large weights matter most)."""
    out = {}
    for name, p in params.items():
        value = normalise(dist.local(p).detach().abs()[None], eps, sharded=dist.is_sharded(p))[0]
        out[name] = _laid_out(p, value)
    return out


def permute_within(prior: Tensors, seed: int) -> Tensors:
    """Each tensor's elements shuffled by a permutation fixed by (seed, name)."""
    out = {}
    for name, t in prior.items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        out[name] = t.flatten()[torch.randperm(t.numel(), generator=g)].view_as(t)
    return out


@contextmanager
def rng_preserved(seed: int) -> Iterator[None]:
    """Seed every generator for a side computation, then put their states back (Lightning's isolate_rng)."""
    with isolate_rng():
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        yield


# -- identities and the store -----------------------------------------------------------------


def digest(obj: object, length: int = 16) -> str:
    """A short stable hash of a JSON-able object."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def parameter_signature(params: Tensors) -> str:
    """Hash of the parameter names and shapes a prior covers (refuses priors of another model)."""
    return digest([[name, list(p.shape)] for name, p in params.items()])


@dataclass
class PriorKey:
    """What a stored prior depends on; equal keys mean the same prior.

    model: model identity (name, LoRA settings, dtype); task: task name; data: hash of its training
    data and tokenisation; settings: scoring and single-task training settings and the seed.
    """

    model: dict
    task: str
    data: str
    settings: dict = field(default_factory=dict)

    def filename(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.task)
        return f"{safe}-{digest(asdict(self))}.safetensors"


class PriorStore:
    """Priors as safetensors files in one folder, named by task and key hash, with the full key,
    the parameter signature and how they were made in the metadata."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: PriorKey) -> Path:
        return self.root / key.filename()

    def load(self, key: PriorKey, signature: str) -> tuple[Tensors, dict] | None:
        """The stored prior and its metadata, None if absent; ConfigError if it does not match."""
        path = self.path(key)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
            prior = {name: f.get_tensor(name) for name in f.keys()}
        if meta.get("key") != json.loads(json.dumps(asdict(key), default=str)):
            raise ConfigError(
                f"prior_dir: {path} was stored for another key; delete it or use another prior_dir"
            )
        if meta.get("signature") != signature:
            raise ConfigError(
                f"prior_dir: {path} was computed for another model (parameter names and shapes hash "
                f"{meta.get('signature')}, this model {signature}); delete it or use another prior_dir"
            )
        return prior, meta

    def save(self, key: PriorKey, signature: str, prior: Tensors, info: dict) -> Path:
        """Write atomically (a temporary file, then rename), so readers never see half a prior."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"key": asdict(key), "signature": signature, **info}
        tensors = {name: t.detach().float().contiguous().cpu() for name, t in prior.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, default=str)})
        return path


def read_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))

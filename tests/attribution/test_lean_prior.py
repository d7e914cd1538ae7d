"""The lean prior: TopKMean's in-place K slots (fp32 bit for bit the concatenating version, bf16 within
its precision) and row-sparse embedding maps (RowMap) that give the priors of dense maps."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_model, padded_batch

import strategies.attribution.importance as importance
from strategies.attribution import Attribution
from strategies.attribution.importance import TopKMean, normalise, task_prior
from strategies.attribution.lrp import parameter_relevance, stream_parameter_relevance
from strategies.attribution.lrp.sink import RowMap

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def reference_topk_mean(batches: list[torch.Tensor], k: int) -> torch.Tensor:
    """The implementation TopKMean replaced: concatenate old and new values, keep the top K."""
    top = None
    for values in batches:
        merged = values if top is None else torch.cat([top, values])
        top = merged.topk(k, dim=0).values if merged.shape[0] > k else merged
    return top.mean(0)


def samples(n: int, seed: int = 0) -> torch.Tensor:
    """n samples of a (5, 33) map in [-1, 1] with ties: a column equal in every sample, repeated values."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, 5, 33, generator=g) * 2 - 1
    values[:, 0] = values[0, 0]  # one value in every sample
    values[:, 1] = (values[:, 1] * 4).round() / 4  # few distinct values
    values[:, 2] = -values[:, 2].abs()  # all negative
    return values


def fold(agg: TopKMean, values: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    for part in values.split(sizes):
        agg.add("w", part)
    return agg.mean("w")


SPLITS = {3: [1, 2], 8: [3, 5], 13: [2, 1, 4, 6], 30: [8, 8, 8, 6]}


@pytest.mark.parametrize("span", [importance.SPAN, 7], ids=["one-span", "many-spans"])
@pytest.mark.parametrize("n", sorted(SPLITS), ids=lambda n: f"n{n}")
def test_fp32_topk_mean_is_bit_for_bit_the_concatenating_version(n, span, monkeypatch):
    monkeypatch.setattr(importance, "SPAN", span)
    values = samples(n)
    got = fold(TopKMean(8, torch.float32), values, SPLITS[n])
    assert got.dtype == torch.float32
    assert torch.equal(got, reference_topk_mean(list(values.split(SPLITS[n])), 8))


@pytest.mark.parametrize("n", sorted(SPLITS), ids=lambda n: f"n{n}")
def test_bf16_topk_mean_is_within_bf16_precision(n):
    values = samples(n, seed=1)
    got = fold(TopKMean(8), values, SPLITS[n])
    exact = reference_topk_mean([values], 8)
    # bf16 keeps 8 significant bits: each kept value is off by at most 2^-9 of its magnitude (<= 1)
    assert got.dtype == torch.float32 and (got - exact).abs().max() <= 2**-9 + 1e-6


@pytest.mark.parametrize("span", [importance.SPAN, 7], ids=["one-span", "many-spans"])
@pytest.mark.parametrize("n", sorted(SPLITS), ids=lambda n: f"n{n}")
def test_bf16_topk_mean_is_bit_for_bit_the_top_k_of_the_rounded_values(n, span, monkeypatch):
    """bf16 slots keep exactly the K largest bf16-rounded values, summed in fp32 slot by slot in
    arrival order (n <= K) or descending (n > K): nothing but the rounding differs from fp32, and
    the mean's span-by-span sum (no tensor-sized fp32 temporary) is the whole-tensor sum."""
    monkeypatch.setattr(importance, "SPAN", span)
    values = samples(n, seed=2)
    got = fold(TopKMean(8), values, SPLITS[n])
    rounded = values.bfloat16()
    kept = rounded.topk(8, dim=0).values if n > 8 else rounded
    expected = torch.zeros(values.shape[1:])
    for row in kept:
        expected += row
    assert torch.equal(got, expected / len(kept))


def test_a_top_k_of_one_is_the_maximum():
    values = samples(5)
    assert torch.equal(fold(TopKMean(1, torch.float32), values, [2, 3]), values.amax(0))


# -- RowMaps ----------------------------------------------------------------------------------
def row_map(batch: int = 3, vocab: int = 11, seed: int = 0) -> RowMap:
    """Rows 1, 4, 5 and 9 of a (vocab, 2, 3) parameter; sample 2 touches none of them (all zero)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, 4, 2, 3, generator=g)
    values[2] = 0
    return RowMap(torch.tensor([1, 4, 5, 9]), values, (vocab, 2, 3))


def test_normalise_of_a_row_map_is_the_normalised_dense_map():
    rows = row_map()
    assert torch.equal(normalise(rows).dense(), normalise(rows.dense()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [2, 5, 12])
def test_topk_mean_of_row_maps_is_that_of_the_dense_maps(k, dtype):
    sparse, dense = TopKMean(k, dtype), TopKMean(k, dtype)
    for seed in range(3):  # 9 samples: fewer than, as many as and more than K
        rows = normalise(row_map(seed=seed))
        sparse.add("w", rows)
        dense.add("w", rows.dense())
    assert torch.equal(sparse.mean("w"), dense.mean("w"))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_a_row_map_cut_to_a_rank_is_that_ranks_chunk_of_the_dense_map(world):
    rows, size = row_map(), -(-11 // world)  # torch.chunk's rows per rank
    for rank, chunk in enumerate(rows.dense().chunk(world, dim=1)):
        lo = rank * size
        assert torch.equal(rows.between(lo, lo + chunk.shape[1]).dense(), chunk)


# -- the engine and task_prior ----------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_row_maps_of_the_engine_are_its_dense_maps(tied):
    model = build_model("llama", tied=tied)
    streamed: dict = {}
    stream_parameter_relevance(model, *padded_batch(), streamed.__setitem__, row_maps=True)
    assert all(isinstance(streamed[name], RowMap) for name in EMBEDDINGS if name in streamed)
    for name, dense in parameter_relevance(model, *padded_batch()).items():
        r = streamed[name]
        assert torch.equal(r.dense() if isinstance(r, RowMap) else r, dense), name


def dense_only(monkeypatch) -> None:
    """task_prior's LRP as it was: every map dense."""

    def stream(*args, row_maps: bool = False):
        return stream_parameter_relevance(*args)

    monkeypatch.setattr(importance, "stream_parameter_relevance", stream)


def lrp_prior(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    ids, mask = padded_batch()
    batches = [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[1:], "attention_mask": mask[1:]}]
    prior, n = task_prior(
        model, dict(model.named_parameters()), batches, "lrp", k=3, chunk=2, store_dtype=dtype
    )
    assert n == 7
    return prior


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_task_prior_with_row_maps_equals_task_prior_with_dense_maps(tied, dtype, monkeypatch):
    # exact: a RowMap's rows are the dense map's bits (repeats added in the same order), Eq. 10's
    # maximum is the same (untouched elements add log1p(0) = 0) and both fold the same values
    model = build_model("llama", tied=tied)
    sparse = lrp_prior(model, dtype)
    dense_only(monkeypatch)
    dense = lrp_prior(model, dtype)
    for name, p in dense.items():
        assert torch.equal(sparse[name], p), name
    assert all(sparse[name].abs().max() > 0 for name in EMBEDDINGS if name in sparse)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_embeddings_reach_the_prior_as_a_few_rows_never_a_dense_vocab_map(tied, monkeypatch):
    vocab = 4096
    model = build_model("llama", tied=tied, vocab_size=vocab)
    seen: dict[str, list] = {}

    def stream(model, ids, mask, consumer, row_maps: bool = False):
        def spy(name, r):
            seen.setdefault(name, []).append(r)
            consumer(name, r)

        return stream_parameter_relevance(model, ids, mask, spy, row_maps)

    monkeypatch.setattr(importance, "stream_parameter_relevance", stream)
    lrp_prior(model, torch.bfloat16)
    names = [n for n in EMBEDDINGS if n in seen]
    assert names == (["model.embed_tokens.weight"] if tied else list(EMBEDDINGS))
    for name in names:
        for r in seen[name]:
            assert isinstance(r, RowMap) and r.values.shape == (r.values.shape[0], len(r.rows), 32)
            assert len(r.rows) <= 2 * 9 + 2 < vocab // 100  # the batch's tokens and seed rows


def test_prior_dtype_is_checked():
    with pytest.raises(ValueError, match="attribution.prior_dtype"):
        Attribution(prior_dtype="float16")

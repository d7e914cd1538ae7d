"""Only rank 0 reads the weights; other ranks build the architecture empty and get theirs from it."""

from __future__ import annotations

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from clbench.module import CLModule


def test_ranks_above_zero_build_the_model_on_the_meta_device(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what Lightning's launcher and torchrun set
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    empty = CLModule(model=str(tiny_model_dir))
    assert all(t.is_meta for t in (*empty.model.parameters(), *empty.model.buffers()))
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    loaded = CLModule(model=str(tiny_model_dir))
    assert not any(p.is_meta for p in loaded.model.parameters())
    assert [n for n, _ in empty.model.named_parameters()] == [n for n, _ in loaded.model.named_parameters()]

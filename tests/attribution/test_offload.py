"""Parked tensors come back exactly, from host memory or from safetensors parts on disk."""

from __future__ import annotations

import pytest
import torch

from strategies.attribution import offload
from strategies.attribution.offload import Parked


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_parked_tensors_come_back_exactly_and_close_removes_them(tmp_path, monkeypatch, where):
    monkeypatch.setattr(offload, "PART_BYTES", 200)  # several parts: 50 fp32 values each at most
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(3, 7 + i) for i in range(5)} | {"step": torch.tensor(3.0)}
    parked = Parked(tensors, where, tmp_path / "p", copy=True)
    for t in tensors.values():
        t.zero_()  # the caller goes on changing its tensors: the parked copy must not follow
    back = dict(parked.items())
    assert back.keys() == tensors.keys()
    torch.manual_seed(0)
    for name, expected in (
        {f"t{i}": torch.randn(3, 7 + i) for i in range(5)} | {"step": torch.tensor(3.0)}
    ).items():
        assert torch.equal(back[name], expected)
    if where == "disk":
        assert len(list((tmp_path / "p").glob("part-*.safetensors"))) > 1
    parked.close()
    assert not (tmp_path / "p").exists() and dict(parked.items()) == {}


def test_auto_parks_on_disk_only_when_the_parameters_are_on_the_host():
    assert offload.resolve("auto", torch.device("cpu")) == "disk"
    assert offload.resolve("auto", torch.device("cuda", 0)) == "memory"  # host memory frees the GPU
    assert offload.resolve("memory", torch.device("cpu")) == "memory"
    with pytest.raises(ValueError, match="offload"):
        offload.resolve("gpu", torch.device("cpu"))


def test_bad_place_is_refused(tmp_path):
    with pytest.raises(ValueError, match="offload"):
        Parked({}, "gpu", tmp_path, copy=False)

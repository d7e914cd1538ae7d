"""`clbench export` of a sharded checkpoint whose save was cut short: one line naming the folder and
what is missing, and no output folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from clbench.cli import main


@pytest.fixture(scope="module")
def sharded_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """A checkpoint folder laid out as an FSDP2 run saves it (model/ through torch.distributed.checkpoint,
    config.json and the tokenizer beside it), written by one process."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("checkpoint") / "task1-parity"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(model.state_dict(), checkpoint_id=folder / "model")
    model.config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    for f in src.rglob("*"):
        if f.is_file():
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(src)).write_bytes(f.read_bytes())
    return dst


CUTS = {
    "no .metadata": (lambda c: (c / "model" / ".metadata").unlink(), "model/.metadata is missing"),
    "a shard missing": (lambda c: (c / "model" / "__0_0.distcp").unlink(), "model/__0_0.distcp is missing"),
    "a shard cut short": (
        lambda c: (c / "model" / "__0_0.distcp").write_bytes(b"x" * 100),
        "model/__0_0.distcp holds 100 of its",
    ),
    "no config.json": (lambda c: (c / "config.json").unlink(), "config.json is missing"),
    "no tokenizer": (lambda c: (c / "tokenizer.json").unlink(), "its config or tokenizer cannot be read"),
}


@pytest.mark.parametrize("cut", list(CUTS))
def test_a_checkpoint_cut_short_is_one_line_naming_what_is_missing(sharded_checkpoint, tmp_path, capsys, cut):
    damage, expected = CUTS[cut]
    checkpoint = _copy(sharded_checkpoint, tmp_path / "task1-parity")
    damage(checkpoint)
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"clbench export: error: {checkpoint}: "), err
    assert expected in err and "the save was cut short" in err, err
    assert not (tmp_path / "out").exists()


def test_a_whole_checkpoint_exports(sharded_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    assert main(["export", str(sharded_checkpoint), str(tmp_path / "out")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.vocab_size > 0


def test_an_output_folder_that_cannot_be_made_is_one_line(sharded_checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["export", str(sharded_checkpoint), str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err.strip()
    out = tmp_path / "file" / "out"
    assert err == f"clbench export: error: {out}: cannot create the output folder (Not a directory)"

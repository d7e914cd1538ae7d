"""Checkpoints after a task: the model and the strategy's state, and their export to Hugging Face.

One process or DDP (every rank holds the same weights): rank 0 writes a Hugging Face folder
(`save_pretrained`: safetensors; only the adapter under LoRA) and strategy.safetensors.

FSDP2: no rank ever holds the whole model, so each rank writes its own shards with
torch.distributed.checkpoint (DCP) into model/ and strategy/, and rank 0 writes config.json and the
tokenizer beside them; `clbench export CHECKPOINT OUT` (`export_hf`) turns that folder into a plain
Hugging Face folder in one process. Under LoRA only the adapters train and they are small: they
are gathered and rank 0 writes a peft adapter folder directly.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from clbench import distributed as dist
from clbench.errors import ConfigError

SHARDED_MODEL = "model"  # DCP folder of the model inside a sharded checkpoint
SHARDED_STRATEGY = "strategy"


def save(
    module: torch.nn.Module, strategy_state: dict[str, torch.Tensor], folder: Path, writes: bool
) -> None:
    """Write the checkpoint of `module` (a CLModule) and a strategy's state into `folder`.
    Every rank calls it; `writes` is True on the rank that writes unsharded files."""
    model = module.model
    if getattr(model, "peft_config", None) and dist.is_fully_sharded(model):
        adapters = {n: dist.full(p).cpu() for n, p in model.named_parameters() if "lora_" in n}
        state = {k: dist.full(v).cpu() for k, v in strategy_state.items()}
        if writes:
            model.save_pretrained(folder, state_dict=adapters)
            module.tokenizer.save_pretrained(folder)
            _save_plain(state, folder)
    elif dist.is_fully_sharded(model):
        _save_sharded(module, strategy_state, folder, writes)
    elif writes:  # with its tokenizer: a folder that from_pretrained and lm_eval load as it is
        model.save_pretrained(folder)
        module.tokenizer.save_pretrained(folder)
        _save_plain(strategy_state, folder)
    dist.barrier()  # a checkpoint is complete on every rank before anyone goes on


def _save_plain(state: dict[str, torch.Tensor], folder: Path) -> None:
    if state:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, str(folder / "strategy.safetensors"))


def _save_sharded(
    module: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path, writes: bool
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dcp.save(get_model_state_dict(module.model), checkpoint_id=folder / SHARDED_MODEL)
    if state:
        dcp.save({k: v.detach() for k, v in state.items()}, checkpoint_id=folder / SHARDED_STRATEGY)
    if writes:
        module.model.config.save_pretrained(folder)
        module.tokenizer.save_pretrained(folder)


def export_hf(checkpoint_dir: Path, out: Path) -> Path:
    """A sharded (DCP) checkpoint as a Hugging Face folder that `from_pretrained` loads, in one process.
    Everything is read before anything is written: a checkpoint whose save was cut short is a
    ConfigError naming what is missing, and `out` is not made."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    if not (checkpoint_dir / SHARDED_MODEL).is_dir():
        if (checkpoint_dir / "config.json").is_file() or (checkpoint_dir / "adapter_config.json").is_file():
            raise ConfigError(
                f"{checkpoint_dir}: already a Hugging Face folder; load it with from_pretrained"
            )
        raise ConfigError(f"{checkpoint_dir}: not a clbench checkpoint (no {SHARDED_MODEL}/ folder)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; choose another output folder")
    check_saved(checkpoint_dir)
    try:
        config = AutoConfig.from_pretrained(checkpoint_dir)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{checkpoint_dir}: {CUT_SHORT}: its config or tokenizer cannot be read ({e})"
        ) from e
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    state = _untied(model.state_dict())
    with warnings.catch_warnings():  # one process is what export is
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=checkpoint_dir / SHARDED_MODEL)  # in place, into the model's tensors
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


CUT_SHORT = "the save was cut short; export another task's checkpoint, or train this task again"


def check_saved(checkpoint_dir: Path) -> None:
    """A ConfigError naming the first file a sharded checkpoint lacks, or holds cut short: rank 0's
    config.json, torch.distributed.checkpoint's .metadata (written last, once every rank's shards
    are), and every byte range of the shards that .metadata lists."""
    import torch.distributed.checkpoint as dcp

    shards = checkpoint_dir / SHARDED_MODEL
    for needed in (checkpoint_dir / "config.json", shards / ".metadata"):
        if not needed.is_file():
            raise ConfigError(
                f"{checkpoint_dir}: {needed.relative_to(checkpoint_dir)} is missing: {CUT_SHORT}"
            )
    try:
        storage = dcp.FileSystemReader(str(shards)).read_metadata().storage_data
    except Exception as e:  # noqa: BLE001 - a damaged .metadata raises whatever unpickling raises
        raise ConfigError(f"{shards / '.metadata'}: unreadable ({type(e).__name__}): {CUT_SHORT}") from e
    ends: dict[str, int] = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = shards / name
        if not file.is_file():
            raise ConfigError(f"{checkpoint_dir}: {SHARDED_MODEL}/{name} is missing: {CUT_SHORT}")
        if file.stat().st_size < end:
            raise ConfigError(
                f"{checkpoint_dir}: {SHARDED_MODEL}/{name} holds {file.stat().st_size} of its {end} bytes: "
                f"{CUT_SHORT}"
            )


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each storage once (a tied lm_head is the embedding, stored once)."""
    seen: set[int] = set()
    out = {}
    for name, t in state.items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[name] = t
    return out

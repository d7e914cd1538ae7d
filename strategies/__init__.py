"""Continual-learning strategies: one file each, one explicit registry.

Outside strategies plug in by dotted class path (`--strategy mypkg.mod.MyStrategy`) or by an
entry point in the `clbench.strategies` group whose name becomes the registry name.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clbench.strategy import CLStrategy

# name -> "module:Class". Lazy: nothing here imports torch or a strategy until one is loaded, so
# `import strategies` and the names below cost no more than the import system.
REGISTRY: dict[str, str] = {
    "seqft": "strategies.seqft:SeqFT",
    "replay": "strategies.replay:Replay",
    "ewc": "strategies.ewc:EWC",
    "freeze": "strategies.freeze:Freeze",
    "multitask": "strategies.multitask:Multitask",
    "lwf": "strategies.lwf:LwF",
    "attribution": "strategies.attribution:Attribution",
    "attribution_merge": "strategies.attribution.merge:AttributionMerge",
    "o_lora": "strategies.o_lora:OLoRA",
    "ssr": "strategies.ssr:SSR",
    "gem": "strategies.gem:GEM",
    "agem": "strategies.gem:AGEM",
    "ogd": "strategies.ogd:OGD",
    "mbpa": "strategies.mbpa:MbPA",
    "progressive_prompts": "strategies.progressive_prompts:ProgressivePrompts",
    "l2p": "strategies.l2p:L2P",
    "lfpt5": "strategies.lfpt5:LFPT5",
    "linear_merge": "strategies.merging:LinearMerge",
    "ties": "strategies.merging:TIES",
    "magmax": "strategies.merging:MagMax",
    "fisher_merge": "strategies.merging:FisherMerge",
}

ENTRY_POINT_GROUP = "clbench.strategies"


def available() -> dict[str, str]:
    """Registry and entry-point names mapped to their class paths."""
    names = {name: target.replace(":", ".") for name, target in REGISTRY.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        names.setdefault(ep.name, ep.value.replace(":", "."))
    return names


def class_path(name: str) -> str:
    """The dotted class path of a registry name, entry point or class path; ConfigError if unknown."""
    from clbench.errors import ConfigError

    known = available()
    if name in known:
        return known[name]
    if "." in name:
        try:
            cls = _class_at(name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"strategy '{name}' cannot be imported: {e}") from None
        from clbench.strategy import CLStrategy

        if not (isinstance(cls, type) and issubclass(cls, CLStrategy)):
            raise ConfigError(f"strategy '{name}' is not a subclass of strategies.CLStrategy")
        return name
    raise ConfigError(f"unknown strategy '{name}'; known: {', '.join(sorted(known))}")


def placement_only(path: str) -> tuple[str, ...]:
    """The init arguments of the strategy at class path `path` that change no result (none if the
    class cannot be imported)."""
    try:
        cls = _class_at(path)
    except (ImportError, AttributeError, ValueError):
        return ()
    return tuple(getattr(cls, "placement_only", ()))


def name_for(path: str) -> str:
    """The one short name of a strategy class path: its registry or entry-point name, else the
    class name in lower case. Run folders, results and compare all use it."""
    for name, known in available().items():
        if known == path:
            return name
    return path.rsplit(".", 1)[-1].lower()


def load(name: str) -> type[CLStrategy]:
    """The class of a registry name, entry point or class path (imported now)."""
    return _class_at(class_path(name))


def _class_at(path: str) -> type:
    """The object at dotted path "module.attr", its module imported."""
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def name_of(strategy: CLStrategy) -> str:
    """The short name of a strategy instance (see name_for)."""
    cls = type(strategy)
    return name_for(f"{cls.__module__}.{cls.__qualname__}")


def __getattr__(name: str) -> Any:
    # `from strategies import CLStrategy` still works, without importing torch at `import strategies`
    if name in ("CLStrategy", "StrategyContext"):
        from clbench import strategy

        return getattr(strategy, name)
    raise AttributeError(f"module 'strategies' has no attribute '{name}'")


__all__ = [
    "CLStrategy",
    "StrategyContext",
    "REGISTRY",
    "available",
    "class_path",
    "load",
    "name_for",
    "name_of",
    "placement_only",
]

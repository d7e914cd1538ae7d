"""Continual-learning strategies: one file each, one explicit registry.

Outside strategies plug in by dotted class path (`--strategy mypkg.mod.MyStrategy`) or by an
entry point in the `clbench.strategies` group whose name becomes the registry name.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from clbench.strategy import CLStrategy, StrategyContext
from strategies.attribution import Attribution
from strategies.ewc import EWC
from strategies.freeze import Freeze
from strategies.lwf import LwF
from strategies.multitask import Multitask
from strategies.o_lora import OLoRA
from strategies.replay import Replay
from strategies.seqft import SeqFT
from strategies.ssr import SSR

REGISTRY: dict[str, type[CLStrategy]] = {
    "seqft": SeqFT,
    "replay": Replay,
    "ewc": EWC,
    "freeze": Freeze,
    "multitask": Multitask,
    "lwf": LwF,
    "attribution": Attribution,
    "o_lora": OLoRA,
    "ssr": SSR,
}

ENTRY_POINT_GROUP = "clbench.strategies"


def available() -> dict[str, str]:
    """Registry and entry-point names mapped to their class paths."""
    names = {name: f"{cls.__module__}.{cls.__qualname__}" for name, cls in REGISTRY.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        names.setdefault(ep.name, ep.value.replace(":", "."))
    return names


def class_path(name: str) -> str:
    """The dotted class path of a registry name, entry point or class path; ValueError if unknown."""
    known = available()
    if name in known:
        return known[name]
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"strategy '{name}' cannot be imported: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, CLStrategy)):
            raise ValueError(f"strategy '{name}' is not a subclass of strategies.CLStrategy")
        return name
    raise ValueError(f"unknown strategy '{name}'; known: {', '.join(sorted(known))}")


def placement_only(path: str) -> tuple[str, ...]:
    """The init arguments of the strategy at class path `path` that change no result (none if the
    class cannot be imported)."""
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
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


def name_of(strategy: CLStrategy) -> str:
    """The short name of a strategy instance (see name_for)."""
    cls = type(strategy)
    return name_for(f"{cls.__module__}.{cls.__qualname__}")


__all__ = [
    "CLStrategy",
    "StrategyContext",
    "REGISTRY",
    "available",
    "class_path",
    "name_for",
    "name_of",
    "placement_only",
]

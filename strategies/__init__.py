"""Continual-learning strategies: one file each, one explicit registry.

Outside strategies plug in by dotted class path (`--strategy mypkg.mod.MyStrategy`) or by an
entry point in the `clbench.strategies` group whose name becomes the registry name.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from strategies.attribution import Attribution
from strategies.base import CLStrategy, StrategyContext
from strategies.ewc import EWC
from strategies.freeze import Freeze
from strategies.lwf import LwF
from strategies.multitask import Multitask
from strategies.replay import Replay
from strategies.seqft import SeqFT

REGISTRY: dict[str, type[CLStrategy]] = {
    "seqft": SeqFT,
    "replay": Replay,
    "ewc": EWC,
    "freeze": Freeze,
    "multitask": Multitask,
    "lwf": LwF,
    "attribution": Attribution,
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


def name_of(strategy: CLStrategy) -> str:
    """The registry name of a strategy instance, or its class name in lower case."""
    for name, cls in REGISTRY.items():
        if type(strategy) is cls:
            return name
    return type(strategy).__name__.lower()


__all__ = ["CLStrategy", "StrategyContext", "REGISTRY", "available", "class_path", "name_of"]

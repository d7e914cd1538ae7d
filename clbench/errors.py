"""The errors clbench prints as one line: bad input, and a run that stopped on its own terms."""

from __future__ import annotations

import re
from pathlib import Path


class ConfigError(ValueError):
    """Bad user input (a config value, a data file): the message names the file and field."""


class Diverged(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the task and the step."""


# A name that becomes a file or folder name: no separators, no "..", no leading dot.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def safe_name(name: str, field: str) -> str:
    """`name` if it can name a file or folder inside a run folder; ConfigError naming `field` otherwise."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"{field}: {name!r} names files, so it may hold only letters, digits, '.', '_' and '-' "
            "(no separators, no '..', no leading dot)"
        )
    return name


def inside(root: Path, path: Path, field: str) -> Path:
    """`path`, after checking that it resolves inside `root` (ConfigError naming `field` otherwise)."""
    if not Path(path).resolve().is_relative_to(Path(root).resolve()):
        raise ConfigError(f"{field}: {path} would be written outside {root}")
    return path

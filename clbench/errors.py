"""The errors clbench prints as one line: bad input, and a run that stopped on its own terms.

Everything else is a bug (clbench's, a strategy's, a library's) and shows its whole traceback: a
one-line message would hide where it came from. So bad input is a ConfigError, never a plain
ValueError: clbench's own checks raise it, and so does a strategy that refuses a setting or a model
in a hook (a ValueError from a strategy's `__init__` while the arguments are parsed is taken as
the refusal of its option, as jsonargparse reports it)."""

from __future__ import annotations

import re
from pathlib import Path


class ConfigError(ValueError):
    """Bad user input (a config value, a data file, a folder given on the command line): the message
    names the file and field, and clbench prints it as one line (exit 2)."""


class Diverged(RuntimeError):
    """Training collapsed (a NaN or infinite loss, or a uniform or blown-up loss with exploded
    weights: clbench.runner.LossRecorder); the message names the task and the step."""


class RankLost(RuntimeError):
    """Rank 0 of a run on several processes died (a SIGKILL: the kernel's out-of-memory killer, a
    scheduler) while another rank waited for it; the message says how the run goes on."""


# A name that becomes a file or folder name: no separators, no "..", no leading dot. At most
# MAX_NAME characters, so that the longest file made from it ("task12-<name>.jsonl", a run folder
# moved aside with a time stamp) stays under the 255 bytes a file name may have.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
MAX_NAME = 100


def safe_name(name: str, field: str) -> str:
    """`name` if it can name a file or folder inside a run folder; ConfigError naming `field` otherwise."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"{field}: {name!r} names files, so it may hold only letters, digits, '.', '_' and '-' "
            "(no separators, no '..', no leading dot)"
        )
    if len(name) > MAX_NAME:
        raise ConfigError(f"{field}: {name[:20]!r}... is {len(name)} characters long; at most {MAX_NAME}")
    return name


def inside(root: Path, path: Path, field: str) -> Path:
    """`path`, after checking that it resolves inside `root` (ConfigError naming `field` otherwise)."""
    if not Path(path).resolve().is_relative_to(Path(root).resolve()):
        raise ConfigError(f"{field}: {path} would be written outside {root}")
    return path

"""One line for an argument `clbench fit` refused: which option, where it was given, what to do.

jsonargparse reports a bad strategy or logger argument as a few hundred characters of union-type
trial and error with internal class names, and cannot tell whether a value came from a config file
or the command line. When it refuses, `explain` works the answer out again from the arguments
themselves: the class (`--strategy`, `--trainer.logger`) and each of its options with the place that
set it (the last one wins, as in jsonargparse), checked against the class's signature one option at
a time.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import yaml

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

COMMAND_LINE = "command line"


class Given(NamedTuple):
    """One strategy option: its value and where it was set (a config file or the command line)."""

    value: object
    origin: str


def _yaml(path: str) -> object:
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _take_class(node: object, origin: str, spec: dict) -> None:
    """Merge a class value (a name, or {class_path, init_args}) into `spec`."""
    if isinstance(node, str) and node.lstrip().startswith("{"):
        node = yaml.safe_load(node)
    if isinstance(node, str):
        spec.update(cls=node, cls_origin=origin, args={})
    elif isinstance(node, dict):
        if "class_path" in node and node["class_path"] != spec.get("cls"):
            spec.update(cls=node["class_path"], cls_origin=origin, args={})
        for key, value in (node.get("init_args") or {}).items():
            spec["args"][key] = Given(value, origin)


def class_spec(argv: list[str], key: str = "strategy") -> dict:
    """The class `fit` was asked for at dotted option `key` ("strategy", "trainer.logger"):
    {"cls", "cls_origin", "args": {option: Given}}, each value from where it was set last."""
    spec: dict = {"cls": None, "cls_origin": None, "args": {}}
    i = 0
    while i < len(argv):
        arg, value = argv[i], None
        flag = arg.split("=", 1)[0]
        if "=" in arg and arg.startswith("--"):
            value = arg.split("=", 1)[1]
        elif i + 1 < len(argv):
            value, i = argv[i + 1], i + 1
        if flag == "--config" and value is not None:
            data = _yaml(value)
            if _key_in(data, key):
                _take_class(_value_at(data, key), value, spec)
        elif flag == f"--{key}" and value is not None:
            _take_class(value, COMMAND_LINE, spec)
        elif flag.startswith(f"--{key}.") and value is not None:
            option = flag.removeprefix(f"--{key}.").removeprefix("init_args.")
            spec["args"][option] = Given(value, COMMAND_LINE)
        i += 1
    return spec


def _options(cls: type) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {n: p for n, p in list(params.items())[1:] if p.kind not in kinds}


def _annotation(param: inspect.Parameter) -> str:
    a = param.annotation
    return a if isinstance(a, str) else getattr(a, "__name__", str(a))


def _check_options(spec: dict, cls: type, key: str, name: str) -> tuple[str | None, dict]:
    """The first option in `spec` that `cls` does not take, or whose value does not parse, as one line
    (None when all hold), and the values parsed so far."""
    from jsonargparse import ArgumentParser

    options = _options(cls)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls)
    values = {}
    for option, given in spec["args"].items():
        where = f"{given.origin}: {key}.{option}"
        if option not in options:
            return f"{where}: not an option of {name}; its options: {', '.join(options) or 'none'}", values
        try:
            if given.origin == COMMAND_LINE:
                parsed = parser.parse_args([f"--{option}", str(given.value)])
            else:
                parsed = parser.parse_object({option: given.value})
        except argparse.ArgumentError:
            shown = json.dumps(given.value) if not isinstance(given.value, str) else repr(given.value)
            return f"{where}: expected {_annotation(options[option])}, got {shown}", values
        values[option] = parsed[option]
    return None, values


def explain_logger(argv: list[str]) -> str | None:
    """A wrong `--trainer.logger` (a class that is not a logger, an option its class does not take or
    a value of the wrong type) as one line listing what is accepted, or None."""
    from clbench.loggers import lightning_loggers, logger_class

    spec = class_spec(argv, "trainer.logger")
    name = spec["cls"]
    if not isinstance(name, str) or name.lower() in ("true", "false", "null", "none"):
        return None
    cls = logger_class(name)
    if cls is None:
        return (
            f"{spec['cls_origin']}: trainer.logger: {name!r} is not a logger; Lightning's: "
            f"{', '.join(lightning_loggers())} (or the dotted path of a Logger subclass)"
        )
    return _check_options(spec, cls, "trainer.logger", cls.__name__)[0]


def explain_strategy(argv: list[str]) -> str | None:
    """The first wrong strategy option as one line, or None when the strategy's options hold."""
    from strategies import class_path, name_for

    spec = class_spec(argv)
    if spec["cls"] is None:
        return None
    try:
        path = class_path(spec["cls"])
    except ValueError as e:
        return f"{spec['cls_origin']}: strategy: {e}"
    module, _, attr = path.rpartition(".")
    cls = getattr(importlib.import_module(module), attr)
    wrong, values = _check_options(spec, cls, "strategy", name_for(path))
    if wrong:
        return wrong
    try:
        cls(**values)
    except (ValueError, TypeError) as e:
        blamed = [g.origin for o, g in spec["args"].items() if re.search(rf"\b{re.escape(o)}\b", str(e))]
        origins = blamed or sorted({g.origin for g in spec["args"].values()}) or [spec["cls_origin"]]
        return f"{', '.join(dict.fromkeys(origins))}: strategy: {str(e).strip().splitlines()[0]}"
    return None


def _key_in(node: object, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _value_at(node: dict, dotted: str) -> object:
    for part in dotted.split("."):
        node = node[part]
    return node


def origin_of(argv: list[str], key: str | None) -> str | None:
    """Where option `key` (dotted, "model.lr") was set last: "command line", a config file, or None."""
    if key is None:
        return None
    found = None
    for i, arg in enumerate(argv):
        if arg.split("=", 1)[0] == f"--{key}":
            found = COMMAND_LINE
        elif arg == "--config" and i + 1 < len(argv) and _key_in(_yaml(argv[i + 1]), key):
            found = argv[i + 1]
    return found


KEY = re.compile(r"""(?:Parser key|Key|key) ["']([\w.]+)["']""")
UNRECOGNIZED = re.compile(r"unrecognized arguments: (--[\w.]+)")


def from_jsonargparse(message: str) -> bool:
    """Whether an error text is jsonargparse's (a parse or a class it could not build)."""
    return bool(re.search(r"Parser key|Union subtypes|CLStrategy|NestedArg", message))


def explain(argv: list[str], message: str) -> str:
    """jsonargparse's refusal of `fit`'s arguments as one line that names where the mistake is."""
    if re.search(r"""key ["']strategy["']|CLStrategy""", message):
        found = explain_strategy(argv)
        if found:
            return found
    if re.search(r"""key ["']trainer\.logger["']""", message) and (found := explain_logger(argv)):
        return found
    text = " ".join(ln.strip() for ln in message.splitlines() if ln.strip())
    if m := UNRECOGNIZED.search(text):
        return f"{COMMAND_LINE}: {m[1]}: not an option of clbench fit (see clbench fit --help)"
    key = m[1] if (m := KEY.search(text)) else None
    where = origin_of(argv, key)
    if where is None:
        files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
        where = ", ".join(files)
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(
        r"""Parser key ["']([\w.]+)["']: Expected an? ([\w.\[\], ]+)\. Got value: """,
        r"\1: expected \2, got ",
        text,
    )
    return f"{where}: {text}"[:600] if where else text[:600]


def command_parser(prog: str, description: str) -> ArgumentParser:
    """A jsonargparse parser for `clbench compare | analyze | export` that raises its refusals as
    argparse.ArgumentError (made one line by clbench's main) instead of printing usage and exiting."""
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=prog, description=description, exit_on_error=False, allow_abbrev=False)


def parse_command(parser: argparse.ArgumentParser, argv: list[str]) -> Namespace:
    """`parser.parse_args(argv)`, a missing option named as typed (`--config`, not `config`)."""
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as e:
        names = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
        if m := re.search(r"the following arguments are required: (.+)", str(e)):
            missing = ", ".join(names.get(n.strip(), n.strip()) for n in m[1].split(","))
            raise argparse.ArgumentError(None, f"the following arguments are required: {missing}") from None
        raise


def refusal(message: str) -> str:
    """A jsonargparse refusal of a command's own option as one line: `--jobs: expected int, got x`."""
    text = " ".join(ln.strip() for ln in message.splitlines() if ln.strip())
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(r"""Parser key ["']([\w.]+)["']: """, r"--\1: ", text)
    return re.sub(r"Expected an? ([\w.\[\], |]+)\. Got value: ", r"expected \1, got ", text)[:600]


def split_known(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """argv split into the options `parser` declares (with their values) and the rest, in order.

    jsonargparse has no parse_known_args (a typo in a config would pass unnoticed); compare needs the
    rest, which it hands to every `fit` run, whose own parser then checks it."""
    options = {s: a for a in parser._actions for s in a.option_strings}
    own: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        key = argv[i].split("=", 1)[0]
        action = options.get(key)
        target = own if action is not None else rest
        target.append(argv[i])
        takes_value = action is None or action.nargs != 0
        i += 1
        if "=" not in argv[i - 1] and takes_value:  # its value, or the unknown option's values
            while i < len(argv) and not argv[i].startswith("--"):
                target.append(argv[i])
                i += 1
                if action is not None:
                    break
    return own, rest

"""`clbench fit | compare | analyze | export`: the command line.

This module only dispatches, so `clbench --help` imports nothing heavy; each command imports its
own machinery (`fit`: clbench/fit.py, a LightningCLI). Every error a user can cause (a ConfigError
or an argument the parser refused) is one line (exit 2); a diverged fit exits 3. Anything else is a
bug, in clbench or in a strategy's code, and shows its traceback (clbench/errors.py). Set
CLBENCH_TRACEBACK=1 for the full traceback of one-line errors too.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

from clbench.arguments import command_parser, explain, parse_command, refusal
from clbench.errors import ConfigError, Diverged, RankLost

USAGE = """usage: clbench {fit,compare,analyze,export} ...

  fit       train one strategy through a task stream:  clbench fit --strategy seqft --config FILE
  compare   several strategies (and seeds) on one stream, one table: clbench compare --help
  analyze   importance overlap analysis of a finished run:            clbench analyze --help
  export    a sharded (FSDP) checkpoint as a Hugging Face folder:     clbench export CHECKPOINT OUT

Set CLBENCH_TRACEBACK=1 to see full tracebacks of errors."""


def _one_line(message: str) -> str:
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    return " ".join(lines)[:600]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `clbench` console script."""
    for stream in (sys.stdout, sys.stderr):  # lines as they happen, into a file or a pipe as well
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("LOCAL_RANK", "0") != "0":  # before torch loads: it reads this once
        # a further rank's C++ warnings repeat rank 0's, and when rank 0 dies each broken connection
        # would print a C++ stack; this rank's errors still show (TORCH_CPP_LOG_LEVEL set wins)
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    commands = {"fit": _fit, "compare": _compare, "analyze": _analyze, "export": _export}
    if command not in commands:
        print(f"clbench: error: unknown command '{command}'\n{USAGE}", file=sys.stderr)
        return 2
    try:
        commands[command](rest)
    except argparse.ArgumentError as e:  # a config key or value jsonargparse refused
        if os.environ.get("CLBENCH_TRACEBACK"):
            raise
        message = explain(rest, str(e)) if command == "fit" else refusal(str(e))
        print(f"clbench {command}: error: {_one_line(message)}", file=sys.stderr)
        return 2
    except ConfigError as e:  # bad input: the message names the file or option and what to do
        if os.environ.get("CLBENCH_TRACEBACK"):
            raise
        print(f"clbench {command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Diverged as e:
        if os.environ.get("CLBENCH_TRACEBACK"):
            raise
        print(f"clbench {command}: diverged: {_one_line(e)}", file=sys.stderr)
        return 3
    except RankLost as e:  # a surviving rank: the gloo or NCCL traceback would only say "connection reset"
        if os.environ.get("CLBENCH_TRACEBACK"):
            raise
        print(f"clbench {command}: stopped: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


def _fit(argv: list[str]) -> None:
    from clbench.fit import fit

    fit(argv)


def _compare(argv: list[str]) -> None:
    from clbench.compare import main as compare_main

    compare_main(argv)


def _export(argv: list[str]) -> None:
    from clbench.checkpoint import export_hf

    parser = command_parser("clbench export", "A sharded (FSDP) checkpoint as a Hugging Face folder.")
    parser.add_argument("checkpoint", help="RUN_DIR/checkpoints/taskN-NAME of a run trained with FSDP")
    parser.add_argument("out", help="new folder for the Hugging Face model (config, safetensors, tokenizer)")
    args = parse_command(parser, argv)
    print(f"clbench: exported to {export_hf(Path(args.checkpoint), Path(args.out))}")


def _analyze(argv: list[str]) -> None:
    from clbench.analyze import main as analyze_main

    analyze_main(argv)

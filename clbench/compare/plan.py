"""compare's plan: which runs a comparison holds, with the `clbench fit` arguments of each, and what
becomes of a run already in its folder: reused when finished with this invocation's config and
inputs (clbench/identity.py), resumed when interrupted with them, else moved aside and rerun.
Nothing is deleted."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import yaml
from jsonargparse import Namespace

from clbench import records
from clbench.errors import ConfigError
from clbench.identity import differences, run_identity, sha256_text
from strategies import name_for, placement_only

PER_RUN = ("name", "output_dir", "entry")  # run fields that differ between the runs of one comparison

LOCK = "compare.lock"

SUPERSEDED = "superseded"  # runs moved aside to be rerun: beside runs/, never read by the table


class Run(NamedTuple):
    """One (strategy, seed) of the comparison and the `clbench fit` arguments that train it."""

    strategy: str  # the --strategies entry
    dir: Path
    argv: list[str]


def preset_file(presets: str | None, entry: str) -> Path | None:
    """The entry's preset config, when a presets folder holds one."""
    path = Path(presets) / f"{entry}.yaml" if presets else None
    return path if path is not None and path.is_file() else None


def short_name(strategy: str) -> str:
    """Run-folder name of a --strategies entry: a registry, entry-point or preset name as given, a
    class path by strategies.name_for (the one definition `fit` uses too)."""
    return name_for(strategy) if "." in strategy else strategy


def read_finished(run_dir: Path) -> dict | None:
    """A finished run's results (complete, or stopped as diverged), else None; touches nothing."""
    record = records.read_finished(run_dir)
    return record.results if record is not None else None


def planned_runs(args: Namespace, passthrough: list[str]) -> list[Run]:
    """Every strategy x seed with its `fit` arguments: the same for training a run and for checking
    a finished one."""
    runs = []
    for strategy in args.strategies:
        preset = preset_file(args.presets, strategy)
        chosen = ["--config", str(preset)] if preset else ["--strategy", strategy]
        for seed in args.seeds:
            run_dir = args.compare_dir / "runs" / f"{short_name(strategy)}-seed{seed}"
            where = ["--run.output_dir", str(run_dir.parent), "--run.name", run_dir.name]
            where += ["--run.entry", short_name(strategy)]
            argv = ["--config", args.config, *chosen, "--seed_everything", str(seed), *where, *passthrough]
            runs.append(Run(strategy, run_dir, argv))
    return runs


def resolved_config(fit_argv: list[str]) -> dict:
    """The config `clbench fit` resolves from these arguments, as its config.yaml holds it. In this
    process and without data or model: `--print_config` prints it and exits while parsing."""
    from clbench.fit import build_cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            build_cli([*fit_argv, "--print_config"])
        except SystemExit as e:
            if e.code:
                raise
    return _comparable(yaml.safe_load(out.getvalue()))


def check_fit_arguments(runs: list[Run]) -> None:
    """Every entry's `fit` arguments parsed once by fit's own parser, without running (its seeds differ
    in --seed_everything only): a misspelt option, passed through or in a preset, is one line before
    anything starts or is moved, not a failure in every fit's log once the jobs run."""
    from clbench.arguments import explain

    first: dict[str, Run] = {}
    for run in runs:
        first.setdefault(run.strategy, run)
    for run in first.values():
        try:
            resolved_config(run.argv)
        except argparse.ArgumentError as e:
            raise ConfigError(f"the fit arguments of {run.strategy}: {explain(run.argv, str(e))}") from e


def _comparable(cfg: object) -> dict:
    """A resolved fit config without the run folder's name and parent, which legitimately differ
    between the runs of a comparison (and after moving the comparison folder), and without the
    strategy's placement-only arguments (where state waits or is cached: the same numbers)."""
    cfg = cfg if isinstance(cfg, dict) else {}
    run = {k: v for k, v in (cfg.get("run") or {}).items() if k not in PER_RUN}
    out = cfg | {"run": run}
    strategy = cfg.get("strategy")
    if isinstance(strategy, dict) and isinstance(strategy.get("init_args"), dict):
        ignored = placement_only(str(strategy.get("class_path", "")))
        args = {k: v for k, v in strategy["init_args"].items() if k not in ignored}
        out["strategy"] = strategy | {"init_args": args}
    return out


def changed_fields(old: dict, new: dict) -> list[str]:
    """Where two configs differ: a top-level field, or section.key within a section (model.lr)."""
    fields = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fields += [f"{key}.{k}" for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
        else:
            fields.append(key)
    return fields


def run_change(run: Run) -> str | None:
    """How a finished run differs from the run this invocation would make, or None when it is the
    same: its config.yaml field by field, then its identity (data as used, model, code, precision,
    library versions; clbench/identity.py). The expected config is resolved only when needed."""
    try:
        text = (run.dir / "config.yaml").read_text(encoding="utf-8")
        ran = yaml.safe_load(text)
    except (OSError, yaml.YAMLError):
        return "no readable config.yaml"
    expected = resolved_config(run.argv)
    fields = changed_fields(_comparable(ran), expected)
    if fields:
        return ", ".join(fields)
    record = records.read_record(run.dir)
    saved = record.identity if record is not None else None
    if saved and saved.get("config_sha256") != sha256_text(text):
        return "its config.yaml was edited after it ran"
    return "; ".join(differences(saved, expected_identity(expected))) or None


def expected_identity(cfg: dict) -> dict:
    """The identity a fit of this resolved config would record (its config hash aside)."""
    from clbench.data.loaders import StreamConfig, load_stream
    from clbench.fit import _plain
    from strategies import load

    stream = load_stream(StreamConfig(**_plain(cfg.get("stream") or {})))
    strategy = cfg.get("strategy") or {}
    cls = load(strategy["class_path"]) if isinstance(strategy, dict) and strategy.get("class_path") else None
    precision = (cfg.get("trainer") or {}).get("precision")
    general = (cfg.get("general") or {}).get("tasks")
    return run_identity("", stream, (cfg.get("model") or {}).get("model"), precision, cls, general)


def changed_runs(runs: list[Run], rerun_changed: bool) -> set[Path]:
    """The finished runs whose config or inputs differ; refused, before anything trains, without
    --rerun_changed."""
    changed = {r.dir: c for r in runs if read_finished(r.dir) is not None and (c := run_change(r))}
    if changed and not rerun_changed:
        (first, fields), *rest = changed.items()
        also = f" (and {len(rest)} more: {', '.join(d.name for d, _ in rest)})" if rest else ""
        raise ConfigError(
            f"{first}: finished with other inputs than this invocation gives it, differing in {fields}"
            f"{also}; --rerun_changed moves such runs to superseded/ and reruns them"
        )
    return set(changed)


def move_aside(run_dir: Path, why: str) -> None:
    """Keeps a run that will be rerun (never deleted) as <comparison>/superseded/<name>.<why>-<time>,
    outside runs/, so that the table and `clbench analyze` never see two runs of one seed."""
    superseded = run_dir.parent.parent / SUPERSEDED
    superseded.mkdir(exist_ok=True)
    aside = superseded / f"{run_dir.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.rename(aside)
    print(f"clbench compare: moved {run_dir} ({why}) to {aside}, rerunning it")


def resumable(run_dir: Path) -> bool:
    """An interrupted run with the saved state of a finished task (clbench/resume.py)."""
    from clbench.resume import has_state

    return has_state(run_dir)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """One compare per comparison folder: a second one would move the first one's live run aside.

    The kernel drops an flock when its process dies, so the lock of a killed compare is free and is
    taken over; the file names the holder's process id (empty once released) for the messages."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{folder}: cannot create the comparison folder ({e.strerror or e})") from None
    path = folder / LOCK
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{path}: held by process {_holder(f) or '?'}, another clbench compare on this folder"
            ) from None
        if stale := _holder(f):
            print(f"clbench compare: took over the stale lock {path} of process {stale}, which is gone")
        _set_holder(f, str(os.getpid()))
        try:
            yield
        finally:
            _set_holder(f, "")


def _holder(f: io.TextIOBase) -> str:
    f.seek(0)
    return f.read().strip()


def _set_holder(f: io.TextIOBase, pid: str) -> None:
    f.truncate(0)
    f.write(pid)
    f.flush()


def fit_arguments(run: Run, decides: bool = True) -> list[str] | None:
    """The `clbench fit` arguments that bring a run to its end, decided from its folder when its job
    starts (again, after a requeue): None when it is finished with this invocation's config and
    inputs (nothing to do); `--resume` for an interrupted run with them and a finished task saved;
    else the full arguments, any earlier run in its folder (another config's, or an unfinished one)
    moved aside first. Only the process that `decides` (a job's first rank) moves anything."""
    finished = read_finished(run.dir) is not None
    change = run_change(run) if finished or resumable(run.dir) else "none saved"
    if finished and change is None:
        print(f"clbench compare: {run.dir} is finished; nothing to do")
        return None
    if not finished and change is None:
        print(f"clbench compare: resuming interrupted run {run.dir}")
        return ["--resume", str(run.dir)]
    if decides and run.dir.is_dir() and any(run.dir.iterdir()):
        move_aside(run.dir, "changed" if finished else "incomplete")
    return run.argv

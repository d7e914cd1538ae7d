"""`clbench compare`: several strategies (and seeds) on one stream, one table and one chart.

    clbench compare --config FILE --strategies seqft,replay,ewc --seeds 1,2,3 [--presets DIR]

Every (strategy, seed) is an ordinary `clbench fit` run in <comparison>/runs/<strategy>-seed<seed>/,
all with the same config and pass-through overrides; per-strategy hyper-parameters and variants
come from `--presets DIR`, where `<entry>.yaml` is added to that entry's runs. What compare guarantees:

- The table holds only runs of this invocation's inputs: a finished run is reused when its
  config.yaml is the config this invocation would give it (run.name and run.output_dir aside) and
  its recorded identity (data as used, model, code, precision, library versions;
  clbench/identity.py) is the one this invocation's run would have, and refused before anything
  trains when not (naming what differs); `--rerun_changed` moves such runs to
  <comparison>/superseded/ and reruns them.
- An interrupted run with the same config goes on from its last finished task (`fit --resume`);
  nothing is deleted: other unfinished runs and changed ones are moved aside with a timestamp
  suffix and run again.
- One compare per comparison folder (compare.lock names the holder's process id); a lock left by
  a compare that died is taken over.
- No fit outlives its compare: Ctrl-C, SIGTERM or an error stops the running fits and their children.
- `--jobs N` trains up to N runs side by side, in the order given, each with cpu_count // N torch
  threads unless OMP_NUM_THREADS is set, its console in <comparison>/logs/<run>.log; runs that need
  the same cached side result (a strategy's lock) compute it once: the first takes the lock, the
  others wait and reuse it. When a fit fails, no further run starts, those running finish, then compare fails.
- A fit imports clbench as installed, never a module of the same name in the working directory.

`--finished_only` trains nothing and moves nothing: it rewrites the comparison from the runs that
have finished, noting (not refusing) those whose config or inputs differ from this invocation's.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import io
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import NamedTuple

import yaml

from clbench import records
from clbench.errors import ConfigError
from clbench.evaluation.matrix import own_task_score
from clbench.files import write_atomic
from clbench.identity import differences, run_identity, sha256_text
from clbench.reporting import save_figure
from strategies import class_path, name_for, placement_only

METRICS = {"OP": "OP", "BWT (TRACE)": "BWT_TRACE", "BWT (GEM)": "BWT_GEM", "FWT": "FWT"}
OWN = "own-task score"  # mean of the matrix's diagonal: how well each task was learned
RESERVED = ("--strategy", "--seed_everything", "--run.name", "--run.output_dir")  # compare sets these
Cell = tuple[float | None, float | None]  # (mean, sample std) over seeds
PER_RUN = ("name", "output_dir")  # run fields that differ between the runs of one comparison
LOCK = "compare.lock"
SUPERSEDED = "superseded"  # runs moved aside to be rerun: beside runs/, never read by the table
DIVERGED_EXIT = 3  # `clbench fit`'s exit status for a run stopped as diverged
STOP_GRACE_S = 10.0  # a stopped fit gets this long to record "interrupted" before SIGKILL
# `python -m clbench` puts the working directory first on the import path, where a stray
# strategies.py would shadow clbench's own. This runs clbench/__main__.py as -m does, so Lightning
# still starts further ranks with `-m` from its __spec__, without that first entry.
FIT_MAIN = (
    "import runpy, sys\n"
    "if sys.path[:1] == ['']:\n"
    "    del sys.path[0]\n"
    "runpy.run_module('clbench', run_name='__main__', alter_sys=True)"
)


class Run(NamedTuple):
    """One (strategy, seed) of the comparison and the `clbench fit` arguments that train it."""

    strategy: str  # the --strategies entry
    dir: Path
    argv: list[str]


class Console(NamedTuple):
    """Where a fit run side by side with others writes its output, and its torch threads."""

    log: Path
    threads: str


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through clbench's main instead of usage + exit
        raise ConfigError(message)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Compare's own options, and the rest to pass through to every `fit`."""
    epilog = "Other arguments (e.g. --run.checkpoints none) are passed to every `clbench fit` run."
    p = _Parser(
        prog="clbench compare", allow_abbrev=False, description=__doc__.split("\n\n")[0], epilog=epilog
    )
    p.add_argument("--config", required=True, help="the fit config (model, stream, trainer)")
    p.add_argument("--strategies", required=True, help="comma-separated registry names or class paths")
    p.add_argument("--seeds", help="comma-separated integer seeds (default: the config's seed_everything)")
    p.add_argument("--output_dir", help="parent of the comparison folder (default: config run.output_dir)")
    p.add_argument("--name", help="comparison folder name (default: compare-<stream name or config stem>)")
    p.add_argument(
        "--presets",
        help="folder of per-strategy configs: <entry>.yaml is added to that entry's runs and may set its "
        "strategy and hyper-parameters, so variants (e.g. ewc-l1e4) are entries too",
    )
    p.add_argument(
        "--baseline",
        help="a strategy of --strategies: add paired per-seed differences of OP and BWT to it",
    )
    p.add_argument(
        "--finished_only",
        action="store_true",
        help="train nothing: (re)write the comparison from the finished runs among strategies x seeds, "
        "listing the missing ones and those whose config or inputs differ; run folders are left as they are "
        "(safe while runs are in progress)",
    )
    p.add_argument(
        "--rerun_changed",
        action="store_true",
        help="move finished runs whose config or inputs (data, model, code) differ from this invocation's "
        "to <comparison>/superseded/ and rerun them "
        "(without it, compare refuses them)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained side by side (default 1), each with cpu_count // jobs torch threads unless "
        "OMP_NUM_THREADS is set; their consoles go to <comparison>/logs/<run>.log",
    )
    args, passthrough = p.parse_known_args(argv)
    if args.jobs < 1:
        raise ConfigError(f"--jobs: expected a positive integer, got {args.jobs}")
    for arg in passthrough:
        if arg.split("=", 1)[0] in RESERVED:
            raise ConfigError(f"{arg}: set by compare; use --strategies, --seeds, --output_dir, --name")
    cfg = _read_config(args.config)
    args.strategies = _split(args.strategies, "strategies")
    for s in args.strategies:
        if preset_file(args.presets, s) is None:
            class_path(s)  # unknown names fail here, before any training
    if args.baseline is not None and args.baseline not in args.strategies:
        raise ConfigError(f"--baseline: '{args.baseline}' is not one of --strategies")
    if len({short_name(s) for s in args.strategies}) != len(args.strategies):
        raise ConfigError(
            f"--strategies: two strategies share a run-folder name in '{','.join(args.strategies)}'"
        )
    seeds = _split(args.seeds or str(cfg.get("seed_everything", 1234)), "seeds")
    try:
        args.seeds = [int(x) for x in seeds]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got '{args.seeds}'") from None
    stream = (cfg.get("stream") or {}).get("name") or Path(args.config).stem
    parent = args.output_dir or (cfg.get("run") or {}).get("output_dir") or "runs"
    args.compare_dir = Path(parent) / (args.name or f"compare-{stream}")
    return args, passthrough


def preset_file(presets: str | None, entry: str) -> Path | None:
    """The entry's preset config, when a presets folder holds one."""
    path = Path(presets) / f"{entry}.yaml" if presets else None
    return path if path is not None and path.is_file() else None


def _read_config(path: str) -> dict:
    from clbench.fit import read_yaml

    cfg = read_yaml(path)
    return cfg if isinstance(cfg, dict) else {}


def _split(text: str, option: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or len(set(items)) != len(items):
        raise ConfigError(f"--{option}: expected a comma-separated list without repeats, got '{text}'")
    return items


def short_name(strategy: str) -> str:
    """Run-folder name of a --strategies entry: a registry, entry-point or preset name as given, a
    class path by strategies.name_for (the one definition `fit` uses too)."""
    return name_for(strategy) if "." in strategy else strategy


def read_finished(run_dir: Path) -> dict | None:
    """A finished run's results (complete, or stopped as diverged), else None; touches nothing."""
    record = records.read_finished(run_dir)
    return record.results if record is not None else None


def _results(run_dir: Path) -> dict:
    """What a fit just left in its folder (results.json is written from the run's start)."""
    record = records.read_record(run_dir)
    if record is None:
        raise ConfigError(f"{run_dir / 'results.json'}: missing or unreadable after the fit")
    return record.results


def plan(args: argparse.Namespace, passthrough: list[str]) -> list[Run]:
    """Every strategy x seed with its `fit` arguments: the same for training a run and for checking
    a finished one."""
    runs = []
    for strategy in args.strategies:
        preset = preset_file(args.presets, strategy)
        chosen = ["--config", str(preset)] if preset else ["--strategy", strategy]
        for seed in args.seeds:
            run_dir = args.compare_dir / "runs" / f"{short_name(strategy)}-seed{seed}"
            where = ["--run.output_dir", str(run_dir.parent), "--run.name", run_dir.name]
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
    return run_identity("", stream, (cfg.get("model") or {}).get("model"), precision, cls)


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
    from clbench.resume import FOLDER, MARKER

    return any((run_dir / name / MARKER).is_file() for name in (FOLDER, f"{FOLDER}.old"))


def train_or_reuse(run: Run, changed: bool, console: Console | None = None) -> dict:
    """A finished run's results as on disk; an interrupted one with the same config resumed from its
    last finished task; else it is (re)trained, any earlier run moved aside. `console`: where the
    fit's output goes (None: this process's)."""
    results = read_finished(run.dir)
    if results is not None and not changed:
        print(f"clbench compare: reusing finished run {run.dir}")
        return results
    if not changed and resumable(run.dir) and run_change(run) is None:
        print(f"clbench compare: resuming interrupted run {run.dir}")
        run_fit(["--resume", str(run.dir)], console)
        return _results(run.dir)
    if run.dir.is_dir() and any(run.dir.iterdir()):
        move_aside(run.dir, "changed" if changed else "incomplete")
    run_fit(run.argv, console)
    # What is on disk, so a later rerun that reuses this run builds the same table.
    return _results(run.dir)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """One compare per comparison folder: a second one would move the first one's live run aside.

    The kernel drops an flock when its process dies, so the lock of a killed compare is free and is
    taken over; the file names the holder's process id (empty once released) for the messages."""
    folder.mkdir(parents=True, exist_ok=True)
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


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises SystemExit, as Ctrl-C raises KeyboardInterrupt, so that compare stops its fit
    and frees the lock on the way out instead of vanishing and leaving the fit running."""

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def mean_std(values: list[float | None]) -> Cell:
    """Mean and sample standard deviation (ddof=1) of the values that are not None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return mean, std


def run_columns(results: dict) -> dict[str, float | None]:
    """The numbers of one run that the comparison table shows, by column name."""
    summary, timings = results.get("summary") or {}, results.get("timings") or {}
    cols = {label: summary.get(key) for label, key in METRICS.items()}
    cols[OWN] = own_task_score(results["matrix"]) if results.get("matrix") else None
    for task in results.get("tasks") or list(results.get("per_task", {})):
        cols[f"final {task}"] = results["per_task"][task].get("final")
    train, evaluate = timings.get("train_s"), timings.get("eval_s")
    cols["wall time s"] = None if train is None or evaluate is None else train + evaluate
    cols["peak memory MB"] = timings.get("peak_memory_mb")
    return cols


PAIRED = ("OP", "BWT (TRACE)", OWN)  # metrics also shown as paired differences to a baseline


def aggregate(runs: dict[str, list[dict]], baseline: str | None = None) -> list[dict]:
    """One row per strategy: strategy, seeds, n_seeds, diverged, and a (mean, std) Cell per column.

    Runs that stopped as diverged (collapsed training) count in no mean: their seeds are listed in
    "diverged" and the table marks them. With a baseline, "ΔOP vs <baseline>" (and likewise BWT and
    the own-task score) is the mean and std of the per-seed differences on the seeds both completed
    (paired: seed-to-seed noise that both share, such as a hard data order, cancels); blank for the
    baseline itself.
    """
    complete = {s: [r for r in rs if r.get("status", "complete") == "complete"] for s, rs in runs.items()}
    per_run = {s: [run_columns(r) for r in results] for s, results in complete.items()}
    columns = list(dict.fromkeys(k for cols in per_run.values() for c in cols for k in c))
    base = {r.get("seed"): c for r, c in zip(complete.get(baseline, []), per_run.get(baseline, []))}
    rows = []
    for s, cols in per_run.items():
        diverged = [r.get("seed") for r in runs[s] if r.get("status") == "diverged"]
        row: dict = {"strategy": s, "seeds": [r.get("seed") for r in complete[s]], "n_seeds": len(cols)}
        row["diverged"] = diverged
        cells = {k: mean_std([c.get(k) for c in cols]) for k in columns}
        paired = {}
        for k in PAIRED if baseline else ():
            pairs = [(c.get(k), base.get(r.get("seed"), {}).get(k)) for c, r in zip(cols, complete[s])]
            diffs = [a - b for a, b in pairs if s != baseline and a is not None and b is not None]
            paired[f"Δ{k} vs {baseline}"] = mean_std(diffs)
        summary = {k: cells.pop(k, (None, None)) for k in (*METRICS, OWN)}
        rows.append(row | summary | paired | cells)  # summary, paired differences, then the rest
    return rows


def _columns(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if k not in ("strategy", "seeds", "n_seeds", "diverged")] if rows else []


def _cell(cell: Cell, column: str) -> str:
    mean, std = cell
    digits = 0 if column in ("wall time s", "peak memory MB") else 3
    if mean is None:
        return ""
    sign = "+" if column.startswith("Δ") else ""
    mean = round(mean, digits) + 0.0  # no "-0.000"
    return f"{mean:{sign}.{digits}f}" if std is None else f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    """Mean ± std per strategy, with links to each seed's run report; diverged runs marked."""
    cols = _columns(rows)
    lines = ["| strategy | n seeds | " + " | ".join(cols) + " | runs |", "|---" * (len(cols) + 3) + "|"]
    for r in rows:
        links = [f"[seed {s}](runs/{r['strategy']}-seed{s}/results.md)" for s in r["seeds"]]
        links += [
            f"**diverged** [seed {s}](runs/{r['strategy']}-seed{s}/results.json)" for s in r["diverged"]
        ]
        cells = " | ".join(_cell(r[c], c) for c in cols)
        name = f"{r['strategy']} (**{len(r['diverged'])} diverged**)" if r["diverged"] else r["strategy"]
        lines.append(f"| {name} | {r['n_seeds']} | {cells} | {', '.join(links)} |")
    return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
    """The table as CSV: a mean and a std column per metric (blank when undefined)."""
    cols = _columns(rows)
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    stats = (f"{c} {x}" for c in cols for x in ("mean", "std"))
    out.writerow(["strategy", "n_seeds", *stats, "runs", "diverged runs"])
    for r in rows:
        nums = ["" if x is None else repr(x) for c in cols for x in r[c]]
        runs = " ".join(f"runs/{r['strategy']}-seed{s}" for s in r["seeds"])
        diverged = " ".join(f"runs/{r['strategy']}-seed{s}" for s in r["diverged"])
        out.writerow([r["strategy"], r["n_seeds"], *nums, runs, diverged])
    return buf.getvalue()


def plot_comparison(rows: list[dict], title: str, path: Path) -> None:
    """Grouped bars: one group per summary metric, one bar per strategy, std as error bars."""
    import matplotlib.pyplot as plt  # after clbench.reporting chose the Agg backend

    metrics = [m for m in (*METRICS, OWN) if any(r[m][0] is not None for r in rows)]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(1.4 * len(metrics) + 0.3 * len(rows) + 2.5, 4.0))
    for k, r in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(metrics))]
        means = [math.nan if r[m][0] is None else r[m][0] for m in metrics]
        stds = [0.0 if r[m][1] is None else r[m][1] for m in metrics]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=r["strategy"])
    ax.set_xticks(range(len(metrics)), metrics)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("score (mean ± std over seeds)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def plot_pareto(rows: list[dict], title: str, path: Path) -> None:
    """OP against BWT (TRACE), one point per strategy with its std over seeds both ways: the
    trade-off view (up and right is better; a strategy that forgets nothing by learning nothing
    sits low on OP)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    markers = "osD^vP*X"
    for i, r in enumerate(rows):
        (op, op_std), (bwt, bwt_std) = r["OP"], r["BWT (TRACE)"]
        if op is None or bwt is None:
            continue
        ax.errorbar(
            bwt,
            op,
            xerr=bwt_std or 0.0,
            yerr=op_std or 0.0,
            marker=markers[i % len(markers)],
            capsize=3,
            ls="none",
            label=r["strategy"],
        )
    # a legend, not labels at the points: strategies near seqft sit on top of each other
    ax.legend(fontsize="small")
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("BWT (TRACE): higher = less forgetting")
    ax.set_ylabel("OP (mean final score)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str]) -> dict[str, list[dict]]:
    """`clbench compare`: run (or reuse) every strategy x seed, then write the comparison."""
    args, passthrough = parse_args(argv)
    runs = plan(args, passthrough)
    if args.finished_only:
        return tabulate_finished(args, passthrough, runs)
    with folder_lock(args.compare_dir), sigterm_raises():
        STOPPING.clear()  # a stop of an earlier compare in this process
        changed = changed_runs(runs, args.rerun_changed)
        if args.jobs == 1:
            finished = [train_or_reuse(run, run.dir in changed) for run in runs]
        else:
            finished = side_by_side(runs, changed, args.jobs, args.compare_dir / "logs")
        results: dict[str, list[dict]] = {}
        for run, result in zip(runs, finished):
            results.setdefault(short_name(run.strategy), []).append(result)
        write_comparison(args, passthrough, results, [])
    return results


def side_by_side(runs: list[Run], changed: set[Path], jobs: int, logs: Path) -> list[dict]:
    """`--jobs`: every run trained or reused as `train_or_reuse` does, up to `jobs` at once in the
    order given; results in that order. A failed fit lets the running ones finish and starts no
    other; Ctrl-C or SIGTERM stops them all."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))
    logs.mkdir(parents=True, exist_ok=True)

    def attempt(run: Run) -> dict:
        try:
            return train_or_reuse(run, run.dir in changed, Console(logs / f"{run.dir.name}.log", threads))
        except BaseException:
            STOPPING.set()  # before this worker takes the next run: a failed fit starts no other
            raise

    pool = ThreadPoolExecutor(jobs, thread_name_prefix="fit")
    futures = [pool.submit(attempt, run) for run in runs]
    try:
        pending: set[Future] = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                for f in pending:
                    f.cancel()  # not started yet
                wait(pending)  # the running ones finish
                raise failed[0].exception()
        return [f.result() for f in futures]
    except BaseException:
        with LIVE_LOCK:
            STOPPING.set()
            running = list(LIVE)
        for child in running:
            stop(child)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def tabulate_finished(
    args: argparse.Namespace, passthrough: list[str], runs: list[Run]
) -> dict[str, list[dict]]:
    """`--finished_only`: the comparison of the runs that finished, touching no run folder; a run
    whose config or inputs differ from this invocation's is tabulated as it ran and named in the report."""
    results: dict[str, list[dict]] = {}
    missing, notes = [], []
    for run in runs:
        finished = read_finished(run.dir)
        if finished is None:
            missing.append(run.dir.name)
            continue
        if change := run_change(run):
            print(f"clbench compare: {run.dir}: it differs from this invocation's run ({change})")
            notes.append(f"{run.dir.name} ({change})")
        results.setdefault(short_name(run.strategy), []).append(finished)
    if not results:
        raise ConfigError(f"{args.compare_dir}: no finished run among {', '.join(missing)}")
    note = (
        "Tabulated from the finished runs (`--finished_only`); each run's own config.yaml says how it "
        f"ran. Not finished or not run: {', '.join(missing) or 'none'}."
    )
    if notes:
        note += f" Config or inputs differ from this invocation's: {'; '.join(notes)}."
    write_comparison(args, passthrough, results, [note, ""])
    return results


def write_comparison(
    args: argparse.Namespace, passthrough: list[str], runs: dict[str, list[dict]], notes: list[str]
) -> None:
    """comparison.md, comparison.csv, comparison.png (bars) and comparison-pareto.png (OP against
    BWT) in the comparison folder."""
    baseline = short_name(args.baseline) if args.baseline else None
    rows, out = aggregate(runs, baseline), args.compare_dir
    out.mkdir(parents=True, exist_ok=True)
    stream = next(iter(runs.values()))[0].get("stream", "")
    header = [
        f"# Comparison on {stream}",
        "",
        f"Config `{args.config}`" + (f", overrides `{' '.join(passthrough)}`" if passthrough else "") + ".",
        "Mean ± sample standard deviation (ddof=1) over seeds; a blank std means one seed.",
        "Scores are on [0, 1]; own-task score = mean of R[i][i] (each task right after training on it);",
        "wall time = train + eval seconds.",
        "",
    ]
    if baseline:
        header += [f"Δ columns: per-seed differences to {baseline} on the seeds both ran (paired).", ""]
    header += [*notes, ""]
    write_atomic(out / "comparison.md", "\n".join(header) + markdown_table(rows) + "\n")
    write_atomic(out / "comparison.csv", csv_text(rows))
    n_runs = sum(len(r) for r in runs.values())
    title = f"{stream}: {n_runs} runs, up to {len(args.seeds)} seed(s) each"
    plot_comparison(rows, title, out / "comparison.png")
    plot_pareto(rows, title, out / "comparison-pareto.png")
    print(f"clbench compare: {len(rows)} strategies, {n_runs} runs: {out / 'comparison.md'}")


LIVE: set[subprocess.Popen] = set()  # fits in flight, all stopped when compare stops
STOPPING = threading.Event()  # set when compare stops: no further fit starts (--jobs workers)
LIVE_LOCK = threading.Lock()  # a fit starts, or compare stops, not both at once


def run_fit(argv: list[str], console: Console | None = None) -> None:
    """One `clbench fit` in a process of its own: memory is returned between runs, and each run's
    peak memory is its own. Its own process group too, so that stopping it stops its children
    (ranks, loader workers) and Ctrl-C reaches compare alone, which then stops it. PYTHONSAFEPATH
    keeps the working directory off the import path of the ranks Lightning starts (Python 3.11+).
    With a `console`, the fit's output is appended to its log and it runs with its threads."""
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    if console is not None:
        env["OMP_NUM_THREADS"] = console.threads
    with open(console.log, "a", encoding="utf-8") if console else contextlib.nullcontext() as out:
        with LIVE_LOCK:
            if STOPPING.is_set():  # a --jobs worker whose slot a stopped fit just freed
                raise ConfigError("clbench compare is stopping: no further fit starts")
            if console is not None:
                started = f"{console.log.stem} ({console.threads} threads): {console.log}"
                print(f"clbench compare: started {started}")
            child = subprocess.Popen(
                [sys.executable, "-c", FIT_MAIN, "fit", *argv],
                env=env,
                start_new_session=True,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
            )
            LIVE.add(child)
        try:
            code = child.wait()
        finally:
            stop(child)
            LIVE.discard(child)
    where = "above" if console is None else f"in {console.log}"
    if code == DIVERGED_EXIT and read_finished(run_dir_of(argv)) is not None:
        print(f"clbench compare: {run_dir_of(argv)} diverged (collapsed training); marked in the table")
        return
    if code != 0:
        raise ConfigError(f"clbench fit {' '.join(argv)} failed (exit {code}); its error is {where}")
    if console is not None:
        print(f"clbench compare: finished {console.log.stem}")


def run_dir_of(fit_argv: list[str]) -> Path:
    """The run folder a `fit` argv trains: --resume's, or run.output_dir / run.name (compare sets both)."""
    values = {a: fit_argv[i + 1] for i, a in enumerate(fit_argv[:-1]) if a.startswith("--")}
    if "--resume" in values:
        return Path(values["--resume"])
    return Path(values.get("--run.output_dir", ".")) / values.get("--run.name", "")


def stop(child: subprocess.Popen) -> None:
    """Ends a fit that still runs, with its process group: SIGTERM lets it record "interrupted" in its
    results.json, SIGKILL follows after STOP_GRACE_S."""
    if child.poll() is not None:
        return
    print(f"clbench compare: stopping clbench fit (process {child.pid})", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
        os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()

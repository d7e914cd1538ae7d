"""`clbench compare`: several strategies (and seeds) on one stream, one table and one chart.

    clbench compare --config FILE --strategies seqft,replay,ewc --seeds 1,2,3 [--presets DIR]
        [--jobs N] [--launcher local|slurm --slurm.partition P --slurm.gpus_per_node G ...]

Every (strategy, seed) is an ordinary `clbench fit` run in <comparison>/runs/<strategy>-seed<seed>/,
all with the same config and pass-through overrides; per-strategy hyper-parameters and variants
come from `--presets DIR`, where `<entry>.yaml` is added to that entry's runs. Three steps:

- plan (plan.py): which runs, with which `fit` arguments. A finished run is reused when its
  config.yaml is the config this invocation would give it (run.name and run.output_dir aside) and
  its recorded identity (data as used, model, code, precision, library versions;
  clbench/identity.py) is the one this invocation's run would have, and refused before anything
  trains when not (naming what differs); `--rerun_changed` moves such runs to
  <comparison>/superseded/ and reruns them. An interrupted run with the same config goes on from
  its last finished task (`fit --resume`); nothing is deleted: other unfinished runs are moved
  aside with a timestamp suffix and run again.
- launch (launch.py): each run that is not reused is a submitit job, on this machine (`--jobs N`
  side by side) or on SLURM (`--launcher slurm`); its console goes to <comparison>/logs/<run>.log.
  Runs that need the same cached side result (a strategy's lock) compute it once: the first takes
  the lock, the others wait and reuse it. A fit imports clbench as installed, never a module of the
  same name in the working directory.
- report (report.py): comparison.md, comparison.csv and two plots from the runs' records.

One compare per comparison folder (compare.lock names the holder's process id); a lock left by a
compare that died is taken over. No job outlives its compare: Ctrl-C, SIGTERM or an error stops them.

`--finished_only` trains nothing and moves nothing: it rewrites the comparison from the runs that
have finished, noting (not refusing) those whose config or inputs differ from this invocation's.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from clbench import records
from clbench.arguments import command_parser, parse_command, split_known
from clbench.compare.launch import Slurm, launch
from clbench.compare.plan import (
    changed_runs,
    check_fit_arguments,
    folder_lock,
    planned_runs,
    preset_file,
    read_finished,
    run_change,
    short_name,
)
from clbench.compare.report import write_comparison
from clbench.errors import ConfigError
from strategies import class_path

# compare sets these for each run
RESERVED = ("--strategy", "--seed_everything", "--run.name", "--run.output_dir", "--run.entry")


def parser() -> ArgumentParser:
    """compare's own options (a jsonargparse parser); every other argument is passed to each `fit`."""
    p = command_parser("clbench compare", __doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the fit config (model, stream, trainer)")
    p.add_argument("--strategies", required=True, help="comma-separated registry names or class paths")
    p.add_argument("--seeds", help="comma-separated integer seeds (unset: the config's seed_everything)")
    p.add_argument(
        "--output_dir", help="parent of the comparison folder (unset: the config's run.output_dir)"
    )
    p.add_argument("--name", help="comparison folder name (unset: compare-<stream name or config stem>)")
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
        help="runs trained side by side, each with cpu_count // jobs torch threads unless "
        "OMP_NUM_THREADS is set (on SLURM: the array's parallelism); consoles in <comparison>/logs/<run>.log",
    )
    p.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="where the runs' jobs run (submitit): this machine, or SLURM with the --slurm.* resources, "
        "--jobs runs at a time",
    )
    p.add_class_arguments(Slurm, "slurm", help="SLURM resources of each run's job (with --launcher slurm)")
    p.epilog = "Other arguments (e.g. --run.checkpoints none) are passed to every `clbench fit` run."
    return p


def parse_args(argv: list[str]) -> tuple[Namespace, list[str]]:
    """Compare's own options, and the rest to pass through to every `fit`."""
    p = parser()
    own, passthrough = split_known(p, argv)
    args = parse_command(p, own)
    args.slurm = p.instantiate_classes(args).slurm  # a Slurm, from --slurm FILE and --slurm.* options
    if args.launcher == "slurm":
        passthrough += slurm_trainer_args(args.slurm, passthrough)
        args.slurm.check()
    if args.jobs < 1:
        raise ConfigError(f"--jobs: expected a positive integer, got {args.jobs}")
    for arg in passthrough:
        if arg.split("=", 1)[0] in RESERVED:
            raise ConfigError(f"{arg}: set by compare; use --strategies, --seeds, --output_dir, --name")
    cfg = _read_config(args.config)
    if args.presets is not None and not Path(args.presets).is_dir():
        raise ConfigError(f"--presets: {args.presets}: no such folder")
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


def slurm_trainer_args(slurm: Slurm, passthrough: list[str]) -> list[str]:
    """The Trainer settings a SLURM job's shape fixes (Lightning refuses a job whose tasks per node or
    nodes differ from its devices or num_nodes): added to every fit, refused when given otherwise."""
    given = {}
    for i, arg in enumerate(passthrough):
        option, _, value = arg.partition("=")
        if option in ("--trainer.num_nodes", "--trainer.devices"):
            given[option] = value or (passthrough[i + 1] if i + 1 < len(passthrough) else "")
    fixed = {"--trainer.num_nodes": str(slurm.nodes)}
    if slurm.gpus_per_node:
        fixed["--trainer.devices"] = str(slurm.gpus_per_node)
    added = []
    for option, value in fixed.items():
        if option not in given:
            added += [option, value]
        elif given[option] != value:
            raise ConfigError(
                f"{option} {given[option]}: the SLURM job has {value} (--slurm.nodes, "
                "--slurm.gpus_per_node); leave it out and compare sets it"
            )
    return added


def _read_config(path: str) -> dict:
    from clbench.fit import read_yaml

    cfg = read_yaml(path)
    return cfg if isinstance(cfg, dict) else {}


def _split(text: str, option: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or len(set(items)) != len(items):
        raise ConfigError(f"--{option}: expected a comma-separated list without repeats, got '{text}'")
    return items


def main(argv: list[str]) -> dict[str, list[dict]]:
    """`clbench compare`: plan the runs, launch those not reused, then write the comparison."""
    args, passthrough = parse_args(argv)
    runs = planned_runs(args, passthrough)
    check_fit_arguments(runs)
    if args.finished_only:
        return tabulate_finished(args, passthrough, runs)
    with folder_lock(args.compare_dir), sigterm_raises():
        changed = changed_runs(runs, args.rerun_changed)
        starts = []
        for run in runs:
            if run.dir in changed or read_finished(run.dir) is None:
                starts.append(run)
            else:
                print(f"clbench compare: reusing finished run {run.dir}")
        launch(starts, args.launcher, args.jobs, args.compare_dir / "logs", args.slurm)
        results: dict[str, list[dict]] = {}
        for run in runs:
            record = records.read_record(run.dir)
            if record is None:
                raise ConfigError(f"{run.dir / 'results.json'}: missing or unreadable after the fit")
            results.setdefault(short_name(run.strategy), []).append(record.results)
        report(args, passthrough, results, [])
    return results


def report(args: Namespace, passthrough: list[str], runs: dict[str, list[dict]], notes: list[str]) -> None:
    baseline = short_name(args.baseline) if args.baseline else None
    write_comparison(args.compare_dir, args.config, passthrough, runs, baseline, len(args.seeds), notes)


def tabulate_finished(args: Namespace, passthrough: list[str], runs: list) -> dict[str, list[dict]]:
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
    report(args, passthrough, results, [note, ""])
    return results


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

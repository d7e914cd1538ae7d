"""`clbench analyze importance | budget | select`: the studies over finished runs (clbench/studies/).

importance RUN_DIR: per-layer overlap of a run's importance maps (studies/importance.py); budget
COMPARISON...: the matched-budget study (studies/budget.py); select COMPARISON...: baselines'
settings chosen on the eval split (studies/selection.py).
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from clbench.arguments import command_parser, parse_command
from clbench.errors import ConfigError
from clbench.studies.budget import analyze_budget, markdown
from clbench.studies.importance import analyze_importance
from clbench.studies.selection import select


def check_folder(folder: Path, kind: str) -> None:
    """A folder analyze reads exists and is of the kind the analysis needs: a run folder (with
    results.json) or a comparison folder (with runs/); a one-line ConfigError says which it is."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder")
    is_run, is_comparison = (folder / "results.json").is_file(), (folder / "runs").is_dir()
    if kind == "run" and not is_run:
        other = (
            "a comparison folder; give one of its runs/<run> folders" if is_comparison else "no run folder"
        )
        raise ConfigError(f"{folder}: holds no results.json: {other}")
    if kind == "comparison" and not is_comparison:
        other = (
            "a run folder; give the comparison folder that holds runs/" if is_run else "no comparison folder"
        )
        raise ConfigError(f"{folder}: holds no runs/ folder: {other} (clbench compare makes them)")


def parser() -> ArgumentParser:
    """`clbench analyze`'s parser: one jsonargparse subcommand per study."""
    p = command_parser("clbench analyze", __doc__.split("\n\n")[0])
    imp = command_parser("clbench analyze importance", "per-layer overlap of a run's importance maps")
    imp.add_argument("run_dir", type=Path, help="a run folder with importance maps")
    imp.add_argument("--top", type=float, default=0.05, help="top fraction compared")
    imp.add_argument("--max_elements", type=int, default=1_000_000, help="per-layer subsample size")
    bud = command_parser("clbench analyze budget", "the matched-budget study of comparison folders")
    bud.add_argument("comparison", type=Path, nargs="+", help="comparison folders (with runs/)")
    bud.add_argument("--baseline", default="seqft", help="the entry each run is paired with by seed")
    bud.add_argument("--out", type=Path | None, help="folder of budget_study.md/.png (unset: the first one)")
    sel = command_parser("clbench analyze select", "each baseline's setting chosen on eval-split comparisons")
    sel.add_argument("comparison", type=Path, nargs="+", help="comparison folders (with runs/)")
    sel.add_argument("--by", default="OP", help="OP, BWT or own: the mean over seeds to maximise")
    sub = p.add_subcommands(dest="analysis", required=True)
    sub.add_subcommand("importance", imp, help=imp.description)
    sub.add_subcommand("budget", bud, help=bud.description)
    sub.add_subcommand("select", sel, help=sel.description)
    return p


def main(argv: list[str]) -> None:
    cfg = parse_command(parser(), argv)
    args = cfg[cfg.analysis]
    args.analysis = cfg.analysis
    if args.analysis == "importance":
        check_folder(args.run_dir, "run")
    else:
        for folder in args.comparison:
            check_folder(folder, "comparison")
    if args.analysis == "select":
        for strategy, preset in select(args.comparison, args.by).items():
            print(f"clbench analyze: {strategy}: {preset}")
        print(f"clbench analyze: {args.comparison[0] / 'selection.md'}")
        return
    if args.analysis == "budget":
        study = analyze_budget(args.comparison, args.baseline, args.out)
        out = args.out or args.comparison[0]
        print(markdown(study, args.baseline))
        print(f"clbench analyze: {out / 'budget_study.md'}, {out / 'budget_study.png'}")
        return
    if not 0 < args.top <= 1:
        raise ConfigError(f"--top must be in (0, 1], got {args.top}")
    results = analyze_importance(args.run_dir, args.top, args.max_elements)
    print(f"clbench analyze: {len(results)} comparisons; table: {args.run_dir / 'importance' / 'overlap.md'}")

"""Baselines at their best: each strategy's setting chosen on the eval split, never on the test split.

    clbench analyze select runs/tune [--by OP]

Reads the finished runs of a comparison folder run with `--stream.score_split eval` (the tuning
presets of configs/study/); runs scored on the test split are refused, so a choice can never
see the numbers it will be judged by. Runs are grouped by strategy class (ewc, lwf, replay, ...);
within a group the preset with the highest mean of `--by` over its seeds wins (OP by default:
BWT alone would pick whatever learns least). Writes selection.md beside the runs: every
candidate, and the chosen preset per strategy, to run on the test split over the study's seeds.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import yaml

from clbench.budget_study import read_run
from clbench.errors import ConfigError
from clbench.files import write_atomic

KEYS = {"OP": "op", "BWT": "bwt", "own": "own"}


def candidates(comparison: Path) -> dict[str, dict[str, list[dict]]]:
    """{strategy class: {preset: [finished runs]}} of an eval-split comparison folder."""
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for folder in sorted((comparison / "runs").glob("*-seed*")):
        run = read_run(folder)
        if run is None:
            continue
        split = (yaml.safe_load((folder / "config.yaml").read_text()).get("stream") or {}).get("score_split")
        if split != "eval":
            raise ConfigError(
                f"{folder / 'config.yaml'}: stream.score_split is {split or 'test'}; settings are chosen "
                "on eval-split runs only (--stream.score_split eval)"
            )
        groups[run["class"]][run["name"]].append(run)
    if not groups:
        raise ConfigError(f"{comparison}: no finished run to choose from")
    return groups


def select(comparison: Path, by: str = "OP") -> dict[str, str]:
    """The chosen preset per strategy class; writes <comparison>/selection.md."""
    if by not in KEYS:
        raise ConfigError(f"--by: one of {', '.join(KEYS)}, got {by!r}")
    key, groups = KEYS[by], candidates(comparison)
    mean = {c: {p: sum(r[key] for r in rs) / len(rs) for p, rs in ps.items()} for c, ps in groups.items()}
    chosen = {c: max(scores, key=scores.get) for c, scores in mean.items()}
    lines = [
        f"Settings chosen on the eval split by mean {by} over seeds (`clbench analyze select`).",
        "",
        "| strategy | preset | seeds | OP | BWT (TRACE) | own-task score | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in sorted(groups):
        for preset, rs in sorted(groups[c].items()):
            cells = [c, preset, str(len(rs))]
            cells += [f"{sum(r[k] for r in rs) / len(rs):.3f}" for k in ("op", "bwt", "own")]
            cells.append("**yes**" if chosen[c] == preset else "")
            lines.append("| " + " | ".join(cells) + " |")
    write_atomic(comparison / "selection.md", "\n".join(lines) + "\n")
    return chosen

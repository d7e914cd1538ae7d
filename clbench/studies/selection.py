"""Baselines at their best: each strategy's setting chosen on the eval split, never on the test split.

    clbench analyze select runs/tune [runs/tune-b ...] [--by OP]

Reads the finished runs of one or more comparison folders run with `--stream.score_split eval` (the tuning
presets of configs/study/); runs scored on the test split are refused, so a choice can never
see the numbers it will be judged by. Runs are grouped by strategy class (ewc, lwf, replay, ...);
within a group the preset with the highest mean of `--by` wins (OP by default: BWT alone would
pick whatever learns least), each mean over the seeds every preset of the group ran, so no preset
is favoured by a luckier seed. Within a class, presets may differ in the optimiser's settings
(model.lr, the schedule: prompt methods tune their lr) but not in the model, its LoRA or the split
(budget.comparable_runs). Writes selection.md beside the runs: every candidate, and the
chosen preset per strategy, to run on the test split over the study's seeds (in the first folder
when there are several: tuning runs side by side, one compare per folder).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from clbench.errors import ConfigError
from clbench.files import write_atomic
from clbench.records import comparison_runs
from clbench.studies.budget import comparable_runs, read_run

KEYS = {"OP": "op", "BWT": "bwt", "own": "own"}


def candidates(comparisons: list[Path]) -> dict[str, dict[str, list[dict]]]:
    """{strategy class: {preset: [finished runs on the seeds all the class's presets ran]}} of
    eval-split comparison folders. Presets compete within their strategy class only, so each class
    must be like with like (one model setting), not the classes with each other (O-LoRA's LoRA
    presets beside SSR's full fine-tuning ones)."""
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    folders = [f for c in comparisons for f in comparison_runs(c)]
    runs = [r for f in folders if (r := read_run(f))]
    where = ", ".join(str(c) for c in comparisons)
    for run in runs:
        split = json.loads(run["setup"])["score_split"]
        if split != "eval":
            raise ConfigError(
                f"{run['folder'] / 'config.yaml'}: stream.score_split is {split}; settings are "
                "chosen on eval-split runs only (--stream.score_split eval)"
            )
        groups[run["class"]][run["name"]].append(run)
    if not groups:
        raise ConfigError(f"{where}: no finished run to choose from")
    for strategy, presets in groups.items():
        comparable_runs([r for rs in presets.values() for r in rs], setup="model_setup")
        shared = set.intersection(*({r["seed"] for r in rs} for rs in presets.values()))
        if not shared:
            raise ConfigError(f"{where}: the {strategy} presets share no seed; run them on the same seeds")
        for preset, rs in presets.items():
            presets[preset] = [r for r in rs if r["seed"] in shared]
    return groups


def select(comparisons: Path | list[Path], by: str = "OP") -> dict[str, str]:
    """The chosen preset per strategy class; writes selection.md into the first folder."""
    if by not in KEYS:
        raise ConfigError(f"--by: one of {', '.join(KEYS)}, got {by!r}")
    comparisons = [comparisons] if isinstance(comparisons, Path) else comparisons
    key, groups = KEYS[by], candidates(comparisons)
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
    write_atomic(comparisons[0] / "selection.md", "\n".join(lines) + "\n")
    return chosen

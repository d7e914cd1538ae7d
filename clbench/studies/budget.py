"""The matched-budget study: does attribution's choice of parameters beat cheaper or random choices?

    clbench analyze budget runs/study [runs/study-b ...] [--baseline seqft] [--out DIR]

Reads every finished run of one or more comparison folders (a study split over folders so that its
parts can run side by side). Runs of the attribution strategy with a `budget` (configs/study/) are
grouped by importance source (estimator) and budget q; each is paired with the baseline run of the
same seed. Per (source, q), over seeds: the change in BWT (TRACE) against the baseline, the own-task
score (the mean of the accuracy matrix's diagonal: plasticity) and its change, OP, the measured
share of the update's L1 mass the gate removed (importance/gate.json, averaged over the gated tasks;
measured under gate_target "update" only), and, for every source but random, the change in BWT and
own-task score against the random choice at the same q on the same seeds: the matched control, the
comparison that says whether the source's choice of elements matters; and LRP against each cheaper
source at the same q (does attribution choose better than gradient x weight, Fisher, |θ|?), paired by
seed likewise. Mean and standard error over
seeds (sample std / sqrt(n)); a difference counts as real only beyond its errors.
Writes budget_study.md and budget_study.png (one line per source against removed mass) into the
first folder or --out.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from matplotlib import ticker

from clbench.errors import ConfigError
from clbench.evaluation.matrix import own_task_score
from clbench.files import write_atomic
from clbench.records import comparison_runs, read_record
from clbench.reporting import plt, save_figure

SOURCES = ("lrp", "grad_x_weight", "fisher", "magnitude", "random")

# model.* settings of the optimiser: presets of one strategy may tune them (analyze select)
OPTIMISER_SETTINGS = ("lr", "weight_decay", "betas", "warmup_steps", "schedule", "keep_optimizer_state")


def read_run(folder: Path) -> dict | None:
    """One completed run: strategy settings, seed and what the study needs from its results."""
    record = read_record(folder)
    if record is None or record.status != "complete" or not record.config:
        return None
    results, cfg, args = record.results, record.config, record.strategy_args
    gates = folder / "importance" / "gate.json"
    removed = []
    if gates.is_file():
        removed = [
            e["update_mass_removed"]
            for e in json.loads(gates.read_text()).values()
            if "update_mass_removed" in e
        ]
    setup = {"model": cfg.get("model"), "score_split": record.score_split}
    tuned = {k: v for k, v in (cfg.get("model") or {}).items() if k not in OPTIMISER_SETTINGS}
    model_setup = {"model": tuned, "score_split": record.score_split}
    return {
        "folder": folder,
        "setup": json.dumps(setup, sort_keys=True, default=str),  # what must match to compare runs
        # what must match to choose among presets: a preset may tune the optimiser (prompt methods'
        # lr), not the model, its LoRA or the split
        "model_setup": json.dumps(model_setup, sort_keys=True, default=str),
        "name": record.entry,
        "class": record.strategy_class,
        "estimator": args.get("estimator", "lrp"),
        "budget": args.get("budget"),
        "seed": record.seed,
        "bwt": results["summary"]["BWT_TRACE"],
        "op": results["summary"]["OP"],
        "own": own_task_score(results["matrix"]),
        "removed": sum(removed) / len(removed) if removed else None,
    }


def _stat(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (None with one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def collect(comparisons: Path | list[Path], baseline: str = "seqft") -> dict:
    """{(source, q): {n, seeds, d_bwt, own, d_own, op, removed, vs_random, lrp_vs}} with (mean,
    standard error) cells, from the finished runs of one or more comparison folders; `lrp_vs` is LRP
    minus this source (cheaper sources only). Nothing to pair (no attribution run with a budget, or
    none on a seed the baseline ran) is a ConfigError saying which, not an empty table."""
    folders = [comparisons] if isinstance(comparisons, Path) else list(comparisons)
    runs = comparable_runs([r for c in folders for f in comparison_runs(c) if (r := read_run(f))])
    base = {r["seed"]: r for r in runs if r["name"] == baseline}
    if not base:
        names = ", ".join(str(c) for c in folders)
        raise ConfigError(f"{names}: no finished {baseline} run to pair with")
    budgeted = [r for r in runs if r["class"] == "attribution" and r["budget"] is not None]
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in budgeted:
        if r["seed"] in base:
            groups[(r["estimator"], float(r["budget"]))].append(r)
    if not groups:
        names = ", ".join(str(c) for c in folders)
        if not budgeted:
            entries = ", ".join(sorted({r["name"] for r in runs}))
            why = f"no finished attribution run with a budget (configs/study/) among its entries {entries}"
        else:
            seeds = sorted({r["seed"] for r in budgeted})
            why = f"the attribution runs with a budget ran seeds {seeds}, the {baseline} runs {sorted(base)}"
        raise ConfigError(f"{names}: nothing to pair with {baseline} by seed: {why}")
    out = {}
    for key, rs in sorted(groups.items()):
        cheaper = key[0] not in ("lrp", "random")
        pairs = [(r, base[r["seed"]]) for r in rs]
        out[key] = {
            "n": len(rs),
            "seeds": sorted(r["seed"] for r in rs),
            "d_bwt": _stat([r["bwt"] - b["bwt"] for r, b in pairs]),
            "own": _stat([r["own"] for r in rs]),
            "d_own": _stat([r["own"] - b["own"] for r, b in pairs]),
            "op": _stat([r["op"] for r in rs]),
            "removed": _stat([r["removed"] for r in rs])
            if all(r["removed"] is not None for r in rs)
            else None,
            "vs_random": _against(rs, groups.get(("random", key[1]), [])) if key[0] != "random" else None,
            "lrp_vs": _against(groups.get(("lrp", key[1]), []), rs) if cheaper else None,
        }
    out[("baseline", 0.0)] = {
        "n": len(base),
        "seeds": sorted(base),
        "bwt": _stat([b["bwt"] for b in base.values()]),
        "own": _stat([b["own"] for b in base.values()]),
        "op": _stat([b["op"] for b in base.values()]),
    }
    return out


def comparable_runs(runs: list[dict], setup: str = "setup") -> list[dict]:
    """The runs, refused when two share a name and seed (one would count twice) or when their
    `setup` differs: "setup", model settings or score split (LoRA against full fine-tuning, eval
    against test: analyse such sets separately); "model_setup", the same less OPTIMISER_SETTINGS."""
    seen: dict[tuple[str, object], Path] = {}
    for r in runs:
        key = (r["name"], r["seed"])
        if key in seen:
            raise ConfigError(f"{seen[key]} and {r['folder']}: two finished runs of {key[0]} seed {key[1]}")
        seen[key] = r["folder"]
    first = runs[0] if runs else None
    for r in runs:
        if r[setup] != first[setup]:
            raise ConfigError(
                f"{first['folder']} and {r['folder']}: different model settings or score split; "
                "compare like with like (analyse them separately)"
            )
    return runs


def _against(runs: list[dict], control: list[dict]) -> dict | None:
    """Paired by seed: these runs' BWT, own-task score and OP minus the control's (None: no shared seed)."""
    by_seed = {c["seed"]: c for c in control}
    pairs = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
    if not pairs:
        return None
    return {
        "n": len(pairs),
        "d_bwt": _stat([r["bwt"] - c["bwt"] for r, c in pairs]),
        "d_own": _stat([r["own"] - c["own"] for r, c in pairs]),
        "d_op": _stat([r["op"] - c["op"] for r, c in pairs]),
    }


def _cell(stat: tuple[float, float | None] | None, signed: bool = False) -> str:
    if stat is None:
        return "–"
    mean, se = stat
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text + (f" ± {se:.3f}" if se is not None else "")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _source_rank(source: str) -> int:
    """Sources in SOURCES order (others last), in the tables and the plot's legend."""
    return SOURCES.index(source) if source in SOURCES else len(SOURCES)


def _by_budget(item: tuple) -> tuple[float, int]:
    """Rows by q, then by source: the sources side by side at each matched budget."""
    (source, q), _ = item
    return q, _source_rank(source)


def markdown(study: dict, baseline: str) -> str:
    b = study[("baseline", 0.0)]
    lines = [
        f"Baseline {baseline}: {b['n']} seeds {b['seeds']}, BWT (TRACE) {_cell(b['bwt'])}, "
        f"own-task score {_cell(b['own'])}, OP {_cell(b['op'])} (mean ± standard error).",
        "",
        "| source | q | seeds | update mass removed | ΔBWT (TRACE) vs baseline | own-task score "
        "| Δ own-task | OP | seeds with random at q | ΔBWT vs random | Δ own-task vs random |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (source, q), s in sorted(study.items(), key=_by_budget):
        if source == "baseline":
            continue
        cells = [source, f"{q:g}", str(s["n"]), _cell(s["removed"]), _cell(s["d_bwt"], True)]
        cells += [_cell(s["own"]), _cell(s["d_own"], True), _cell(s["op"])]
        vs = s.get("vs_random")
        cells += [str(vs["n"]), _cell(vs["d_bwt"], True), _cell(vs["d_own"], True)] if vs else ["–"] * 3
        lines.append(_row(cells))
    cheaper = [(key, s["lrp_vs"]) for key, s in sorted(study.items(), key=_by_budget) if s.get("lrp_vs")]
    if cheaper:
        lines += [
            "",
            "LRP minus each cheaper source at the same q, paired by seed (positive ΔBWT: LRP forgets less):",
            "",
            "| source | q | seeds with lrp at q | ΔBWT (lrp − source) | Δ own-task (lrp − source) "
            "| ΔOP (lrp − source) |",
            "|---|---|---|---|---|---|",
        ]
        for (source, q), vs in cheaper:
            lines.append(
                _row(
                    [source, f"{q:g}", str(vs["n"])]
                    + [_cell(vs[k], True) for k in ("d_bwt", "d_own", "d_op")]
                )
            )
    return "\n".join(lines) + "\n"


def plot(study: dict, path: Path, baseline: str) -> None:
    """Against the removed update mass, one line per source: ΔBWT and Δ own-task score against the
    baseline; and against q, the paired ΔBWT against random at the same q (the matched control,
    whose error bars are those of the paired differences, not of the two lines above)."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    by_source: dict[str, list] = defaultdict(list)
    for (source, q), s in study.items():
        if source != "baseline":
            by_source[source].append((s["removed"][0] if s["removed"] else q, q, s))
    xs_all: list[list[float]] = [[], [], []]
    for source in sorted(by_source, key=_source_rank):
        points = sorted(by_source[source], key=lambda p: p[0])
        xs = [100 * x for x, _, _ in points]
        for i, key in enumerate(("d_bwt", "d_own")):
            _line(axes[i], xs, [s[key] for _, _, s in points], source)
            xs_all[i] += xs
        paired = [(100 * q, s["vs_random"]["d_bwt"]) for _, q, s in points if s.get("vs_random")]
        if paired:
            _line(axes[2], [x for x, _ in paired], [d for _, d in paired], source)
            xs_all[2] += [x for x, _ in paired]
    titles = (
        f"ΔBWT (TRACE) vs {baseline}: higher = less forgetting",
        f"Δ own-task score vs {baseline}",
        "ΔBWT (TRACE) vs random at the same q, paired by seed",
    )
    xlabels = ("share of the update's L1 mass removed (%)",) * 2 + ("q: share of each tensor protected (%)",)
    for ax, title, xlabel, xs in zip(axes, titles, xlabels, xs_all, strict=True):
        ax.axhline(0, color="grey", lw=0.8)
        if xs and max(xs) > 8 * min(xs):  # budgets over more than a decade: 2% and 5% stay apart
            ax.set_xscale("log")
            ax.set_xticks([t for t in (1, 2, 5, 10, 20, 50, 100) if min(xs) / 1.5 <= t <= max(xs) * 1.5])
            ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _line(ax: plt.Axes, xs: list[float], stats: list[tuple[float, float | None]], label: str) -> None:
    ax.errorbar(
        xs, [m for m, _ in stats], yerr=[se or 0.0 for _, se in stats], marker="o", capsize=3, label=label
    )


def analyze_budget(comparisons: list[Path], baseline: str = "seqft", out: Path | None = None) -> dict:
    """The study table and plot of one or more comparison folders (written into `out`, default the
    first folder); returns the collected cells."""
    for comparison in comparisons:
        if not (comparison / "runs").is_dir():
            raise ConfigError(f"{comparison}: not a comparison folder (no runs/ inside)")
    study = collect(comparisons, baseline)
    out = out or comparisons[0]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    write_atomic(out / "budget_study.md", markdown(study, baseline))
    plot(study, out / "budget_study.png", baseline)
    return study

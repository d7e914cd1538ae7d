"""compare's report: mean ± std per strategy over seeds, paired differences to a baseline, and the
comparison's markdown table, CSV and two plots (bars; OP against BWT)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from clbench.evaluation.general import primary
from clbench.evaluation.matrix import own_task_score
from clbench.files import write_atomic
from clbench.reporting import save_figure

METRICS = {"OP": "OP", "BWT (TRACE)": "BWT_TRACE", "BWT (GEM)": "BWT_GEM", "FWT": "FWT"}

OWN = "own-task score"  # mean of the matrix's diagonal: how well each task was learned
GENERAL = "general change"  # general ability after the stream minus before (results.json "general")

Cell = tuple[float | None, float | None]  # (mean, sample std) over seeds


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
    cols |= general_columns(results)
    train, evaluate = timings.get("train_s"), timings.get("eval_s")
    general_s = timings.get("general_s", 0.0)
    cols["wall time s"] = None if train is None or evaluate is None else train + evaluate + general_s
    # the costs a strategy adds per optimizer step (its own gradients or projections) and at
    # evaluation (its own answers), read beside another strategy's on the same split and machine
    steps = sum((timings.get("steps") or {}).values())
    cols["step time s"] = train / steps if train is not None and steps else None
    cols["eval time s"] = evaluate
    cols["peak memory MB"] = timings.get("peak_memory_mb")
    return cols


def general_columns(results: dict) -> dict[str, float | None]:
    """A run's general-ability change (mean over lm-eval tasks, and per task its primary metric);
    nothing for a run that measured none."""
    g = results.get("general")
    if not g:
        return {}
    cols = {GENERAL: g.get("mean_change")}
    after = g["rows"].get(str(len(results.get("tasks") or []))) or {}
    for task, metrics in after.items():
        key = primary(metrics)
        cols[f"general Δ {task} {key}"] = (g.get("change") or {}).get(task, {}).get(key)
    return cols


PAIRED = ("OP", "BWT (TRACE)", OWN, GENERAL)  # metrics also shown as paired differences to a baseline


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
    # general change only where some run measured it; the rest always (blank where undefined)
    headline = [k for k in (*METRICS, OWN, GENERAL) if k != GENERAL or k in columns]
    rows = []
    for s, cols in per_run.items():
        diverged = [r.get("seed") for r in runs[s] if r.get("status") == "diverged"]
        row: dict = {"strategy": s, "seeds": [r.get("seed") for r in complete[s]], "n_seeds": len(cols)}
        row["diverged"] = diverged
        cells = {k: mean_std([c.get(k) for c in cols]) for k in columns}
        paired = {}
        for k in [k for k in PAIRED if k in headline] if baseline else ():
            pairs = [(c.get(k), base.get(r.get("seed"), {}).get(k)) for c, r in zip(cols, complete[s])]
            diffs = [a - b for a, b in pairs if s != baseline and a is not None and b is not None]
            paired[f"Δ{k} vs {baseline}"] = mean_std(diffs)
        summary = {k: cells.pop(k, (None, None)) for k in headline}
        rows.append(row | summary | paired | cells)  # summary, paired differences, then the rest
    return rows


def _columns(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if k not in ("strategy", "seeds", "n_seeds", "diverged")] if rows else []


def _cell(cell: Cell, column: str) -> str:
    mean, std = cell
    digits = 0 if column in ("wall time s", "eval time s", "peak memory MB") else 3
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
    _plot_against_op(rows, "BWT (TRACE)", "BWT (TRACE): higher = less forgetting", title, path)


def plot_general(rows: list[dict], title: str, path: Path) -> None:
    """OP against the general-ability change, one point per strategy with its std over seeds both
    ways: TRACE's trade-off (up: the stream is learned; right: the model keeps what it could do)."""
    xlabel = "general-ability change (after − before; mean over lm-eval tasks)"
    _plot_against_op(rows, GENERAL, xlabel, title, path)


def _plot_against_op(rows: list[dict], column: str, xlabel: str, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    markers = "osD^vP*X"
    for i, r in enumerate(rows):
        (op, op_std), (x, x_std) = r["OP"], r.get(column, (None, None))
        if op is None or x is None:
            continue
        ax.errorbar(
            x,
            op,
            xerr=x_std or 0.0,
            yerr=op_std or 0.0,
            marker=markers[i % len(markers)],
            capsize=3,
            ls="none",
            label=r["strategy"],
        )
    # a legend, not labels at the points: strategies near seqft sit on top of each other
    ax.legend(fontsize="small")
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("OP (mean final score on the stream)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def same_runs(runs: dict[str, list[dict]]) -> list[str]:
    """A note per two entries of one strategy that, on every seed both ran, used the same settings
    (results.json's `strategy_used`, where a strategy records what it really used: SSR's demonstrations
    capped by a task's size, say) and got the same matrix: one run under two names, which the table
    would otherwise show as two results."""
    notes = []
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            by_seed = [{r.get("seed"): r for r in runs[name]} for name in (a, b)]
            seeds = by_seed[0].keys() & by_seed[1].keys()
            pairs = [(by_seed[0][seed], by_seed[1][seed]) for seed in seeds]
            if pairs and all(
                x.get("strategy_used")
                and (x["strategy"], x["strategy_used"], x["matrix"])
                == (y.get("strategy"), y.get("strategy_used"), y.get("matrix"))
                for x, y in pairs
            ):
                notes.append(
                    f"{a} and {b} used the same settings on every task (strategy_used in results.json) "
                    "and got the same numbers: one run under two names."
                )
    return notes


def write_comparison(
    folder: Path,
    config: str,
    passthrough: list[str],
    runs: dict[str, list[dict]],
    baseline: str | None,
    n_seeds: int,
    notes: list[str],
) -> None:
    """comparison.md, comparison.csv, comparison.png (bars), comparison-pareto.png (OP against
    BWT) and, where runs measured general ability, comparison-general.png (OP against its change)
    in the comparison folder."""
    rows = aggregate(runs, baseline)
    folder.mkdir(parents=True, exist_ok=True)
    stream = next(iter(runs.values()))[0].get("stream", "")
    header = [
        f"# Comparison on {stream}",
        "",
        f"Config `{config}`" + (f", overrides `{' '.join(passthrough)}`" if passthrough else "") + ".",
        "Mean ± sample standard deviation (ddof=1) over seeds; a blank std means one seed.",
        "Scores are on [0, 1]; own-task score = mean of R[i][i] (each task right after training on it);",
        "wall time = train + eval (+ general-ability eval) seconds. General change = general ability",
        "after the stream minus before (lm-eval; the mean over its tasks of each one's primary metric).",
        "",
    ]
    if baseline:
        header += [f"Δ columns: per-seed differences to {baseline} on the seeds both ran (paired).", ""]
    for note in same_runs(runs):
        print(f"clbench compare: note: {note}")
        notes = [*notes, note]
    header += [*notes, ""]
    write_atomic(folder / "comparison.md", "\n".join(header) + markdown_table(rows) + "\n")
    write_atomic(folder / "comparison.csv", csv_text(rows))
    n_runs = sum(len(r) for r in runs.values())
    title = f"{stream}: {n_runs} runs, up to {n_seeds} seed(s) each"
    plot_comparison(rows, title, folder / "comparison.png")
    plot_pareto(rows, title, folder / "comparison-pareto.png")
    if any(GENERAL in r and r[GENERAL][0] is not None for r in rows):
        plot_general(rows, title, folder / "comparison-general.png")
    print(f"clbench compare: {len(rows)} strategies, {n_runs} runs: {folder / 'comparison.md'}")

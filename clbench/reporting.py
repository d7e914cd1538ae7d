"""Run outputs people read: results.json, results.md and the matrix heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from clbench.files import atomic_path  # noqa: E402


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _stderr(per_task: dict) -> str:
    """The final score's standard error; "n/a" where one scored example has none."""
    if per_task["final_stderr"] is None and per_task["final"] is not None and per_task["n_test"] < 2:
        return "n/a"
    return _fmt(per_task["final_stderr"])


def matrix_table(tasks: list[str], matrix: list[list[float | None]]) -> str:
    """Markdown table of R: one row per point of the stream, one column per task."""
    lines = ["| after \\ task | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for r, row in enumerate(matrix):
        label = "start" if r == 0 else f"{r}. {tasks[r - 1]}"
        lines.append(f"| {label} | " + " | ".join(_fmt(x) for x in row) + " |")
    return "\n".join(lines)


def results_markdown(results: dict) -> str:
    """The whole run as tables: summary, matrix, final per-task details."""
    s = results["summary"]
    out = [
        f"# {results['stream']} · {results['strategy']} · seed {results['seed']}",
        "",
        f"Every score below is on the {results.get('score_split', 'test')} split of each task.",
        "",
        "Scores are on [0, 1] for every metric (ROUGE-L, edit similarity and SARI divided by 100 where",
        "their usual scale is 0-100). BWT (TRACE) = (1/T)·Σ_{i≤T}(R[T][i] − R[i][i]);",
        "BWT (GEM) = (1/(T−1))·Σ_{i<T}(R[T][i] − R[i][i]); FWT = (1/(T−1))·Σ_{i≥2}(R[i−1][i] − R[0][i]).",
        "",
        "| OP | BWT (TRACE) | BWT (GEM) | FWT | train s | eval s |",
        "|---|---|---|---|---|---|",
        f"| {_fmt(s['OP'])} | {_fmt(s['BWT_TRACE'])} | {_fmt(s['BWT_GEM'])} | {_fmt(s['FWT'])} "
        f"| {results['timings']['train_s']:.0f} | {results['timings']['eval_s']:.0f} |",
        "",
        "## Accuracy matrix R[t][i]",
        "",
        matrix_table(results["tasks"], results["matrix"]),
        "",
        "## Per task",
        "",
        "| task | metric | n scored | start | after own task | final | ± s.e. | valid label share (final) "
        "| majority baseline | train loss before → after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in results["tasks"]:
        d = results["per_task"][name]
        out.append(
            f"| {name} | {d['metric']} | {d['n_test']} | {_fmt(d['start'])} | {_fmt(d['after_own_task'])} "
            f"| {_fmt(d['final'])} | {_stderr(d)} | {_fmt(d['valid_label_share'], 2)} "
            f"| {_fmt(d['majority_baseline'])} | {_fmt(d['loss_before'])} → {_fmt(d['loss_after'])} |"
        )
    out += _label_share_table(results)
    out += general_table(results)
    out += [
        "",
        f"Predictions: `predictions/after_<t>/<task>.jsonl`. Package versions: {results['versions']}",
        "",
    ]
    return "\n".join(out)


def general_table(results: dict) -> list[str]:
    """General ability as lm-eval measured it (value ± standard error), before the stream, after
    each task where measured and after it, with the change: what the stream cost the model outside
    its own tasks."""
    g = results.get("general")
    if not g:
        return []
    T = len(results["tasks"])
    rows = sorted(int(r) for r in g["rows"])
    label = {
        r: "before" if r == 0 else ("after" if r == T else f"after {r}. {results['tasks'][r - 1]}")
        for r in rows
    }
    shots = "each task's default" if g["num_fewshot"] is None else g["num_fewshot"]
    settings = f"lm-eval {g.get('lm_eval')}, num_fewshot {shots}, limit {g['limit'] or 'none'}"
    out = [
        "",
        "## General ability (lm-eval)",
        "",
        f"Tasks outside the stream, scored by lm-evaluation-harness ({settings}); value ± standard error as",
        "lm-eval reports it. Change = after − before. Samples: `general/after_<row>/<task>.jsonl`.",
        "",
        "| task | metric | " + " | ".join(label[r] for r in rows) + " | change |",
        "|---" * (len(rows) + 3) + "|",
    ]
    change = g.get("change") or {}
    first = g["rows"][str(rows[0])] if rows else {}
    for task, metrics in first.items():
        for key in metrics:
            cells = []
            for r in rows:
                m = g["rows"][str(r)].get(task, {}).get(key)
                cells.append(
                    "–"
                    if m is None
                    else _fmt(m["value"]) + (f" ± {_fmt(m['stderr'])}" if m["stderr"] is not None else "")
                )
            delta = change.get(task, {}).get(key)
            out.append(
                f"| {task} | {key} | "
                + " | ".join(cells)
                + f" | {'–' if delta is None else f'{delta:+.3f}'} |"
            )
    if g.get("mean_change") is not None:
        out += [
            "",
            f"Mean change of each task's primary metric (a gain is positive): {g['mean_change']:+.3f}.",
        ]
    return out


def _label_share_table(results: dict) -> list[str]:
    """Valid-label share of classification tasks after each task: a falling share means a later
    task's answer format took over (format forgetting), a steady one that the model still answers
    with labels but picks wrong ones (knowledge forgetting)."""
    names = [n for n in results["tasks"] if results["per_task"][n]["labels"]]
    if not names:
        return []
    out = [
        "",
        "## Valid-label share of classification tasks",
        "",
        "| after \\ task | " + " | ".join(names) + " |",
    ]
    out.append("|---" * (len(names) + 1) + "|")
    for r in range(len(results["matrix"])):
        shares = [results["per_task"][n]["valid_label_share_by_row"].get(r) for n in names]
        if any(x is not None for x in shares):
            label = "start" if r == 0 else f"{r}. {results['tasks'][r - 1]}"
            out.append(f"| {label} | " + " | ".join(_fmt(x, 2) for x in shares) + " |")
    return out


def plot_heatmap(tasks: list[str], matrix: list[list[float | None]], title: str, path: Path) -> None:
    """Heatmap of R with values written in the cells; unevaluated cells stay blank."""
    data = [[float("nan") if x is None else x for x in row] for row in matrix]
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2.5, 0.55 * len(matrix) + 1.8))
    im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), ["start"] + [f"after {t}" for t in tasks])
    for r, row in enumerate(data):
        for c, x in enumerate(row):
            if x == x:  # not NaN
                ax.text(c, r, f"{x:.2f}", ha="center", va="center", color="white" if x < 0.6 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig: object, path: Path) -> None:
    """Save a matplotlib figure atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)

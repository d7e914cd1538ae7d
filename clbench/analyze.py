"""`clbench analyze importance RUN_DIR`: how much tasks' importance maps overlap, per layer.
(`clbench analyze budget COMPARISON [COMPARISON ...]`: the matched-budget study, clbench/budget_study.py;
`clbench analyze select COMPARISON [COMPARISON ...]`: baselines' settings chosen on the eval split,
clbench/tuning.py.)

The paper's Figure 1 (arXiv 2605.05285): for each layer (all of its trainable tensors flattened
together), the top-k overlap |top(a) & top(b)| / k of two maps' k = top_fraction x n largest
elements, and the Spearman rank correlation (average ranks for ties) of the two maps. Compared
are every pair of tasks' single-task priors, and each task's single-task prior against the
continual model's map after that task when the run recorded one (attribution's
`record_continual`, or source "continual": then the continual maps are compared between tasks).
Maps come from RUN_DIR/importance/used.json; the table (overlap.md) and plot (overlap.png) are
written beside it. Layers above `max_elements` are compared on one fixed random subset; layers
whose maps are all zero (norm weights alone, never gated) are left out.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from clbench.budget_study import analyze_budget, markdown
from clbench.errors import ConfigError
from clbench.files import write_atomic
from clbench.models import layer_index
from clbench.reporting import plt
from clbench.tuning import select


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through clbench's main instead of usage + exit
        raise ConfigError(message)


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


def layer_of(name: str) -> str:
    """'layer 3' for a decoder block's parameter, else 'embed', 'head' or 'other'."""
    index = layer_index(name)
    if index is not None:
        return f"layer {index}"
    if "embed" in name or "wte" in name or "wpe" in name:
        return "embed"
    return "head" if "lm_head" in name else "other"


def _order(layer: str) -> tuple[int, int]:
    if layer.startswith("layer "):
        return (1, int(layer.split()[1]))
    return ({"embed": 0, "head": 2}.get(layer, 3), 0)


def by_layer(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One flat fp32 vector per layer, tensors in name order."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name in sorted(tensors):
        groups.setdefault(layer_of(name), []).append(tensors[name].float().flatten())
    return {layer: torch.cat(groups[layer]) for layer in sorted(groups, key=_order)}


def topk_overlap(a: torch.Tensor, b: torch.Tensor, fraction: float) -> float:
    """Share of a's top-k elements (k = fraction x n, at least 1) that are also among b's."""
    k = max(1, round(fraction * a.numel()))
    top_a, top_b = a.topk(k).indices, b.topk(k).indices
    return torch.isin(top_a, top_b).sum().item() / k


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), fp64."""
    values, order = x.double().sort()
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() + 1) / 2  # 0-based mean rank of each run of ties
    ranks = torch.empty_like(values)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho; nan when either map is constant."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return float("nan") if denom == 0 else float((ra * rb).sum() / denom)


def read_maps(run_dir: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Single-task prior and continual map files by task name, from importance/used.json."""
    used = run_dir / "importance" / "used.json"
    if not used.is_file():
        raise ConfigError(f"{used} not found: was {run_dir} run with --strategy attribution?")
    single: dict[str, Path] = {}
    continual: dict[str, Path] = {}
    for entry in json.loads(used.read_text(encoding="utf-8"))["maps"]:
        (single if entry["kind"] == "single_task" else continual)[entry["task"]] = Path(entry["file"])
    return single, continual


def comparisons(single: dict[str, Path], continual: dict[str, Path]) -> list[tuple[str, Path, Path]]:
    """(label, map a, map b): task pairs (single-task priors, else continual maps), and each
    task's single-task prior against its continual map."""
    between = single if len(single) >= 2 else continual
    pairs = [(f"{a} vs {b}", between[a], between[b]) for a, b in itertools.combinations(between, 2)]
    own = [(f"{t}: single vs continual", single[t], continual[t]) for t in single if t in continual]
    return pairs + [(label, a, b) for label, a, b in own if a != b]


def analyze_importance(run_dir: Path, fraction: float = 0.05, max_elements: int = 1_000_000) -> dict:
    """{comparison: {layer: (overlap, spearman)}}, with overlap.md and overlap.png written."""
    single, continual = read_maps(run_dir)
    todo = comparisons(single, continual)
    if not todo:
        raise ConfigError(f"{run_dir}: fewer than two importance maps recorded; nothing to compare")
    cache: dict[Path, dict[str, torch.Tensor]] = {}
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for label, pa, pb in todo:
        a = cache.setdefault(pa, by_layer(load_file(str(pa))))
        b = cache.setdefault(pb, by_layer(load_file(str(pb))))
        results[label] = {}
        for layer in a:
            va, vb = a[layer], b[layer]
            if not (va.any() or vb.any()):
                continue  # norm weights alone: zero relevance, never gated
            if va.numel() > max_elements:
                pick = torch.randperm(va.numel(), generator=torch.Generator().manual_seed(0))[:max_elements]
                va, vb = va[pick], vb[pick]
            results[label][layer] = (topk_overlap(va, vb, fraction), spearman(va, vb))
    out = run_dir / "importance"
    write_atomic(out / "overlap.md", overlap_markdown(results, fraction))
    plot_overlap(results, fraction, out / "overlap.png")
    return results


def overlap_markdown(results: dict, fraction: float) -> str:
    labels = list(results)
    layers = list(dict.fromkeys(x for per_layer in results.values() for x in per_layer))
    lines = [
        f"# Importance overlap per layer: top-{fraction:.0%} overlap / Spearman rho",
        "",
        "| layer | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for layer in layers:
        cells = [_cell(results[c].get(layer)) for c in labels]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(values: tuple[float, float] | None) -> str:
    return "–" if values is None else f"{values[0]:.3f} / {values[1]:.3f}"


def plot_overlap(results: dict, fraction: float, path: Path) -> None:
    layers = list(dict.fromkeys(x for per_layer in results.values() for x in per_layer))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for label, per_layer in results.items():
        xs = [layers.index(x) for x in per_layer]
        for ax, i in zip(axes, (0, 1)):
            ax.plot(xs, [v[i] for v in per_layer.values()], marker="o", label=label)
    for ax, title in zip(axes, (f"top-{fraction:.0%} overlap", "Spearman rho")):
        ax.set_xticks(range(len(layers)), layers, rotation=60, fontsize=7)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    p = _Parser(prog="clbench analyze", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="analysis", required=True)
    imp = sub.add_parser("importance", help="per-layer overlap of a run's importance maps")
    imp.add_argument("run_dir", type=Path)
    imp.add_argument("--top", type=float, default=0.05, help="top fraction compared (default 0.05)")
    imp.add_argument("--max_elements", type=int, default=1_000_000, help="per-layer subsample size")
    bud = sub.add_parser("budget", help="the matched-budget study of one or more comparison folders")
    bud.add_argument("comparison", type=Path, nargs="+")
    bud.add_argument("--baseline", default="seqft", help="the entry each run is paired with by seed")
    bud.add_argument("--out", type=Path, help="folder of budget_study.md/.png (default: the first one)")
    sel = sub.add_parser("select", help="each baseline's setting chosen on eval-split comparisons")
    sel.add_argument("comparison", type=Path, nargs="+")
    sel.add_argument("--by", default="OP", help="OP (default), BWT or own: the mean over seeds to maximise")
    args = p.parse_args(argv)
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

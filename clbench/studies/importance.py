"""Importance overlap: how much tasks' importance maps (attribution's priors, recorded in
RUN_DIR/importance/used.json) overlap, layer by layer: top-fraction overlap and Spearman's rho
(the paper's Figure 1). `clbench analyze importance RUN_DIR` writes overlap.md and overlap.png.

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

import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from clbench.errors import ConfigError
from clbench.files import write_atomic
from clbench.models import layer_index
from clbench.reporting import plt


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

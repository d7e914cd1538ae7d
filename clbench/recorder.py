"""What a run has measured, and the writer of what it says: results.json (from the run's start,
renewed after every task and evaluation row), results.md, heatmap.png and the logger's scores.

The runner reports each trained task and each evaluated row here; resume saves and restores the
bookkeeping; readers go through clbench.records. (A run ended by the SIGTERM watchdog gets its
"interrupted" mark from clbench/stopping.py, which cannot wait for the loop.)
"""

from __future__ import annotations

import os
import platform
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from clbench import distributed as dist
from clbench.data.tasks import TaskStream
from clbench.evaluation import general
from clbench.evaluation.evaluator import TaskScore
from clbench.evaluation.matrix import summarize
from clbench.files import write_atomic, write_json
from clbench.loggers import RunLoggers
from clbench.reporting import plot_heatmap, results_markdown

PACKAGES = ("torch", "lightning", "transformers", "peft", "datasets", "torchmetrics", "lm_eval", "clbench")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def peak_memory_mb() -> float:
    """Peak accelerator memory when on CUDA, else the process's peak resident set size.

    On Linux that is VmHWM of /proc/self/status: getrusage's ru_maxrss survives fork and exec, so a
    run started by a large process (a compare, a benchmark holding a model) would report its
    parent's size whenever its own peak is smaller."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Recorder:
    """The run's matrix, per-row scores, losses and timings, and the files and logs that say them."""

    def __init__(
        self,
        stream: TaskStream,
        run_dir: Path,
        strategy_name: str,
        seed: int,
        identity: dict | None,
        loggers: RunLoggers,
        strategy_used: Callable[[], dict] = dict,
        general_cfg: general.GeneralConfig | None = None,
    ) -> None:
        self.stream, self.run_dir, self.strategy_name = stream, run_dir, strategy_name
        self.general_cfg = general_cfg if general_cfg is not None and general_cfg.tasks else None
        self.general: dict[int, dict[str, dict]] = {}  # row -> lm-eval's scores (general.evaluate)
        entries = self.general_cfg.tasks if self.general_cfg else []
        self.general_names = [general.task_name(e) for e in entries]
        self.seed, self.identity, self.loggers = seed, identity, loggers
        self.strategy_used = strategy_used  # the strategy's `used`, asked at every write
        T = len(stream)
        self.matrix: list[list[float | None]] = [[None] * T for _ in range(T + 1)]
        self.scores: dict[int, dict[str, TaskScore]] = {}
        self.losses: dict[str, tuple[float | None, float | None]] = {}
        self.train_loss: dict[str, list[float]] = {}
        self.weight_growth: dict[str, float | None] = {}
        self.timings = {"train_s": 0.0, "eval_s": 0.0, "per_task_train_s": {}, "steps": {}}

    def trained(
        self,
        task: str,
        loss: tuple[float | None, float | None],
        train_loss: list[float],
        weight_growth: float | None,
        steps: int,
        seconds: float,
    ) -> None:
        """Task `task` trained: its probe loss before and after, the loss curve, its steps."""
        self.losses[task], self.train_loss[task], self.weight_growth[task] = loss, train_loss, weight_growth
        self.timings["steps"][task] = steps
        self.timings["per_task_train_s"][task] = seconds
        self.timings["train_s"] += seconds

    def evaluated(self, row: int, scores: dict[str, TaskScore], seconds: float, writes: bool) -> None:
        """Row `row` of the matrix (only the tasks evaluated), logged where the run logs."""
        self.scores[row] = scores
        for name, score in scores.items():
            self.matrix[row][self.stream.names.index(name)] = score.score
        if writes:
            self.loggers.log({f"score/{n}": s.score for n, s in scores.items()}, row, self.steps_done())
        self.timings["eval_s"] += seconds

    def general_evaluated(self, row: int, scores: dict[str, dict], seconds: float, writes: bool) -> None:
        """The general-ability scores at row `row` (0: before the stream), logged where the run logs."""
        self.general[row] = scores
        if writes:
            values = {f"general/{t}/{k}": m["value"] for t, ms in scores.items() for k, m in ms.items()}
            self.loggers.log(values, row, self.steps_done())
        self.timings["general_s"] = self.timings.get("general_s", 0.0) + seconds

    def steps_done(self) -> int:
        """The run's optimizer steps so far (the tasks trained, resumed ones included)."""
        return sum(self.timings["steps"].values())

    def bookkeeping(self) -> dict:
        """Everything measured so far, for the resume state (JSON)."""
        scores = {str(r): {n: asdict(s) for n, s in row.items()} for r, row in self.scores.items()}
        return {
            "matrix": self.matrix,
            "scores": scores,
            "losses": self.losses,
            "train_loss": self.train_loss,
            "weight_growth": self.weight_growth,
            "timings": self.timings,
            "general": {str(r): scores for r, scores in self.general.items()},
        }

    def restore(self, saved: dict) -> None:
        """What `bookkeeping` returned."""
        self.matrix = saved["matrix"]
        self.scores = {
            int(r): {n: TaskScore(**s) for n, s in row.items()} for r, row in saved["scores"].items()
        }
        self.losses = {n: tuple(v) for n, v in saved["losses"].items()}
        self.train_loss, self.timings = saved["train_loss"], saved["timings"]
        self.weight_growth = saved.get("weight_growth", {})
        self.general = {int(r): scores for r, scores in saved.get("general", {}).items()}

    def results(self, status: str, error: str | None, resumable: str) -> dict:
        """results.json's content: where the run stands and everything measured so far."""
        T, done = len(self.stream), status == "complete"
        per_task = {}
        for i, task in enumerate(self.stream.tasks):
            final = self.scores.get(T, {}).get(task.name)
            before, after = self.losses.get(task.name, (None, None))
            per_task[task.name] = {
                "metric": task.metric,
                "n_test": len(task.test),
                "n_train": len(task.train),
                "start": self.matrix[0][i],
                "after_own_task": self.matrix[i + 1][i],
                "final": self.matrix[T][i],
                "final_stderr": final.stderr if final else None,
                "valid_label_share": final.valid_label_share if final else None,
                "majority_baseline": task.majority_baseline(),
                "labels": task.labels,
                "loss_before": before,
                "loss_after": after,
                "train_loss": self.train_loss.get(task.name, []),
                "weight_growth": self.weight_growth.get(task.name),
                "valid_label_share_by_row": {
                    r: s[task.name].valid_label_share for r, s in self.scores.items() if task.name in s
                },
            }
        self.timings["peak_memory_mb"] = peak_memory_mb()
        state = {"status": status, "pid": os.getpid(), "host": socket.gethostname()}
        state["heartbeat"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return {
            **state,
            **({"error": error} if error else {}),
            "stream": self.stream.name,
            "score_split": self.stream.score_split,
            "strategy": self.strategy_name,
            "strategy_used": self.strategy_used(),
            "seed": self.seed,
            "world_size": dist.world_size(),
            "tasks": self.stream.names,
            "matrix": self.matrix,
            "summary": summarize(self.matrix) if done else None,
            "per_task": per_task,
            "timings": self.timings,
            "general": self._general_results(),
            "versions": package_versions(),
            "identity": self.identity,
            "resumable": resumable,
        }

    def _general_results(self) -> dict | None:
        """What general ability was asked for and measured: lm-eval's scores per row of the stream
        (0: before it, T: after its last task), and the change from before to after."""
        cfg = self.general_cfg
        if cfg is None:
            return None
        T = len(self.stream)
        before, after = self.general.get(0), self.general.get(T)
        done = before is not None and after is not None
        return {
            "tasks": self.general_names,
            "entries": list(cfg.tasks),
            "limit": cfg.limit,
            "num_fewshot": cfg.num_fewshot,
            "batch_size": cfg.batch_size,
            "every_task": cfg.every_task,
            "lm_eval": package_versions().get("lm_eval"),
            "rows": {str(r): scores for r, scores in sorted(self.general.items())},
            "change": general.change(before, after) if done else None,
            "mean_change": general.mean_change(before, after) if done else None,
        }

    def write(self, status: str, error: str | None, resumable: str) -> None:
        """results.json now; on completion results.md, heatmap.png and the summary's log too."""
        results = self.results(status, error, resumable)
        write_json(self.run_dir / "results.json", results)
        if status == "complete":
            write_atomic(self.run_dir / "results.md", results_markdown(results))
            title = f"{self.stream.name} · {self.strategy_name}"
            plot_heatmap(self.stream.names, self.matrix, title, self.run_dir / "heatmap.png")
            summary = {f"summary/{k}": v for k, v in results["summary"].items() if v is not None}
            self.loggers.log(summary, None, self.steps_done())

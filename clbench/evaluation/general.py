"""General ability: what the model can do outside the stream, measured by EleutherAI's
lm-evaluation-harness (lm-eval) on the live model, before the stream, after the last task and,
where asked, after every task (TRACE's question: what does continual fine-tuning cost the model?).

The numbers are lm-eval's own: its task definitions, prompts, filters, metrics and standard
errors, run through its `HFLM` wrapped around the model in memory (under LoRA, the adapted model),
so they equal what the `lm_eval` command line prints on the exported checkpoint (tested).

Under several ranks every rank runs the whole evaluation on the same requests in the same
batches: sharded parameters (FSDP2) need every rank in every forward, and generation keeps the
ranks in step (`synced_gpus`). It costs the time of one process (no speed-up from the ranks) and
no memory beyond an evaluation batch; under DDP the other ranks repeat rank 0's work.

lm-eval seeds Python's, NumPy's and torch's generators; they are restored afterwards, so a run
trains exactly as it would without this evaluation.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from clbench import distributed as dist
from clbench.errors import ConfigError


@dataclass
class GeneralConfig:
    """General-ability evaluation through lm-eval (nothing runs when `tasks` is empty).

    Args:
        tasks: lm-eval task or group names from its registry (gsm8k, mmlu, bbh, boolq, piqa; their
            data come from the Hugging Face hub or its local cache), or paths to local task YAML
            files (data/general/*.yaml: the bundled offline suite).
        limit: Documents per task: a count, or a fraction of each task's documents when below 1
            (lm-eval's --limit); None for all.
        num_fewshot: Few-shot examples per prompt; None keeps each task's own default.
        batch_size: Requests per forward.
        every_task: Also evaluate after every task, not only before the stream and after its last
            task.
    """

    tasks: list[str] = field(default_factory=list)
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 16
    every_task: bool = False

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit <= 0:
            raise ValueError(
                f"general.limit: must be positive (a count, or a fraction below 1), got {self.limit}"
            )
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"general.num_fewshot: must be >= 0, got {self.num_fewshot}")
        if self.batch_size < 1:
            raise ValueError(f"general.batch_size: must be >= 1, got {self.batch_size}")


def local_task_file(entry: str) -> Path | None:
    """The YAML file a task entry names, or None for a registry name."""
    return Path(entry) if entry.endswith((".yaml", ".yml")) else None


def task_name(entry: str) -> str:
    """The lm-eval task name of an entry: a registry name as given, a YAML file's `task:` field."""
    path = local_task_file(entry)
    if path is None:
        return entry
    where = f"general.tasks: {entry}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such task file")
    try:
        # lm-eval's YAMLs carry custom tags (!function): read the plain fields only
        text = path.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_IgnoreTags)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: cannot be read as a task YAML ({str(e).splitlines()[0]})") from None
    name = data.get("task") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: has no `task:` name")
    return name


class _IgnoreTags(yaml.SafeLoader):
    """A YAML loader that reads lm-eval's custom tags (!function) as plain strings."""


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node))


def task_manager(entries: list[str]) -> Any:
    """lm-eval's TaskManager, seeing the folders of local task files, and its registry only when a
    registry name is asked for (indexing the registry takes seconds); one per process and folders."""
    folders = tuple(sorted({str(p.resolve().parent) for e in entries if (p := local_task_file(e))}))
    registry = any(local_task_file(e) is None for e in entries)
    return _manager(folders, registry)


@functools.cache
def _manager(folders: tuple[str, ...], registry: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(folders) or None, include_defaults=registry, verbosity="ERROR")


def check_tasks(cfg: GeneralConfig) -> list[str]:
    """The lm-eval task names, each one a task or a group with an aggregate score that lm-eval
    knows, local task files built (their data read); a ConfigError naming the entry otherwise."""
    names = [task_name(e) for e in cfg.tasks]
    if not names:
        return names
    manager = task_manager(cfg.tasks)
    for entry, name in zip(cfg.tasks, names):
        where = f"general.tasks: {entry}"
        if name not in manager.all_tasks:
            hint = " (a local task file's folder is searched for it)" if local_task_file(entry) else ""
            raise ConfigError(f"{where}: lm-eval knows no task or group {name!r}{hint}")
        info = manager.task_index[name]
        kind = getattr(getattr(info, "kind", None), "name", None)
        if kind == "TAG" or (kind == "GROUP" and not (info.cfg or {}).get("aggregate_metric_list")):
            what = "a tag" if kind == "TAG" else "a group without an aggregate score"
            members = [n for n, e in manager.task_index.items() if name in (getattr(e, "tags", None) or ())]
            some = f" ({', '.join(sorted(members)[:4])}, ...)" if members else ""
            raise ConfigError(
                f"{where}: is {what} in lm-eval, which reports no score for it; list its tasks{some}"
            )
    local = [name for entry, name in zip(cfg.tasks, names) if local_task_file(entry)]
    if local:
        from lm_eval.tasks import get_task_dict

        try:
            with _quiet_lm_eval():
                get_task_dict(local, manager)
        except Exception as e:  # noqa: BLE001 - any failure to build a task file is bad input
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(
                f"general.tasks: lm-eval cannot build {', '.join(local)} ({type(e).__name__}: {first})"
            ) from e
    return names


@contextmanager
def _rng_kept():
    """Python's, NumPy's and torch's (CPU and this rank's CUDA device) generators as they were,
    afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _live_lm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class LiveLM(HFLM):
        """lm-eval's HF model around a model in memory: its forwards under the run's autocast dtype
        (HFLM's own autocast would otherwise turn an outer one off), generation keeping sharded
        ranks in step, progress bars on rank 0 only and only while clbench shows bars."""

        def __init__(
            self, model: torch.nn.Module, tokenizer: Any, batch_size: int, autocast: torch.dtype | None
        ) -> None:
            super().__init__(
                pretrained=model, tokenizer=tokenizer, batch_size=batch_size, mixed_precision_dtype=autocast
            )
            self.synced = dist.is_fully_sharded(model)
            from clbench.console import BARS

            self.quiet = dist.rank() != 0 or not BARS["on"]

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if self.synced:
                generation_kwargs["synced_gpus"] = True
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or self.quiet)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or self.quiet)

    return LiveLM


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: GeneralConfig,
    samples_dir: Path | None = None,
    autocast: torch.dtype | None = None,
) -> dict[str, dict]:
    """lm-eval's scores of `model` on cfg.tasks, the same on every rank:
    {task: {"metric,filter": {"value", "stderr", "higher_is_better"}}} for each configured task (a
    group: its aggregate). `autocast`: the dtype of the run's mixed precision (bf16-mixed:
    torch.bfloat16; what lm_eval's `mixed_precision_dtype` does), None for none. With `samples_dir`,
    each task's documents, responses and per-document metrics go to samples_dir/<task>.jsonl."""
    import lm_eval

    names = [task_name(e) for e in cfg.tasks]
    modes = {m: m.training for m in model.modules()}
    try:
        with _rng_kept(), _quiet_lm_eval(), torch.no_grad():
            lm = _live_lm_class()(model, tokenizer, cfg.batch_size, autocast)
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=cfg.num_fewshot,
                limit=cfg.limit,
                task_manager=task_manager(cfg.tasks),
                log_samples=samples_dir is not None,
            )
    finally:
        for m, training in modes.items():  # HFLM puts the model in eval mode
            m.training = training
    # lm-eval reports on the process with LOCAL_RANK 0 only (None elsewhere): rank 0's scores, sent
    # to every rank, are what every rank computed
    scores = {name: _scores(out, name) for name in names} if out is not None else None
    if dist.world_size() > 1:
        scores = dist.broadcast_object(scores)
    if samples_dir is not None and out is not None:
        _write_samples(out.get("samples") or {}, samples_dir)
    return scores


def _scores(out: dict, name: str) -> dict[str, dict]:
    """One task's (or group's) metrics as lm-eval reports them, stderr beside each value."""
    row = out["results"].get(name) or out.get("groups", {}).get(name) or {}
    better = out.get("higher_is_better", {}).get(name, {})
    scores = {}
    for key, value in row.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        stderr = row.get(f"{metric}_stderr,{filt}")
        scores[key] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "higher_is_better": better.get(metric),
        }
    return scores


def _write_samples(samples: dict[str, list[dict]], folder: Path) -> None:
    from lm_eval.utils import handle_non_serializable

    folder.mkdir(parents=True, exist_ok=True)
    for task, rows in samples.items():
        with (folder / f"{task}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")


@contextmanager
def _quiet_lm_eval():
    """lm-eval's info lines stay out of the run log (its warnings go there, as Lightning's do:
    clbench.console)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def primary(scores: dict[str, dict]) -> str | None:
    """A task's headline metric: the first one where higher is better (else the first)."""
    for key, s in scores.items():
        if s.get("higher_is_better"):
            return key
    return next(iter(scores), None)


def change(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict[str, float]]:
    """after - before per task and metric (raw differences; a lower-is-better metric keeps its sign)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in after.items():
        old = before.get(task, {})
        out[task] = {k: m["value"] - old[k]["value"] for k, m in metrics.items() if k in old}
    return out


def mean_change(before: dict[str, dict], after: dict[str, dict]) -> float | None:
    """The mean over tasks of the change in each task's primary metric, signed so that a positive
    number is a gain (a lower-is-better metric's drop counts as one): the "general change" that
    compare tabulates and plots against OP."""
    gains = []
    for task, metrics in after.items():
        key = primary(metrics)
        if key is None or key not in before.get(task, {}):
            continue
        delta = metrics[key]["value"] - before[task][key]["value"]
        gains.append(delta if metrics[key].get("higher_is_better", True) is not False else -delta)
    return sum(gains) / len(gains) if gains else None

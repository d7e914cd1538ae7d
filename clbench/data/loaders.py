"""Reading tasks from disk: the TRACE layout, JSONL files and Hugging Face `datasets`.

Every loader ends in the same validation, so a bundled stream and a user's TRACE folder are
checked by one set of rules.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from clbench.console import say
from clbench.data.tasks import Example, Task, TaskStream
from clbench.errors import ConfigError, safe_name
from clbench.evaluation.metrics import get_metric

SPLITS = ("train", "eval", "test")


@dataclass
class TaskConfig:
    """One task of a stream.

    Args:
        name: Task name, used in reports and file names.
        path: TRACE folder, folder of {split}.jsonl files, or a `datasets` name/path;
            relative paths resolve against the stream's `data_root`.
        loader: "trace" (train/eval/test.json lists), "jsonl", or "hf" (`datasets.load_dataset`).
        metric: exact_match (alias accuracy), first_char, rouge_l, edit_similarity or sari.
        epochs: Training epochs on this task.
        max_steps: Cap on optimizer steps for this task (-1: epochs decide).
        n_train: Seeded subsample of the training split (None: all).
        n_eval: Seeded subsample of the eval split.
        n_test: Seeded subsample of the test split.
        max_prompt_tokens: Longer prompts are cut from the left.
        max_answer_tokens: Answer budget: prompt + answer get max_prompt_tokens + max_answer_tokens
            (a longer answer takes the prompt's room); an answer that alone fills that room is cut to
            max_answer_tokens, with a warning that counts them.
        max_new_tokens: Generation budget at evaluation.
        postprocess: "strip" (whitespace) or "first_line" (strip, then up to the first newline).
        classification: Closed answer set: reports add valid-label share and majority baseline.
        hf_config: `datasets` configuration name (loader hf).
        hf_splits: Split names in the `datasets` source, keyed by train/eval/test.
        prompt_field: Field holding the prompt (loader hf/jsonl).
        answer_field: Field holding the answer (loader hf/jsonl).
        prompt_template: Optional str.format template over a row's fields, instead of prompt_field.
    """

    name: str
    path: str
    loader: Literal["trace", "jsonl", "hf"] = "trace"
    metric: str = "exact_match"
    epochs: int = 1
    max_steps: int = -1
    n_train: int | None = None
    n_eval: int | None = None
    n_test: int | None = None
    max_prompt_tokens: int = 1024
    max_answer_tokens: int = 512
    max_new_tokens: int = 64
    postprocess: Literal["strip", "first_line"] = "strip"
    classification: bool = False
    hf_config: str | None = None
    hf_splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "eval": "validation", "test": "test"}
    )
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    prompt_template: str | None = None


@dataclass
class StreamConfig:
    """An ordered task stream and how its batches are made.

    Args:
        name: Stream name, used in run names and reports.
        tasks: The tasks, in training order.
        data_root: Folder that relative task paths resolve against.
        prompt_format: "raw" (the prompt as written, as TRACE does) or "chat" (tokenizer template).
        seed: Seed of the per-task subsampling.
        batch_size: Training batch size.
        eval_batch_size: Generation batch size.
        score_split: The split that fills the accuracy matrix: "test", or "eval" to choose settings
            (a strategy's hyper-parameters) without looking at the test split.
    """

    name: str = "stream"
    tasks: list[TaskConfig] = field(default_factory=list)
    data_root: str = "."
    prompt_format: Literal["raw", "chat"] = "raw"
    seed: int = 1234
    batch_size: int = 8
    eval_batch_size: int = 16
    score_split: Literal["test", "eval"] = "test"


def parse_examples(rows: object, where: str, places: list[str] | None = None) -> list[Example]:
    """Validate a decoded JSON value as a non-empty list of {prompt, answer} string objects.

    Errors name each row by `places[i]` (a JSONL file's "line 7") or else as "item i" counted
    from 1, as a person counts."""
    if not isinstance(rows, list):
        raise ConfigError(
            f"{where}: expected a JSON list of {{prompt, answer}} objects, got {type(rows).__name__}"
        )
    if not rows:
        raise ConfigError(f"{where}: the split is empty")
    examples = []
    for i, row in enumerate(rows):
        place = places[i] if places else f"item {i + 1}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: {place} is {type(row).__name__}, not an object")
        for key in ("prompt", "answer"):
            if not isinstance(row.get(key), str):
                raise ConfigError(f"{where}: {place}: field '{key}' is missing or not a string")
        if not row["answer"].strip():  # an empty answer would score an empty prediction as correct
            raise ConfigError(f"{where}: {place}: field 'answer' is empty")
        examples.append(Example(row["prompt"], row["answer"]))
    return examples


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _read_jsonl(path: Path, cfg: TaskConfig) -> tuple[list[object], list[str]]:
    """The rows of a JSONL file mapped to {prompt, answer}, and each one's "line N" (blank lines
    skipped but counted, so the number is the one an editor shows)."""
    rows, places = [], []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
            rows.append(_map_fields(row, cfg, f"{path}: line {n}"))
            places.append(f"line {n}")
    return rows, places


def _map_fields(row: object, cfg: TaskConfig, where: str) -> object:
    """Turn a source row into {prompt, answer} by the task's field mapping."""
    if not isinstance(row, dict):
        return row
    try:
        prompt = cfg.prompt_template.format(**row) if cfg.prompt_template else row.get(cfg.prompt_field)
    except KeyError as e:
        raise ConfigError(f"{where}: prompt_template field {e} not in the row") from None
    answer = row.get(cfg.answer_field)
    return {"prompt": prompt, "answer": answer if not isinstance(answer, (int, float)) else str(answer)}


def _load_hf_split(cfg: TaskConfig, root: Path, split: str) -> list[dict] | None:
    import datasets

    source = root / cfg.path if (root / cfg.path).exists() else cfg.path
    name = cfg.hf_splits.get(split)
    if name is None:
        return None
    kwargs = {}
    if Path(source).is_file():
        kwargs = {"path": Path(source).suffix.lstrip(".").replace("jsonl", "json"), "data_files": str(source)}
    else:
        kwargs = {"path": str(source), "name": cfg.hf_config}
    try:
        ds = datasets.load_dataset(**kwargs, split=name)
    except ValueError as e:
        if split == "eval":
            return None
        raise ConfigError(f"{source}: split '{name}' ({split}): {e}") from None
    return [_map_fields(r, cfg, f"{source}[{name}] row {i + 1}") for i, r in enumerate(ds)]


def _load_split(cfg: TaskConfig, root: Path, split: str) -> tuple[list[Example], str]:
    folder = root / cfg.path
    if cfg.loader == "trace":
        path = folder / f"{split}.json"
        return parse_examples(_read_json(path), str(path)), str(path)
    if cfg.loader == "jsonl":
        path = folder / f"{split}.jsonl"
        if split == "eval" and not path.exists():
            return [], str(path)
        rows, places = _read_jsonl(path, cfg)
        return parse_examples(rows, str(path), places), str(path)
    rows = _load_hf_split(cfg, root, split)
    if rows is None:
        return [], cfg.path
    return parse_examples(rows, f"{cfg.path}[{split}]"), cfg.path


def subsample(examples: list[Example], n: int | None, seed: int, key: str) -> list[Example]:
    """A seeded random subset of size n (order kept), stable across runs and machines."""
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(f"{seed}:{key}").sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def check_counts(cfg: TaskConfig) -> None:
    """Counts and token budgets that would make a run train or score nothing are refused."""
    where = f"stream.tasks[{cfg.name}]"
    for option in ("epochs", "max_prompt_tokens", "max_answer_tokens", "max_new_tokens"):
        if getattr(cfg, option) < 1:
            raise ConfigError(f"{where}.{option}: must be a positive count, got {getattr(cfg, option)}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ConfigError(f"{where}.max_steps: must be positive, or -1 for no cap; got {cfg.max_steps}")
    for option in ("n_train", "n_eval", "n_test"):
        if getattr(cfg, option) is not None and getattr(cfg, option) < 1:
            raise ConfigError(
                f"{where}.{option}: must be a positive count or null, got {getattr(cfg, option)}"
            )


def load_task(cfg: TaskConfig, root: Path, seed: int) -> Task:
    """Read, validate and subsample one task's splits."""
    safe_name(cfg.name, "stream.tasks.name")
    check_counts(cfg)
    try:
        get_metric(cfg.metric)
    except ValueError as e:
        raise ConfigError(f"stream.tasks[{cfg.name}].metric: {e}") from None
    splits = {}
    for split, n in zip(SPLITS, (cfg.n_train, cfg.n_eval, cfg.n_test), strict=True):
        examples, source = _load_split(cfg, root, split)
        if n is not None and n > len(examples) and examples:
            held = f"{source} holds {len(examples)}"
            say(f"clbench: warning: stream.tasks[{cfg.name}].n_{split}: {n} asked, {held}; using all")
        splits[split] = subsample(examples, n, seed, f"{cfg.name}:{split}")
    if len(splits["test"]) == 1:
        say(
            f"clbench: warning: stream.tasks[{cfg.name}]: its test split holds one example: its score "
            "is 0 or 1 and has no standard error (n/a)"
        )
    labels = sorted({ex.answer.strip() for ex in splits["train"]}) if cfg.classification else None
    return Task(
        name=cfg.name,
        train=splits["train"],
        eval=splits["eval"],
        test=splits["test"],
        metric=cfg.metric,
        epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        max_prompt_tokens=cfg.max_prompt_tokens,
        max_answer_tokens=cfg.max_answer_tokens,
        max_new_tokens=cfg.max_new_tokens,
        postprocess=cfg.postprocess,
        labels=labels,
        source=str(root / cfg.path),
    )


def load_stream(cfg: StreamConfig) -> TaskStream:
    """Load every task of the stream; errors name the file and field that is wrong."""
    if not cfg.tasks:
        raise ConfigError("stream.tasks: the stream has no tasks")
    safe_name(cfg.name, "stream.name")
    for option in ("batch_size", "eval_batch_size"):
        if getattr(cfg, option) < 1:
            raise ConfigError(f"stream.{option}: must be a positive count, got {getattr(cfg, option)}")
    names = [t.name for t in cfg.tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"stream.tasks: task names repeat: {names}")
    if cfg.score_split not in ("test", "eval"):
        raise ConfigError(f"stream.score_split: must be test or eval, got {cfg.score_split!r}")
    root = Path(cfg.data_root)
    refuse_shared_sources(cfg.tasks, root)
    tasks = [load_task(t, root, cfg.seed) for t in cfg.tasks]
    refuse_shared_examples(tasks)
    if cfg.score_split == "eval":
        for task in tasks:
            if not task.eval:
                raise ConfigError(f"stream.score_split: eval, but task {task.name} has no eval split")
            task.test = task.eval  # the matrix scores the eval split; the test split is not scored
    return TaskStream(cfg.name, tasks, cfg.score_split)


def _source_key(cfg: TaskConfig, root: Path) -> tuple:
    """What decides the rows a task reads: its resolved files and how rows become examples."""
    local = root / cfg.path
    where = str(local.resolve()) if local.exists() else cfg.path
    fields = (cfg.prompt_field, cfg.answer_field, cfg.prompt_template)
    return (cfg.loader, where, cfg.hf_config, tuple(sorted(cfg.hf_splits.items())), fields)


def refuse_shared_sources(tasks: list[TaskConfig], root: Path) -> None:
    """Two tasks reading the same files would train and be scored as two tasks of one stream: the
    matrix would count one task twice (a config slip, such as a copied task entry)."""
    seen: dict[tuple, str] = {}
    for t in tasks:
        key = _source_key(t, root)
        if key in seen:
            raise ConfigError(
                f"stream.tasks[{t.name}].path: reads the same data as task {seen[key]} ({key[1]}); "
                "each task of a stream needs its own data"
            )
        seen[key] = t.name


def refuse_shared_examples(tasks: list[Task]) -> None:
    """Two tasks whose examples are the same (copied files under two names) are refused too."""
    seen: dict[tuple, str] = {}
    for t in tasks:
        key = (tuple(t.train), tuple(t.test))
        if key in seen:
            raise ConfigError(
                f"stream.tasks[{t.name}]: its train and test examples are those of task {seen[key]}; "
                "each task of a stream needs its own data"
            )
        seen[key] = t.name


def fit_to_context(stream: TaskStream, context: int | None) -> list[str]:
    """Shrink each task's token budgets so that prompt + generation and prompt + answer fit the model's
    context (a longer sequence crashes learned-position models such as GPT-2 and is out of
    distribution for the rest): the generation budget to at most half the context, the prompt budget
    next, down to half the context, then the answer budget. Returns a warning per task changed."""
    if not context:
        return []
    notes = []
    for task in stream.tasks:
        old = (task.max_prompt_tokens, task.max_answer_tokens, task.max_new_tokens)
        new_tokens = min(task.max_new_tokens, max(context // 2, context - task.max_prompt_tokens))
        prompt = min(task.max_prompt_tokens, context - new_tokens)
        answer = task.max_answer_tokens
        if prompt + answer > context:
            prompt = min(prompt, max(context - answer, context // 2))
            answer = context - prompt
        if (prompt, answer, new_tokens) != old:
            notes.append(
                f"stream.tasks[{task.name}]: max_prompt_tokens / max_answer_tokens / max_new_tokens "
                f"{'/'.join(map(str, old))} -> {prompt}/{answer}/{new_tokens}, to fit the model's context "
                f"of {context} tokens"
            )
            task.max_prompt_tokens, task.max_answer_tokens, task.max_new_tokens = prompt, answer, new_tokens
    return notes

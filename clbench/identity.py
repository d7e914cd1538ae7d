"""A run's identity: every input that can change its numbers, fingerprinted when it starts.

results.json keeps it under "identity". `fit --resume` refuses to go on when any part differs
from the run's start, and `compare` reuses a finished run only when its identity is the one the
comparison would give it, so a number is never carried over from other data, code or weights:

- config: the SHA-256 of config.yaml as written at the start (the stored file is checked against
  it, so an edited config.yaml is caught, not trusted);
- data: per task, a content hash of the train, eval and scored examples as used (after n_* caps,
  seeded subsampling, and the eval split standing in for test under score_split eval);
- model: the hashes of a local folder's files, the bundled GGUF file's hash, or a hub model's
  cached revision;
- code: the SHA-256 of clbench's and strategies' Python sources (and of a plugin strategy's file),
  with clbench's version and git commit for the reader;
- general ability (general.tasks): per lm-eval task, the hash of a local task file's folder (its
  YAML, data and helpers) or of the registry task's YAML, and lm-eval's version (a registry task's
  data come from the hub by name: their revision is lm-eval's concern, not hashed here);
- precision and the versions of the libraries that compute the numbers.

The machine (CPU model) is recorded for the reader but not compared: bf16 numbers differ a little
between CPU models, and a run may legitimately go on on another node.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from clbench.data.tasks import Example, TaskStream
from clbench.errors import ConfigError

# Libraries whose version can change a number (kernels, optimizer, tokenizer, generation).
NUMERIC_PACKAGES = ("torch", "lightning", "transformers", "peft")
_FILE_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """The SHA-256 of a tensor's bytes (any dtype, any shape)."""
    raw = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def file_sha256(path: Path) -> str:
    """A file's SHA-256, computed once per process for an unchanged file (large weight files)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def examples_sha256(examples: list[Example]) -> str:
    """A content hash of examples in order: any changed, added, removed or reordered one shows."""
    rows = [[ex.prompt, ex.answer] for ex in examples]
    return sha256_text(json.dumps(rows, ensure_ascii=False, separators=(",", ":")))


def data_identity(stream: TaskStream) -> dict[str, dict[str, str]]:
    """Per task, the hash of each split as the run uses it ("test" is the scored split)."""
    return {
        t.name: {
            "train": examples_sha256(t.train),
            "eval": examples_sha256(t.eval),
            "test": examples_sha256(t.test),
        }
        for t in stream.tasks
    }


def model_identity(name: str) -> dict:
    """What the weights and tokenizer are: files' hashes (bundled GGUF, local folder) or a hub id's
    cached revision."""
    from clbench.models import BUNDLED, bundled_gguf, check_source

    if name in BUNDLED:
        folder, filename = bundled_gguf(name)
        return {"bundled": name, "files": {filename: file_sha256(folder / filename)}}
    check_source(name)  # a missing folder or an uncached hub id offline: one line, before any hashing
    folder = Path(name).expanduser()
    if folder.is_dir():
        files = sorted(
            f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and f.suffix != ".md"
        )
        return {"folder": str(folder.resolve()), "files": {f.name: file_sha256(f) for f in files}}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    return {"hub": name, "revision": Path(cached).parent.name if isinstance(cached, str) else None}


# clbench's parts a fit never imports: the plugin/test kit and the studies, which read finished runs.
# Editing them changes no run's numbers, so it leaves finished runs reusable (tested: a fit imports none).
NOT_IN_A_FIT = ("testing.py", "analyze.py", "studies")


def _sources(root: Path) -> list[Path]:
    def computes(path: Path) -> bool:
        relative = path.relative_to(root).parts
        return not (root.name == "clbench" and relative[0] in NOT_IN_A_FIT)

    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts and computes(p))


def code_identity(strategy_class: type | None = None) -> dict:
    """clbench's version, git commit (when a checkout) and the hash of the sources that compute."""
    h = hashlib.sha256()
    roots = []
    for package in ("clbench", "strategies"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            roots.append(Path(next(iter(spec.submodule_search_locations))))
    for root in roots:
        for path in _sources(root):
            h.update(f"{root.name}/{path.relative_to(root)}\0".encode())
            h.update(path.read_bytes())
    out = {"clbench": _version("clbench"), "git_commit": _git_commit(roots[0]) if roots else None}
    out["source_sha256"] = h.hexdigest()
    source = inspect.getsourcefile(strategy_class) if strategy_class is not None else None
    if source and not any(Path(source).resolve().is_relative_to(r.resolve()) for r in roots):
        out["strategy_source_sha256"] = file_sha256(Path(source))  # a plugin outside clbench
    return out


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _git_commit(folder: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def machine() -> str:
    """The CPU model (and the GPU's, when there is one), for the reader of results.json."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return f"{cpu}; {gpu}" if gpu else cpu


MAX_TASK_FOLDER_FILES = 2000  # a local task's folder is hashed whole: more means it is not a suite's own


def folder_sha256(folder: Path, what: str) -> str:
    """One hash over a folder's files (names and contents, sorted; hidden entries and caches left
    out); a ConfigError naming `what` when the folder holds more than a task suite would."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(folder).parts)
    )
    if len(files) > MAX_TASK_FOLDER_FILES:
        raise ConfigError(
            f"{what}: its folder {folder} holds {len(files)} files; keep local task files in a folder of "
            "their own (its whole tree is hashed into the run identity)"
        )
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(folder)}\0".encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def general_identity(entries: list[str]) -> dict:
    """What the general-ability evaluation reads: per entry, the hash of a local task file's folder
    or of the registry task's YAML; lm-eval's version."""
    from clbench.evaluation import general

    tasks = {}
    for entry in entries:
        path = general.local_task_file(entry)
        if path is not None:
            folder = folder_sha256(path.resolve().parent, f"general.tasks: {entry}")
            tasks[entry] = {"task": general.task_name(entry), "folder_sha256": folder}
            continue
        info = general.task_manager(entries).task_index.get(entry)
        yaml_path = info.get("yaml_path") if isinstance(info, dict) else getattr(info, "yaml_path", None)
        found = isinstance(yaml_path, (str, Path)) and Path(yaml_path).is_file()
        tasks[entry] = {"task": entry, "yaml_sha256": file_sha256(Path(yaml_path)) if found else None}
    return {"lm_eval": _version("lm_eval"), "tasks": tasks}


def run_identity(
    config_text: str,
    stream: TaskStream,
    model: str,
    precision: str,
    strategy_class: type | None,
    general_tasks: list[str] | None = None,
) -> dict:
    """The identity of a run that starts with this config, data, model and code."""
    return {
        "config_sha256": sha256_text(config_text),
        "data": data_identity(stream),
        "general": general_identity(general_tasks) if general_tasks else None,
        "model": model_identity(model),
        "code": code_identity(strategy_class),
        "precision": str(precision),
        "versions": {p: _version(p) for p in NUMERIC_PACKAGES},
        "machine": machine(),
    }


def differences(saved: dict | None, current: dict) -> list[str]:
    """What differs between a run's recorded identity and the current one, in words (the config
    and the machine aside: the config is compared field by field, the machine not at all)."""
    if not saved:
        return ["it records no run identity (made by an older clbench)"]
    out = []
    old_data, new_data = saved.get("data") or {}, current["data"]
    for task in dict.fromkeys([*old_data, *new_data]):
        a, b = old_data.get(task), new_data.get(task)
        if a is None or b is None:
            out.append(f"task {task} {'added' if a is None else 'removed'}")
            continue
        changed = [split for split in ("train", "eval", "test") if a.get(split) != b.get(split)]
        if changed:
            out.append(f"the data of task {task} ({', '.join(changed)})")
    where = ("folder",)  # a moved model folder holds the same model
    old_model = {k: v for k, v in (saved.get("model") or {}).items() if k not in where}
    if old_model != {k: v for k, v in current["model"].items() if k not in where}:
        old, new = old_model.get("files"), current["model"].get("files")
        if isinstance(old, dict) and isinstance(new, dict):
            which = sorted(f for f in old.keys() | new.keys() if old.get(f) != new.get(f))
            out.append(f"the model's files ({', '.join(which)})")
        else:
            out.append("the model (its source or revision)")
    old_code, new_code = saved.get("code") or {}, current["code"]
    for key, label in (
        ("source_sha256", "clbench's code"),
        ("strategy_source_sha256", "the strategy's file"),
    ):
        if old_code.get(key) != new_code.get(key):
            then, now = old_code.get("git_commit") or "?", new_code.get("git_commit") or "?"
            out.append(label + (f" (commit {then} then, {now} now)" if key == "source_sha256" else ""))
    old_general, new_general = saved.get("general") or {}, current.get("general") or {}
    if old_general != new_general:
        then, now = old_general.get("tasks") or {}, new_general.get("tasks") or {}
        which = sorted(e for e in then.keys() | now.keys() if then.get(e) != now.get(e))
        if which:
            out.append(f"the general-ability tasks ({', '.join(which)})")
        if old_general.get("lm_eval") != new_general.get("lm_eval"):
            out.append(f"lm_eval {old_general.get('lm_eval')} then, {new_general.get('lm_eval')} now")
    if saved.get("precision") != current["precision"]:
        out.append(f"precision ({saved.get('precision')} then, {current['precision']} now)")
    old_v, new_v = saved.get("versions") or {}, current["versions"]
    for p in NUMERIC_PACKAGES:
        if old_v.get(p) != new_v.get(p):
            out.append(f"{p} {old_v.get(p)} then, {new_v.get(p)} now")
    return out

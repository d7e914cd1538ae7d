"""How attribution's costs scale: scoring against training, batched generation, gate memory, length.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python tools/bench_scaling.py --model tiny
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python tools/bench_scaling.py --model smollm2-135m-instruct

Four measurements (issue 11), each a function that takes `model` ("tiny": bench_attribution's random
2-layer Llama built in code; "smollm2-135m-instruct": the bundled model, loaded offline through
clbench.models) and size knobs, and returns a plain dict; `markdown(name, result, model)` renders one
as a small table under a one-line caption. tools/bench.py imports them with tools/ on sys.path.

  scoring_vs_training   a task prior (attribution's importance.task_prior: LRP, K 8, bf16 top-K, chunk 4)
                        against a bf16-autocast training forward + backward on the same sequences
  scoring_vs_training_n32  the same over 32 sequences: more samples than K, so every element's full
                        slots take the top-K insertion too, as in a run's prior (up to 64 samples)
  generation            clbench's batched greedy generation (Runner -> Evaluator -> Trainer.predict ->
                        CLModule.generate, left padding) at batch 8 against the same prompts one by one
  gate_growth           bytes the attribution strategy holds after folding the priors of 1..8 tasks
  scoring_vs_seq_len    scoring time and peak memory against sequence length, each as a ratio to a
                        training forward + backward at the same length, and time per token

Timings share the machine with other jobs, so every figure is a ratio measured inside one process:
the runs compared alternate in rounds (after one warm-up of each) and a ratio is the median of the
per-round ratios, by the wall clock and by this process's CPU time (with OMP_NUM_THREADS=1 the CPU
time is the work done, whatever else the machine runs). Peak memory on CPU is the peak resident set
(VmHWM, reset through /proc/self/clear_refs) above the resident set just before the measured call,
each in a fresh process.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import gc
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_attribution import random_batch, tiny_llama  # noqa: E402  (tools/ is on sys.path)

BUNDLED = "smollm2-135m-instruct"
MODELS = ("tiny", BUNDLED)
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "data" / "quickstart" / "PyNextLine" / "test.json"
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
TINY_POSITIONS = 1024  # the tiny Llama's context: room for the longest sequence measured here

Rounds = list[dict[str, dict[str, float]]]  # per round: run name -> clock -> seconds


# -- shared helpers ---------------------------------------------------------------------------


_loaded: dict[str, tuple[torch.nn.Module, object]] = {}
_folders: dict[str, str] = {}


def load(model: str) -> tuple[torch.nn.Module, object]:
    """(fp32 causal LM, tokenizer or None), loaded once per process and shared by the measurements
    (each leaves the model as it found it: grads dropped, scoring restores modes and flags)."""
    if model not in _loaded:
        if model == "tiny":
            _loaded[model] = (tiny_llama(torch.float32, max_position_embeddings=TINY_POSITIONS), None)
        elif model == BUNDLED:
            from clbench.models import load_causal_lm, load_tokenizer

            _loaded[model] = (load_causal_lm(model), load_tokenizer(model))
        else:
            raise ValueError(f"model must be one of {', '.join(MODELS)}; got {model!r}")
    return _loaded[model]


def _scratch() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="bench_scaling-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def model_folder(model: str) -> str:
    """A folder with the model's weights and a tokenizer, for what loads by name (a CLModule, a
    child process): the bundled model saved once after its GGUF load (the same fp32 weights, 4 s to
    reload instead of 20 s of dequantisation); for "tiny", bench_attribution's Llama sized to the
    bundled tokenizer's vocabulary (generation needs real tokens), as tools/bench_gate.py does."""
    if model not in _folders:
        from transformers.utils import logging as hf_logging

        from clbench.models import load_tokenizer

        hf_logging.disable_progress_bar()  # a bar per save

        folder = _scratch() / model
        if model == BUNDLED:
            net, tok = load(model)
        else:
            tok = load_tokenizer(BUNDLED)
            net = tiny_llama(torch.float32, vocab_size=len(tok), max_position_embeddings=TINY_POSITIONS)
        net.save_pretrained(folder)
        tok.save_pretrained(folder)
        _folders[model] = str(folder)
    return _folders[model]


def trainable(net: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """As CLModule.trainable_parameters: every parameter that trains (full fine-tuning)."""
    return {n: p for n, p in net.named_parameters() if p.requires_grad}


def train_step(net: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """A training forward + backward as Lightning's bf16-mixed runs it: the forward (CLModule's, with
    positions counted from each row's first token) under bf16 autocast, fp32 weights and grads, the
    backward outside it. No optimizer step."""
    from clbench.data.collate import position_ids_for

    net.train()
    net.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        out = net(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_for(mask),
            labels=ids.masked_fill(mask == 0, -100),
        )
    out.loss.backward()


def score_prior(
    net: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, k: int = 8, chunk: int = 4
) -> int:
    """One task prior as clbench's attribution computes it (its priors -> task_prior): LRP,
    the top-K mean in bf16, `chunk` samples at a time, outside autocast in the weights' fp32."""
    from strategies.attribution.importance import task_prior

    batch = {"input_ids": ids, "attention_mask": mask}
    prior, n = task_prior(net, trainable(net), [batch], "lrp", k, chunk=chunk, store_dtype=torch.bfloat16)
    del prior
    return n


def engine_only(net: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, chunk: int = 4) -> None:
    """The LRP engine alone on the same chunks task_prior hands it (row maps on), maps dropped:
    the difference to `score_prior` is the consumer (Eq. 10 normalisation and the top-K merge)."""
    from strategies.attribution.lrp import stream_parameter_relevance

    for start in range(0, ids.shape[0], chunk):
        part = slice(start, start + chunk)
        stream_parameter_relevance(net, ids[part], mask[part], lambda name, r: None, row_maps=True)


def minor_faults() -> int:
    """Minor page faults of this process so far: fresh pages the kernel had to map (and zero)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn: Callable[[], object]) -> dict[str, float]:
    """Seconds of one call by each clock, and the MB of fresh pages it faulted in ("faults_mb")."""
    start, faults = {clock: now() for clock, now in CLOCKS.items()}, minor_faults()
    fn()
    out = {clock: now() - start[clock] for clock, now in CLOCKS.items()}
    return {**out, "faults_mb": (minor_faults() - faults) * resource.getpagesize() / 1e6}


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> Rounds:
    """`repeats` rounds, each running every entry of `runs` once in turn (after one warm-up each):
    load from other processes hits all of them alike."""
    if warmup:
        for fn in runs.values():
            fn()
    return [{name: timed(fn) for name, fn in runs.items()} for _ in range(repeats)]


def summary(rounds: Rounds, name: str, ref: str) -> dict:
    """Median seconds of `name` and the median over rounds of its time / `ref`'s, per clock."""
    out: dict = {
        "s": statistics.median(r[name]["wall"] for r in rounds),
        "faults_mb": statistics.median(r[name]["faults_mb"] for r in rounds),
    }
    for clock in CLOCKS:
        ratios = [r[name][clock] / r[ref][clock] for r in rounds]
        suffix = "" if clock == "wall" else f"_{clock}"
        out[f"ratio{suffix}"] = statistics.median(ratios)
        out[f"ratio{suffix}_range"] = [min(ratios), max(ratios)]
    return out


def proc_status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back (glibc malloc_trim), so that the resident set
    is what is held rather than what the allocator kept."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def quiet() -> Iterator[None]:
    """Lightning's advice and banners (workers, no logger, ...) off while clbench generates."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


def _environment() -> dict:
    return {"threads": torch.get_num_threads(), "torch": torch.__version__}


# -- 1. scoring against training --------------------------------------------------------------


def prior_breakdown(net: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Where one `score_prior` call's time goes, as shares of it: Eq. 10
    (attribution's importance.normalise, per sample and tensor), the top-K merge (TopKMean.add),
    the top-K mean at the end (TopKMean.pop), and the rest (the LRP engine and the loop around
    it), by wrapping those three with timers for this one call; with the MB of fresh pages the
    call faulted in."""
    from unittest import mock

    import strategies.attribution.importance as importance

    spent: dict[str, float] = {}

    def clocked(part: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] = spent.get(part, 0.0) + time.perf_counter() - start

        return call

    with (
        mock.patch.object(importance, "normalise", clocked("eq10_normalise", importance.normalise)),
        mock.patch.object(importance.TopKMean, "add", clocked("topk_add", importance.TopKMean.add)),
        mock.patch.object(importance.TopKMean, "pop", clocked("topk_mean", importance.TopKMean.pop)),
    ):
        call = timed(lambda: score_prior(net, ids, mask))
    parts = {"engine_and_rest": call["wall"] - sum(spent.values()), **spent}
    shares = {k: v / call["wall"] for k, v in parts.items()}
    return {"s": call["wall"], "faults_mb": call["faults_mb"], **shares}


def scoring_vs_training(model: str = "tiny", n: int = 8, seq: int = 64, repeats: int = 3) -> dict:
    """Time of scoring one task prior over N samples, as a multiple of one training step on them.

    What: `task_prior` as attribution calls it (estimator "lrp", K = 8, top-K kept in bf16, 4 samples
    per engine call: the engine plus the lean consumer, i.e. Eq. 10 per sample and the streaming
    top-K merge), and for reference the LRP engine alone on the same chunks with the maps dropped,
    each against a training forward + backward over the same N left-padded random sequences of
    `seq` tokens under bf16 autocast (Lightning's bf16-mixed; no optimizer step). Why: the issue's
    target is scoring at most 2x a training pass over the same samples, so that a prior costs about
    as much as training on the samples it scores. Interleaved rounds, median of per-round ratios.
    When the target is missed, `prior_breakdown` says where the time went (one more call).
    """
    net, _ = load(model)
    ids, mask = random_batch(n, seq, net.config.vocab_size)
    runs = {
        "train": lambda: train_step(net, ids, mask),
        "engine": lambda: engine_only(net, ids, mask),
        "task_prior": lambda: score_prior(net, ids, mask),
    }
    rounds = interleaved(runs, repeats)
    net.zero_grad(set_to_none=True)
    prior = summary(rounds, "task_prior", "train")
    breakdown = prior_breakdown(net, ids, mask) if not prior["ratio"] <= 2.0 else None
    return {
        "measurement": "scoring_vs_training",
        "model": model,
        "n": n,
        "seq": seq,
        "tokens": int(mask.sum()),
        "parameters": sum(p.numel() for p in trainable(net).values()),
        "estimator": "lrp",
        "k": 8,
        "chunk": 4,
        "store_dtype": "bfloat16",
        "repeats": repeats,
        **_environment(),
        "train": summary(rounds, "train", "train"),
        "engine": summary(rounds, "engine", "train"),
        "task_prior": prior,
        "breakdown": breakdown,
        "target": 2.0,
        "meets_target": prior["ratio"] <= 2.0,
    }


# -- 2. batched generation --------------------------------------------------------------------


class ForwardLog:
    """Every forward of a model: (rows, tokens fed, seconds), via forward pre/post hooks. Under a KV
    cache, generate's first forward per batch feeds the prompt (prefill), the others one token."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.calls: list[tuple[int, int, float]] = []
        self._handles = [
            net.register_forward_pre_hook(self._pre, with_kwargs=True),
            net.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._shape = tuple(ids.shape) if ids is not None else (0, 0)
        self._start = time.perf_counter()

    def _post(self, module, args, kwargs, output) -> None:
        self.calls.append((*self._shape, time.perf_counter() - self._start))

    def profile(self, total: float) -> dict:
        prefill = [c for c in self.calls if c[1] > 1]
        decode = [c for c in self.calls if c[1] == 1]
        prefill_s, decode_s = sum(c[2] for c in prefill), sum(c[2] for c in decode)
        return {
            "s": total,
            "forwards": len(self.calls),
            "prefills": len(prefill),
            "decode_steps": len(decode),
            "row_steps": sum(c[0] for c in decode),  # tokens computed by decode steps, padding rows too
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "other_s": total - prefill_s - decode_s,
            "decode_ms_per_step": 1e3 * decode_s / max(len(decode), 1),
        }

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def generation(model: str = "tiny", batch: int = 8, new_tokens: int = 24, repeats: int = 3) -> dict:
    """Batched greedy generation against the same prompts one at a time, through clbench's own path.

    What: the first `batch` test prompts of the quickstart task PyNextLine (real prompts of unequal
    length, so real left padding) answered by greedy decoding with up to `new_tokens` new tokens
    (PyNextLine's quickstart setting is 24), exactly as the evaluation does: Runner.evaluator.generate
    -> Trainer.predict (CPU, bf16-mixed, as configs/quickstart.yaml) -> CLModule.generate (KV cache,
    stop at EOS), once with eval_batch_size = `batch` and once with eval_batch_size 1. Reported:
    the speed-up (one-at-a-time seconds / batched seconds; target >= 4x at batch 8), and a profile
    from forward hooks: prefill and decode forwards, their seconds, and what is left (Lightning's
    predict loop, collation, generate's own bookkeeping, detokenisation), plus how many answers the
    two agree on. Why: evaluation and attribution's correct-sample filter generate for every test and
    candidate example, so their wall time rests on batching paying off.
    """
    import lightning.pytorch as pl

    from clbench.data.tasks import Example, Task, TaskStream
    from clbench.module import CLModule
    from clbench.runner import RunConfig, Runner
    from clbench.strategy import CLStrategy

    rows = json.loads(PROMPTS.read_text(encoding="utf-8"))[:batch]
    examples = [Example(r["prompt"], r["answer"]) for r in rows]
    task = Task(
        "PyNextLine",
        train=[],
        test=examples,
        metric="edit_similarity",
        max_new_tokens=new_tokens,
        postprocess="first_line",
    )
    scratch = _scratch()

    def trainer_factory(**kwargs) -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", **kwargs)

    with quiet():
        module = CLModule(model=model_folder(model))
        runners = {
            mode: Runner(
                module,
                TaskStream("bench", [task]),
                CLStrategy(),
                trainer_factory,
                RunConfig(output_dir=str(scratch)),
                eval_batch_size=size,
            )
            for mode, size in (("batched", batch), ("one_at_a_time", 1))
        }
        answers: dict[str, list[str]] = {}
        profiles: dict[str, list[dict]] = {mode: [] for mode in runners}

        def run(mode: str) -> Callable[[], None]:
            def go() -> None:
                log = ForwardLog(module.model)
                start = time.perf_counter()
                try:
                    answers[mode] = runners[mode].evaluator.generate(task, examples)
                finally:
                    total = time.perf_counter() - start
                    log.remove()
                profiles[mode].append(log.profile(total))

            return go

        rounds = interleaved({mode: run(mode) for mode in runners}, repeats)
    tok = module.tokenizer
    prompt_tokens = [len(tok(ex.prompt)["input_ids"]) for ex in examples]
    speed = summary(rounds, "one_at_a_time", "batched")
    profile = {
        mode: {key: statistics.median(p[key] for p in runs[1:]) for key in runs[0]}  # warm-up dropped
        for mode, runs in profiles.items()
    }
    return {
        "measurement": "generation",
        "model": model,
        "batch": batch,
        "new_tokens": new_tokens,
        "prompt_tokens": [min(prompt_tokens), max(prompt_tokens)],
        "precision": "bf16-mixed",
        "repeats": repeats,
        **_environment(),
        "batched_s": statistics.median(r["batched"]["wall"] for r in rounds),
        "one_at_a_time_s": statistics.median(r["one_at_a_time"]["wall"] for r in rounds),
        "speedup": speed["ratio"],
        "speedup_range": speed["ratio_range"],
        "speedup_cpu": speed["ratio_cpu"],
        "profile": profile,
        "same_answers": sum(a == b for a, b in zip(answers["batched"], answers["one_at_a_time"])),
        "target": 4.0,
        "meets_target": speed["ratio"] >= 4.0,
    }


# -- 3. gate state against the number of tasks -------------------------------------------------


def held_tensors(
    obj: object, prefix: str = "", seen: set[int] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(attribute path, tensor) for every tensor reachable from `obj`'s attributes, through dict
    values, lists, tuples and plain objects (e.g. the strategy's PriorSource and its Parked starting
    weights). Dict keys are not followed: a dict keyed by parameter (the "grad" gate's cache)
    refers to the model's tensors, it does not hold them."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from held_tensors(value, prefix, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            yield from held_tensors(value, prefix, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)) and not callable(obj):
        for name, value in vars(obj).items():
            yield from held_tensors(value, f"{prefix}.{name}" if prefix else name, seen)


def held_bytes(strategy: object) -> dict[str, int]:
    """Bytes of the distinct storages the strategy's tensors live in, by the attribute that reaches
    a storage first (a gate that is Rbar itself counts once, under rbar)."""
    storages: set[int] = set()
    out: dict[str, int] = {}
    for path, t in held_tensors(strategy):
        storage = t.untyped_storage()
        if storage.data_ptr() in storages:
            out.setdefault(path, 0)
            continue
        storages.add(storage.data_ptr())
        out[path] = out.get(path, 0) + storage.nbytes()
    return out


def random_prior(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """A prior laid out like the trainable parameters: fp32, uniform in [-1, 1] (Eq. 10's range)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g).mul_(2).sub_(1) for n, s in shapes.items()}


GATE_FORMS = {
    "grad, gate_power 1": {"gate_target": "grad", "gate_power": 1.0},
    "grad, gate_power 0.25": {"gate_target": "grad", "gate_power": 0.25},
    "grad, budget 0.2": {"gate_target": "grad", "budget": 0.2},
    "update, gate_power 1": {"gate_target": "update", "gate_power": 1.0},
}


def gate_growth(model: str = "tiny", tasks: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Bytes per trainable parameter that the attribution strategy holds after 1, 2, 4, 8 tasks.

    What: an Attribution strategy (source "single_task", offload "memory": set up as a run sets it
    up, so its PriorSource keeps the starting weights) folds random priors laid out like the
    trainable parameters through its own `_fold` (fold_max into Rbar, then `_refresh` builds the
    gate), for the graded gate (gate_power 1 and 0.25) and the hard budget gate (budget 0.2) under
    gate_target "grad" (the default), and the graded gate under "update"; after each fold one
    optimizer-step hook runs on zero gradients (on_before_optimizer_step, resp. update_gate), so the
    caches a training step makes exist (the "grad" gate keeps 1 - gate per tensor). After each count
    in `tasks`, every tensor reachable from the strategy's attributes is counted once per storage
    (deduplicated by data pointer), by attribute; also the process's resident set above where it was
    before the strategy was made (after garbage collection and malloc_trim), as a cross-check for
    memory the strategy does not reach. Why: the gate must stay flat in the number of tasks (Eq. 12
    keeps one running max), not grow with a prior per task. No model forward: the model gives the
    shapes (and the parameters the hooks look up).
    """
    from strategies.attribution import Attribution

    net, _ = load(model)
    params = trainable(net)
    shapes = {n: p.shape for n, p in params.items()}
    total = sum(p.numel() for p in params.values())
    module = SimpleNamespace(trainable_parameters=lambda: params)
    ctx = SimpleNamespace(module=module, run_dir=str(_scratch()), rank=0, seed=0)
    for p in params.values():
        p.grad = torch.zeros_like(p)  # what the step hooks gate (the model's, not the strategy's)
    forms = {}
    for label, kwargs in GATE_FORMS.items():
        release_memory()
        base = proc_status("VmRSS")
        strategy = Attribution(**kwargs)
        strategy.setup(ctx)
        rows = []
        for t in range(1, max(tasks) + 1):
            prior = random_prior(shapes, seed=t)
            start = time.perf_counter()
            strategy._fold(ctx, prior)
            fold_s = time.perf_counter() - start
            del prior
            strategy.on_before_optimizer_step(ctx, None)  # each acts under its own gate_target only
            strategy.update_gate(ctx)
            if t in tasks:
                release_memory()
                parts = held_bytes(strategy)
                rows.append(
                    {
                        "tasks": t,
                        "tasks_folded": strategy.tasks_folded,
                        "bytes_per_param": sum(parts.values()) / total,
                        "by_attribute": {k: v / total for k, v in parts.items() if v},
                        "rss_per_param": (proc_status("VmRSS") - base) / total,
                        "fold_s": fold_s,
                    }
                )
        forms[label] = rows
        del strategy
    net.zero_grad(set_to_none=True)
    flat = {
        label: max(r["bytes_per_param"] for r in rows) - min(r["bytes_per_param"] for r in rows)
        for label, rows in forms.items()
    }
    return {
        "measurement": "gate_growth",
        "model": model,
        "parameters": total,
        "tasks": list(tasks),
        **_environment(),
        "forms": forms,
        "growth_bytes_per_param": flat,
        "flat": all(v == 0 for v in flat.values()),
    }


# -- 4. scoring against sequence length -------------------------------------------------------


def _peak(spec: dict) -> dict:
    """In a fresh process: the peak resident set above the loaded model of one `kind` run."""
    if spec["model"] == "tiny":
        net = tiny_llama(torch.float32, max_position_embeddings=TINY_POSITIONS)
    else:
        from clbench.models import load_causal_lm

        net = load_causal_lm(spec["folder"])
        for p in net.parameters():  # into anonymous memory: safetensors weights arrive mapped from
            p.data = p.data.clone()  # the file and would page in (into the peak) on first use
    ids, mask = random_batch(spec["n"], spec["seq"], net.config.vocab_size)
    fn = {"train": train_step, "score": score_prior}[spec["kind"]]
    release_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current resident set
    base = proc_status("VmRSS")
    fn(net, ids, mask)
    return {"peak_bytes": proc_status("VmHWM") - base, "base_bytes": base}


def peak_in_child(model: str, kind: str, n: int, seq: int) -> dict:
    spec = {"model": model, "kind": kind, "n": n, "seq": seq}
    if model != "tiny":
        spec["folder"] = model_folder(model)
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--peak", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"peak memory child {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def scoring_vs_seq_len(
    model: str = "tiny",
    lengths: tuple[int, ...] = (64, 128, 256, 512),
    n: int = 4,
    repeats: int | None = None,
    n_at: dict[int, int] | None = None,
    memory: bool = True,
) -> dict:
    """Scoring time and peak memory against sequence length, as multiples of training at that length.

    What: for each length T, N left-padded random sequences of T tokens (`n_at` overrides N for some
    lengths: on SmolLM2 the default scores 2 samples at 512 tokens to keep the run short; the ratio
    compares the same N for both, the time per token divides by the real tokens). Time: one task
    prior (as in `scoring_vs_training`: LRP, K 8, bf16 top-K, chunk 4) against a bf16-autocast
    training forward + backward of the same sequences, in interleaved rounds (all lengths per round,
    after one warm-up of both at the smallest length; `repeats` rounds: 2 on SmolLM2, 5 on the tiny
    model, whose millisecond calls are noisier), median of per-round ratios; seconds per real token
    of each; and the MB of fresh pages each call faulted in (large temporaries the allocator
    returned to the kernel and asks for again: kernel time, which grows with the machine's load).
    Memory (CPU): the peak resident set (VmHWM after a reset through /proc/self/clear_refs) above the
    loaded model during one call, each (length, kind) in a fresh process: in one process the
    allocator keeps what an earlier call freed, and a later call would reuse it unseen. Why: LRP
    keeps per-sample state the training pass does not (per-sample maps, B x heads x T x T eager
    attention scores), so its cost relative to training may grow with T.
    """
    net, _ = load(model)
    repeats = repeats if repeats is not None else (2 if model == BUNDLED else 5)
    n_at = dict(n_at if n_at is not None else ({512: 2} if model == BUNDLED else {}))
    batches = {T: random_batch(n_at.get(T, n), T, net.config.vocab_size) for T in lengths}
    runs: dict[str, Callable[[], object]] = {}
    for T, (ids, mask) in batches.items():
        runs[f"train {T}"] = lambda ids=ids, mask=mask: train_step(net, ids, mask)
        runs[f"score {T}"] = lambda ids=ids, mask=mask: score_prior(net, ids, mask)
    smallest = batches[min(lengths)]
    train_step(net, *smallest)  # warm-up at the smallest length: allocator, kernels, lazy init
    score_prior(net, *smallest)
    rounds = interleaved(runs, repeats, warmup=False)
    net.zero_grad(set_to_none=True)
    rows = []
    for T, (ids, mask) in batches.items():
        tokens = int(mask.sum())
        train, score = (
            summary(rounds, f"train {T}", f"train {T}"),
            summary(rounds, f"score {T}", f"train {T}"),
        )
        row = {
            "seq": T,
            "n": ids.shape[0],
            "tokens": tokens,
            "train_s": train["s"],
            "score_s": score["s"],
            "train_faults_mb": train["faults_mb"],
            "score_faults_mb": score["faults_mb"],
            "time_ratio": score["ratio"],
            "time_ratio_cpu": score["ratio_cpu"],
            "time_ratio_range": score["ratio_range"],
            "train_ms_per_token": 1e3 * train["s"] / tokens,
            "score_ms_per_token": 1e3 * score["s"] / tokens,
        }
        if memory:
            train_peak = peak_in_child(model, "train", ids.shape[0], T)["peak_bytes"]
            score_peak = peak_in_child(model, "score", ids.shape[0], T)["peak_bytes"]
            row.update(
                {
                    "train_peak_bytes": train_peak,
                    "score_peak_bytes": score_peak,
                    "memory_ratio": score_peak / train_peak if train_peak > 0 else None,
                }
            )
        rows.append(row)
    return {
        "measurement": "scoring_vs_seq_len",
        "model": model,
        "parameters": sum(p.numel() for p in trainable(net).values()),
        "repeats": repeats,
        **_environment(),
        "rows": rows,
    }


# -- reporting --------------------------------------------------------------------------------


def scoring_vs_training_n32(model: str = "tiny") -> dict:
    """`scoring_vs_training` over 32 samples: with N > K the top-K merge's insertion runs too."""
    return scoring_vs_training(model, n=32)


MEASUREMENTS: dict[str, Callable[..., dict]] = {
    "scoring_vs_training": scoring_vs_training,
    "scoring_vs_training_n32": scoring_vs_training_n32,
    "generation": generation,
    "gate_growth": gate_growth,
    "scoring_vs_seq_len": scoring_vs_seq_len,
}
LABELS = {"tiny": "tiny random Llama (2 layers, d 64)", BUNDLED: "SmolLM2-135M-Instruct"}


def _range(r: list[float]) -> str:
    return f"{r[0]:.2f}-{r[1]:.2f}"


def _md_scoring_vs_training(res: dict, label: str) -> list[str]:
    lines = [
        f"**Scoring vs training** ({label}, {res['parameters']:,} parameters; {res['threads']} thread(s)): "
        f"one task prior (task_prior: LRP, K {res['k']}, bf16 top-K, chunk {res['chunk']}) and the LRP "
        f"engine alone over N = {res['n']} left-padded sequences of {res['seq']} tokens, against a "
        f"bf16-autocast training forward + backward on them; median of {res['repeats']} interleaved "
        f"rounds' ratios. Target: task prior <= {res['target']:g}x.",
        "",
        "| run | seconds | ratio to training (wall) | rounds | ratio (CPU time) | fresh pages MB |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in (("train", "training fwd + bwd (bf16 autocast)"), ("engine", "LRP engine alone"),
                      ("task_prior", "task prior (engine + Eq. 10 + bf16 top-K)")):  # fmt: skip
        r = res[key]
        bold = "**" if key == "task_prior" else ""
        lines.append(
            f"| {name} | {r['s']:.3f} | {bold}{r['ratio']:.2f}x{bold} | {_range(r['ratio_range'])} "
            f"| {r['ratio_cpu']:.2f}x | {r['faults_mb']:.0f} |"
        )
    lines.append(f"\nTarget {'met' if res['meets_target'] else '**missed**'}.")
    if res.get("breakdown"):
        b, ratio = res["breakdown"], res["task_prior"]["ratio"]
        shares = {
            "LRP engine and loop": b["engine_and_rest"],
            "Eq. 10 normalise": b.get("eq10_normalise", 0.0),
            "top-K merge": b.get("topk_add", 0.0),
            "top-K mean": b.get("topk_mean", 0.0),
        }
        lines[-1] += (
            f" Where the task prior's time goes (one more call, {b['s']:.2f} s, timers around the "
            f"consumer's parts; share, and that share of the {ratio:.2f}x): "
            + ", ".join(f"{k} {v:.0%} ({v * ratio:.2f}x)" for k, v in shares.items())
            + "."
        )
    return lines


def _md_generation(res: dict, label: str) -> list[str]:
    b, one = res["profile"]["batched"], res["profile"]["one_at_a_time"]
    lines = [
        f"**Batched generation** ({label}; {res['threads']} thread(s)): {res['batch']} PyNextLine test "
        f"prompts ({res['prompt_tokens'][0]}-{res['prompt_tokens'][1]} tokens), greedy, up to "
        f"{res['new_tokens']} new tokens, through Runner.evaluator.generate (Trainer.predict, "
        f"{res['precision']}, CLModule.generate, left padding) with eval_batch_size {res['batch']} "
        f"against eval_batch_size 1; median of {res['repeats']} interleaved rounds. Target: speed-up >= "
        f"{res['target']:g}x.",
        "",
        "| mode | seconds | forwards (prefill + decode) | decode row-steps | prefill s | decode s "
        "| ms per decode step | other s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, p in (("batch " + str(res["batch"]), b), ("one at a time", one)):
        lines.append(
            f"| {name} | {p['s']:.3f} | {p['prefills']:.0f} + {p['decode_steps']:.0f} | {p['row_steps']:.0f} "
            f"| {p['prefill_s']:.3f} | {p['decode_s']:.3f} | {p['decode_ms_per_step']:.1f} "
            f"| {p['other_s']:.3f} |"
        )
    step_ratio = b["decode_ms_per_step"] / one["decode_ms_per_step"] if one["decode_ms_per_step"] else 0
    lines += [
        "",
        f"Speed-up (one at a time / batched): **{res['speedup']:.2f}x** "
        f"(rounds {_range(res['speedup_range'])}; "
        f"CPU time {res['speedup_cpu']:.2f}x); target {'met' if res['meets_target'] else '**missed**'}. "
        f"A batch-{res['batch']} decode step costs {step_ratio:.2f}x a batch-1 step; the batched run takes "
        f"{b['decode_steps']:.0f} decode steps for what one at a time takes {one['decode_steps']:.0f}. "
        f"Batched and one-at-a-time answers agree on {res['same_answers']} of {res['batch']}.",
    ]
    return lines


def _md_gate_growth(res: dict, label: str) -> list[str]:
    lines = [
        f"**Gate state vs tasks** ({label}, {res['parameters']:,} trainable parameters): bytes per trainable "
        f"parameter held by an Attribution strategy (single_task source: its copy of the starting "
        f"weights included) after folding random priors of {', '.join(map(str, res['tasks']))} tasks "
        f"through `_fold` (fold_max + `_refresh`) and one optimizer-step hook; every tensor reachable "
        f"from its attributes, counted once per storage; process RSS above the start as a cross-check.",
        "",
        "| gate | " + " | ".join(f"{t} task{'s' if t > 1 else ''}" for t in res["tasks"]) + " | held by |",
        "|---|" + "---|" * len(res["tasks"]) + "---|",
    ]
    for form, rows in res["forms"].items():
        cells = [f"{r['bytes_per_param']:.2f} B (RSS {r['rss_per_param']:.2f})" for r in rows]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in rows[-1]["by_attribute"].items() if v >= 0.005)
        lines.append(f"| {form} | " + " | ".join(cells) + f" | {parts} |")
    growth = ", ".join(f"{k} {v:+.2f}" for k, v in res["growth_bytes_per_param"].items())
    lines.append(
        f"\nGrowth from {res['tasks'][0]} to {res['tasks'][-1]} tasks (B/parameter): {growth}: "
        f"{'flat' if res['flat'] else '**not flat**'}."
    )
    return lines


def _md_scoring_vs_seq_len(res: dict, label: str) -> list[str]:
    mem = "train_peak_bytes" in res["rows"][0]
    lines = [
        f"**Scoring vs sequence length** ({label}; {res['threads']} thread(s)): one task prior (LRP, K 8, "
        f"bf16 top-K, chunk 4) against a bf16-autocast training forward + backward of the same N "
        f"sequences, per length; time: median of {res['repeats']} interleaved rounds' ratios"
        + (
            "; memory: peak RSS above the loaded model, one fresh process per length and kind."
            if mem
            else "."
        ),
        "",
        "| T | N | tokens | train s | score s | time ratio | (CPU) | train ms/token | score ms/token "
        "| fresh pages MB train / score"
        + (" | train peak MB | score peak MB | memory ratio |" if mem else " |"),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if mem else ""),
    ]
    for r in res["rows"]:
        line = (
            f"| {r['seq']} | {r['n']} | {r['tokens']} | {r['train_s']:.3f} | {r['score_s']:.3f} "
            f"| **{r['time_ratio']:.2f}x** | {r['time_ratio_cpu']:.2f}x | {r['train_ms_per_token']:.2f} "
            f"| {r['score_ms_per_token']:.2f} | {r['train_faults_mb']:.0f} / {r['score_faults_mb']:.0f} |"
        )
        if mem:
            ratio = f"{r['memory_ratio']:.2f}x" if r["memory_ratio"] is not None else "-"
            line += f" {r['train_peak_bytes'] / 1e6:.0f} | {r['score_peak_bytes'] / 1e6:.0f} | {ratio} |"
        lines.append(line)
    return lines


RENDERERS = {
    "scoring_vs_training": _md_scoring_vs_training,
    "scoring_vs_training_n32": _md_scoring_vs_training,
    "generation": _md_generation,
    "gate_growth": _md_gate_growth,
    "scoring_vs_seq_len": _md_scoring_vs_seq_len,
}


def markdown(name: str, result: dict, model: str) -> str:
    """One measurement's result as a one-line caption (what and how) and a small table."""
    return "\n".join(RENDERERS[name](result, LABELS.get(model, model))) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help="comma-separated measurements")
    parser.add_argument("--json", help="also write every result to this JSON file")
    parser.add_argument("--peak", help=argparse.SUPPRESS)  # internal: one peak-memory run in this process
    args = parser.parse_args()
    if args.peak:
        print(json.dumps(_peak(json.loads(args.peak))), flush=True)
        return
    names = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in names if s not in MEASUREMENTS]
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(MEASUREMENTS)}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; model {args.model}\n",
        flush=True,
    )
    results = {}
    for name in names:
        start = time.perf_counter()
        results[name] = MEASUREMENTS[name](args.model)
        results[name]["elapsed_s"] = time.perf_counter() - start
        print(markdown(name, results[name], args.model), flush=True)
        print(f"({name}: {results[name]['elapsed_s']:.0f} s)\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()

"""Per-rank memory and LRP scoring time under FSDP2 on N CPU processes (gloo): issue 27, parts 2 and 4.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python tools/bench_ranks.py memory --ranks 1,2,4 [--write]
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python tools/bench_ranks.py scoring --ranks 1,2 [--write]

memory: docs/memory.md's per-GPU table rests on bytes per parameter (weights, gradients, AdamW moments 16 B,
EWC's Fisher and anchor 8 B, attribution's R-bar 4 B, its top-K slots 16 B), divided by the number of
ranks, plus parts every rank holds whole. This checks that model on CPU ranks, where host memory is the
device memory: a Llama with Llama-3.2-1B's widths (hidden 2048, MLP 8192, vocabulary 128256, 32 heads,
8 KV heads, tied embeddings) and `--layers` decoder layers, random weights, built on the meta device
and sharded by clbench's own `apply_fsdp` (one unit per layer, then the root; bf16-mixed policy) so
that no rank ever holds the whole model, on N gloo processes started by torchrun. Each phase runs in
a fresh set of processes; the peak is each rank's peak resident set (VmHWM) above its floor, the
resident set once the libraries are imported and the process group exists (VmHWM reset there):

  seqft              training steps: bf16 autocast forward, backward, clipping, clbench's AdamW
  ewc                the same with EWC's Fisher and anchor (strategies/ewc.py: its optimizer-step
                     hook), then its task end (Fisher estimate and fold) with the moments held
  attribution train  the same with attribution's R-bar gate (its grad-gate hook)
  attribution score  a new prior: the side model's weights and `task_prior` (LRP, K 8, bf16 slots,
                     chunks of 4), as on a GPU where `offload` moved the moments and R-bar off the device

The expected peak of a phase is its table bytes x parameters / N plus the replicated parts measured
separately: the bf16 copy of the root unit that FSDP2 gathers (embeddings: 128256 x 2048), the
gathered decoder layers, and while scoring the whole model gathered for the LRP engine.

scoring: a random Llama of SmolLM2-135M's shape, `task_prior` (LRP, K 8, bf16 slots, chunks of 4) over
`--samples` prompts on N ranks, with the samples split over the ranks (clbench's way) and, under N > 1,
with every rank scoring every sample (the former way, by disabling the split for that call): wall and
CPU seconds per rank, in interleaved repeats inside one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from shapes import LLAMA_1B, SMOLLM2  # noqa: E402

# docs/memory.md's table: bytes per parameter of each phase's sharded state
TABLE_BYTES = {"seqft": 16, "ewc": 24, "attribution train": 20, "attribution score": 4 + 16}
PHASES = tuple(TABLE_BYTES)


def status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(field + ":")).split()[1]) * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM starts again from the current resident set


def release() -> None:
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


# -- the worker: one rank ----------------------------------------------------------------------
def build(shape: dict, layers: int | None, precision: str):
    """The random Llama on the meta device, sharded by clbench's apply_fsdp, then this rank's shards
    allocated and filled with seeded random values (norm weights 1), the rotary buffers computed."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from clbench import distributed as dist

    depth = {"num_hidden_layers": layers} if layers else {}
    config = LlamaConfig(**{**shape, "max_position_embeddings": 1024, **depth})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    dist.apply_fsdp(model, mesh, precision)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                dist.local(p).fill_(1.0)
            else:  # seeded by name and this rank's first row
                lo = dist.dim0_bounds(p.shape[0], mesh.size())[mesh.get_local_rank()][0]
                g = torch.Generator().manual_seed(sum(map(ord, name)) * 7919 + lo)
                dist.local(p).normal_(0.0, 0.02, generator=g)
        rotary = LlamaRotaryEmbedding(config)
        for name, b in model.model.rotary_emb.named_buffers():
            b.copy_(getattr(rotary, name))
    return model, config


def batch(vocab: int, rows: int, tokens: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, tokens), generator=g)
    mask = torch.ones_like(ids)
    for k in range(rows):
        mask[k, : k % 4] = 0  # some left padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class Wrapped:
    """What strategies' hooks ask of ctx.module: the parameters that train, a forward on a batch."""

    def __init__(self, model) -> None:
        self.model, self._trainer, self.training = model, None, True

    def trainable_parameters(self) -> dict:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def __call__(self, b: dict):
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]
            )

    def eval(self) -> None:
        self.training = False

    def train(self, mode: bool = True) -> None:
        self.training = mode


def train_steps(module: Wrapped, data: dict, steps: int, hook=None) -> object:
    """Training steps as Lightning's bf16-mixed runs them: autocast forward, backward, the strategy's
    optimizer-step hook, gradient clipping (norm 1), clbench's AdamW, gradients set to None."""
    import torch

    from clbench.module import GatedAdamW

    params = list(module.trainable_parameters().values())
    opt = GatedAdamW(params, lambda: None, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(steps):
        module(data).loss.backward()
        if hook is not None:
            hook(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def memory_worker(spec: dict) -> dict:
    import torch
    import torch.distributed as tdist

    from clbench import distributed as dist

    tdist.init_process_group("gloo")
    import strategies.attribution  # noqa: F401  (the libraries a run imports, before the floor)
    import strategies.ewc  # noqa: F401
    from strategies.attribution.importance import task_prior

    release()
    floor = status("VmRSS")
    reset_peak()
    model, config = build(LLAMA_1B, spec["layers"], "bf16-mixed")
    module = Wrapped(model)
    params = module.trainable_parameters()
    local_elements = sum(dist.local(p).numel() for p in params.values())
    built = status("VmRSS") - floor
    data = batch(config.vocab_size, spec["batch"], spec["tokens"])
    phase, out = spec["phase"], {}
    tdist.barrier()
    reset_peak()
    if phase == "seqft":
        train_steps(module, data, spec["steps"])
        out["train"] = status("VmHWM") - floor
    elif phase == "ewc":
        from strategies.ewc import EWC

        ewc = EWC(ewc_lambda=400.0)
        with torch.no_grad():
            ewc.fisher = {n: torch.rand_like(p, dtype=torch.float32).mul_(1e-6) for n, p in params.items()}
            ewc.anchor = {n: p.detach().float().clone() for n, p in params.items()}
        ctx = SimpleNamespace(module=module)
        opt = train_steps(module, data, spec["steps"], hook=lambda o: ewc.on_before_optimizer_step(ctx, o))
        out["train"] = status("VmHWM") - floor
        reset_peak()
        task = SimpleNamespace(name="bench", train=[None])
        service = SimpleNamespace(make_loader=lambda examples, shuffle: [data])
        end_ctx = SimpleNamespace(
            module=module, service=lambda: service, task=task, run_dir=tempfile.mkdtemp(), writes=False
        )
        ewc.on_task_end(end_ctx)  # Fisher of one batch, folded; the AdamW moments still held
        out["task_end"] = status("VmHWM") - floor
        del opt
    elif phase == "attribution train":
        from strategies.attribution import Attribution

        strategy = Attribution()
        with torch.no_grad():
            strategy.load_state_dict(
                {f"rbar.{n}": torch.rand_like(p, dtype=torch.float32) for n, p in params.items()}
            )
        strategy._refresh()
        ctx = SimpleNamespace(module=module)
        train_steps(module, data, spec["steps"], hook=lambda o: strategy.on_before_optimizer_step(ctx, o))
        out["train"] = status("VmHWM") - floor
    elif phase == "attribution score":
        prompts = batch(config.vocab_size, spec["samples"], spec["prompt_tokens"], seed=1)
        prompts = {k: v for k, v in prompts.items() if k != "labels"}
        prior, n = task_prior(model, params, [prompts], "lrp", 8, chunk=4, store_dtype=torch.bfloat16)
        assert n == spec["samples"]
        out["score"] = status("VmHWM") - floor
        del prior
    else:
        raise ValueError(f"unknown phase {phase!r}")
    return {
        "rank": tdist.get_rank(),
        "world": tdist.get_world_size(),
        "floor": floor,
        "weights": built,
        "local_elements": local_elements,
        "parameters": sum(p.numel() for p in params.values()),
        **out,
    }


def scoring_worker(spec: dict) -> dict:
    """Seconds of task_prior per rank: split over the ranks, and (N > 1) every rank every sample."""
    from unittest import mock

    import torch
    import torch.distributed as tdist

    import strategies.attribution.importance as importance

    tdist.init_process_group("gloo")
    model, config = build(SMOLLM2, spec.get("layers"), "32-true")
    params = dict(model.named_parameters())
    prompts = batch(config.vocab_size, spec["samples"], spec["prompt_tokens"], seed=1)
    prompts = {k: v for k, v in prompts.items() if k != "labels"}
    counted: dict[str, int] = {}
    engine = importance.stream_parameter_relevance

    def counting(m, ids, *a, **kw):
        counted[mode] = counted.get(mode, 0) + ids.shape[0]
        return engine(m, ids, *a, **kw)

    modes = ["split", "every rank"] if tdist.get_world_size() > 1 else ["split"]
    times: dict[str, list[dict]] = {m: [] for m in modes}
    priors = {}
    with mock.patch.object(importance, "stream_parameter_relevance", counting):
        for r in range(spec["repeats"] + 1):  # the first round warms up
            for mode in modes:
                patch = (
                    mock.patch.object(importance, "_split_mesh", lambda p: None) if mode != "split" else None
                )
                tdist.barrier()
                wall, cpu = time.perf_counter(), time.process_time()
                if patch:
                    with patch:
                        prior, _ = importance.task_prior(model, params, [prompts], "lrp", 8, chunk=4)
                else:
                    prior, _ = importance.task_prior(model, params, [prompts], "lrp", 8, chunk=4)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                tdist.barrier()
                if r > 0:
                    times[mode].append({"wall": wall, "cpu": cpu})
                priors[mode] = {n: importance.dist.full(t) for n, t in prior.items()}
    same = (
        all(torch.equal(priors["split"][n], priors["every rank"][n]) for n in params)
        if len(modes) > 1
        else None
    )
    return {
        "rank": tdist.get_rank(),
        "world": tdist.get_world_size(),
        "times": times,
        "samples_scored": {m: c // (spec["repeats"] + 1) for m, c in counted.items()},
        "same_prior": same,
        "parameters": sum(p.numel() for p in params.values()),
    }


def worker(spec_json: str) -> None:
    import torch.distributed as tdist

    spec = json.loads(spec_json)
    result = memory_worker(spec) if spec["kind"] == "memory" else scoring_worker(spec)
    results = [None] * tdist.get_world_size()
    tdist.all_gather_object(results, result)
    if tdist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(results))
    tdist.barrier()
    tdist.destroy_process_group()


# -- the launcher ------------------------------------------------------------------------------
def launch(spec: dict, ranks: int, timeout: int = 3600) -> list[dict]:
    """`spec` on `ranks` gloo processes (torchrun --standalone); every rank's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        cmd += [str(Path(__file__).resolve()), "--worker", json.dumps({**spec, "out": str(out)})]
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{ranks} ranks, {spec}: failed\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


def gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def available() -> int:
    """MemAvailable of this machine, bytes."""
    with open("/proc/meminfo") as f:
        return int(next(x for x in f if x.startswith("MemAvailable:")).split()[1]) * 1024


def memory(ranks: list[int], layers: int, log, phases: tuple[str, ...] = PHASES, margin: float = 2e9) -> dict:
    """Every phase on each number of ranks (in the order given), each a fresh torchrun; one row per
    (phase, N). A run whose predicted need (N floors and replicated parts as measured on fewer ranks,
    3 GB a rank before any, plus the table's sharded bytes) leaves less than `margin` of this shared
    machine's available memory is skipped, and its row says so."""
    rows = []
    for phase in phases:
        replicated = 3e9
        for n in ranks:
            spec = {"kind": "memory", "phase": phase, "layers": layers, "batch": 2, "tokens": 64, "steps": 2}
            spec.update(samples=8, prompt_tokens=32)
            params = _parameters(layers)
            need = n * replicated + TABLE_BYTES[phase] * params
            if need > available() - margin:
                rows.append(
                    {"phase": phase, "ranks": n, "skipped": f"needs ~{gb(need)} GB, {gb(available())} free"}
                )
                log(json.dumps(rows[-1]))
                continue
            start = time.time()
            result = launch(spec, n)
            rows.append({"phase": phase, "ranks": n, "per_rank": result, "seconds": time.time() - start})
            peak = max(max(x.get(k, 0) for k in ("train", "task_end", "score")) for x in result)
            replicated = max(peak - TABLE_BYTES[phase] * params / n, 0) + result[0]["floor"]
            log(json.dumps(rows[-1]))
    return {"layers": layers, "rows": rows}


def _parameters(layers: int) -> int:
    """Parameters of the Llama-3.2-1B-width model with `layers` decoder layers (tied embeddings)."""
    d, ff, v, kv = LLAMA_1B["hidden_size"], LLAMA_1B["intermediate_size"], LLAMA_1B["vocab_size"], 512
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d
    return v * d + layers * per_layer + d


def memory_markdown(res: dict) -> str:
    rows = [r for r in res["rows"] if "per_rank" in r]
    params = rows[0]["per_rank"][0]["parameters"]
    lines = [
        f"Llama-3.2-1B widths, {res['layers']} decoder layers, random weights: {params / 1e6:.1f} M "
        f"parameters ({128256 * 2048 / 1e6:.1f} M of them the tied embedding). Per-rank peak resident set "
        "above the "
        "rank's floor (libraries imported, process group up), GB; the largest rank's. 'table' is "
        "docs/memory.md's "
        "bytes per parameter x parameters / N (the sharded state only); 'rest' is peak - table, what every "
        "rank holds beside its shard (gathered units, their gradients, activations, the engine's model).",
        "",
        "| phase | N | peak per rank (max) | peak per rank (min) | table B/param | table share | rest | "
        "peak / N=1 peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base: dict[str, float] = {}
    for r in rows:  # the one-rank peaks first, whatever the order the runs took
        for key in ("train", "task_end", "score"):
            if r["ranks"] == 1 and key in r["per_rank"][0]:
                base[r["phase"] + (", task end" if key == "task_end" else "")] = r["per_rank"][0][key]
    for r in rows:
        for key in ("train", "task_end", "score"):
            peaks = [x[key] for x in r["per_rank"] if key in x]
            if not peaks:
                continue
            label = r["phase"] + (", task end" if key == "task_end" else "")
            table = TABLE_BYTES[r["phase"]] * params / r["ranks"]
            ratio = f"{max(peaks) / base[label]:.2f}x" if label in base else "-"
            lines.append(
                f"| {label} | {r['ranks']} | {gb(max(peaks))} | {gb(min(peaks))} | {TABLE_BYTES[r['phase']]} "
                f"| {gb(table)} | {gb(max(peaks) - table)} | {ratio} |"
            )
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(f"\n{r['phase']} on {r['ranks']} ranks: not run ({r['skipped']}).")
    lines += ["", *fit_markdown(rows, params)]
    return "\n".join(lines)


def fit_markdown(rows: list[dict], params: int) -> list[str]:
    """Least squares of peak(N) = S / N + R over each phase's measured N: S in bytes per parameter
    (the sharded part, to hold against the table) and R (what every rank holds whatever N)."""
    import numpy as np

    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for key in ("train", "task_end", "score"):
            peaks = [x[key] for x in r["per_rank"] if key in x]
            if peaks:
                label = r["phase"] + (", task end" if key == "task_end" else "")
                series.setdefault(label, []).append((r["ranks"], max(peaks)))
    lines = [
        "Fit of peak = S x parameters / N + R over the measured N (least squares; two points for a "
        "phase measured on two N only):",
        "",
        "| phase | N measured | S, B / parameter | table B / parameter | S / table | R, GB per rank "
        "| largest miss |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, points in series.items():
        if len(points) < 2:
            continue
        n = np.array([1 / k for k, _ in points])
        y = np.array([v for _, v in points])
        (slope, rest), *_ = np.linalg.lstsq(np.stack([n, np.ones_like(n)], 1), y, rcond=None)
        miss = max(abs(slope * x + rest - v) / v for x, v in zip(n, y))
        table = TABLE_BYTES[label.split(",")[0]]
        lines.append(
            f"| {label} | {', '.join(str(k) for k, _ in points)} | {slope / params:.1f} | {table} "
            f"| {slope / params / table:.2f} | {gb(rest)} | {miss:.1%} |"
        )
    return lines


def scoring(ranks: list[int], samples: int, repeats: int, log) -> dict:
    rows = []
    for n in ranks:
        spec = {"kind": "scoring", "samples": samples, "prompt_tokens": 48, "repeats": repeats}
        result = launch(spec, n)
        rows.append({"ranks": n, "per_rank": result})
        log(json.dumps(rows[-1]))
    return {"samples": samples, "repeats": repeats, "rows": rows}


def scoring_markdown(res: dict) -> str:
    rows = res["rows"]
    lines = [
        f"task_prior (LRP, K 8, bf16 slots, chunks of 4) of a random Llama of SmolLM2-135M's shape "
        f"({rows[0]['per_rank'][0]['parameters'] / 1e6:.1f} M parameters, fp32) over {res['samples']} "
        "prompts of 48 tokens, sharded by FSDP2 over N gloo processes of one thread each; median of "
        f"{res['repeats']} "
        "repeats after a warm-up, the slowest rank's wall clock and the mean of the ranks' CPU seconds.",
        "",
        "| N | scoring | samples scored per rank | wall s | CPU s per rank | wall vs N=1 "
        "| CPU per rank vs N=1 |",
        "|---|---|---|---|---|---|---|",
    ]
    ref = None
    for r in rows:
        for mode in r["per_rank"][0]["times"]:
            walls = [statistics.median(x["wall"] for x in p["times"][mode]) for p in r["per_rank"]]
            cpus = [statistics.median(x["cpu"] for x in p["times"][mode]) for p in r["per_rank"]]
            wall, cpu = max(walls), statistics.mean(cpus)
            if ref is None:
                ref = (wall, cpu)
            scored = "/".join(str(p["samples_scored"].get(mode, 0)) for p in r["per_rank"])
            label = "one process" if r["ranks"] == 1 else mode
            lines.append(
                f"| {r['ranks']} | {label} | {scored} | {wall:.2f} | {cpu:.2f} | {wall / ref[0]:.2f}x "
                f"| {cpu / ref[1]:.2f}x |"
            )
        same = r["per_rank"][0]["same_prior"]
        if same is not None:
            lines.append(
                f"\nN = {r['ranks']}: the split prior equals the every-rank prior bit for bit: {same}."
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("memory", "scoring"))
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--phases", default=",".join(PHASES), help="memory: which phases")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--from-json", help="render (and --write) the results a former --json run wrote")
    parser.add_argument("--commit", help="with --from-json: the commit that measured, if the file lacks it")
    parser.add_argument("--write", action="store_true", help="replace this part of BENCHMARKS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    from bench import commit, machine, write  # tools/ is this script's folder: on sys.path

    ranks = [int(x) for x in args.ranks.split(",")]
    start = time.time()
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
    elif args.what == "memory":
        phases = tuple(p for p in args.phases.split(",") if p)
        res = memory(ranks, args.layers, lambda s: print(s, flush=True), phases)
    else:
        res = scoring(ranks, args.samples, args.repeats, lambda s: print(s, flush=True))
    if not args.from_json:
        res.update(
            commit=commit(),
            machine=machine(),
            date=time.strftime("%Y-%m-%d"),
            minutes=(time.time() - start) / 60,
            command=" ".join(["tools/bench_ranks.py", *sys.argv[1:]]),
        )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    what = args.what or ("memory" if "layers" in res else "scoring")
    text = memory_markdown(res) if what == "memory" else scoring_markdown(res)
    command = res.get("command", f"tools/bench_ranks.py {what}")
    how = (
        f"`HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python {command}`: "
        f"commit {res.get('commit') or args.commit}; {res.get('machine') or machine()}; "
        f"{res.get('date', time.strftime('%Y-%m-%d'))}, {res.get('minutes', 0):.0f} min."
    )
    print(text + "\n\n" + how, flush=True)
    if args.write:
        write(f"ranks_{what}", text + "\n\n" + how)


if __name__ == "__main__":
    main()

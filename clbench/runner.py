"""The continual-learning loop: for each task, hooks -> fit -> hooks -> evaluate -> write.

One fresh Lightning Trainer per task: a Trainer that already reached `max_epochs` would
return at once on the next `fit` (the max_epochs pitfall), and per-task epochs differ anyway.
"""

from __future__ import annotations

import math
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from clbench import checkpoint
from clbench import distributed as dist
from clbench import resume as resume_state
from clbench.console import run_log, say
from clbench.data.tasks import Example, Task, TaskStream
from clbench.errors import ConfigError, Diverged, RankLost, inside, safe_name
from clbench.evaluation import general
from clbench.evaluation.evaluator import Evaluator, TaskScore, score_task
from clbench.files import write_atomic
from clbench.loggers import RunLoggers
from clbench.module import CLModule, call_trainer
from clbench.recorder import Recorder
from clbench.records import read_record
from clbench.services import RunServices
from clbench.stopping import alive, mark_interrupted
from clbench.strategy import CLStrategy, StrategyContext


@dataclass
class RunConfig:
    """Where a run writes and how much it evaluates.

    Args:
        output_dir: Parent folder of run folders.
        name: Run folder name; default "<stream>-<strategy>-seed<seed>-<time>". An existing run is
            never overwritten.
        evaluate: "all" fills the whole matrix (FWT needs it); "needed" only the diagonal and the
            last row (enough for OP and BWT).
        evaluate_start: Evaluate the starting model (row 0; needed for FWT).
        checkpoints: Save the model after every task ("every_task"), only the latest ("last"),
            or never. Only adapters are saved under LoRA.
        num_workers: DataLoader workers.
        entry: The comparison entry (a strategy name or preset) this run belongs to; `clbench compare`
            sets it and the studies group runs by it. Changes no result.
        resumable: Keep the state of the last finished task in RUN_DIR/resume (parameters, optimizer
            moments, strategy state, random generators; about 3x the trainable weights on disk) for
            `clbench fit --resume RUN_DIR`; removed when the run completes.
    """

    output_dir: str = "runs"
    name: str | None = None
    evaluate: Literal["all", "needed"] = "all"
    evaluate_start: bool = True
    checkpoints: Literal["every_task", "last", "none"] = "every_task"
    num_workers: int = 0
    resumable: bool = True
    entry: str | None = None


def unused_run_dir(output_dir: str, name: str) -> Path:
    """The folder a new run named `name` writes to; a ConfigError when it already holds anything,
    to never overwrite a run."""
    run_dir = inside(Path(output_dir), Path(output_dir) / safe_name(name, "run.name"), "run.name")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run.name: {run_dir} already holds a run; choose another run.name or remove it")
    return run_dir


def prepare_run_dir(output_dir: str, name: str) -> Path:
    """Create a new run folder (see unused_run_dir)."""
    run_dir = unused_run_dir(output_dir, name)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run.output_dir: cannot create {run_dir}: {e.strerror or e}") from None
    return run_dir


class Runner:
    """Runs one strategy over one task stream: the per-task loop. The strategies' services are a
    RunServices per task (`services(t)`), results go through the Recorder (`record`).
    Under several ranks every rank runs the whole loop; only rank 0 writes files.
    """

    def __init__(
        self,
        module: CLModule,
        stream: TaskStream,
        strategy: CLStrategy,
        trainer_factory: Callable[..., pl.Trainer],
        run: RunConfig | None = None,
        prompt_format: str = "raw",
        batch_size: int = 8,
        eval_batch_size: int = 16,
        seed: int = 0,
        strategy_name: str | None = None,
        identity: dict | None = None,
        logger: Logger | list[Logger] | bool | None = None,
        general_cfg: general.GeneralConfig | None = None,
    ) -> None:
        self.module, self.stream, self.strategy = module, stream, strategy
        self.general_cfg = general_cfg or general.GeneralConfig()
        self.trainer_factory, self.run_cfg = trainer_factory, run or RunConfig()
        self.prompt_format, self.batch_size, self.eval_batch_size = prompt_format, batch_size, eval_batch_size
        self.seed, self.identity = seed, identity
        self.strategy_name = strategy_name or type(strategy).__name__.lower()
        self.run_dir = Path(self.run_cfg.output_dir) / (
            self.run_cfg.name or f"{stream.name}-{self.strategy_name}-seed{seed}"
        )
        self.loggers = RunLoggers(self.run_dir, logger)
        self.evaluator = Evaluator(module, self._prompt_loader, self._quiet_trainer)
        self.record = Recorder(
            stream,
            self.run_dir,
            self.strategy_name,
            seed,
            identity,
            self.loggers,
            strategy.used,
            self.general_cfg,
        )

    @property
    def writes(self) -> bool:
        """Only global rank 0 writes files."""
        return dist.rank() == 0

    def services(self, t: int) -> RunServices:
        """What strategies (and the loop) use for task t: loaders seeded for t, prediction, side fit."""
        return RunServices(
            self.module,
            self.stream,
            t,
            self.run_dir,
            self.trainer_factory,
            self._quiet_trainer,
            self.evaluator,
            prompt_format=self.prompt_format,
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
            seed=self.seed,
            num_workers=self.run_cfg.num_workers,
        )

    def _prompt_loader(self, task: Task, examples: list[Example]) -> DataLoader:
        # prompt batches are unshuffled: the task index that seeds the loader changes nothing here
        names = self.stream.names  # a strategy may predict on a task of its own making
        t = names.index(task.name) if task.name in names else 0
        return self.services(t).make_prompt_loader(examples, task)

    def _ctx(self, t: int) -> StrategyContext:
        return StrategyContext(
            self.module,
            self.stream,
            t,
            self.run_dir,
            seed=self.seed,
            services=self.services(t),
            rank=dist.rank(),
            world_size=dist.world_size(),
        )

    # -- the loop -----------------------------------------------------------------------------
    def run(self, config_text: str | None = None, resume: bool = False) -> dict:
        """Train through the stream, evaluating after each task; returns the results dict.

        results.json exists from the start and always says where the run stands: "running" (with
        the process id and a heartbeat time, renewed after every task and evaluation row),
        "complete", "diverged" (collapsed training stopped it: LossRecorder), "failed" (with the error) or
        "interrupted" (Ctrl-C, SIGTERM). `resume`: go on from the last finished task of this run
        folder (clbench/resume.py)."""
        state = resume_state.load(self.run_dir) if resume else None
        # the model's structure first (sharding and a restore follow it); a strategy that refuses this
        # model stops here, before anything is written
        self.strategy.prepare_model(self._ctx(0))
        if state is not None:
            self.record.restore(state.runner)
        elif self.writes:
            prepare_run_dir(self.run_cfg.output_dir, self.run_dir.name)
            if config_text is not None:
                write_atomic(self.run_dir / "config.yaml", config_text)
        self._write("running")
        status = "failed"
        try:
            with run_log(self.run_dir / "run.log" if self.writes else None):
                self._loop(state)
            status = "success"
        except Diverged as e:
            self._write("diverged", str(e))
            raise
        except (KeyboardInterrupt, SystemExit) as e:
            if not self.complete:  # a signal during the clean-up after "complete" changes nothing
                self._write("interrupted", type(e).__name__)
            raise
        except BaseException as e:
            if lost := self._rank0_lost():
                raise RankLost(lost) from e
            self._write(
                "failed", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            )
            raise
        finally:
            self.loggers.finalize(status)
        return self.record.results("complete", None, self._resumable())

    def _loop(self, state: resume_state.ResumeState | None) -> None:
        self._connect()
        self.strategy.setup(self._ctx(0))  # before a restore: setup may snapshot the starting weights
        start = 0
        if state is not None:
            self.strategy.load_state_dict(resume_state.restore(state, self.module))
            start = state.done
            say(f"clbench: resuming {self.run_dir} after task {start}/{len(self.stream)}")
        else:
            if self.run_cfg.evaluate_start:
                self._evaluate_row(0)
            self._evaluate_general(0)
            self._write("running")
        for t in range(start, len(self.stream)):
            task = self.stream.tasks[t]
            self._train_task(t, task)
            self._evaluate_row(t + 1)
            self._checkpoint(t, task)  # before general ability: a long evaluation that fails keeps it
            if self.general_cfg.every_task or t + 1 == len(self.stream):
                self._evaluate_general(t + 1)
            last = t + 1 == len(self.stream)
            if not last:
                self._save_resume_state(t + 1)
            self._write("complete" if last else "running")
        if self.writes:  # only once results.json says complete: a kill before that still resumes
            shutil.rmtree(self.run_dir / resume_state.FOLDER, ignore_errors=True)

    def _rank0_lost(self) -> str | None:
        """On a rank that does not write, after an error: when rank 0, the run's writer, is gone from
        this machine (killed; a collective with it then fails on every other rank), results.json is
        marked "interrupted" here, as rank 0 cannot, and the line to print says how to go on; None
        otherwise (rank 0 records the error itself)."""
        record = read_record(self.run_dir) if not self.writes else None
        if record is None or record.status != "running" or record.results.get("host") != socket.gethostname():
            return None  # rank 0 recorded its own end (its error), or runs where this rank cannot look
        pid = record.results.get("pid")
        if alive(pid):
            return None
        reason = f"rank 0 (process {pid}) died without an error: killed (the kernel's out-of-memory killer "
        reason += "sends SIGKILL; see dmesg)"
        mark_interrupted(self.run_dir, reason)
        if not resume_state.has_state(self.run_dir):
            return f"{reason}; {self.run_dir} holds no finished task: start the run again"
        return f"{reason}; go on from its last finished task with: clbench fit --resume {self.run_dir}"

    def _resumable(self) -> str:
        """Whether `fit --resume` can go on with this run, and if not, why (results.json says it)."""
        if not self.run_cfg.resumable:
            return "no: run.resumable is false"
        return "yes"

    def _write(self, status: str, error: str | None = None) -> None:
        """results.json says `status` (rank 0, once the run folder exists)."""
        if self.writes and self.run_dir.is_dir():
            self.record.write(status, error, self._resumable())
        self.complete = status == "complete"

    def _save_resume_state(self, done: int) -> None:
        """The state after `done` tasks, for --resume (removed once the run is complete)."""
        sharded = dist.is_fully_sharded(self.module.model)  # then every rank writes its shards
        if self._resumable() != "yes" or not (self.writes or sharded):
            return
        resume_state.save(
            self.run_dir, self.module, self.strategy.state_dict(), self.record.bookkeeping(), done
        )

    def _connect(self) -> None:
        """Start the other ranks (Lightning's launcher re-runs the command for them), join the process
        group and shard the model, before any strategy hook: a no-op predict does all three."""
        empty = DataLoader([], generator=torch.Generator())  # no draw from the global RNG
        call_trainer(self._quiet_trainer(), "predict", self.module, dataloaders=empty)

    def _train_task(self, t: int, task: Task) -> None:
        start = time.perf_counter()
        ctx = self._ctx(t)
        self.strategy.on_task_start(ctx)
        examples = self.strategy.training_examples(ctx, task.train)
        say(f"clbench: task {t + 1}/{len(self.stream)} {task.name}: training on {len(examples)} examples")
        probe = self._loss_probe(t, task)
        before = self._mean_loss(probe)
        recorder = LossRecorder(task.name, before, self._vocab_size())
        logger = self.loggers.for_task(t, task.name, self.record.steps_done())
        monitor = [LearningRateMonitor(logging_interval="step")] if logger else []  # it needs a logger
        trainer = self.trainer_factory(
            max_epochs=task.epochs,
            max_steps=task.max_steps,
            default_root_dir=str(self.run_dir),
            logger=logger,
            callbacks=[*monitor, recorder],
            enable_checkpointing=False,
        )
        self.module.attach(self.strategy, ctx)
        loader = self.services(t).train_loader(examples)
        call_trainer(trainer, "fit", self.module, train_dataloaders=loader)
        self.strategy.on_task_end(ctx)
        loss = (before, self._mean_loss(probe))
        seconds = time.perf_counter() - start
        self.record.trained(
            task.name, loss, recorder.losses, recorder.weight_growth, trainer.global_step, seconds
        )

    def _vocab_size(self) -> int | None:
        """The output vocabulary: the loss of uniform predictions is ln of it."""
        out = self.module.model.get_output_embeddings()
        return getattr(out, "out_features", None) or getattr(self.module.model.config, "vocab_size", None)

    def _loss_probe(self, t: int, task: Task) -> DataLoader:
        """The task's eval split (or first 64 training examples): loss before vs after its training.
        Every rank computes it on all of them, so each holds the same value."""
        return self.services(t).probe_loader(task.eval or task.train[:64], task)

    def _mean_loss(self, loader: DataLoader) -> float:
        out = call_trainer(self._quiet_trainer(), "validate", self.module, dataloaders=loader, verbose=False)
        return float(out[0]["val/loss"])

    def _quiet_trainer(self, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
        """For loss probes and generation: no logger, checkpoints, summary or Lightning progress bar
        (generation draws its own, clbench.console.progress, through `callbacks`)."""
        return self.trainer_factory(
            logger=False,
            enable_checkpointing=False,
            callbacks=callbacks or [],
            limit_val_batches=1.0,
            enable_model_summary=False,
            enable_progress_bar=False,
        )

    def _row_tasks(self, row: int) -> list[int]:
        T = len(self.stream)
        if self.run_cfg.evaluate == "all" or row == T or row == 0:
            return list(range(T))
        return [row - 1]

    def _evaluate_row(self, row: int) -> None:
        start = time.perf_counter()
        scores: dict[str, TaskScore] = {}
        tasks = self._row_tasks(row)
        for k, i in enumerate(tasks):
            task = self.stream.tasks[i]
            raw = self.evaluator.generate(task, task.test, f"row {row}: {task.name} ({k + 1}/{len(tasks)})")
            out = self.run_dir / "predictions" / f"after_{row}" / f"{task.name}.jsonl"
            scores[task.name] = score_task(task, raw, out if self.writes else None)
        line = ", ".join(f"{n} {s.score:.3f}" for n, s in scores.items())
        say(f"clbench: row {row} ({'start' if row == 0 else 'after task ' + str(row)}): {line}")
        self.record.evaluated(row, scores, time.perf_counter() - start, self.writes)

    def _evaluate_general(self, row: int) -> None:
        """General ability at row `row` through lm-eval (clbench/evaluation/general.py), on the model's
        device and under the run's precision, as the stream's own evaluation runs."""
        if not self.general_cfg.tasks:
            return
        start = time.perf_counter()
        trainer = self._quiet_trainer()
        device = trainer.strategy.root_device
        if not dist.is_fully_sharded(self.module.model):  # Lightning leaves it on the CPU between calls
            self.module.to(device)
        samples = self.run_dir / "general" / f"after_{row}" if self.writes else None
        with trainer.precision_plugin.forward_context():  # the run's precision: its autocast, if any
            on = torch.is_autocast_enabled(device.type)
            autocast = torch.get_autocast_dtype(device.type) if on else None
        model, tokenizer = self.module.model, self.module.tokenizer
        scores = general.evaluate(model, tokenizer, self.general_cfg, samples, autocast)
        heads = {t: (k, ms[k]["value"]) for t, ms in scores.items() if (k := general.primary(ms))}
        line = "; ".join(f"{t} {k} {v:.3f}" for t, (k, v) in heads.items())
        say(f"clbench: general ability ({'start' if row == 0 else 'after task ' + str(row)}): {line}")
        self.record.general_evaluated(row, scores, time.perf_counter() - start, self.writes)

    def _checkpoint(self, t: int, task: Task) -> None:
        if self.run_cfg.checkpoints == "none":
            return
        folder = self.run_dir / "checkpoints" / f"task{t + 1}-{task.name}"
        checkpoint.save(self.module, self.strategy.state_dict(), folder, self.writes)
        if self.run_cfg.checkpoints == "last" and t > 0 and self.writes:
            prev = self.stream.tasks[t - 1]
            shutil.rmtree(self.run_dir / "checkpoints" / f"task{t}-{prev.name}", ignore_errors=True)


# Collapse: training that has stopped learning anything while its weights blew up. Chosen from
# measurements (README, "Collapse is not success"): on a tiny random Llama, lr 1e6 grows the largest
# trainable weight 1.7e6-fold in two steps with the loss pinned at ln(V), lr 10 and lr 1 grow it
# 100-fold and 10-fold with the loss 7-400x its start; working learning rates (3e-3, and 3e-2)
# grow it at most 1.04x and 1.3x over a whole task, the bundled model at lr 5e-5 far less.
WEIGHT_GROWTH = 10.0  # max |theta| over max(1, max |theta| at the task's start)
PINNED = 0.01  # |loss - ln V| <= PINNED * ln V: the loss of uniform predictions
BLOWN = 2.0  # loss > BLOWN x the task's starting loss (its eval-split probe before training)


def max_abs_weight(params: list[torch.Tensor]) -> float:
    """The largest |theta| among the parameters, the same on every rank (sharded ones reduced)."""
    local = [dist.local(p.detach()).abs().max() for p in params if dist.local(p).numel()]
    device = params[0].device if params else torch.device("cpu")
    peak = torch.stack(local).max().float() if local else torch.zeros((), device=device)
    return float(dist.all_reduce_(peak.reshape(1), "max")[0])


class LossRecorder(pl.Callback):
    """The training loss of every batch, as logged (averaged over ranks, so every rank sees the same
    value), for results.json; a run whose training collapsed stops at once (Diverged): a NaN or
    infinite loss, or a loss at the uniform-prediction level ln(V) or above BLOWN x the task's
    starting loss while the largest weight has grown WEIGHT_GROWTH-fold. `weight_growth` is that
    growth at the task's end (results.json keeps it: how far a run was from the rule)."""

    def __init__(self, task: str, start_loss: float | None = None, vocab_size: int | None = None) -> None:
        self.task, self.losses = task, []
        self.start_loss, self.uniform = start_loss, math.log(vocab_size) if vocab_size else None
        self.start_weight, self.weight_growth = 1.0, None

    def _params(self, pl_module: pl.LightningModule) -> list[torch.Tensor]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_weight = max(1.0, max_abs_weight(self._params(pl_module)))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weight_growth = max_abs_weight(self._params(pl_module)) / self.start_weight

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        loss = float(trainer.callback_metrics["train/loss"])
        self.losses.append(loss)
        where = f"task {self.task}: the training loss is {loss:.6g} at step {trainer.global_step} "
        where += f"(batch {len(self.losses)})"
        if not math.isfinite(loss):
            raise Diverged(f"{where}; lower model.lr or check the data")
        pinned = self.uniform is not None and abs(loss - self.uniform) <= PINNED * self.uniform
        blown = self.start_loss is not None and loss > BLOWN * self.start_loss
        if pinned or blown:  # every rank sees the same loss, so all take part in the reduction
            growth = max_abs_weight(self._params(pl_module)) / self.start_weight
            if growth > WEIGHT_GROWTH:
                level = (
                    f"ln(V) = {self.uniform:.3f}, uniform predictions"
                    if pinned
                    else (f"over {BLOWN:g}x the task's starting loss {self.start_loss:.3f}")
                )
                raise Diverged(
                    f"{where}, {level}, and the largest weight grew {growth:.3g}-fold: training collapsed; "
                    "lower model.lr"
                )

"""`clbench fit`: train one strategy through a task stream.

A LightningCLI: `--model.*` configures CLModule, `--trainer.*` Lightning's Trainer
(including Lightning's own `--trainer.strategy`, e.g. ddp or FSDP), `--strategy` the
continual-learning strategy, `--stream.*` the tasks, `--run.*` the output folder.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from clbench import distributed as dist  # registers the "fsdp" / "fsdp2" trainer strategies
from clbench.arguments import explain, from_jsonargparse
from clbench.console import run_log, say, show_bars
from clbench.data.collate import cut_answers
from clbench.data.loaders import StreamConfig, fit_to_context, load_stream
from clbench.errors import ConfigError, safe_name
from clbench.evaluation.general import GeneralConfig, check_tasks
from clbench.identity import differences, run_identity, sha256_text
from clbench.module import CLModule
from clbench.precision import default_precision, slow_bf16_note
from clbench.records import read_record
from clbench.runner import RunConfig, Runner, unused_run_dir
from clbench.stopping import StopWatch, alive, sigterm_stops
from clbench.strategy import CLStrategy
from strategies import class_path, load, name_for, name_of

# The run folder's name, chosen once by rank 0: Lightning's launcher starts the other ranks by
# running the same command again with this process's environment, so they read it from here.
RUN_NAME_ENV = "CLBENCH_RUN_NAME"


class CLBenchCLI(LightningCLI):
    """LightningCLI that adds the stream, the run folder and the continual-learning strategy.
    `resuming`: the run folder `fit --resume` goes on with (its name, its recorded identity)."""

    def __init__(self, *args, resuming: Path | None = None, **kwargs) -> None:
        self.resuming = resuming  # LightningCLI parses and calls the hooks below in __init__
        super().__init__(*args, **kwargs)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """LightningCLI hands the config's `trainer.callbacks` list itself to the Trainer, which appends
        its defaults (checkpointing, progress bar) to it; the runner's trainers take that list again,
        so each trainer gets a copy and the list keeps the user's callbacks alone."""
        callbacks = self._get(self.config_init, "trainer", default={}).get("callbacks")
        kwargs.setdefault("callbacks", list(callbacks or []))
        return super().instantiate_trainer(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_subclass_arguments(CLStrategy, "strategy", required=True, instantiate=True)
        parser.add_class_arguments(StreamConfig, "stream")
        parser.add_class_arguments(RunConfig, "run")
        parser.add_class_arguments(GeneralConfig, "general")

    def before_instantiate_classes(self) -> None:
        # Check data and the run folder before the (slow) model load, so bad input fails fast.
        cfg = self.config
        self.stream = load_stream(StreamConfig(**_plain(cfg.stream)))
        self.general = GeneralConfig(**cfg.general.as_dict())
        check_tasks(self.general)
        cfg.run.name = agreed_run_name(cfg, self.stream.name, self.resuming)
        self.config_text = self.parser.dump(cfg, skip_none=False, skip_validation=True)
        self.identity = None  # written by rank 0 alone, which alone hashes data, model and code
        if dist.rank() == 0:
            strategy_class = load(cfg.strategy.class_path)
            self.identity = run_identity(
                self.config_text,
                self.stream,
                cfg.model.model,
                cfg.trainer.precision,
                strategy_class,
                self.general.tasks,
            )
            if self.resuming is not None:
                self.identity = check_resumable(self.resuming, self.config_text, self.identity)


def agreed_run_name(cfg: Namespace, stream: str, resuming: Path | None = None) -> str:
    """The run folder's name, the same on every rank; rank 0 refuses one that already holds a run."""
    if resuming is not None:
        return resuming.name
    inherited = os.environ.get(RUN_NAME_ENV)
    if inherited and dist.rank() != 0:  # started by rank 0's launcher, which chose and checked it
        return inherited
    name = cfg.run.name
    if name:
        safe_name(name, "run.name")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if dist.world_size() > 1:  # ranks started together (torchrun, srun): no clock they share
            stamp = os.environ.get("TORCHELASTIC_RUN_ID", "none")[:8]  # torchrun --standalone: a uuid
            stamp = os.environ.get("SLURM_JOB_ID", stamp if stamp != "none" else "")
            if not stamp:
                raise ConfigError(
                    "run.name: set run.name when torchrun starts the ranks, so all use one folder"
                )
        name = f"{stream}-{name_for(cfg.strategy.class_path)}-seed{cfg.seed_everything}-{stamp}"
    if dist.rank() == 0:
        unused_run_dir(cfg.run.output_dir, name)
    os.environ[RUN_NAME_ENV] = name
    return name


def _plain(ns: Namespace) -> dict:
    """A jsonargparse namespace as plain dicts (nested task configs included)."""
    from clbench.data.loaders import TaskConfig

    d = ns.as_dict() if isinstance(ns, Namespace) else dict(ns)
    d["tasks"] = [TaskConfig(**t) if isinstance(t, dict) else t for t in d.get("tasks", [])]
    return d


# Lightning's "fsdp" is FSDP1 (refuses CPU, cannot shard what configure_model builds); in clbench
# the name means FSDP2, registered as "fsdp2" by clbench.distributed.
TRAINER_STRATEGY_ALIASES = {"fsdp": "fsdp2"}


def resolve_strategy_args(argv: list[str]) -> list[str]:
    """Replace registry names (`--strategy ewc`, `--strategy.help ewc`, `strategy: ewc` in a config) by
    class paths, and
    clbench's trainer-strategy names (`--trainer.strategy fsdp`) by Lightning's."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--trainer.strategy" and i + 1 < len(argv):
            out += [arg, TRAINER_STRATEGY_ALIASES.get(argv[i + 1], argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--trainer.strategy="):
            name = arg.split("=", 1)[1]
            arg = "--trainer.strategy=" + TRAINER_STRATEGY_ALIASES.get(name, name)
        if arg in ("--strategy", "--strategy.help") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out += [arg, _resolve_strategy_value(argv[i + 1])]
            i += 2
            continue
        if arg.startswith(("--strategy=", "--strategy.help=")):
            key, value = arg.split("=", 1)
            out.append(f"{key}={_resolve_strategy_value(value)}")
        elif arg == "--config" and i + 1 < len(argv):
            out += [arg, _resolve_config_strategy(argv[i + 1])]
            i += 2
            continue
        else:
            out.append(arg)
        i += 1
    return out


def _resolve_strategy_value(value: str) -> str:
    """A `--strategy` value with its registry name resolved: a name, or a JSON/YAML {class_path, ...}."""
    if not value.lstrip().startswith("{"):
        return class_path(value)
    try:
        node = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--strategy: not valid JSON or YAML ({str(e).splitlines()[0]})") from None
    if isinstance(node, dict) and isinstance(node.get("class_path"), str):
        node["class_path"] = class_path(node["class_path"])
    return json.dumps(node)


def read_yaml(path: str) -> object:
    """A YAML config file's content; a missing or malformed file is a one-line ConfigError."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as a UTF-8 text file ({e})") from None


def _resolve_config_strategy(path: str) -> str:
    """The config file, or its text with the strategy name resolved when it uses a short name."""
    data = read_yaml(path)
    trainer = data.get("trainer") if isinstance(data, dict) else None
    sharding = trainer.get("strategy") if isinstance(trainer, dict) else None
    if isinstance(sharding, str) and sharding in TRAINER_STRATEGY_ALIASES:
        trainer["strategy"] = TRAINER_STRATEGY_ALIASES[sharding]
    elif not isinstance(data, dict) or "strategy" not in data:
        return path
    strat = data.get("strategy")
    try:
        if strat is None:
            pass
        elif isinstance(strat, str):
            data["strategy"] = {"class_path": class_path(strat)}
        elif isinstance(strat, dict) and "class_path" in strat:
            strat["class_path"] = class_path(strat["class_path"])
    except ValueError as e:
        raise ConfigError(f"{path}: strategy: {e}") from None
    return yaml.safe_dump(data, sort_keys=False)


def build_cli(argv: list[str], resuming: Path | None = None) -> CLBenchCLI:
    """Parse `fit` arguments and instantiate the module and strategy (no training yet)."""
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    return CLBenchCLI(
        model_class=CLModule,
        save_config_callback=None,  # the runner writes the resolved config into the run folder
        trainer_defaults={
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 5,
            "limit_val_batches": 0,
            "devices": 1,
            "use_distributed_sampler": False,  # clbench splits batches over ranks itself
            "precision": default_precision(),  # bf16-mixed only where bf16 is native and faster
        },
        seed_everything_default=1234,
        parser_kwargs={"exit_on_error": False, "prog": "clbench fit"},
        args=resolve_strategy_args(argv),
        run=False,
        auto_configure_optimizers=False,
        resuming=resuming,
    )


def parsed_cli(argv: list[str], resuming: Path | None = None) -> CLBenchCLI:
    """build_cli, where a value a class refused while the arguments were built (a strategy's or the
    module's own check in `__init__`, raised through jsonargparse as a ValueError) is bad input: a
    ConfigError that names the option and where it was given."""
    try:
        return build_cli(argv, resuming)
    except ConfigError:
        raise
    except ValueError as e:
        message = explain(argv, str(e)) if from_jsonargparse(str(e)) else str(e)
        raise ConfigError(message) from e


def resume_args(argv: list[str]) -> tuple[list[str], Path | None]:
    """`--resume RUN_DIR` as the run's own config, name and folder; the run folder itself when
    resuming. It takes no other argument: a resumed run goes on exactly as it started."""
    flags = [i for i, a in enumerate(argv) if a == "--resume" or a.startswith("--resume=")]
    if not flags:
        return argv, None
    i = flags[0]
    if argv[i] == "--resume" and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
        raise ConfigError("--resume: expects the run folder to go on with: clbench fit --resume RUN_DIR")
    value, rest = (
        (argv[i + 1], argv[:i] + argv[i + 2 :])
        if argv[i] == "--resume"
        else (argv[i].split("=", 1)[1], argv[:i] + argv[i + 1 :])
    )
    if rest:
        raise ConfigError(
            f"--resume: takes no other argument (got {' '.join(rest)[:200]}); a resumed run goes on with "
            "its own config.yaml, unchanged"
        )
    run_dir = Path(value)
    if not run_dir.is_dir():
        raise ConfigError(f"--resume: {run_dir}: no such folder")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume: {run_dir} holds no config.yaml; it is not a clbench run folder")
    status = _status(run_dir)
    if status.get("status") == "complete":
        raise ConfigError(f"--resume: {run_dir} is complete; nothing to resume")
    # the ranks Lightning starts run this command again while rank 0, the resumed run, is running
    if status.get("status") == "running" and alive(status.get("pid")) and dist.rank() == 0:
        raise ConfigError(f"--resume: {run_dir} is still running (process {status['pid']})")
    if str(status.get("resumable", "")).startswith("no:"):  # before the model loads
        raise ConfigError(f"--resume: {run_dir} cannot be resumed ({status['resumable'][3:].strip()})")
    own = ["--config", str(run_dir / "config.yaml"), "--run.output_dir", str(run_dir.parent)]
    return [*own, "--run.name", run_dir.name], run_dir


def _status(run_dir: Path) -> dict:
    record = read_record(run_dir)
    return record.results if record is not None else {}


def config_differences(saved: str, current: str) -> list[str]:
    """Dotted fields whose values differ between two dumped configs (run.name/output_dir aside)."""

    def flat(node: object, prefix: str = "") -> dict[str, object]:
        if isinstance(node, dict):
            return {k: v for key, sub in node.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): node}

    a, b = flat(yaml.safe_load(saved) or {}), flat(yaml.safe_load(current) or {})
    ignored = {"run.name", "run.output_dir"}
    return sorted(k for k in a.keys() | b.keys() if k not in ignored and a.get(k) != b.get(k))


def check_resumable(run_dir: Path, config_text: str, identity: dict) -> dict:
    """The run's recorded identity when it may go on with this config, data, model and code; a
    ConfigError naming what changed otherwise (the stored config.yaml too, against its hash)."""
    stored = (run_dir / "config.yaml").read_text(encoding="utf-8")
    saved = _status(run_dir).get("identity")
    if saved and saved.get("config_sha256") != sha256_text(stored):
        raise ConfigError(
            f"--resume: {run_dir / 'config.yaml'} was edited after the run started (its SHA-256 is not "
            "the one results.json recorded); restore it, or start a new run with the new config"
        )
    changed = config_differences(stored, config_text)
    if changed:
        raise ConfigError(f"--resume: {run_dir} ran with another config; differing: {', '.join(changed)}")
    differ = differences(saved, identity)
    if differ:
        raise ConfigError(
            f"--resume: {run_dir} started with other inputs; changed since: {'; '.join(differ)}. Its "
            "finished tasks would not match the rest: start a new run"
        )
    return saved


def fit(argv: list[str]) -> dict:
    """`clbench fit`: one strategy through one stream; returns the results. SIGTERM (a scheduler's
    kill, `kill PID`) stops it within seconds in any phase, with results.json saying "interrupted"
    (clbench/stopping.py)."""
    try:
        with sigterm_stops() as watch:
            return _fit(argv, watch)
    finally:
        os.environ.pop(RUN_NAME_ENV, None)


def _user_logger(value: object) -> object:
    """--trainer.logger as the runner takes it: None (unset or true) for TensorBoard's per-task
    layout in the run folder, False for none, else the logger(s) jsonargparse instantiated."""
    return None if value is None or value is True else value


def _fit(argv: list[str], watch: StopWatch) -> dict:
    argv, resume_dir = resume_args(argv)
    with run_log(None):  # Lightning's banners for the CLI's own Trainer: the run log repeats them
        cli = parsed_cli(argv, resume_dir)
    cfg = cli.config
    show_bars(cfg.trainer.enable_progress_bar is not False)
    trainer_callbacks = list(cli.config_init.trainer.get("callbacks") or [])

    def trainer_factory(**kwargs):
        kwargs["callbacks"] = trainer_callbacks + list(kwargs.get("callbacks") or [])
        return cli.instantiate_trainer(**kwargs)

    context = getattr(dist.fsdp_root(cli.model.model).config, "max_position_embeddings", None)
    notes = fit_to_context(cli.stream, context)
    notes += cut_answers(cli.stream.tasks, cli.model.tokenizer)
    notes.append(slow_bf16_note(cfg.trainer.precision, cfg.trainer.accelerator))
    for note in filter(None, notes):
        say(f"clbench: warning: {note}")
    strategy = cli.config_init.strategy
    runner = Runner(
        cli.model,
        cli.stream,
        strategy,
        trainer_factory,
        RunConfig(**cfg.run.as_dict()),
        prompt_format=cfg.stream.prompt_format,
        batch_size=cfg.stream.batch_size,
        eval_batch_size=cfg.stream.eval_batch_size,
        seed=cfg.seed_everything,
        strategy_name=name_of(strategy),
        identity=cli.identity,
        logger=_user_logger(cli.config_init.trainer.get("logger")),
        general_cfg=cli.general,
    )
    watch.run_dir = runner.run_dir if runner.writes else None
    results = runner.run(cli.config_text, resume=resume_dir is not None)
    if not runner.writes:
        return results
    summary = ", ".join(f"{k} {v:.3f}" for k, v in results["summary"].items() if v is not None)
    print(f"clbench: {name_of(strategy)} on {cli.stream.name}: {summary}")
    report = runner.run_dir / "results.md"
    print(f"clbench: report {report} (heatmap.png, predictions/, tensorboard/ next to it)")
    return results


__all__ = ["fit", "build_cli"]

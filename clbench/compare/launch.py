"""compare's launch: every run that is not reused is one submitit job.

`--launcher local` (the default): submitit's LocalExecutor starts each run in a process of its
own on this machine, up to `--jobs` at once in the order given, each with cpu_count // jobs torch
threads unless OMP_NUM_THREADS is set. `--launcher slurm`: the runs are one SLURM job array
(`--jobs` of them at a time, SLURM's array parallelism) with the `--slurm.*` resources; a run on
several GPUs is one job of `gpus_per_node` tasks per node, one per rank, which Lightning reads from
SLURM's environment.

Inside its job a run is an ordinary `clbench fit` (in the job's own process), its console in
<comparison>/logs/<run>.log. A job sent SIGUSR2 (before its time limit, or a preemption the
cluster signals so) is requeued by submitit; whenever a job starts it decides from the run's folder
(plan.fit_arguments), so a requeued run goes on from its last finished task with `fit --resume`.
When a run fails, no further job starts (on SLURM: its pending array tasks are cancelled), the
running ones finish, then compare fails; when compare is stopped
(Ctrl-C, SIGTERM, an error), it stops its jobs: SIGTERM first, which lets a fit record
"interrupted", then submitit's cancel.

On SLURM, compare learns the jobs' states from sacct, or from squeue where the cluster keeps no job
accounting (there sacct fails at every poll, and a job that ended without a result would never be
seen to end). submitit's own log lines go to <comparison>/jobs/<invocation>/submitit.log, not to
compare's console.
"""

from __future__ import annotations

import codecs
import contextlib
import getpass
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

from clbench import records
from clbench.compare.plan import Run, fit_arguments, read_finished
from clbench.errors import ConfigError

DIVERGED_EXIT = 3  # `clbench fit`'s exit status for a run stopped as diverged
STOP_GRACE_S = 10.0  # a stopped fit gets this long to record "interrupted" before it is cancelled
POLL_S = 0.5
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # a local job has no time limit of its own
SIGNAL_S = 120  # SIGUSR2 this long before a job's time limit (a quarter of a shorter limit)
# squeue's states of a job that has ended (a requeued or preempted one is pending again, not ended)
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT"}
GONE = "GONE"  # a job squeue no longer lists: it ended MinJobAge ago or more


@dataclass
class Slurm:
    """SLURM resources of each run's job (`--slurm.*`)."""

    partition: str | None = None
    time: int = 240  # minutes, per job; a job that reaches it is requeued and resumes
    nodes: int = 1
    gpus_per_node: int = 0  # also the job's tasks per node: one task per rank (Lightning's SLURM environment)
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None

    def check(self) -> None:
        """One-line errors before anything is planned or trained."""
        for field in ("time", "nodes", "gpus_per_node", "cpus_per_task", "mem_gb"):
            value, low = getattr(self, field), 0 if field == "gpus_per_node" else 1
            if value is not None and value < low:
                raise ConfigError(f"--slurm.{field}: expected an integer >= {low}, got {value}")
        if shutil.which("sbatch") is None:
            raise ConfigError("--launcher slurm: no sbatch on PATH (run compare on a SLURM login node)")

    def parameters(self, parallelism: int, name: str) -> dict:
        """submitit's SlurmExecutor parameters."""
        params = {
            "job_name": name,
            "partition": self.partition,
            "time": self.time,
            "nodes": self.nodes,
            "ntasks_per_node": max(self.gpus_per_node, 1),
            "gpus_per_node": self.gpus_per_node or None,
            "cpus_per_task": self.cpus_per_task,
            "mem": f"{self.mem_gb}GB" if self.mem_gb else None,
            "account": self.account,
            "qos": self.qos,
            "constraint": self.constraint,
            "array_parallelism": parallelism,
            # SIGUSR2 before the time limit: requeue and resume. SLURM checks every 30 s and sends it
            # up to 60 s early, so at once when the delay is not 30 s shorter than the limit, and
            # then the job would be requeued again at every start: at most a quarter of the limit.
            "signal_delay_s": min(SIGNAL_S, 15 * self.time),
            "stderr_to_stdout": True,
        }
        return {k: v for k, v in params.items() if v is not None}


class QueueWatcher(SlurmInfoWatcher):
    """Job states from squeue, for a cluster that keeps no job accounting. submitit asks sacct only,
    which then fails at every poll: a job that ends without a result (cancelled, killed, out of
    time) stays UNKNOWN, never done, and compare would wait for it for ever. squeue lists a job
    until MinJobAge after its end; a job it no longer lists has ended."""

    def _make_command(self) -> list[str] | None:
        if super()._make_command() is None:  # no job left to ask about
            return None
        user = getpass.getuser()  # not --me: Slurm before 20.11 lacks it; -a: hidden partitions too
        return ["squeue", "-a", "-u", user, "--noheader", "--states", "all", "--format", "%i|%T|%N"]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        listed = super().read_info(f"JobID|State|NodeList\n{text}")  # sacct's layout
        unfinished = self._registered - self._finished
        return {**{job: {"State": GONE} for job in unfinished if job not in listed}, **listed}

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        return self.get_state(job_id, mode=mode) in ENDED | {GONE}


class QueueJob(SlurmJob):
    """A SLURM job whose state comes from squeue (QueueWatcher)."""

    watcher = QueueWatcher(delay_s=600)


def keeps_accounting() -> bool:
    """Whether the SLURM cluster keeps job accounting, where sacct (submitit's source of job
    states) answers; when scontrol does not say, submitit's own way is kept."""
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return True
    return accounting_in(config.stdout)


def accounting_in(config: str) -> bool:
    """Whether `scontrol show config`'s text names an accounting storage (Slurm 22 writes
    accounting_storage/none for none, later releases (null) or nothing); True when it does not say."""
    match = re.search(r"^AccountingStorageType\s*=[ \t]*(\S*)", config, re.M)
    return match is None or match[1] not in ("", "(null)", "accounting_storage/none")


class FitJob(submitit.helpers.Checkpointable):
    """One run in its job: `clbench fit` with the arguments `fit_arguments` decides from the run's
    folder when the job starts, its console appended to `log`. Returns the fit's exit status (0 when
    the run was already finished). Checkpointable: on SIGUSR2 (a time limit, or a preemption the
    cluster signals) submitit pickles this same job again and requeues it; on restart it resumes
    from the run's last finished task. `devices`: compare's CUDA_VISIBLE_DEVICES (None: unset),
    which submitit's local executor overwrites for jobs that ask it for no GPU."""

    def __init__(self, run: Run, log: Path, devices: str | None) -> None:
        self.run, self.log, self.devices = run, log, devices

    def __call__(self) -> int:
        if submitit.JobEnvironment().cluster == "local":  # before anything initialises CUDA
            if self.devices is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = self.devices
        first_rank = submitit.JobEnvironment().global_rank == 0
        with console_to(self.log):
            try:
                argv = fit_arguments(self.run, decides=first_rank)
            except Exception:
                traceback.print_exc()  # into the run's log, where compare's message points
                raise
            return 0 if argv is None else fit_here(argv)


def fit_here(argv: list[str]) -> int:
    """`clbench fit` in this process, as `python -m clbench fit ...` would run it: Lightning starts
    further ranks on this machine by running that command again (from __main__'s module spec)."""
    import importlib.util

    from clbench.cli import main

    module = sys.modules["__main__"]
    saved = sys.argv, getattr(module, "__spec__", None)
    sys.argv, module.__spec__ = ["clbench", "fit", *argv], importlib.util.find_spec("clbench.__main__")
    try:
        return main(["fit", *argv])
    finally:
        sys.argv, module.__spec__ = saved


@contextlib.contextmanager
def console_to(log: Path) -> Iterator[None]:
    """This process's stdout and stderr (file descriptors too, for the ranks it starts) appended to
    `log` for the block."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


@contextlib.contextmanager
def job_environment(threads: str | None) -> Iterator[None]:
    """What every job inherits from compare's environment while it is submitted: PYTHONSAFEPATH
    keeps the working directory off the import path (a stray strategies.py there must not shadow
    clbench's own), in the job and in the ranks Lightning starts; OMP_NUM_THREADS (`threads`) is
    set before the job's process starts, so every library that reads it at load time sees it."""
    values = {"PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": threads}
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is not None:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def executor(launcher: str, folder: Path, jobs: int, slurm: Slurm) -> submitit.Executor:
    """submitit's executor for the runs' jobs; its pickles and own logs go to a folder of this
    invocation's under `folder` (a local job is named by its controller's process id, which a later
    compare may be given again: its old result must not be read as the new job's)."""
    folder = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    if launcher == "local":
        ex = submitit.LocalExecutor(folder=folder / "%j")
        ex.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, stderr_to_stdout=True)
        return ex
    if launcher == "slurm":
        ex = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=20)
        ex.update_parameters(**slurm.parameters(jobs, f"clbench-{folder.parent.parent.name}"))
        if not keeps_accounting():
            ex.job_class = QueueJob
        return ex
    raise ConfigError(f"--launcher: expected local or slurm, got '{launcher}'")


def submit(ex: submitit.Executor, fits: list[FitJob], threads: str | None = None) -> list[submitit.Job]:
    """The jobs of these runs, submitted together (one SLURM array), with `threads` torch threads."""
    with job_environment(threads), ex.batch():
        jobs = [ex.submit(fit) for fit in fits]
    if ex.job_class is QueueJob:  # submitit makes an array's jobs SlurmJobs, whatever the executor's class
        jobs = [QueueJob(folder=ex.folder, job_id=job.job_id, tasks=range(job.num_tasks)) for job in jobs]
    return jobs


def launch(starts: list[Run], launcher: str, jobs: int, logs: Path, slurm: Slurm | None = None) -> None:
    """Trains (or resumes) every run in `starts` to its end; returns when all finished."""
    if not starts:
        return
    slurm = slurm or Slurm()
    threads = None
    if launcher == "local":
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))
    ex = executor(launcher, logs.parent / "jobs", jobs, slurm)
    with submitit_log(Path(ex.folder).parent / "submitit.log"):
        if launcher == "slurm":
            source = "squeue (no job accounting here)" if ex.job_class is QueueJob else "sacct"
            logging.getLogger("submitit").info(f"job states from {source}")
        run_jobs(ex, starts, launcher, jobs, logs, threads)


def run_jobs(
    ex: submitit.Executor, starts: list[Run], launcher: str, jobs: int, logs: Path, threads: str | None
) -> None:
    """launch's loop: submits the runs' jobs and waits for them, stopping them all on the way out."""
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    fits = [FitJob(run, logs / f"{run.dir.name}.log", devices) for run in starts]
    running: dict[submitit.Job, FitJob] = {}
    waiting = list(fits) if launcher == "local" else []
    if launcher != "local":  # SLURM keeps `jobs` of the array running
        running = dict(zip(submit(ex, fits, threads), fits))
        for fit in fits:
            print(f"clbench compare: submitted {fit.run.dir.name}: {fit.log}")
    failure: str | None = None
    echo = Echo() if launcher == "local" and jobs == 1 else None  # one run at a time: its console here
    try:
        while running or (waiting and failure is None):
            while waiting and failure is None and len(running) < jobs:
                fit = waiting.pop(0)
                if echo is not None:
                    echo.start(fit.log)
                (job,) = submit(ex, [fit], threads)
                running[job] = fit
                print(f"clbench compare: started {fit.run.dir.name} ({threads or '?'} threads): {fit.log}")
            time.sleep(POLL_S)
            for job in [j for j in running if j.done()]:
                if echo is not None:
                    echo(running[job].log)
                why = outcome(job, running.pop(job))
                if why and not failure and launcher != "local":  # no further run of the array starts
                    for pending in [j for j in running if j.state == "PENDING"]:
                        pending.cancel(check=False)
                failure = failure or why
            if echo is not None:
                for fit in running.values():
                    echo(fit.log)
        if failure:
            raise ConfigError(failure)
    except BaseException:
        stop(running)
        raise


@contextlib.contextmanager
def submitit_log(path: Path) -> Iterator[None]:
    """submitit's own log lines (on a cluster without job accounting, a failed sacct at every poll)
    go to `path` in the jobs folder for the block, not to compare's console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("submitit")
    saved = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved
        handler.close()


class Echo:
    """With `--jobs 1` on this machine: what a run's log gained since the last call, on compare's
    own stdout, so the run's console (lines and progress bars) shows as it happens."""

    def __init__(self) -> None:
        self.offsets: dict[Path, int] = {}
        self.decoders: dict[Path, codecs.IncrementalDecoder] = {}  # a character cut between two reads

    def start(self, log: Path) -> None:
        """From the log's present end: an earlier run's console in it is not shown again."""
        self.offsets[log] = log.stat().st_size if log.is_file() else 0
        self.decoders[log] = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, log: Path) -> None:
        try:
            with open(log, "rb") as f:
                f.seek(self.offsets.get(log, 0))
                data = f.read()
        except FileNotFoundError:
            return
        self.offsets[log] = self.offsets.get(log, 0) + len(data)
        sys.stdout.write(self.decoders[log].decode(data))
        sys.stdout.flush()


def outcome(job: submitit.Job, fit: FitJob) -> str | None:
    """What a finished job means: None when its run finished (complete, or stopped as diverged),
    else why it failed."""
    name, where = fit.run.dir.name, f"its error is in {fit.log}"
    try:
        codes = job.results()  # one per task: a run on several GPUs or nodes has a task per rank
    except Exception as e:  # the job died (killed, out of memory, cancelled) or raised
        return f"{name}: its job {job.job_id} ended without finishing the run ({type(e).__name__}); {where}"
    code = next((c for c in codes if c != 0), 0)
    if code == DIVERGED_EXIT and read_finished(fit.run.dir) is not None:
        print(f"clbench compare: {fit.run.dir} diverged (collapsed training); marked in the table")
        return None
    if code != 0:
        return f"clbench fit of {name} failed (exit {code}); {where}"
    print(f"clbench compare: finished {name}")
    return None


def stop(running: dict[submitit.Job, FitJob]) -> None:
    """Stops the running jobs: SIGTERM to a local job (its controller passes it to the fit, which
    records "interrupted"), submitit's cancel after STOP_GRACE_S or on SLURM (scancel)."""
    for job, fit in running.items():
        record = records.read_record(fit.run.dir)
        pid = (record.results.get("pid") if record is not None else None) or "not started"
        print(f"clbench compare: stopping clbench fit (process {pid}) of {fit.run.dir.name}", file=sys.stderr)
        if isinstance(job, submitit.LocalJob):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(job.job_id), signal.SIGTERM)
        else:
            job.cancel(check=False)
    wait_until_done(running, STOP_GRACE_S)
    for job in running:
        if not job.done():
            job.cancel(check=False)
    wait_until_done(running, 6 * STOP_GRACE_S)  # a cluster that does not answer: give up waiting


def wait_until_done(jobs: dict[submitit.Job, FitJob], timeout_s: float) -> None:
    """Waits up to `timeout_s` for the jobs to end, asking the cluster at every poll: submitit asks
    it only minutes apart while a job has long been running."""
    deadline = time.monotonic() + timeout_s
    while any(not j.done(force_check=True) for j in jobs) and time.monotonic() < deadline:
        time.sleep(0.1)

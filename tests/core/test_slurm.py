"""`clbench compare --launcher slurm` through a real SLURM queue: sbatch, job arrays, time limits,
requeues and scancel, on a cluster without job accounting (tools/slurm_cluster.sh starts one on
this machine). Skipped where no sbatch is on PATH or no cluster answers."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_compare_safety import toy
from test_fit import write_config

from clbench.resume import FOLDER, MARKER
from clbench.testing import toy_tasks, write_trace_folder

pytestmark = pytest.mark.slurm

DEADLINE_S = 600  # a compare that runs longer than this is stuck


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """Skips the module, saying why, unless sbatch is on PATH and a node of the cluster is up."""
    if shutil.which("sbatch") is None:
        pytest.skip("no sbatch on PATH (start a one-node cluster: tools/slurm_cluster.sh start)")
    try:
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo: no answer from slurmctld in 30 s (tools/slurm_cluster.sh start)")
    if not {"idle", "mixed", "allocated"} & {s.rstrip("*~#$@") for s in sinfo.stdout.split()}:
        why = sinfo.stderr.strip() or f"no node up ({sinfo.stdout.split() or 'none'})"
        pytest.skip(f"the SLURM cluster does not answer: {why} (tools/slurm_cluster.sh start)")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # jobs inherit it from sbatch's environment


def queued(name: str) -> list[str]:
    """This comparison's jobs SLURM still holds (pending, running or completing)."""
    out = subprocess.run(["squeue", "--me", "-h", "-n", name, "-o", "%i|%T"], capture_output=True, text=True)
    return out.stdout.split()


def left_in_queue(name: str, within_s: float = 20) -> list[str]:
    """This comparison's jobs still in the queue `within_s` after compare ended: a job whose result
    compare has read may take a moment more to leave (its processes exit, SLURM cleans up)."""
    deadline = time.monotonic() + within_s
    while (jobs := queued(name)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return jobs


class Compare:
    """`clbench compare` in a process of its own, its console in files (as a user's terminal would
    show it); its jobs are cancelled on the way out, whatever happened."""

    def __init__(self, tmp_path: Path, argv: list[str], name: str) -> None:
        self.name, self.folder = name, tmp_path / "runs" / name
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out, "ab") as out, open(self.err, "ab") as err:
            command = [sys.executable, "-m", "clbench", "compare", *argv, "--name", name]
            self.process = subprocess.Popen(command, stdout=out, stderr=err, cwd=tmp_path)

    def console(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"compare still running after {DEADLINE_S} s: {self.console()}")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        subprocess.run(["scancel", "--me", "-n", f"clbench-{self.name}"], check=False)


@pytest.fixture
def compares(tmp_path):
    """Starts compares (`start(argv, name)`), and stops them and their jobs after the test."""
    started: list[Compare] = []

    def start(argv: list[str], name: str) -> Compare:
        started.append(Compare(tmp_path, argv, name))
        return started[-1]

    yield start
    for compare in started:
        compare.close()


def toy_argv(
    tmp_path: Path, trace_dir: Path, model_dir: Path, epochs: int, strategies: str, seeds: str
) -> list:
    """compare's arguments for the toy stream at `epochs` a task."""
    cfg = write_config(tmp_path / "toy.yaml", toy(tmp_path, trace_dir, model_dir, epochs=epochs))
    return ["--config", str(cfg), "--strategies", strategies, "--seeds", seeds, "--run.checkpoints", "none"]


def test_an_array_of_jobs_runs_to_complete_and_keeps_submitit_out_of_the_console(
    trace_dir, tiny_model_dir, tmp_path, compares
):
    """Two runs are one job array, side by side on the cluster; compare reports both. The cluster
    keeps no job accounting: compare's console carries no sacct or submitit line, its jobs log says
    where the job states came from."""
    argv = toy_argv(tmp_path, trace_dir, tiny_model_dir, 1, "seqft,replay", "1")
    compare = compares([*argv, "--launcher", "slurm", "--jobs", "2", "--slurm.time", "5"], "array")
    assert compare.wait() == 0, compare.console()

    runs = compare.folder / "runs"
    for run in ("seqft-seed1", "replay-seed1"):
        assert json.loads((runs / run / "results.json").read_text())["status"] == "complete"
        assert f"clbench compare: submitted {run}" in compare.out.read_text()
    table = (compare.folder / "comparison.md").read_text()
    assert "seqft" in table and "replay" in table
    (invocation,) = (compare.folder / "jobs").iterdir()
    (script,) = invocation.glob("*/*_submission.sh")  # one sbatch: an array, a task per run
    array = script.parent.name
    spans = []  # each array task's first and last submitit log time
    for task in (0, 1):
        log = (invocation / f"{array}_{task}" / f"{array}_{task}_0_log.out").read_text()
        assert f"JobEnvironment(job_id={array}_{task}," in log and "Job completed successfully" in log, log
        stamps = re.findall(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\)", log)
        spans.append((stamps[0], stamps[-1]))
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans  # side by side: --jobs 2
    assert left_in_queue("clbench-array") == []

    console = compare.console().splitlines()  # compare's own lines only: no sacct, no submitit
    assert console and all(line.startswith("clbench compare: ") for line in console), console
    jobs_log = (invocation / "submitit.log").read_text()
    assert "job states from squeue (no job accounting here)" in jobs_log and "sacct" not in jobs_log, jobs_log


# seqft that waits before each task: six tasks take over 45 s on any CPU, so the time limit is met
PACED = """
import time
from strategies.seqft import SeqFT

class Paced(SeqFT):
    def on_task_start(self, ctx):
        time.sleep(7)
"""


def test_a_job_at_its_time_limit_is_requeued_and_goes_on_from_its_last_finished_task(
    tiny_model_dir, tmp_path, compares, monkeypatch
):
    """A one-minute job: SLURM sends SIGUSR2 15 to 45 s after it starts, submitit requeues it and
    the next start resumes the run after its last finished task, until all six tasks are done. The
    matrix and training losses are those of the same run left alone (run beside it on this
    machine), and no task that had finished trains again. The run waits 7 s before each task, so
    that it outlasts the signal however fast the machine (it once finished first on an idle one)."""
    (tmp_path / "paced.py").write_text(PACED)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # compare's jobs inherit sbatch's environment
    tasks = {**toy_tasks(), **{f"{name}2": splits for name, splits in toy_tasks(seed=1).items()}}
    cfg = toy(tmp_path, write_trace_folder(tmp_path / "TRACE6", tasks), tiny_model_dir, epochs=40)
    cfg["stream"]["tasks"] += [
        t | {"name": f"{t['name']}2", "path": f"{t['path']}2"} for t in cfg["stream"]["tasks"]
    ]
    path = write_config(tmp_path / "six.yaml", cfg)
    argv = ["--config", str(path), "--strategies", "paced.Paced", "--seeds", "1", "--run.checkpoints", "none"]
    alone = compares(argv, "alone")
    limited = compares([*argv, "--launcher", "slurm", "--slurm.time", "1"], "limited")
    assert alone.wait() == 0, alone.console()
    assert limited.wait() == 0, limited.console()

    a, b = (
        json.loads((c.folder / "runs" / "paced-seed1" / "results.json").read_text()) for c in (alone, limited)
    )
    assert b["status"] == "complete" and b["matrix"] == a["matrix"]
    for task in a["tasks"]:
        assert b["per_task"][task]["train_loss"] == a["per_task"][task]["train_loss"], task

    log = (limited.folder / "logs" / "paced-seed1.log").read_text()
    assert "Job has timed out" in log and "Requeued job" in log, log  # SLURM's time limit, not a failure
    resumed = [int(k) for k in re.findall(r"resuming \S+ after task (\d+)/6", log)]
    assert resumed and resumed == sorted(resumed), log  # went on, never back (a slow start may not)
    lines = log.splitlines()
    # a complete run (its summary printed) is not redone; a signal after row 6 but before results.json
    # said complete (the report being written, under load) resumes after task 5, as README says
    (end,) = [i for i, line in enumerate(lines) if line.startswith("clbench: paced on toy:")][:1]
    assert not any(x.startswith("clbench: task") for x in lines[end:]), log
    for i, line in enumerate(lines):  # each start went on after a finished task, never trained one again
        if match := re.match(r"clbench: resuming \S+ after task (\d+)/6", line):
            k = int(match[1])
            assert any(x.startswith(f"clbench: row {k} (after task {k})") for x in lines[:i]), log
            assert not any(re.match(rf"clbench: task [1-{k}]/6", x) for x in lines[i:]), log
    for k in range(1, 7):
        assert any(line.startswith(f"clbench: row {k} (after task {k})") for line in lines), log
    assert left_in_queue("clbench-limited") == []


def test_stopping_compare_cancels_its_jobs_and_the_next_compare_resumes(
    trace_dir, tiny_model_dir, tmp_path, compares
):
    """Two runs, one at a time: SIGTERM to compare once the first has a finished task saved cancels
    the running job and the pending one (nothing left in squeue); the same compare again resumes
    the first run after its saved task and trains the second."""
    argv = toy_argv(tmp_path, trace_dir, tiny_model_dir, 25, "seqft", "1,2")
    argv += ["--launcher", "slurm", "--jobs", "1"]
    first = compares(argv, "stopped")
    runs = first.folder / "runs"
    deadline = time.monotonic() + DEADLINE_S
    while not (runs / "seqft-seed1" / FOLDER / MARKER).is_file():
        assert first.process.poll() is None and time.monotonic() < deadline, first.console()
        time.sleep(0.2)
    assert len(queued("clbench-stopped")) == 2  # one running, one pending
    first.process.send_signal(signal.SIGTERM)
    assert first.wait() == 128 + signal.SIGTERM, first.console()
    assert left_in_queue("clbench-stopped") == []
    assert json.loads((runs / "seqft-seed1" / "results.json").read_text())["status"] == "interrupted"
    assert not (runs / "seqft-seed2").exists()

    again = compares(argv, "stopped")
    assert again.wait() == 0, again.console()
    log = (first.folder / "logs" / "seqft-seed1.log").read_text()
    assert f"resuming interrupted run {runs / 'seqft-seed1'}" in log, log
    for seed in (1, 2):
        assert json.loads((runs / f"seqft-seed{seed}" / "results.json").read_text())["status"] == "complete"
    assert not (first.folder / "superseded").exists()  # resumed, not rerun


def test_a_job_that_ends_without_its_run_fails_compare_instead_of_waiting(
    trace_dir, tiny_model_dir, tmp_path, compares
):
    """A job cancelled from outside (or killed, or out of time) leaves no result: without job
    accounting submitit's sacct could not tell it had ended, and compare waited for ever."""
    argv = toy_argv(tmp_path, trace_dir, tiny_model_dir, 100, "seqft", "1")
    compare = compares([*argv, "--launcher", "slurm"], "cancelled")
    deadline = time.monotonic() + DEADLINE_S
    while not (jobs := [j for j in queued("clbench-cancelled") if j.endswith("|RUNNING")]):
        assert compare.process.poll() is None and time.monotonic() < deadline, compare.console()
        time.sleep(0.2)
    subprocess.run(["scancel", jobs[0].split("|")[0]], check=True)
    started = time.monotonic()
    assert compare.wait() == 2, compare.console()
    assert time.monotonic() - started < 60
    assert "ended without finishing the run" in compare.err.read_text()

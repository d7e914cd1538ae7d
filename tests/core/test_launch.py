"""compare's launcher: the SLURM job it generates (checked through a stand-in `sbatch`, no cluster
needed), and a real local submitit job that is preempted, requeued and resumes to the same run."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest
import submitit
from submitit.core.utils import DelayedSubmission
from test_compare_safety import toy
from test_fit import write_config

from clbench.cli import main
from clbench.compare import parse_args
from clbench.compare.launch import FitJob, Slurm, accounting_in, executor, outcome, submit
from clbench.compare.plan import Run, planned_runs
from clbench.resume import FOLDER, MARKER

SBATCH = """#!/bin/sh
# Records what submitit hands to sbatch, and answers as sbatch does.
printf '%s\\n' "$@" > "$RECORD/args"
for last; do :; done
cp "$last" "$RECORD/script"
echo "${PYTHONSAFEPATH:-unset}" > "$RECORD/pythonsafepath"
echo "Submitted batch job 4242"
"""


def test_slurm_runs_are_one_array_of_jobs_with_the_resources_and_fit_arguments(tmp_path, monkeypatch):
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    (bin_dir / "sbatch").write_text(SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it; the job script runs it
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(record))
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    cfg = write_config(tmp_path / "toy.yaml", {"stream": {"name": "toy"}})
    argv = ["--config", str(cfg), "--strategies", "seqft,ewc,replay", "--seeds", "7", "--launcher", "slurm"]
    resources = write_config(tmp_path / "slurm.yaml", {"partition": "gpu", "gpus_per_node": 4, "time": 60})
    argv += ["--jobs", "2", "--slurm", str(resources), "--slurm.time", "90"]  # a file, then an override
    argv += ["--slurm.nodes", "2", "--slurm.cpus_per_task", "8", "--trainer.devices", "4"]
    args, passthrough = parse_args(argv)
    runs = planned_runs(args, passthrough)
    ex = executor(args.launcher, args.compare_dir / "jobs", args.jobs, args.slurm)
    fits = [FitJob(run, tmp_path / "logs" / f"{run.dir.name}.log", None) for run in runs]
    jobs = submit(ex, fits)

    assert [j.job_id for j in jobs] == ["4242_0", "4242_1", "4242_2"]  # one array, a job per run
    script = (record / "script").read_text()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=90",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",  # one task per rank, as Lightning's SLURM environment expects
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --array=0-2%2",  # --jobs runs at a time
        "#SBATCH --signal=USR2@120",  # before the time limit: requeue, then resume
        "#SBATCH --job-name=clbench-compare-toy",
    ):
        assert line in script.splitlines(), line
    assert "srun" in script and "-m submitit.core._submit" in script
    assert (record / "pythonsafepath").read_text().strip() == "1"  # jobs never import from the cwd
    assert os.environ.get("PYTHONSAFEPATH") is None  # and compare's own environment is as it was
    for job, run in zip(jobs, runs):
        submitted = DelayedSubmission.load(job.paths.submitted_pickle)
        assert isinstance(submitted.function, FitJob) and submitted.function.run.argv == run.argv
        # the job's shape fixes the Trainer's: Lightning refuses a SLURM job whose tasks differ from it
        assert run.argv[-4:] == ["--trainer.devices", "4", "--trainer.num_nodes", "2"], run.argv
    (ewc,) = [r for r in runs if r.strategy == "ewc"]
    assert ewc.dir == Path("runs/compare-toy/runs/ewc-seed7")  # the config sets no run.output_dir


@pytest.mark.parametrize("minutes, delay", [(1, 15), (4, 60), (90, 120)])
def test_the_requeue_signal_comes_well_inside_the_time_limit(minutes, delay):
    """SLURM checks time limits every 30 s and signals up to 60 s early: a delay not 30 s shorter
    than the limit would signal every start of the job at once, which would requeue it for ever."""
    assert Slurm(time=minutes).parameters(1, "clbench-x")["signal_delay_s"] == delay


@pytest.mark.parametrize(
    "bad, expected",
    [
        (["--slurm.time", "x"], "--slurm.time: expected int, got x"),
        (["--slurm.gpus_per_node", "-1"], "--slurm.gpus_per_node: expected"),
        ([], "--launcher slurm: no sbatch on PATH"),
        (
            ["--slurm.gpus_per_node", "4", "--trainer.devices", "2"],
            "--trainer.devices 2: the SLURM job has 4",
        ),
        (["--slurm.nodes", "2", "--trainer.num_nodes=1"], "--trainer.num_nodes 1: the SLURM job has 2"),
    ],
)
def test_bad_launcher_settings_are_one_line(tmp_path, capsys, monkeypatch, bad, expected):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM here
    cfg = write_config(tmp_path / "toy.yaml", {"stream": {"name": "toy"}})
    assert main(["compare", "--config", str(cfg), "--strategies", "seqft", "--launcher", "slurm", *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_a_preempted_local_job_is_requeued_and_resumes_to_the_uninterrupted_run(
    trace_dir, tiny_model_dir, tmp_path, monkeypatch
):
    """SIGUSR2 (what SLURM sends before a time limit or preemption) reaches the fit after its first
    task: submitit pickles the job again and restarts it, and the run goes on with `fit --resume`
    to the matrix and training losses of the same run left alone."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = toy(tmp_path, trace_dir, tiny_model_dir, epochs=3)
    path = write_config(tmp_path / "toy.yaml", cfg)
    argv = ["--config", str(path), "--strategies", "seqft", "--seeds", "1", "--run.checkpoints", "none"]
    assert main(["compare", *argv, "--name", "alone"]) == 0

    args, passthrough = parse_args([*argv, "--name", "preempted"])
    (run,) = planned_runs(args, passthrough)
    log = tmp_path / "preempted.log"
    (job,) = submit(executor("local", tmp_path / "jobs", 1, Slurm()), [FitJob(run, log, None)], threads="1")
    deadline = time.monotonic() + 240
    while not (run.dir / FOLDER / MARKER).is_file():  # the first task finished and is saved
        assert not job.done() and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    pid = json.loads((run.dir / "results.json").read_text())["pid"]
    os.kill(pid, signal.SIGUSR2)
    assert job.result() == 0, log.read_text()

    text = log.read_text()
    assert f"resuming interrupted run {run.dir}" in text, text
    assert json.loads((run.dir / "results.json").read_text())["pid"] != pid  # a new process went on
    alone = tmp_path / "runs" / "alone" / "runs" / "seqft-seed1" / "results.json"
    a, b = json.loads(alone.read_text()), json.loads((run.dir / "results.json").read_text())
    assert b["status"] == "complete" and b["matrix"] == a["matrix"]
    for task in a["tasks"]:  # every task's probe losses and last training loss, bit for bit
        for key in ("loss_before", "loss_after", "train_loss"):
            assert b["per_task"][task][key] == a["per_task"][task][key], (task, key)
    assert not Path(run.dir.parent.parent / "superseded").exists()  # resumed, not rerun


def test_a_job_with_a_task_per_rank_is_judged_by_every_rank(tmp_path, capsys):
    """A run on several GPUs or nodes is one job of several tasks: a failure on any rank fails it."""
    fit = FitJob(Run("seqft", tmp_path / "runs" / "seqft-seed1", []), tmp_path / "seqft-seed1.log", None)
    ex = executor("local", tmp_path / "jobs", 1, Slurm())
    ex.update_parameters(tasks_per_node=2)
    codes = {"all zero": lambda: 0, "rank 1 fails": lambda: 2 * submitit.JobEnvironment().global_rank}
    jobs = {name: submit(ex, [job])[0] for name, job in codes.items()}
    assert outcome(jobs["all zero"], fit) is None
    assert "failed (exit 2)" in outcome(jobs["rank 1 fails"], fit)


@pytest.mark.parametrize(
    "line, keeps",
    [
        ("AccountingStorageType   = accounting_storage/none", False),  # Slurm 22 (Debian 12)
        ("AccountingStorageType   = (null)", False),  # later releases without accounting
        ("AccountingStorageType   = ", False),
        ("AccountingStorageType   = accounting_storage/slurmdbd", True),
        ("ClusterName = x", True),  # not said: submitit's own way (sacct)
    ],
)
def test_a_cluster_without_accounting_is_recognised_however_slurm_says_it(line, keeps):
    """Without accounting sacct never answers, and a job that ended with no result would keep
    compare waiting: job states must then come from squeue."""
    assert (
        accounting_in(f"Configuration data as of now\nAuthType = auth/munge\n{line}\nBurstBuffer = x\n")
        is keeps
    )

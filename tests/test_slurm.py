"""launcher=slurm on a real SLURM cluster (slurmctld + two slurmd on this machine, tests/clusters): jobs
submitted through the real sbatch train like the same job run locally, and a job that gets the warning
signal snapshots, requeues itself and resumes to the same parameters."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.clusters.slurm import SlurmCluster
from tests.support import JOB, ROOT, crash_once_at, disttrain, done_lines, last_step, summary

pytestmark = pytest.mark.slow  # every test here starts processes


def submit(cluster: SlurmCluster, tmp_path: Path, *overrides: str) -> tuple[str, str]:
    """`disttrain launcher=slurm ...` as a user on the login node runs it; returns (job id, its output)."""
    res = disttrain(
        *JOB, "launcher=slurm", f"run_dir={tmp_path}/${{run_id:}}", *overrides, **in_tmp(cluster, tmp_path)
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{out}\n{cluster.logs()}"
    match = re.search(r"^submitted SLURM job (\d+)$", res.stdout, re.M)
    assert match, out
    return match.group(1), out


def in_tmp(cluster: SlurmCluster, tmp_path: Path) -> dict[str, Any]:
    """disttrain()'s keywords for a submission from `tmp_path`: the job's working directory is the
    submit directory, and anything SLURM writes there by default (`slurm-N.out`, a step's messages)
    must land in a temporary directory, not in the checkout (env() keeps this checkout's code and
    tests' models importable from there)."""
    return {"cwd": tmp_path, "SLURM_CONF": cluster.env["SLURM_CONF"], "PATH": cluster.env["PATH"]}


def job_log(tmp_path: Path, job: str) -> str:
    return "\n".join(p.read_text() for p in tmp_path.glob(f"*/slurm-{job}.out"))


@pytest.mark.parametrize(("nodes", "per_node"), [(1, 2), (2, 1)], ids=["1node-2procs", "2nodes-1proc"])
def test_slurm_job_matches_the_local_run(
    slurm_cluster: SlurmCluster, tmp_path: Path, ddp_reference: str, nodes: int, per_node: int
) -> None:
    job, out = submit(
        slurm_cluster,
        tmp_path,
        f"launcher.nodes={nodes}",
        f"launcher.nproc_per_node={per_node}",
        "launcher.time=00:05:00",
        "launcher.wait=true",
    )
    state = slurm_cluster.job_state(job)
    log = job_log(tmp_path, job)
    assert state["JobState"] == "COMPLETED", f"{out}\n{log}\n{slurm_cluster.logs()}"
    assert f"SLURM job {job} COMPLETED, exit code 0, restarts 0" in out  # launcher.wait reported it
    assert state["NodeList"] in ({"n[1-2]"} if nodes == 2 else {"n1", "n2"})
    # The run dir carries the job id; one `done` line per node, all with the local run's parameters.
    run_dir = tmp_path / f"slurm-{job}"
    assert f"  run dir: {run_dir}" in out
    assert done_lines(log) == {rank * per_node: ddp_reference for rank in range(nodes)}, log
    assert summary(run_dir)["params_sha256"] == ddp_reference
    assert summary(run_dir)["world_size"] == 2
    assert (run_dir / "config.yaml").read_text().count(f"run_dir: {run_dir}\n") == 1


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_preempted_job_requeues_and_resumes(
    slurm_cluster: SlurmCluster, tmp_path: Path, request: pytest.FixtureRequest, strategy: str
) -> None:
    if strategy == "ddp":
        reference = request.getfixturevalue("ddp_reference")
    else:  # FSDP's sharded snapshots (DCP) through the same requeue; its own uninterrupted local run
        local = disttrain(*JOB, "launcher=torchrun", "strategy=fsdp", f"run_dir={tmp_path / 'local'}")
        assert local.returncode == 0, local.stderr[-3000:]
        reference = summary(tmp_path / "local")["params_sha256"]
    # Snapshots every 10 steps (the weights do not depend on it) flush metrics.jsonl that often, so the
    # test sees step 20 well before the job's last step (226) rather than up to a second later.
    job, _ = submit(
        slurm_cluster,
        tmp_path,
        "launcher.nproc_per_node=2",
        "launcher.time=00:05:00",
        "snapshot.every_steps=10",
        f"strategy={strategy}",
    )
    run_dir = tmp_path / f"slurm-{job}"
    deadline = time.monotonic() + 120
    while last_step(run_dir) < 20:
        state = slurm_cluster.job_state(job)
        assert state["JobState"] in ("PENDING", "RUNNING"), f"{state}\n{job_log(tmp_path, job)}"
        assert time.monotonic() < deadline, f"no step 20 in 120 s\n{job_log(tmp_path, job)}"
        time.sleep(0.05)
    # What `#SBATCH --signal=USR2@N` does at N seconds before the time limit: USR2 to the job's steps.
    subprocess.run(["scancel", "--signal=USR2", job], env=slurm_cluster.env, check=True, timeout=30)
    slurm_cluster.wait_until(
        job, lambda s: s.get("Restarts") == "1" and s.get("JobState") == "PENDING", 60, "requeued"
    )
    slurm_cluster.release(job)
    state = slurm_cluster.wait_job(job, timeout=180)
    log = job_log(tmp_path, job)
    assert state["JobState"] == "COMPLETED", f"{state}\n{log}\n{slurm_cluster.logs()}"
    assert state["Restarts"] == "1"
    stopped = re.search(
        r"stopped by signal SIGUSR2 at step (\d+): snapshot written, requeueing SLURM job (\d+)",
        log,
    )
    assert stopped and stopped.group(2) == job, log
    assert f"resumed from {run_dir}/snapshots/step_{int(stopped.group(1)):08d}" in log, log
    assert 20 <= int(stopped.group(1)) < 226
    assert summary(run_dir)["params_sha256"] == reference
    assert summary(run_dir)["stopped"] == "max_epochs"


def test_gpus_the_partition_lacks_are_refused(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    res = disttrain(
        "launcher=slurm",
        "launcher.gpus_per_node=1",
        f"run_dir={tmp_path}/run",
        SLURM_CONF=slurm_cluster.env["SLURM_CONF"],
        PATH=slurm_cluster.env["PATH"],
    )
    assert res.returncode == 2
    assert res.stderr == (
        "disttrain: error: launcher.gpus_per_node=1: nodes of the default partition have at most 0 (sinfo)\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_hand_written_sbatch_script_trains(
    slurm_cluster: SlurmCluster, tmp_path: Path, ddp_reference: str
) -> None:
    # As its header says: `sbatch [OPTIONS] slurm/train.sbatch [OVERRIDE ...]`; options beat #SBATCH lines.
    job = slurm_cluster.sbatch(
        "--nodes=2",
        "--cpus-per-task=1",
        "--time=5",
        f"--export=ALL,PYTHON={sys.executable},PYTHONPATH={ROOT}",  # this checkout's code, from tmp_path
        str(ROOT / "slurm" / "train.sbatch"),
        *JOB,
        f"run_dir={tmp_path}/${{run_id:}}",
        cwd=tmp_path,
    )
    state = slurm_cluster.wait_job(job, timeout=240)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", f"{state}\n{log}\n{slurm_cluster.logs()}"
    assert state["NodeList"] == "n[1-2]"
    assert summary(tmp_path / f"slurm-{job}")["params_sha256"] == ddp_reference


def test_wait_returns_the_exit_code_of_a_failed_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # A model that makes one worker die at step 5 (tests/crashing.py); the job has no restarts.
    res = disttrain(
        *JOB,
        *crash_once_at(5, tmp_path / "crashed"),
        "launcher=slurm",
        "launcher.nproc_per_node=2",
        "launcher.time=00:05:00",
        "launcher.wait=true",
        f"run_dir={tmp_path}/${{run_id:}}",
        **in_tmp(slurm_cluster, tmp_path),
    )
    job = re.search(r"^submitted SLURM job (\d+)$", res.stdout, re.M)
    assert job, res.stdout + res.stderr
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"SLURM job {job.group(1)} FAILED, exit code 1, restarts 0" in res.stdout
    assert slurm_cluster.job_state(job.group(1))["JobState"] == "FAILED"


def test_a_two_node_job_preempted_and_requeued_on_one_node_continues(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    # The global batch is fixed (32 = 2 nodes × 1 × 16): on one node accumulate becomes 2.
    job_args = ["launcher.nodes=2", "launcher.time=00:05:00", "snapshot.every_steps=10"]
    job, _ = submit(slurm_cluster, tmp_path, "trainer.global_batch_size=32", *job_args)
    run_dir = tmp_path / f"slurm-{job}"
    deadline = time.monotonic() + 120
    while last_step(run_dir) < 20:
        assert slurm_cluster.job_state(job)["JobState"] in ("PENDING", "RUNNING"), job_log(tmp_path, job)
        assert time.monotonic() < deadline, f"no step 20 in 120 s\n{job_log(tmp_path, job)}"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR2", job], env=slurm_cluster.env, check=True, timeout=30)
    slurm_cluster.wait_until(
        job, lambda s: s.get("Restarts") == "1" and s.get("JobState") == "PENDING", 60, "requeued"
    )
    # Rank 0 prints its stop line once `scontrol requeue` returned: the job may be PENDING a moment earlier.
    deadline = time.monotonic() + 30
    while not (found := re.search(r"stopped by signal SIGUSR2 at step (\d+)", job_log(tmp_path, job))):
        assert time.monotonic() < deadline, job_log(tmp_path, job)
        time.sleep(0.1)
    stopped = int(found.group(1))
    # The same snapshot, resumed by hand on one local process: what the requeued job must end on.
    reference = tmp_path / "reference"
    shutil.copytree(
        run_dir / "snapshots" / f"step_{stopped:08d}", reference / "snapshots" / f"step_{stopped:08d}"
    )
    # What an admin (or a shrinking allocation) does to a requeued job: one node, one task.
    shrink = ["scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=1"]
    subprocess.run(shrink, env=slurm_cluster.env, check=True, timeout=30)
    slurm_cluster.release(job)
    state = slurm_cluster.wait_job(job, timeout=180)
    log = job_log(tmp_path, job)
    assert state["JobState"] == "COMPLETED", f"{state}\n{log}\n{slurm_cluster.logs()}"
    assert f"SLURM job {job} on n[1-2], restart 0" in log and f"SLURM job {job} on n1, restart 1" in log
    assert (
        f"resumed from {run_dir}/snapshots/step_{stopped:08d} (epoch 0, step {stopped}, 2 -> 1 processes)"
        in log
    )
    assert summary(run_dir)["world_size"] == 1 and summary(run_dir)["steps"] == 226
    local = disttrain(*JOB, "trainer.global_batch_size=32", f"run_dir={reference}")
    assert local.returncode == 0 and "2 -> 1 processes" in local.stderr, local.stderr[-3000:]
    assert summary(run_dir)["params_sha256"] == summary(reference)["params_sha256"]

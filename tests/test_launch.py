"""Launching for real: torchrun across two hosts (network namespaces), torchrun's elastic restart after a
crash, the command every launcher's dry run prints, and bad launch input refused in one line."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from disttrain.cli import main
from disttrain.launch.slurm import FREE_PORT
from tests.clusters.netns import TwoHosts
from tests.support import JOB, crash_once_at, disttrain, done_lines, env, summary


@pytest.mark.slow
def test_multinode_across_two_hosts(two_hosts: TwoHosts, tmp_path: Path, ddp_reference: str) -> None:
    run_dir = tmp_path / "run"
    endpoint = f"{two_hosts.addr(0)}:29400"
    nodes = []
    for rank in (0, 1):
        args = [
            *JOB,
            "launcher=multinode",
            "launcher.nnodes=2",
            f"launcher.node_rank={rank}",
            f"launcher.rdzv_endpoint={endpoint}",
            f"launcher.local_addr={two_hosts.addr(rank)}",
            f"run_dir={run_dir}",
        ]
        nodes.append(
            two_hosts.run(
                rank,
                [sys.executable, "-m", "disttrain", *args],
                env=env(GLOO_SOCKET_IFNAME=two_hosts.ifname(rank)),
                cwd=Path(__file__).resolve().parent.parent,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [proc.communicate(timeout=300)[0] for proc in nodes]
    for rank, (proc, out) in enumerate(zip(nodes, outputs, strict=True)):
        assert proc.returncode == 0, f"node {rank}:\n{out}"
    # Each node's own worker reports the parameters it ended with: the same, and the one-node job's.
    assert done_lines(outputs[0]) == {0: ddp_reference}, outputs[0]
    assert done_lines(outputs[1]) == {1: ddp_reference}, outputs[1]
    assert summary(run_dir)["params_sha256"] == ddp_reference
    assert summary(run_dir)["world_size"] == 2


@pytest.mark.slow
def test_elastic_restart_resumes_after_a_crash(tmp_path: Path, ddp_reference: str) -> None:
    run_dir = tmp_path / "run"
    res = disttrain(
        *JOB,
        *crash_once_at(60, tmp_path / "crashed"),
        "launcher=torchrun",
        "launcher.nproc_per_node=2",
        "launcher.max_restarts=1",
        f"run_dir={run_dir}",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "tests.crashing: rank 1 crashing" in out  # the crash did happen
    assert (tmp_path / "crashed").exists()
    assert f"resumed from {run_dir}/snapshots/step_00000050" in out, out
    assert summary(run_dir)["params_sha256"] == ddp_reference
    assert summary(run_dir)["steps"] == 226


@pytest.mark.slow
def test_a_crash_without_restarts_fails_the_job(tmp_path: Path) -> None:
    # The counterpart of the elastic test: the restart, not luck, is what saved that job.
    run_dir = tmp_path / "run"
    res = disttrain(
        *JOB,
        *crash_once_at(60, tmp_path / "crashed"),
        "launcher=torchrun",
        "launcher.nproc_per_node=2",
        "trainer.max_steps=70",
        f"run_dir={run_dir}",
    )
    assert res.returncode != 0
    assert not (run_dir / "summary.json").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["launcher=multinode", "launcher.nnodes=0", "launcher.rdzv_endpoint=node0:29400"],
            "launcher.nnodes=0: must be at least 1",
        ),
        (
            ["launcher=multinode", "launcher.rdzv_endpoint=node0"],
            "launcher.rdzv_endpoint='node0': must be HOST:PORT, e.g. node0:29400",
        ),
        (
            ["launcher=multinode", "launcher.rdzv_endpoint=node0:http"],
            "launcher.rdzv_endpoint='node0:http': must be HOST:PORT, e.g. node0:29400",
        ),
        (
            ["launcher=multinode", "launcher.node_rank=2", "launcher.rdzv_endpoint=node0:29400"],
            "launcher.node_rank=2: must be in 0..1",
        ),
        (["launcher=torchrun", "launcher.nproc_per_node=0"], "launcher.nproc_per_node=0: must be at least 1"),
        (["launcher=slurm", "launcher.nodes=0"], "launcher.nodes=0: must be at least 1"),
        (
            ["launcher=slurm", "launcher.signal=USR9"],
            "launcher.signal='USR9': must be a signal name without SIG, e.g. USR2",
        ),
        (
            ["launcher=slurm"],
            "launcher='slurm': sbatch not found on PATH; run this on a SLURM login node, or install SLURM's "
            "client commands (Debian/Ubuntu: apt-get install slurm-client) configured for your cluster",
        ),
    ],
)
def test_bad_launch_input_is_one_line(
    overrides: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no sbatch, no torchrun: nothing may start
    run_dir = tmp_path / "run"
    assert main([*overrides, f"run_dir={run_dir}"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"disttrain: error: {message}\n"
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_unwritable_run_dir_is_refused_before_submitting(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["launcher=slurm", "launcher.dry_run=true", f"run_dir={blocker}/run"]) == 2
    message = f"run_dir='{blocker}/run': not writable (Not a directory)"
    assert capsys.readouterr().err == f"disttrain: error: {message}\n"


def test_dry_run_of_local_prints_the_command(tmp_path: Path, capsys) -> None:
    args = ["trainer.max_epochs=1", "launcher.dry_run=true", f"run_dir={tmp_path}/run"]
    assert main(args) == 0
    assert capsys.readouterr().out == shlex.join([sys.executable, "-m", "disttrain", *args]) + "\n"
    assert list(tmp_path.iterdir()) == []


def test_dry_run_of_multinode_prints_the_torchrun_command(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    base = ["launcher=multinode", "launcher.dry_run=true", "launcher.rdzv_endpoint=10.0.0.1:29400"]
    assert main([*base, "launcher.local_addr=10.0.0.1", f"run_dir={run_dir}"]) == 0
    assert main([*base, "launcher.node_rank=1", f"run_dir={run_dir}"]) == 0
    node0, node1 = capsys.readouterr().out.splitlines()
    common = "--nnodes=2 --node-rank={} --rdzv-backend=c10d --rdzv-endpoint=10.0.0.1:29400 --rdzv-id=default"
    tail = f"--nproc-per-node=1 --max-restarts=0 -m disttrain.worker {run_dir}"
    assert node0 == (
        f"{sys.executable} -m torch.distributed.run {common.format(0)} --rdzv-conf is_host=1 "
        f"--local-addr 10.0.0.1 {tail}/config.yaml"
    )
    assert node1 == f"{sys.executable} -m torch.distributed.run {common.format(1)} {tail}/.hydra/node1.yaml"
    assert list(tmp_path.iterdir()) == []


def test_dry_run_of_slurm_prints_the_script_without_slurm(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # rendering needs no SLURM on this machine
    monkeypatch.chdir(tmp_path)
    args = [
        "launcher=slurm",
        "launcher.dry_run=true",
        "launcher.nodes=2",
        "launcher.gpus_per_node=4",
        "launcher.partition=gpu",
        "launcher.account=proj",
        "launcher.time=02:00:00",
        "launcher.signal_seconds=300",
        "launcher.sbatch_args=['--qos=high']",
        "run_dir=runs/x/${run_id:}",
    ]
    assert main(args) == 0
    script = capsys.readouterr().out
    submit_dir = next(line for line in script.splitlines() if line.startswith("#SBATCH --output="))
    submit_dir = submit_dir.removeprefix("#SBATCH --output=").removesuffix("/slurm-%j.out")
    assert submit_dir.startswith(f"{tmp_path}/runs/x/")  # run_dir as resolved here: the submit time
    assert (
        script
        == f"""\
#!/bin/bash
# Rendered by `disttrain launcher=slurm`.
#SBATCH --job-name=default
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=1
#SBATCH --time=02:00:00
#SBATCH --partition=gpu
#SBATCH --account=proj
#SBATCH --signal=USR2@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={submit_dir}/slurm-%j.out
#SBATCH --chdir={tmp_path}
#SBATCH --qos=high
set -euo pipefail
echo "disttrain: SLURM job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, restart ${{SLURM_RESTART_COUNT:-0}}"
# Rendezvous on the first node, at the address SLURM itself uses for it, on a port free there
# (this script runs on the first node).
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=$(scontrol show node -o "$head_node" | grep -o "NodeAddr=[^ ]*" | cut -d= -f2)
rdzv_port=$({sys.executable} -c {shlex.quote(FREE_PORT)})
srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 {sys.executable} -m torch.distributed.run \\
    --nnodes=$SLURM_NNODES --nproc-per-node=4 \\
    --rdzv-backend=c10d --rdzv-endpoint="$head_addr:$rdzv_port" --rdzv-id="$SLURM_JOB_ID" \\
    --max-restarts=0 \\
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2 --shutdown-timeout=300 \\
    -m disttrain.worker {submit_dir}/sbatch-config.yaml
"""
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_requeue_without_scontrol_fails_loudly(tmp_path: Path) -> None:
    # What rank 0 does after a signal stopped the run inside a SLURM job whose PATH lacks scontrol.
    code = (
        "import sys; from disttrain.worker import finish; "
        "sys.exit(finish({'stopped': 'stopped by signal SIGUSR2', 'steps': 7, 'params_sha256': 'x'}))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        env=env(SLURM_JOB_ID="42", PATH=str(tmp_path)),
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert res.returncode == 1
    assert res.stderr == (
        "disttrain: error: stopped by signal SIGUSR2 at step 7, but cannot requeue SLURM job 42: "
        "scontrol not found on PATH\n"
    )


def test_an_array_task_requeues_only_itself() -> None:
    from disttrain.worker import slurm_job_to_requeue

    task = {"SLURM_JOB_ID": "108", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "8"}
    assert slurm_job_to_requeue(task) == "100_8"
    assert slurm_job_to_requeue({"SLURM_JOB_ID": "108"}) == "108"
    assert slurm_job_to_requeue({}) is None

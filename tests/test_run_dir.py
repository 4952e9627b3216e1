"""One job per run dir (issue 11): a second job on a run dir in use is refused in one line naming the
first and touches nothing, whichever way either was started; the default run dir is unique per job."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from disttrain.config import ConfigError
from disttrain.snapshot import list_snapshots
from tests.support import (
    ROOT,
    SMALL,
    disttrain,
    env,
    job_processes,
    python_api_fit,
    slow_writes,
    slowed,
    start,
    summary,
    tree_hashes,
    wait_for_step,
)

pytestmark = pytest.mark.slow  # every test here starts processes

#: 450 steps, a snapshot every 50 (whose commit `slow_writes` makes 0.3 s longer: a few seconds of run to
#: catch).
JOB = [*SMALL, "snapshot.every_steps=50"]
DDP = ["launcher=torchrun", "launcher.nproc_per_node=2"]


def refusal(run_dir: Path, pid: int) -> str:
    """The line a second job prints, naming the first as its lock file describes it."""
    holder = json.loads((run_dir / ".lock").read_text())
    assert holder["pid"] == pid and holder["host"] == socket.gethostname()
    return (
        f"disttrain: error: run_dir='{run_dir}': in use by another job (pid {pid} on {holder['host']}, "
        f"started {holder['started']}); wait for it to end, or choose another run_dir"
    )


@pytest.mark.parametrize("first", [[], DDP], ids=["first-one-process", "first-torchrun-launcher"])
def test_a_second_job_on_a_run_dir_in_use_is_refused_and_touches_nothing(tmp_path, first) -> None:
    run_dir = tmp_path / "run"
    command = [*JOB, f"run_dir={run_dir}"]
    log = tmp_path / "slow_writes"
    job = start(*first, *command, **slow_writes(0.3, log))
    wait_for_step(job, run_dir, 60)
    # Frozen, every process of it (torchrun's workers each lead a session of their own), so that any
    # change to its files could only come from the second job.
    frozen = job_processes(run_dir)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        before = tree_hashes(run_dir)
        assert any(name.endswith("shared.pt") for name in before)  # snapshots, maybe one being written
        expected = refusal(run_dir, job.pid)  # the launcher holds it, not a worker
        for second in ([], DDP):  # a second `disttrain`, one process or torchrun
            again = disttrain(*second, *command)
            assert again.returncode == 2, again.stderr
            assert again.stderr == expected + "\n"
            assert again.stdout == ""
        with pytest.raises(ConfigError) as refused:  # the Python API, in this process
            python_api_fit(run_dir)
        assert f"disttrain: error: {refused.value}" == expected
        assert tree_hashes(run_dir) == before
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out
    assert summary(run_dir)["stopped"] == "max_epochs"
    assert summary(run_dir)["steps"] == (226 if first else 450)
    for snap in list_snapshots(run_dir / "snapshots"):
        snap.verify()
    assert slowed(log) >= 4  # every snapshot of the run, each 0.3 s longer


def test_the_python_api_under_torchrun_holds_the_run_dir_on_rank_0(tmp_path) -> None:
    """`Trainer.fit()` under the user's own torchrun: rank 0 takes the lock, and a refusal reaches every
    rank (rank 1 would otherwise wait in its first collective until the timeout)."""
    run_dir = tmp_path / "run"
    job = start(*JOB, f"run_dir={run_dir}")
    wait_for_step(job, run_dir, 60)  # of 450
    os.killpg(job.pid, signal.SIGSTOP)  # holding the run dir for as long as the test needs
    try:
        script = tmp_path / "fit.py"
        script.write_text(
            "import os, sys\n"
            "from disttrain.config import ConfigError\n"
            "from tests.support import python_api_fit\n"
            "try:\n"
            f"    python_api_fit({str(run_dir)!r})\n"
            "except ConfigError as e:\n"
            "    os.write(1, f'rank refused: {e}\\n'.encode())  # one write: the ranks' lines do not mix\n"
            "    sys.exit(3)\n"
        )
        res = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script],
            cwd=ROOT,
            env=env(PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=300,
        )
        expected = refusal(run_dir, job.pid).removeprefix("disttrain: error: ")
        assert res.stdout.count(f"rank refused: {expected}\n") == 2, res.stdout + res.stderr
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def test_the_default_run_dir_is_unique_per_job_started_in_the_same_second(tmp_path) -> None:
    # The default run_dir is runs/${name}/${run_id:}: with no SLURM or torchrun id, the start time. Two
    # jobs started together usually start in the same second; retried until they do.
    for _ in range(5):
        jobs = [start(*SMALL, "trainer.max_steps=2", cwd=tmp_path) for _ in range(2)]
        outs = [job.communicate(timeout=300)[0] for job in jobs]
        assert [job.returncode for job in jobs] == [0, 0], outs
        dirs = sorted(
            re.search(r"run dir (\S+)$", out.strip().splitlines()[-1]).group(1)  # type: ignore[union-attr]
            for out in outs
        )
        seconds = {Path(d).name[: len("2026-11-23_12-14-03")] for d in dirs}
        if len(seconds) == 1:
            break
    else:
        pytest.fail(f"no two jobs started in the same second in 5 tries: {dirs}")
    assert dirs[0] != dirs[1]
    for d in dirs:
        assert re.fullmatch(r"runs/default/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-[0-9a-f]{6}", d), d
        assert json.loads((tmp_path / d / "summary.json").read_text())["steps"] == 2

"""Resume on any number of processes: a job stopped on W processes continues on W' with the same global
batch, every remaining sample of the epoch seen once, in the uninterrupted run's global order and
grouping, and weights within fp32 reduction tolerance of the uninterrupted run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from disttrain.snapshot import list_snapshots
from tests.clusters.netns import TwoHosts
from tests.order import steps_read
from tests.support import (
    ROOT,
    disttrain,
    env,
    kill_at_step,
    last_step,
    start,
    step_losses,
    summary,
    tree_hashes,
)

pytestmark = pytest.mark.slow  # every test here starts processes

#: 192 samples of tests/order.py, 16 per optimizer step (4 per micro-batch: accumulate 4 on 1 process,
#: 2 on 2, 1 on 4), 12 steps an epoch, 2 epochs, a snapshot every 2 steps.
JOB = [
    "--config-dir", "tests/conf", "model=regressor", "data=logged", "trainer.global_batch_size=16",
    "trainer.batch_size=4", "trainer.max_epochs=2", "trainer.val_fraction=0", "trainer.num_threads=1",
    "snapshot.every_steps=2", "optim.lr=0.05",
]  # fmt: skip
STEPS = 24


def on(world: int) -> list[str]:
    return [] if world == 1 else ["launcher=torchrun", f"launcher.nproc_per_node={world}"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = list_snapshots(run_dir / "snapshots")[0]
    return torch.load(newest.path / "shared.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, list[int]]]:
    """The uninterrupted run (one process; the global order does not depend on the world size)."""
    root = tmp_path_factory.mktemp("reference")
    result = disttrain(*JOB, f"run_dir={root / 'run'}", ORDER_LOG=str(root / "log"))
    assert result.returncode == 0, result.stderr
    steps = steps_read(root / "log", 1, 16)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert sorted(i for s in range(1, 13) for i in steps[s]) == list(range(192))  # an epoch: each once
    return root / "run", steps


def assert_continues_like(reference, run_dir: Path, lives: list[tuple[Path, int]]) -> None:
    """Every step's samples, in order, are the uninterrupted run's; the weights end within tolerance."""
    ref_dir, ref_steps = reference
    seen: dict[int, list[int]] = {}
    for log_dir, first_step in lives:  # a later life redoes the steps after the snapshot it resumed
        seen.update(steps_read(log_dir, first_step, 16))
    assert {s: seen.get(s) for s in ref_steps} == ref_steps
    for name, tensor in final_weights(ref_dir).items():
        torch.testing.assert_close(final_weights(run_dir)[name], tensor, rtol=1e-5, atol=1e-6)
    assert summary(run_dir)["steps"] == STEPS
    steps, losses = step_losses(run_dir)
    assert steps == list(range(1, STEPS + 1))  # metrics.jsonl: every step once, in order
    # The logged loss is the window's mean on all ranks: the same curve whatever the world size.
    assert losses == pytest.approx(step_losses(ref_dir)[1], rel=1e-5)


#: A chain of lives, each on another number of processes: (world size, the step it stops at; None:
#: the end). 4 -> 2, 2 -> 1 and 1 -> 2, mid-epoch and across the epoch's end (12 steps an epoch).
LIVES = [(4, 6), (2, 10), (1, 16), (2, None)]


def test_a_stopped_job_continues_on_another_number_of_processes(reference, tmp_path) -> None:
    run_dir = tmp_path / "run"
    lives, first_step, before = [], 1, None
    for life, (world, stop) in enumerate(LIVES):
        until = [] if stop is None else [f"trainer.max_steps={stop}"]
        log = tmp_path / str(life)
        result = disttrain(*JOB, *on(world), *until, f"run_dir={run_dir}", ORDER_LOG=str(log))
        assert result.returncode == 0, result.stderr[-3000:]
        if before is not None:
            epoch = (first_step - 1) // 12
            resumed = f"(epoch {epoch}, step {first_step - 1}, {before} -> {world} processes)"
            assert f"resumed from {run_dir}/snapshots/step_{first_step - 1:08d} {resumed}" in result.stderr
        lives.append((log, first_step))
        first_step, before = (stop or STEPS) + 1, world
    assert summary(run_dir)["world_size"] == LIVES[-1][0]
    assert_continues_like(reference, run_dir, lives)


def test_sigkill_mid_window_then_resume_on_two_processes(reference, tmp_path) -> None:
    # One process, 4 micro-batches a step, reading a sample takes 10 ms: the kill lands inside a window,
    # whose samples the resumed job reads again from the window's start (snapshots are at step ends).
    run_dir = tmp_path / "run"
    job = [*JOB, "data.delay=0.01", f"run_dir={run_dir}"]
    kill_at_step(start(*job, ORDER_LOG=str(tmp_path / "1")), run_dir, 5)
    resumed_at = list_snapshots(run_dir / "snapshots")[0].step
    assert 0 < resumed_at < STEPS
    again = disttrain(*job, *on(2), ORDER_LOG=str(tmp_path / "2"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(epoch 0, step {resumed_at}, 1 -> 2 processes)" in again.stderr
    assert_continues_like(reference, run_dir, [(tmp_path / "1", 1), (tmp_path / "2", resumed_at + 1)])


#: The same job over 201 samples, 24 per optimizer step: 8 whole steps an epoch, then one of the 9 that
#: are left, which divide by none of 2, 3 and 4 processes' micro-batches (batch 2: on 4 processes the
#: ranks hold 3, 2, 2, 2 of them, in 2, 1, 1, 1 micro-batches).
TAIL_JOB = [*JOB, "data.size=201", "trainer.global_batch_size=24", "trainer.batch_size=2"]
TAIL_STEPS, TAIL_EPOCH = 18, 201


@pytest.fixture(scope="module")
def tail_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, list[int]]]:
    root = tmp_path_factory.mktemp("tail")
    result = disttrain(*TAIL_JOB, f"run_dir={root / 'run'}", ORDER_LOG=str(root / "log"))
    assert result.returncode == 0, result.stderr
    steps = steps_read(root / "log", 1, 24, TAIL_EPOCH)
    assert sorted(steps) == list(range(1, TAIL_STEPS + 1))
    assert [len(steps[s]) for s in (8, 9, 10)] == [24, 9, 24]  # the epoch ends on what is left
    for epoch in (range(1, 10), range(10, 19)):  # each sample once an epoch, none repeated
        assert sorted(i for s in epoch for i in steps[s]) == list(range(TAIL_EPOCH))
    return root / "run", steps


def assert_tail_like(tail_reference, run_dir: Path, lives: list[tuple[Path, int]]) -> None:
    ref_dir, ref_steps = tail_reference
    seen: dict[int, list[int]] = {}
    for log_dir, first_step in lives:
        seen.update(steps_read(log_dir, first_step, 24, TAIL_EPOCH))
    assert {s: seen.get(s) for s in ref_steps} == ref_steps
    steps, losses = step_losses(run_dir)
    assert steps == list(range(1, TAIL_STEPS + 1))
    # The short step is the mean over its 9 samples on any number of processes: the curve goes on alike.
    assert losses == pytest.approx(step_losses(ref_dir)[1], rel=1e-5)
    for name, tensor in final_weights(ref_dir).items():
        torch.testing.assert_close(final_weights(run_dir)[name], tensor, rtol=1e-5, atol=1e-6)


def test_an_epochs_short_step_trains_alike_on_4_processes_and_after_a_resume_on_3(
    tail_reference, tmp_path
) -> None:
    # On 4 processes the first epoch's short step (step 9) of 9 samples falls 3, 2, 2, 2 (in 2, 1, 1, 1
    # micro-batches: fillers); the job stops mid-way through the second epoch, and 3 processes take its
    # short step (step 18) in the resume.
    run_dir = tmp_path / "run"
    first = disttrain(
        *TAIL_JOB, *on(4), "trainer.max_steps=12", f"run_dir={run_dir}", ORDER_LOG=str(tmp_path / "1")
    )
    assert first.returncode == 0, first.stderr[-3000:]
    again = disttrain(*TAIL_JOB, *on(3), f"run_dir={run_dir}", ORDER_LOG=str(tmp_path / "2"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(epoch 1, step 12, 4 -> 3 processes)" in again.stderr
    assert_tail_like(tail_reference, run_dir, [(tmp_path / "1", 1), (tmp_path / "2", 13)])


def test_drop_last_leaves_out_the_short_step(tail_reference, tmp_path) -> None:
    run_dir = tmp_path / "run"
    result = disttrain(
        *TAIL_JOB, "trainer.drop_last=true", f"run_dir={run_dir}", ORDER_LOG=str(tmp_path / "log")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = steps_read(tmp_path / "log", 1, 24)
    assert sorted(steps) == list(range(1, 17)) and summary(run_dir)["steps"] == 16  # 8 whole steps an epoch
    ref_steps = tail_reference[1]
    assert [steps[s] for s in range(1, 9)] == [ref_steps[s] for s in range(1, 9)]  # the same order
    assert len({i for s in range(1, 9) for i in steps[s]}) == 192  # the 9 left out, none repeated


def test_a_resume_that_would_change_the_global_batch_is_refused(tmp_path) -> None:
    run_dir = tmp_path / "run"
    first = disttrain(*JOB, "trainer.max_steps=2", f"run_dir={run_dir}", ORDER_LOG=str(tmp_path / "log"))
    assert first.returncode == 0, first.stderr
    before = tree_hashes(run_dir)
    # Another world size with the global batch left to batch × accumulate × processes, or a batch size
    # that changes it: refused, naming both shapes.
    cases = [
        (["trainer.global_batch_size=0", "trainer.accumulate=4"], 64, "2 processes × batch 8 × accumulate 4"),
        (["trainer.global_batch_size=32"], 32, "2 processes × batch 8 × accumulate 2"),
    ]
    for overrides, now, now_shape in cases:
        res = disttrain(
            *JOB, *on(2), "trainer.batch_size=8", *overrides, f"run_dir={run_dir}", ORDER_LOG=str(tmp_path)
        )
        assert (res.returncode, res.stderr) == (
            2,
            f"disttrain: error: run_dir='{run_dir}': cannot resume: its optimizer steps took 16 samples "
            f"(1 process × batch 4 × accumulate 4) and this job's take {now} ({now_shape}); set "
            "trainer.global_batch_size=16 to keep the global batch on 2 processes\n",
        )
    indivisible = disttrain(*JOB, *on(3), f"run_dir={run_dir}", ORDER_LOG=str(tmp_path / "log"))
    assert (indivisible.returncode, indivisible.stderr) == (
        2,
        "disttrain: error: trainer.global_batch_size=16: must be a multiple of 3 processes × "
        "trainer.batch_size 4 = 12\n",
    )
    assert tree_hashes(run_dir) == before  # nothing touched


def test_a_snapshot_from_before_the_global_position_resumes_on_its_world_size(tmp_path) -> None:
    # Written by disttrain 3e61641 (per-rank loader state, no samples_in_epoch): the regression job on
    # one process, stopped at step 3 of 8 in its first epoch.
    old = Path(__file__).parent / "data" / "snapshot-before-global-position"
    job = [
        "model=regression",
        "data=regression",
        "data.size=256",
        "trainer.num_threads=1",
        "trainer.max_epochs=2",
    ]
    run_dir = tmp_path / "old"
    shutil.copytree(old, run_dir / "snapshots" / "step_00000003")
    resumed = disttrain(*job, f"run_dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run_dir}/snapshots/step_00000003 (epoch 0, step 3)" in resumed.stderr
    straight = disttrain(*job, f"run_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr
    # The stored snapshot's weights were computed on another machine, whose CPU float kernels may differ
    # from this one's in the last bits: bit-for-bit equality holds only between runs made here. A resume
    # that lost or repeated a sample, or restarted its epoch, moves the weights by far more than fp32
    # rounding does over the remaining SGD steps.
    resumed_weights, straight_weights = (
        list_snapshots(d / "snapshots")[0].load_shared()["model"] for d in (run_dir, tmp_path / "straight")
    )
    assert summary(run_dir)["steps"] == summary(tmp_path / "straight")["steps"]
    torch.testing.assert_close(resumed_weights, straight_weights, rtol=1e-5, atol=1e-6)


def test_an_elastic_job_that_loses_a_host_continues_on_the_other(
    two_hosts: TwoHosts, reference, tmp_path
) -> None:
    # The user's own torchrun on two hosts (network namespaces), --nnodes=1:2: host 1's agent is killed,
    # host 0's agent restarts its worker, the rendezvous closes with one node, and the job continues
    # from the newest snapshot on one process.
    run_dir, log = tmp_path / "run", tmp_path / "order"
    endpoint = f"{two_hosts.addr(0)}:29400"
    agents = []
    for host in (0, 1):
        conf = "is_host=1,last_call_timeout=2" if host == 0 else "last_call_timeout=2"
        torchrun = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=elastic", "--rdzv-conf", conf,
            f"--local-addr={two_hosts.addr(host)}", "--max-restarts=3", "--monitor-interval=0.5",
        ]  # fmt: skip
        argv = [*torchrun, "-m", "disttrain", *JOB, "data.delay=0.03", f"run_dir={run_dir}"]
        agent_env = env(
            GLOO_SOCKET_IFNAME=two_hosts.ifname(host),
            ORDER_LOG=str(log),
            TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        )
        agents.append(
            two_hosts.run(
                host, argv, env=agent_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True,
            )
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while last_step(run_dir) < 6:
        assert time.monotonic() < deadline and agents[0].poll() is None, agents[0].stdout.read()
        time.sleep(0.05)
    two_hosts.kill(1)  # host 1 is gone: its agent and its worker
    out = agents[0].communicate(timeout=300)[0]
    agents[1].wait()
    assert agents[0].returncode == 0, out[-5000:]
    resumed = re.search(r"resumed from \S+/step_(\d+) \(epoch 0, step \d+, 2 -> 1 processes\)", out)
    assert resumed, out[-5000:]
    restart = max(int(p.name.removeprefix("restart")) for p in log.glob("restart*"))
    assert_continues_like(
        reference, run_dir, [(log, 1), (log / f"restart{restart}", int(resumed.group(1)) + 1)]
    )
    assert summary(run_dir)["world_size"] == 1

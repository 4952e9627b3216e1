"""Every project under examples/ runs as its README says, copied out of the checkout as a user copies it,
on tiny sizes: the job completes, and what a user would check holds (the steps in summary.json, the same
losses on one and two processes, a resume, the exported model)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.clusters.slurm import SlurmCluster
from tests.support import ROOT, env, last_step, losses, summary

EXAMPLES = ROOT / "examples"


def copy_example(name: str, tmp_path: Path) -> Path:
    """The example as a user copies it: its own files only, nothing a run left in the checkout."""
    ignore = shutil.ignore_patterns("runs", "outputs", "__pycache__", "slurm-*.out", "*.pt")
    return Path(shutil.copytree(EXAMPLES / name, tmp_path / name, ignore=ignore))


def run(project: Path, *cmd: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """A command run in the copied project. PYTHONPATH puts this checkout's disttrain first (an editable
    install may point at another checkout); the project's own modules come from its directory."""
    res = subprocess.run(
        [sys.executable, *cmd],
        cwd=project,
        env=env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}\n{res.stdout}\n{res.stderr[-4000:]}"
    return res


def torchrun(project: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return run(
        project, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args, timeout=timeout
    )


@pytest.mark.slow
def test_gpt2_from_transformers_on_a_datasets_dataset_trains_and_resumes(tmp_path: Path) -> None:
    project = copy_example("gpt2_hf", tmp_path)
    tiny = ["--width", "32", "--block", "48"]
    first = run(project, "train.py", "--run-dir", "runs/a", "--epochs", "1", *tiny)
    # 400 lines, 10% held out: 360 training lines, 45 batches of 8 an epoch.
    assert summary(project / "runs/a")["steps"] == 45, first.stdout
    val = summary(project / "runs/a")["final_val_loss"]
    assert math.isfinite(val) and val < math.log(256), first.stdout  # better than a uniform guess
    again = run(project, "train.py", "--run-dir", "runs/a", "--epochs", "2", *tiny)
    assert "resumed from runs/a/snapshots/step_00000045" in again.stderr, again.stderr
    assert summary(project / "runs/a")["steps"] == 90
    assert [step for step, _ in losses(project / "runs/a")] == list(range(1, 91))


@pytest.mark.slow
def test_a_user_project_trains_through_the_cli_and_its_own_hydra_app(tmp_path: Path) -> None:
    project = copy_example("user_project", tmp_path)
    cli = run(project, "-m", "disttrain", "--config-dir", "conf", "experiment=sums", "run_dir=runs/cli")
    assert "done: 30 steps (max_epochs)" in cli.stdout, cli.stdout  # 2 epochs × 15 batches of 16
    frozen = (project / "runs/cli/config.yaml").read_text()
    assert "_target_: mypkg.SumNet" in frozen and "width: 16" in frozen and "lr: 0.05" in frozen
    app = run(project, "app.py", "experiment=sums", "run_dir=runs/app")
    assert "done: 30 steps" in app.stdout, app.stdout
    # The same job either way: the same weights.
    assert summary(project / "runs/app")["params_sha256"] == summary(project / "runs/cli")["params_sha256"]


@pytest.mark.slow
def test_one_script_under_python_and_torchrun_takes_the_same_steps(tmp_path: Path) -> None:
    project = copy_example("torchrun_ddp", tmp_path)
    # 640 samples: 576 to train on (10% held out), 18 full steps of 32 an epoch, so no epoch ends on a
    # step that DistributedSampler pads with repeats (on 2 processes only), which would differ.
    small = ["--samples", "640", "--epochs", "2"]
    two = torchrun(project, "train.py", "--run-dir", "runs/two", *small)
    one = run(project, "train.py", "--run-dir", "runs/one", *small)
    assert "on 2 processes" in two.stdout and "on 1 process," in one.stdout
    assert summary(project / "runs/two")["world_size"] == 2
    # The global batch is fixed: one process accumulates two micro-batches where two processes take one
    # each, so every step's logged loss (the mean over its whole window) agrees to float rounding.
    ddp, single = losses(project / "runs/two"), losses(project / "runs/one")
    assert [s for s, _ in ddp] == [s for s, _ in single] == list(range(1, 37))
    for (_, a), (_, b) in zip(ddp, single, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.slow
def test_the_sbatch_script_trains_on_two_nodes_and_resumes_after_preemption(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    project = copy_example("slurm", tmp_path)
    # As its header says: options given to sbatch win over its #SBATCH lines; its arguments go to train.py.
    # 4 epochs of 58 steps (1,844 samples to train on, 32 a step): long enough to be preempted mid-run.
    job = slurm_cluster.sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        "--time=5",
        f"--export=ALL,PYTHON={sys.executable},PYTHONPATH={ROOT}",
        "train.sbatch",
        *("--samples", "2048", "--epochs", "4"),
        cwd=project,
    )
    run_dir, log = project / f"runs/slurm-{job}", project / f"slurm-{job}.out"  # the run dir has the job id
    deadline = time.monotonic() + 120
    while last_step(run_dir) < 10:  # training, with the script's signal handlers in place
        state = slurm_cluster.job_state(job)
        assert state["JobState"] in ("PENDING", "RUNNING"), f"{state}\n{log.read_text()}"
        assert time.monotonic() < deadline, "no step 10 in 120 s"
        time.sleep(0.05)
    # What `#SBATCH --signal=USR2@120` does 120 s before the time limit: USR2 to every task.
    subprocess.run(["scancel", "--signal=USR2", job], env=slurm_cluster.env, check=True, timeout=30)
    slurm_cluster.wait_until(
        job, lambda s: s.get("Restarts") == "1" and s.get("JobState") == "PENDING", 60, "requeued"
    )
    slurm_cluster.release(job)
    state = slurm_cluster.wait_job(job, timeout=180)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED", f"{state}\n{text}\n{slurm_cluster.logs()}"
    assert state["NodeList"] == "n[1-2]"
    stopped = re.search(r"stopped by signal SIGUSR2 at step (\d+): requeued", text)
    assert stopped and 10 <= int(stopped.group(1)) < 232, text
    assert f"resumed from runs/slurm-{job}/snapshots/step_{int(stopped.group(1)):08d}" in text, text
    # The requeued attempt (appended to the same log) continued where the first stopped: every step
    # logged once, and the run complete on two ranks.
    assert "restart 1" in text
    assert [step for step, _ in losses(run_dir)] == list(range(1, 233))
    result = summary(run_dir)
    assert (result["world_size"], result["steps"], result["stopped"]) == (2, 232, "max_epochs")
    assert f"done: 232 steps on 2 processes, {result['params_sha256']}" in text


@pytest.mark.slow
def test_fsdp_shards_the_model_and_exports_it_whole(tmp_path: Path) -> None:
    project = copy_example("fsdp", tmp_path)
    out = torchrun(project, "train.py", "--run-dir", "runs/fsdp", "--samples", "512", "--depth", "2")
    held = re.search(r"rank 0 held ([\d,]+) of ([\d,]+) parameters \(2 processes\)", out.stdout)
    assert held, out.stdout
    local, total = (int(n.replace(",", "")) for n in held.groups())
    assert 2 * local == total  # every tensor of this model splits evenly in two
    result = summary(project / "runs/fsdp")
    assert (result["strategy"], result["steps"]) == ("fsdp", 24)  # 460 samples, 8 steps of 2 × 32
    # `disttrain export runs/fsdp -o model.pt`, then the plain, unsharded model loads the file, as the
    # README shows (one process for both: the CLI's own entry point, then the load): the run's weights.
    check = run(
        project,
        "-c",
        "import torch; from disttrain.cli import main; from disttrain.metrics import params_sha256; "
        "from model import DeepMLP; assert main(['export', 'runs/fsdp', '-o', 'model.pt']) == 0; "
        "m = DeepMLP(depth=2); m.load_state_dict(torch.load('model.pt', weights_only=True)); "
        "print(params_sha256(m))",
    )
    assert check.stdout.strip().splitlines()[-1] == result["params_sha256"], check.stdout
    assert result["snapshot"] == "step_00000024"  # the newest snapshot, the one exported


@pytest.mark.slow
def test_your_own_callbacks_stop_the_run_keep_their_state_and_log_every_step_once(tmp_path: Path) -> None:
    project = copy_example("callback", tmp_path)
    first = run(project, "train.py", "--run-dir", "runs/a")
    stopped = summary(project / "runs/a")
    assert stopped["stopped"] == "stopped by callback stop" and stopped["steps"] < 160, first.stdout
    assert f"stopped by callback stop at step {stopped['steps']}" in first.stdout
    # Told never to stop, the same run dir resumes from the stop's snapshot and trains its 5 epochs.
    again = run(project, "train.py", "--run-dir", "runs/a", "--target", "0")
    assert f"resumed from runs/a/snapshots/step_{stopped['steps']:08d}" in again.stderr, again.stderr
    assert summary(project / "runs/a")["steps"] == 160  # 1,024 samples in steps of 32, 5 epochs
    rows = (project / "runs/a/steps.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr" and [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, 161))


@pytest.mark.slow
def test_a_token_file_from_tokenize_or_prepare_trains_a_gpt(tmp_path: Path) -> None:
    project = copy_example("token_file", tmp_path)
    run(project, "-m", "disttrain", "tokenize", "corpus.txt", "-o", "train.bin")
    run(project, "prepare.py", "corpus.txt", "prepared.bin")
    # Bytes as tokens either way: the command and the nanoGPT-style script write the same file.
    assert (project / "train.bin").read_bytes() == (project / "prepared.bin").read_bytes()
    job = ["experiment=gpt", "data=token_file", "data.path=train.bin", "data.vocab_size=256"]
    job += ["data.context=32", "model.n_layer=1", "trainer.max_steps=6", "trainer.val_every_steps=3"]
    trained = run(project, "-m", "disttrain", *job, "run_dir=runs/gpt")
    assert "done: 6 steps (max_steps)" in trained.stdout, trained.stdout
    assert math.isfinite(summary(project / "runs/gpt")["final_val_loss"])

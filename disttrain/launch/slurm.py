"""launcher=slurm: render an sbatch script, submit it, print where everything goes.

The job is one `srun` task per node, each running a torchrun agent; the agents meet by c10d rendezvous
on the first node of the allocation and start `nproc_per_node` workers each. Decisions:

- The run dir carries the job id, which does not exist on the submit host. The staged config keeps
  `run_dir` with `${run_id:}` unresolved; every worker resolves it inside the job (to `slurm-<jobid>`,
  `slurm-<arrayjob>_<task>` for an array task), so a requeued job finds the same run dir and resumes.
  Script, staged config and log go to the submit dir: `run_dir` as resolved here (by default
  `runs/<name>/<submit time>`), which exists before sbatch runs, as SLURM needs for the log.
- Rendezvous address: the first node's `NodeAddr`, i.e. how SLURM itself reaches that node (the node
  name need not resolve, as on a test cluster), and a port found free there by the batch script, which
  runs on that node: a port derived from the job id can collide with another job's on a shared node.
- The warning signal goes to the job steps (`--signal=USR2@N`, no `B:`): SLURM delivers it to every
  process of the step, torchrun agent and workers alike (measured). torchrun is told to handle it
  (`--signals-to-handle`), else its default action would kill the agent mid-snapshot; it then forwards
  it to its workers and waits up to `signal_seconds` for them to snapshot and requeue.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from disttrain.config import ConfigError, LauncherConfig, TrainConfig, run_id
from disttrain.snapshot import atomic_write, freeze_config

#: The placeholder the staged config keeps in run_dir, resolved by each worker inside the job.
RUN_ID = "${run_id:}"
#: Job states after which a job runs no more (a requeued job goes back to PENDING instead).
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
#: Prints a TCP port free on this machine.
FREE_PORT = 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
# torchrun's own default list, plus the warning signal.
_TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


def workers_per_node(cfg: TrainConfig) -> int:
    return cfg.launcher.gpus_per_node or cfg.launcher.nproc_per_node


def render_script(cfg: TrainConfig, config_path: Path, log_path: Path, workdir: Path) -> str:
    """The sbatch script: `#SBATCH` resources, then one srun task per node running a torchrun agent."""
    launcher = cfg.launcher
    sbatch = [
        f"--job-name={cfg.name}",
        f"--nodes={launcher.nodes}",
        "--ntasks-per-node=1",
        *([f"--gpus-per-node={launcher.gpus_per_node}"] if launcher.gpus_per_node else []),
        f"--cpus-per-task={launcher.cpus_per_task}",
        f"--time={launcher.time}",
        *([f"--partition={launcher.partition}"] if launcher.partition else []),
        *([f"--account={launcher.account}"] if launcher.account else []),
        f"--signal={launcher.signal}@{launcher.signal_seconds}",
        "--requeue",
        "--open-mode=append",
        f"--output={log_path}",
        f"--chdir={workdir}",
        *launcher.sbatch_args,
    ]
    signals = ",".join(dict.fromkeys([*_TORCHRUN_SIGNALS, f"SIG{launcher.signal}"]))
    torchrun = [
        f"{shlex.quote(sys.executable)} -m torch.distributed.run",
        f"--nnodes=$SLURM_NNODES --nproc-per-node={workers_per_node(cfg)}",
        '--rdzv-backend=c10d --rdzv-endpoint="$head_addr:$rdzv_port" --rdzv-id="$SLURM_JOB_ID"',
        f"--max-restarts={launcher.max_restarts}",
        f"--signals-to-handle={signals} --shutdown-timeout={launcher.signal_seconds}",
        f"-m disttrain.worker {shlex.quote(str(config_path))}",
    ]
    env = ""
    if launcher.max_restarts:
        # As launcher=torchrun: a restarted group on a shared TCPStore failed in 7 of 9 restarts here.
        env = "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1\n"
    lines = [
        "#!/bin/bash",
        "# Rendered by `disttrain launcher=slurm`.",
        *(f"#SBATCH {arg}" for arg in sbatch),
        "set -euo pipefail",
        'echo "disttrain: SLURM job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, restart ${SLURM_RESTART_COUNT:-0}"',
        "# Rendezvous on the first node, at the address SLURM itself uses for it, on a port free there",
        "# (this script runs on the first node).",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'head_addr=$(scontrol show node -o "$head_node" | grep -o "NodeAddr=[^ ]*" | cut -d= -f2)',
        f"rdzv_port=$({shlex.quote(sys.executable)} -c {shlex.quote(FREE_PORT)})",
        env.rstrip("\n"),
        # One torchrun agent per node, whatever task count the job was submitted (or requeued) with.
        'srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 ' + " \\\n    ".join(torchrun),
    ]
    return "\n".join(line for line in lines if line) + "\n"


def run_slurm(cfg: TrainConfig, overrides: list[str]) -> int:
    """Submit the job (or print its script with `launcher.dry_run=true`); with `launcher.wait=true` block
    until it ends for good and return its exit code."""
    job_id = submit(cfg)
    if job_id is None or not cfg.launcher.wait:
        return 0
    return wait_for_job(job_id)


def submit(cfg: TrainConfig) -> str | None:
    """Stage the config and script in the submit dir, `sbatch` it, print the job id, script and log;
    return the job id (None for a dry run, which prints the script instead)."""
    submit_dir = Path(cfg.run_dir).absolute()
    # The run id is the submit host's here; inside the job each worker resolves the placeholder again.
    staged = dataclasses.replace(cfg, run_dir=str(submit_dir).replace(run_id(), RUN_ID))
    config_path = submit_dir / "sbatch-config.yaml"
    script_path = submit_dir / "job.sbatch"
    log_path = submit_dir / "slurm-%j.out"
    script = render_script(cfg, config_path, log_path, Path.cwd())
    if cfg.launcher.dry_run:
        print(script, end="")
        return None
    freeze_config(staged, config_path)
    atomic_write(script_path, lambda f: f.write(script.encode()))
    job_id = _sbatch(script_path)
    print(f"submitted SLURM job {job_id}")
    print(f"  script:  {script_path}")
    print(f"  log:     {str(log_path).replace('%j', job_id)}")
    print(f"  run dir: {job_run_dir(staged.run_dir, job_id)}", flush=True)
    return job_id


def job_run_dir(staged_run_dir: str, job_id: str) -> str:
    """The run dir a job's workers resolve from the staged config's run_dir."""
    return staged_run_dir.replace(RUN_ID, f"slurm-{job_id}")


def _sbatch(script_path: Path) -> str:
    res = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    if res.returncode != 0:
        # SLURM refuses resources (partition, time, GPUs) here; its own line says which.
        reason = "; ".join(line.strip() for line in res.stderr.splitlines() if line.strip())
        raise ConfigError(f"launcher='slurm': sbatch refused the job: {reason}")
    return res.stdout.strip().split(";")[0]


def job_state(job_id: str) -> dict[str, str]:
    """`scontrol show job -o ID` as a dict (JobState, ExitCode, Restarts, ...); {} if SLURM forgot it."""
    res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if res.returncode != 0:
        return {}
    return dict(re.findall(r"(\S+?)=(\S*)", res.stdout))


def wait_for_job(job_id: str, poll_s: float = 2.0) -> int:
    """Block until the job ends for good (a requeue is not an end) and return its exit code.

    Polls `scontrol` rather than `sbatch --wait`, which returns when the first attempt of a requeued
    job ends.
    """
    state: dict[str, str] = {}
    while True:
        current = job_state(job_id)
        if not current:
            last = state.get("JobState")
            print(f"disttrain: error: SLURM forgot job {job_id} (last seen: {last})", file=sys.stderr)
            return 1
        state = current
        if state.get("JobState") in FINAL_STATES:
            break
        time.sleep(poll_s)
    code, _, signal = state.get("ExitCode", "1:0").partition(":")
    print(f"SLURM job {job_id} {state['JobState']}, exit code {code}, restarts {state.get('Restarts', '0')}")
    return int(code) if int(code) or signal in ("", "0") else 128 + int(signal)


def sbatch_missing() -> str | None:
    """None if sbatch is on PATH, else what to do about it."""
    if shutil.which("sbatch", path=os.environ.get("PATH")):
        return None
    return (
        "sbatch not found on PATH; run this on a SLURM login node, or install SLURM's client commands "
        "(Debian/Ubuntu: apt-get install slurm-client) configured for your cluster"
    )


def partition_gpus(partition: str) -> int | None:
    """Most GPUs any node of the partition ("" = the default one) has, from `sinfo`; None if unknown."""
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    counts = []
    for line in res.stdout.splitlines():
        name, _, gres = line.partition("|")
        if (partition and name.rstrip("*") == partition) or (not partition and name.endswith("*")):
            # GRES like "gpu:a100:4(S:0-1),gpu:2" or "(null)": add the counts of every gpu entry.
            counts.append(sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres)))
    return max(counts) if counts else None


def preflight(launcher: LauncherConfig) -> None:
    """sbatch exists, and the partition's nodes have the GPUs asked for (a dry run asks no cluster)."""
    if launcher.dry_run:
        return
    missing = sbatch_missing()
    if missing:
        raise ConfigError(f"launcher='slurm': {missing}")
    if launcher.gpus_per_node:
        have = partition_gpus(launcher.partition)
        if have is not None and launcher.gpus_per_node > have:
            where = f"partition {launcher.partition!r}" if launcher.partition else "the default partition"
            rule = f"nodes of {where} have at most {have} (sinfo)"
            raise ConfigError(f"launcher.gpus_per_node={launcher.gpus_per_node}: {rule}")

"""A real SLURM cluster (slurmctld + two slurmd "nodes") on this one machine, for tests.

Everything lives in the given work directory: config, state, spool, logs and pid files. No munge
(auth/none, cred/none), private ports, and every client is pointed at the cluster with SLURM_CONF, so
the machine's own /etc/slurm (if any) is never read.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

NODES = ("n1", "n2")
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }
)
_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
# The daemons live in /usr/sbin, which a non-login PATH (e.g. in CI containers) may lack.
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
# Values may contain "=" (TRES=cpu=2,node=1) but never " <key>=", so a key starts after whitespace.
_FIELD = re.compile(r"([^\s=]+)=(.*?)(?=\s+[^\s=]+=|\s*$)")


def _path_with_sbin(path: str) -> str:
    parts = path.split(os.pathsep) if path else []
    return os.pathsep.join(parts + [p for p in _SBIN if p not in parts])


def slurm_available() -> str | None:
    """None if a local cluster can be started here, else a one-line reason why not."""
    if os.geteuid() != 0:
        return "SLURM tests need root (the daemons run as root)"
    path = _path_with_sbin(os.environ.get("PATH", ""))
    missing = [b for b in _BINARIES if shutil.which(b, path=path) is None]
    if missing:
        return f"SLURM not installed (missing {', '.join(missing)}; run tests/clusters/install_slurm.sh)"
    return None


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open until every port is chosen so the kernel cannot hand out one port twice.
    # A port may still be taken between here and the daemon's bind; start() then retries.
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def parse_fields(line: str) -> dict[str, str]:
    """Parse one `scontrol show ... -o` line (`Key=Value Key=Value ...`) into a dict."""
    return {m.group(1): m.group(2) for m in _FIELD.finditer(line.strip())}


class _DaemonExited(RuntimeError):
    pass


def _die_with_parent() -> None:
    # If the test process is killed outright (no teardown), the daemons get SIGTERM instead of
    # lingering on their private ports. Linux only; elsewhere this is a no-op.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _pid_alive(pid: int) -> bool:
    # A zombie still answers kill(pid, 0); it is dead for our purposes (its parent may be an init that
    # is slow to reap), so look at the state in /proc instead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class SlurmCluster:
    """slurmctld plus slurmd `n1` and `n2` (NodeAddr 127.0.0.1, own ports), all as root.

    Each node declares `cpus_per_node` CPUs (default 2), so both a 1-node x 2-task job and a 2-node x
    1-task job fit. slurmd is told to trust the declared count (config_overrides), so a machine with
    fewer cores still brings the nodes up instead of draining them.
    """

    def __init__(self, workdir: Path, cpus_per_node: int = 2, real_memory_mb: int = 1000) -> None:
        self.workdir = Path(workdir).resolve()
        self.cpus_per_node = cpus_per_node
        self.real_memory_mb = real_memory_mb
        self.conf_path = self.workdir / "slurm.conf"
        self.log_dir = self.workdir / "log"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._env: dict[str, str] | None = None
        self._short_spool: Path | None = None
        self.ctld_port = 0
        self.node_ports: dict[str, int] = {}

    # ---- configuration -------------------------------------------------------------------------
    def _write_conf(self) -> None:
        w = self.workdir
        host = socket.gethostname().split(".")[0]
        self.ctld_port, *ports = _free_ports(1 + len(NODES))
        self.node_ports = dict(zip(NODES, ports, strict=True))
        for sub in ("state", "spool", "log"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        spool = self._spool_dir()
        for name in NODES:
            (spool / name).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=disttrain-test",
            # The address in parentheses keeps clients off DNS: the hostname may resolve elsewhere.
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "AuthType=auth/none",
            "CredType=cred/none",
            # A requeued job may restart only after the credential expires (default 120 s).
            "AuthInfo=cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={w}/state",
            f"SlurmdSpoolDir={spool}/%n",
            f"SlurmctldPidFile={w}/slurmctld.pid",
            f"SlurmdPidFile={w}/slurmd-%n.pid",
            f"SlurmctldLogFile={w}/log/slurmctld.log",
            f"SlurmdLogFile={w}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SchedulerType=sched/backfill",
            # Default intervals (60 s / 30 s) would leave submitted jobs pending for many seconds.
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "JobRequeue=1",
            "KillWait=5",
            # No slurmdbd (no sacct): finished jobs must stay visible to `scontrol show job`.
            "MinJobAge=600",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
        ]
        for name, port in self.node_ports.items():
            lines.append(
                f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory={self.real_memory_mb} State=UNKNOWN"
            )
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _spool_dir(self) -> Path:
        # slurmd puts each step's unix socket (`<node>_<job>.<step>`, ~20 chars) in its spool dir, and a
        # socket path may not exceed 107 bytes; a deep work dir (long TMPDIR in CI) falls back to /tmp.
        spool = self.workdir / "spool"
        if len(str(spool)) <= 70:
            return spool
        if self._short_spool is None:
            self._short_spool = Path(tempfile.mkdtemp(prefix="dtslurm-", dir="/tmp"))
        return self._short_spool

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (sbatch, squeue, scontrol, scancel) and jobs of this cluster."""
        if self._env is None:
            # Drop SLURM_* inherited from an outer job (e.g. tests run under a real cluster): sbatch
            # and srun would otherwise take that job's id, nodes and limits as their own.
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
            env["SLURM_CONF"] = str(self.conf_path)
            env["PATH"] = _path_with_sbin(env.get("PATH", ""))
            self._env = env
        return dict(self._env)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 30, attempts: int = 2) -> None:
        """Start the daemons and wait until both nodes are idle; on failure stop them and raise.

        A daemon that exits during start is retried with fresh ports (`attempts` in all): a port chosen
        free may have been taken by another process before the daemon bound it.
        """
        if self._procs:
            raise RuntimeError("cluster already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            self._write_conf()
            # Foreground (-D) daemons are our children: we know their pids without racing on the pid
            # files and can reap them, while they still write the pid files the config names.
            try:
                self._spawn("slurmctld", ["slurmctld", "-D"])
                for name in NODES:
                    self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name])
                self._wait_idle(timeout)
                return
            except _DaemonExited:
                # No jobs yet, so no need to be gentle: a slurmd still trying to register with a dead
                # controller ignores SIGTERM for up to 10 s.
                self.stop(timeout=1)
                if attempt == attempts:
                    raise
            except BaseException:
                self.stop(timeout=1)
                raise

    def _spawn(self, key: str, argv: list[str]) -> None:
        with open(self.log_dir / f"{key}.stdout", "ab") as out:
            self._procs[key] = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Own session: a Ctrl-C in the test terminal must not kill the daemons half-way (the
                # fixture's teardown stops them in order).
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for key, proc in self._procs.items():
                if proc.poll() is not None:
                    raise _DaemonExited(f"{key} exited with {proc.returncode} during start\n{self.logs()}")
            try:
                # Short timeout: with no controller yet (or a dead one) sinfo blocks for 10 s.
                res = self._client(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=2)
            except subprocess.TimeoutExpired:
                continue
            states = dict(line.split(None, 1) for line in res.stdout.splitlines() if " " in line)
            if all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.1)
        raise TimeoutError(f"nodes not idle after {timeout} s: {states}\n{self.logs()}")

    def stop(self, timeout: float = 15) -> None:
        """Cancel all jobs, stop the daemons by pid and end whatever the jobs left behind."""
        if not self._procs:
            # Also a way to clean up after a test process that was killed outright: a new
            # SlurmCluster on the same workdir finds that cluster's leftover jobs by their marker.
            self._kill_strays()
            self._remove_short_spool()
            return
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            self._cancel_all(timeout)
        # Read the pid files before stopping: the daemons delete them on a clean exit. With -D they
        # name our children; any other pid is trusted only if it carries this cluster's marker, since a
        # stale file from a failed attempt may name a pid the kernel has given to someone else.
        pids = {key: proc.pid for key, proc in self._procs.items()}
        for key, pid in self._pidfile_pids().items():
            if pid != pids.get(key) and self._is_ours(pid):
                pids[f"{key} (pid file)"] = pid
        for key in sorted(pids, key=lambda k: k.startswith("slurmctld")):  # slurmd first
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[key], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for key, pid in pids.items():
            proc = self._procs.get(key)
            while _pid_alive(pid) and time.monotonic() < deadline:
                if proc is not None and proc.poll() is not None:
                    break
                time.sleep(0.05)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()
        self._kill_strays()
        self._remove_short_spool()

    def _remove_short_spool(self) -> None:
        if self._short_spool is not None:
            shutil.rmtree(self._short_spool, ignore_errors=True)
            self._short_spool = None

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _pidfile_pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in ("slurmctld", *(f"slurmd-{n}" for n in NODES)):
            with contextlib.suppress(OSError, ValueError):
                out[key] = int((self.workdir / f"{key}.pid").read_text().split()[0])
        return out

    def _cancel_all(self, timeout: float) -> None:
        self._client(["scancel", "--full", "--user", "root"], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = self._client(
                ["squeue", "-h", "-t", "RUNNING,COMPLETING,CONFIGURING,SUSPENDED"], check=False
            )
            if res.returncode != 0 or not res.stdout.strip():
                return
            time.sleep(0.2)

    def _is_ours(self, pid: int) -> bool:
        # The daemons, the slurmstepd they fork and every job process inherit SLURM_CONF, and its path
        # is unique to this work directory: the marker of what this cluster started.
        if pid == os.getpid() or not _pid_alive(pid):
            return False
        try:
            environ = b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return f"\0SLURM_CONF={self.conf_path}\0".encode() in environ

    def stray_pids(self) -> list[int]:
        """Live processes (other than this one) that this cluster started: daemons, steps, jobs."""
        pids = (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit())
        return [pid for pid in pids if self._is_ours(pid)]

    def _kill_strays(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.stray_pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 3
            while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.05)

    # ---- clients -------------------------------------------------------------------------------
    def _client(
        self, argv: list[str], check: bool = True, timeout: float = 20
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def sbatch(self, *args: str, cwd: Path | None = None) -> str:
        """Submit with `sbatch --parsable ARGS` from `cwd` (the job's working directory, where SLURM
        writes `slurm-N.out` unless told otherwise), by default the cluster's own temporary directory:
        never the directory the tests run from, the checkout."""
        res = subprocess.run(
            ["sbatch", "--parsable", *args],
            env=self.env,
            cwd=cwd or self.workdir,
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {res.stderr.strip()}\n{self.logs()}")
        return res.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> dict[str, str]:
        """Fields of `scontrol show job -o ID` (JobState, ExitCode, Restarts, NodeList, StdOut, ...)."""
        res = self._client(["scontrol", "show", "job", "-o", str(job_id)])
        line = res.stdout.strip().splitlines()[0] if res.stdout.strip() else ""
        return parse_fields(line)

    def wait_until(
        self, job_id: str, predicate: Callable[[dict[str, str]], bool], timeout: float, what: str = ""
    ) -> dict[str, str]:
        """Poll the job until predicate(state) holds; raise TimeoutError with the logs if it does not."""
        deadline = time.monotonic() + timeout
        state: dict[str, str] = {}
        error = ""
        while True:
            try:
                state = self.job_state(job_id)
                error = ""
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                # A busy slurmctld may time out one query; only a lasting failure matters.
                error = f" (last query failed: {e})"
            else:
                if predicate(state):
                    return state
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {job_id}: {what or 'condition'} not reached in {timeout} s; "
                    f"JobState={state.get('JobState')} Reason={state.get('Reason')} "
                    f"Restarts={state.get('Restarts')}{error}\n{self.logs()}"
                )
            time.sleep(0.1)

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait until the job reaches a final state (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...)."""
        return self.wait_until(
            job_id, lambda s: s.get("JobState") in FINAL_STATES, timeout, what="a final state"
        )

    def release(self, job_id: str) -> None:
        """Let a requeued job (pending with Reason=BeginTime) start in about a second, not ~6 s.

        Not `StartTime=now`: slurmd refuses a credential issued in the same second as the requeue's
        revocation (times are whole seconds, `ctime <= revoked`), and the job then ends FAILED with
        "Job credential revoked". Seen in 1 of ~25 runs; `now+1` puts the restart in a later second.
        Call it only once the requeue is visible (Restarts went up), so the revocation is in the past.
        """
        self._client(["scontrol", "update", f"JobId={job_id}", "StartTime=now+1"])

    def logs(self, lines: int = 40) -> str:
        """The last lines of each daemon's log, for assertion messages."""
        parts: list[str] = []
        for key in ("slurmctld", *(f"slurmd-{n}" for n in NODES)):
            # A daemon's stdout repeats its log file (-D copies it there) but also holds what it said
            # before it could open the log (e.g. a bad config), so show it only when the log is empty.
            for path in (self.log_dir / f"{key}.log", self.log_dir / f"{key}.stdout"):
                try:
                    text = path.read_text(errors="replace").splitlines()[-lines:]
                except OSError:
                    continue
                if text:
                    parts.append(f"==> {path} <==\n" + "\n".join(text))
                    break
        return "\n".join(parts) or f"(no daemon logs in {self.log_dir})"

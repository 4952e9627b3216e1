"""Two "hosts" on one machine: Linux network namespaces joined by a veth pair.

Host i has only `lo` and one veth end (`ifname(i)`) with address `addr(i)` on a private /24; there is
no route out, so whatever runs inside can only reach the other namespace. Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

_counter = itertools.count()


def _ip() -> str | None:
    return shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip") if os.access(p, os.X_OK)), None
    )


def _run_ip(ip: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ip, *args], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)


def netns_available() -> str | None:
    """None if two namespaces can be made here, else a one-line reason why not."""
    if os.geteuid() != 0:
        return "network-namespace tests need root"
    ip = _ip()
    if ip is None:
        return "`ip` (iproute2) not installed; run tests/clusters/install_slurm.sh"
    probe = f"dt-probe-{os.getpid()}-{next(_counter)}"
    res = _run_ip(ip, "netns", "add", probe)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    res = _run_ip(ip, "netns", "del", probe)
    if res.returncode != 0:
        return f"`ip netns del` failed: {res.stderr.strip()}"
    return None


class TwoHosts:
    """Two network namespaces `dt-<pid>-<n>-a` / `-b` with a veth pair 10.123.X.1 <-> 10.123.X.2.

    Use as a context manager; leaving it ends the processes still running inside and deletes both
    namespaces (which also removes the veth pair), also when setting up failed half-way.
    """

    def __init__(self) -> None:
        ip = _ip()
        if ip is None:
            raise RuntimeError("`ip` (iproute2) not found")
        self._ip = ip
        n = next(_counter)
        pid = os.getpid()
        self.names = [f"dt-{pid}-{n}-{s}" for s in "ab"]
        # The namespaces are isolated from each other pair, so equal subnets would not clash; varying X
        # only keeps addresses in logs of concurrent runs apart.
        x = (pid + n) % 254 + 1
        self._addrs = [f"10.123.{x}.1", f"10.123.{x}.2"]
        # Created straight inside the namespaces, so the names only need to be unique there.
        self._ifnames = ["dtveth0", "dtveth1"]
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []

    def addr(self, i: int) -> str:
        return self._addrs[i]

    def ifname(self, i: int) -> str:
        return self._ifnames[i]

    def name(self, i: int) -> str:
        return self.names[i]

    def _must(self, *args: str) -> None:
        res = _run_ip(self._ip, *args)
        if res.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)} failed: {res.stderr.strip()}")

    def start(self) -> TwoHosts:
        try:
            for name in self.names:
                self._must("netns", "add", name)
                self._created.append(name)
            a, b = self.names
            self._must(
                "link", "add", "name", self._ifnames[0], "netns", a, "type", "veth",
                "peer", "name", self._ifnames[1], "netns", b,
            )  # fmt: skip
            for i, name in enumerate(self.names):
                self._must("-n", name, "addr", "add", f"{self._addrs[i]}/24", "dev", self._ifnames[i])
                self._must("-n", name, "link", "set", self._ifnames[i], "up")
                self._must("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def exec_prefix(self, i: int) -> list[str]:
        """argv prefix that runs a command inside host i (for callers that build their own Popen)."""
        return [self._ip, "netns", "exec", self.names[i]]

    def run(
        self, i: int, argv: Sequence[str], env: Mapping[str, str] | None = None, **popen_kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start argv inside host i; the process is ended at close() if still running."""
        if self.names[i] not in self._created:
            raise RuntimeError("TwoHosts not started")
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(
            [*self.exec_prefix(i), *argv], env=dict(env) if env is not None else None, **popen_kwargs
        )
        self._procs.append(proc)
        return proc

    def _ns_pids(self, name: str) -> list[int]:
        res = _run_ip(self._ip, "netns", "pids", name)
        return [int(p) for p in res.stdout.split() if p.isdigit()] if res.returncode == 0 else []

    def kill(self, i: int) -> None:
        """Host i dies: SIGKILL every process in its namespace (torchrun starts each worker in a session
        of its own, so a process group kill would miss them)."""
        for pid in self._ns_pids(self.names[i]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        # Anything still inside would keep the namespace alive after `ip netns del`; those pids are ours
        # (started by run() or by its children) because the namespaces are ours.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = {p.pid for p in self._procs if p.poll() is None}
            for name in self._created:
                pids.update(self._ns_pids(name))
            pids.discard(os.getpid())
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                for p in self._procs:
                    p.poll()
                if not any(p.returncode is None for p in self._procs) and not any(
                    self._ns_pids(n) for n in self._created
                ):
                    break
                time.sleep(0.05)
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=1)
        errors = []
        for name in list(self._created):
            res = _run_ip(self._ip, "netns", "del", name)
            if res.returncode == 0:
                self._created.remove(name)
            else:
                errors.append(f"{name}: {res.stderr.strip()}")
        if errors:
            raise RuntimeError(f"could not delete namespaces: {'; '.join(errors)}")

    def __enter__(self) -> TwoHosts:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

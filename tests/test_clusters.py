"""Smoke tests of the real-cluster infrastructure itself, with real engines and no disttrain code."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.clusters.netns import TwoHosts
from tests.clusters.slurm import SlurmCluster
from tests.support import require


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else f"({path} missing)"


@pytest.mark.slow
def test_slurm_one_node_two_tasks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "job.sh"
    script.write_text(
        textwrap.dedent(f"""\
            #!/bin/bash
            #SBATCH -N 1 -n 2 -o {tmp_path}/slurm-%j.out -t 1
            srun bash -c 'echo "$SLURM_PROCID $SLURMD_NODENAME" > {out}/task-$SLURM_PROCID'
        """)
    )
    job = slurm_cluster.sbatch(str(script))
    state = slurm_cluster.wait_job(job, timeout=30)
    log = "\n".join(_read(p) for p in tmp_path.glob("slurm-*.out"))
    assert state["JobState"] == "COMPLETED", f"{state}\njob log:\n{log}\n{slurm_cluster.logs()}"
    assert state["ExitCode"] == "0:0"
    assert state["NumTasks"] == "2" and state["NodeList"] in ("n1", "n2")
    node = state["NodeList"]
    assert sorted(p.read_text().split()[0] for p in out.iterdir()) == ["0", "1"], log
    assert {p.read_text().split()[1] for p in out.iterdir()} == {node}


@pytest.mark.slow
def test_slurm_two_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    job = slurm_cluster.sbatch(
        "-N", "2", "--ntasks-per-node=1", "-t", "1", "-o", f"{tmp_path}/slurm-%j.out",
        "--wrap", f"srun bash -c 'echo $SLURMD_NODENAME $SLURM_NODELIST > {out}/rank-$SLURM_PROCID'",
    )  # fmt: skip
    state = slurm_cluster.wait_job(job, timeout=30)
    assert state["JobState"] == "COMPLETED", f"{state}\n{slurm_cluster.logs()}"
    assert state["NodeList"] == "n[1-2]"
    seen = {p.name: p.read_text().split() for p in out.iterdir()}
    assert sorted(seen) == ["rank-0", "rank-1"]
    assert {v[0] for v in seen.values()} == {"n1", "n2"}
    assert {v[1] for v in seen.values()} == {"n[1-2]"}


@pytest.mark.slow
def test_slurm_requeue_round_trip(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    done = tmp_path / "done"
    log = tmp_path / "job.log"
    script = tmp_path / "job.sh"
    # The first attempt requeues itself and would sleep for a minute: the requeue must end it. (SLURM
    # signals the step's processes one after another: bash may see its sleep killed and run a line more
    # before its own signal comes, so the line that says so is reached only by a sleep run to its end.)
    script.write_text(
        textwrap.dedent(f"""\
            #!/bin/bash
            #SBATCH -N 1 -n 1 -t 2 --open-mode=append -o {log}
            echo "attempt restart=${{SLURM_RESTART_COUNT:-unset}}"
            if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then
                scontrol requeue "$SLURM_JOB_ID"
                sleep 60 || exit 143
                echo "not ended by the requeue"
                exit 3
            fi
            echo "$SLURM_RESTART_COUNT" > {done}
        """)
    )
    job = slurm_cluster.sbatch(str(script))
    slurm_cluster.wait_until(
        job,
        lambda s: s.get("Restarts") == "1" and s.get("JobState") == "PENDING",
        timeout=30,
        what="requeued and pending",
    )
    # Without this the job waits for the requeue hold to pass (~6 s with cred_expire=5); with it, ~1-2 s.
    slurm_cluster.release(job)
    state = slurm_cluster.wait_job(job, timeout=30)
    text = _read(log)
    assert state["JobState"] == "COMPLETED", f"{state}\n{text}\n{slurm_cluster.logs()}"
    assert state["Restarts"] == "1"
    assert _read(done).strip() == "1"
    assert "attempt restart=unset" in text and "attempt restart=1" in text, text
    assert "not ended by the requeue" not in text


_SERVER = """
import socket, sys
addr, payload = sys.argv[1], sys.argv[2].encode()
with socket.create_server((addr, 0)) as srv:
    srv.settimeout(15)
    print(srv.getsockname()[1], flush=True)
    conn, peer = srv.accept()
    with conn:
        conn.sendall(payload + b" to " + peer[0].encode())
"""

_CLIENT = """
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
with socket.create_connection((addr, port), timeout=10) as c:
    data = b""
    while chunk := c.recv(4096):
        data += chunk
print(data.decode())
"""


@pytest.mark.slow
def test_netns_two_hosts_talk(two_hosts: TwoHosts) -> None:
    a, b = two_hosts.addr(0), two_hosts.addr(1)
    server = two_hosts.run(0, [sys.executable, "-c", _SERVER, a, "hello"], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = server.stdout.readline().strip()
    assert port.isdigit(), f"server did not start: {port!r}"
    client = two_hosts.run(
        1, [sys.executable, "-c", _CLIENT, a, port], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = client.communicate(timeout=20)
    assert client.returncode == 0, err
    assert out.strip() == f"hello to {b}"
    assert server.wait(timeout=10) == 0
    # Host 1 holds only its own address and lo: nothing else is reachable from inside.
    prefix = two_hosts.exec_prefix(1)
    ip = prefix[0]  # the absolute path of `ip`, which PATH may lack
    addrs = subprocess.run(
        [*prefix, ip, "-o", "-4", "addr"], capture_output=True, text=True, timeout=10
    ).stdout
    assert f"{b}/24" in addrs and two_hosts.ifname(1) in addrs and a not in addrs


def test_require_fails_in_ci_and_skips_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    require(None)  # available: no effect, in CI or not
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI"):
        require("SLURM not installed")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="CI"):
        require("SLURM not installed")

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.clusters.netns import TwoHosts, netns_available
from tests.clusters.slurm import SlurmCluster, slurm_available

# ==== real-cluster fixtures (tests/clusters): SLURM and network namespaces ===========================
# Project rule: a test that needs a service FAILS when CI=true and the service is missing (CI must
# provide it), and may only skip outside CI.


def require(reason: str | None) -> None:
    """Do nothing if reason is None; else fail under CI=true, or skip with a hint elsewhere."""
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: CI must provide this service)", pytrace=False)
    pytest.skip(f"{reason} (skipped outside CI; CI=true makes this a failure)")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A real slurmctld + slurmd n1, n2 on this machine, shared by the whole session."""
    require(slurm_available())
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    """Two network namespaces joined by a veth pair; deleted after the test."""
    require(netns_available())
    with TwoHosts() as hosts:
        yield hosts


# ==== end of real-cluster fixtures ===================================================================

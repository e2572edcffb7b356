"""Fixtures of the cluster-launch tests: one local SLURM cluster for the session (always stopped),
a small dataset and the tiny model every launch trains."""
import pytest

from forge_dist.testing.cluster import LocalSlurm
from forge_dist.testing.data import corpus_dataset


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster on localhost (tools/local_slurm.sh), stopped at the end of the
    session whatever happened; skipped with the reason when this machine cannot run one."""
    why = LocalSlurm.unavailable()
    if why:
        pytest.skip(why)
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), kill_wait=30) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def launch_dataset(tmp_path_factory):
    return corpus_dataset(tmp_path_factory.mktemp("launch_data"), 20_000)

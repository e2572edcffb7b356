"""NVMe offload under DeepSpeed (``offload_optimizer`` / ``offload_param`` with ``device: nvme``,
an nvme_path in the test's tmp dir; DeepSpeed's async_io op, built once by the ``deepspeed_aio_op``
fixture, tests/dist/conftest.py, and libaio, which install.sh installs) with forge-train's sharded
checkpoint, in one DP=2 world:

  memory    ZeRO-3 in memory, one sub-group per rank (a 192-wide model: 0.9 M fp32 per rank, above
            the 1 MiB DeepSpeed swaps at least)
  nvme      the same with optimizer state and parameters offloaded to NVMe, sharded checkpoint at
            SAVE (each rank's swapped partitions read through DeepSpeed's swapper)
  nvme_r    resumed from it on NVMe: bit for bit
  nvme_z1   resumed from it at ZeRO-1 in memory: the cross-stage bounds (loss 1e-6, weights 1e-5)

Alone in its file, so that its build (about 220 s on an idle 2-core machine from an empty cache:
docs/deepspeed.md) is paid only where this file runs.
"""
import glob
import os

import pytest
import torch

from forge_dist.testing.spawn import spawn

import deepspeed_harness as T

# the setup builds DeepSpeed's pin_memory and async_io ops on a fresh machine, above the 300 s per test
pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(900)]

SAVE = 4
NVME_MODEL = dict(T.TINY, n_embd=192)  # a ZeRO-3 sub-group of 0.9 M fp32 per rank: DeepSpeed swaps >= 1 MiB only


def nvme_config(path=None):
    """ZeRO-3 in one sub-group; with ``path``, optimizer state and parameters offloaded to NVMe there."""
    cfg = T.ds_config(3)
    zero = cfg["zero_optimization"]
    zero["sub_group_size"] = 10 ** 9
    if path is not None:
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": path}
        zero["offload_param"] = {"device": "nvme", "nvme_path": path, "max_in_cpu": 0}
    return cfg


def world2(rank, world, workdir):
    """ZeRO-3 in memory, the same on NVMe with a sharded
    checkpoint at SAVE, resumed on NVMe and by ZeRO-1 in memory."""
    T.quiet()
    out = {"memory": T.run_iters(*T.make_engine(None, config=nvme_config(), model_kwargs=NVME_MODEL), range(T.ITERS))}
    engine, ctx = T.make_engine(None, config=nvme_config(os.path.join(workdir, "nvme")), model_kwargs=NVME_MODEL)
    zero = engine.ds.optimizer
    out["nvme"] = T.run_iters(engine, ctx, range(T.ITERS), sharded_to=os.path.join(workdir, "s_nvme"), sharded_at=SAVE)
    out["nvme"]["swapped"] = [zero.swap_optimizer, zero._swappable_optimizer_subgroup(0)]
    out["nvme"]["files"] = sorted(os.path.basename(f) for f in glob.glob(
        os.path.join(workdir, "nvme", "zero_stage_3", "optimizer", f"rank{ctx.rank}", "*.swp")))
    engine, ctx = T.make_engine(None, config=nvme_config(os.path.join(workdir, "nvme_r")), model_kwargs=NVME_MODEL)
    engine.load_state(out["nvme"]["sharded"])
    out["nvme_r"] = T.run_iters(engine, ctx, range(SAVE, T.ITERS))
    engine, ctx = T.make_engine(1, model_kwargs=NVME_MODEL)
    engine.load_state(out["nvme"]["sharded"])
    out["nvme_z1"] = T.run_iters(engine, ctx, range(SAVE, T.ITERS))
    return out


@pytest.fixture(scope="module")
def runs(deepspeed_aio_op, tmp_path_factory):
    return spawn(world2, 2, str(tmp_path_factory.mktemp("ds_nvme")), timeout=300)


def test_nvme_offload_trains_and_its_sharded_checkpoint_resumes(runs):
    """ZeRO-3 with optimizer state and parameters offloaded to NVMe (a directory of the test's tmp dir,
    written through DeepSpeed's async_io op): the optimizer state is in swap files, the run equals
    the in-memory one, its sharded checkpoint (each rank's partitions read through the swapper)
    resumes on NVMe bit for bit and in memory at ZeRO-1 within the cross-stage bounds."""
    nvme = runs["nvme"]
    assert nvme["swapped"] == [True, True]
    kinds = sorted(f.rsplit("-", 1)[0] if "-" in f else "fp32" for f in nvme["files"])  # exp_avg-<id>.tensor.swp
    assert kinds == ["exp_avg", "exp_avg_sq", "fp32"], nvme["files"]
    e = T.errors("ZeRO-3 on NVMe vs in memory", nvme, runs["memory"])
    assert e["loss"] <= 1e-6 and e["weights"] <= 1e-5, e
    assert runs["nvme_r"]["loss"] == nvme["loss"][SAVE:]
    for k, v in nvme["weights"].items():
        assert torch.equal(runs["nvme_r"]["weights"][k], v), k
    e = T.errors("NVMe checkpoint -> ZeRO-1 in memory vs uninterrupted", runs["nvme_z1"], nvme, offset=SAVE)
    assert e["loss"] <= 1e-6 and e["weights"] <= 1e-5, e

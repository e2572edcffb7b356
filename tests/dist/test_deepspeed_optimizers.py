"""DeepSpeed's own Adam optimizers (the config's "optimizer" section) in forge-train's sharded
checkpoint: FusedAdam (what ``"type": "AdamW"`` builds on this accelerator: the fused_adam op, the
cpu_adam kernel on a CPU) and DeepSpeedCPUAdam (the same section with ``offload_optimizer: cpu``),
both JIT-built once per machine (the ``deepspeed_adam_ops`` fixture, tests/dist/conftest.py).

One DP=2 world, checkpoints before iteration SAVE (SAVE steps done: the next step is 5, where
DeepSpeed's CPU kernel's running beta2^t product and pow(0.99, 5) differ in the last bit, so a
resume that did not replay the product would show; train/deepspeed_adam.py):

  torch     our torch AdamW at ZeRO-1, uninterrupted: the reference of the kernels' parity
  fused     FusedAdam ZeRO-1, uninterrupted, sharded checkpoint at SAVE
  fused1    FusedAdam ZeRO-1 resumed from it: bit for bit; ``no_replay`` the same without the
            replay of the kernel's product (the control: its weights must differ)
  fused3    FusedAdam ZeRO-3 resumed from it (ZeRO-1 -> ZeRO-3), checkpoint at SAVE + 2
  native    forge_dist's ParallelEngine (torch AdamW) resumed from that, checkpoint at SAVE + 3
  cpu2      DeepSpeedCPUAdam, ZeRO-2 offload_optimizer (shipped config), resumed from the native one
  fused0    FusedAdam at stage 0 (one state per parameter, only the last one's step advances)
            resumed from the native one, checkpoint at SAVE + 4, which torch ZeRO-2 resumes (torch2)
  cpu3      DeepSpeedCPUAdam, ZeRO-3 offload_param + offload_optimizer (shipped config),
            uninterrupted, checkpoint at SAVE; cpu3r resumed from it: bit for bit

Bounds: a run and its resume on the same optimizer and stage: equal. Across ZeRO stages on one
optimizer: the bounds of test_deepspeed_resharding.py (loss 1e-6, weights 1e-5). Across kernels
(torch AdamW against DeepSpeed's CPU kernel, which rounds differently: AVX-512 lanes, its own order
of the bias corrections): KERNEL (relative) on losses and weights over 10 iterations. The shipped
*_cpu_adam.json configs are the ones cpu2 and cpu3 train.
"""
import os

import pytest
import torch

from forge_dist.testing.spawn import spawn

import deepspeed_harness as T

# the first test's setup builds DeepSpeed's fused_adam and cpu_adam ops on a fresh machine (about
# 125 s on an idle 2-core one: docs/deepspeed.md) before the world runs; cached, a few seconds
pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(900)]

SAVE = 4
KERNEL = 5e-6  # measured worst 6.3e-7 (weights; losses 1.1e-7): printed by pytest -s


def ds_optimizer(stage):
    """T.ds_config with DeepSpeed's own optimizer: FusedAdam (no offload)."""
    cfg = T.ds_config(stage)
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
    return cfg


def shipped(name):
    return os.path.join(T.CONFIGS, name)


def resumed(config, checkpoint, start, stop=T.ITERS, stage=None, **save):
    """A DeepSpeed run (``config``) resumed from ``checkpoint`` over range(start, stop)."""
    engine, ctx = T.make_engine(stage, config=config)
    engine.load_state(checkpoint)
    out = T.run_iters(engine, ctx, range(start, stop), **save)
    out["optimizer"] = type(engine.inner_optimizer).__name__
    return out


def world2(rank, world, workdir):
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.topology import Topology
    from forge_dist.train import deepspeed_adam

    T.quiet()
    at = lambda name: os.path.join(workdir, name)  # noqa: E731
    out = {"torch": T.run_iters(*T.make_engine(1), range(T.ITERS))}
    engine, ctx = T.make_engine(None, config=ds_optimizer(1))
    out["fused"] = T.run_iters(engine, ctx, range(T.ITERS), sharded_to=at("fused"), sharded_at=SAVE)
    out["fused"]["optimizer"] = type(engine.inner_optimizer).__name__
    s_fused = out["fused"]["sharded"]
    out["fused1"] = resumed(ds_optimizer(1), s_fused, SAVE)
    kernel_step = deepspeed_adam._cpu_kernel_step
    deepspeed_adam._cpu_kernel_step = lambda opt: None  # the control: no replay of the kernel's product
    try:
        out["no_replay"] = resumed(ds_optimizer(1), s_fused, SAVE)
    finally:
        deepspeed_adam._cpu_kernel_step = kernel_step
    out["fused3"] = resumed(ds_optimizer(3), s_fused, SAVE, sharded_to=at("fused3"), sharded_at=SAVE + 2)
    engine, ctx = T.native_engine(out["fused3"]["sharded"], ProcessGroups.build(Topology(world)))
    out["native"] = T.run_native(engine, ctx, range(SAVE + 2, T.ITERS), sharded_to=at("native"),
                                 sharded_at=SAVE + 3)
    s_native = out["native"]["sharded"]
    out["cpu2"] = resumed(shipped("zero2_offload_optimizer_cpu_adam.json"), s_native, SAVE + 3)
    out["fused0"] = resumed(ds_optimizer(0), s_native, SAVE + 3, sharded_to=at("fused0"), sharded_at=SAVE + 4)
    out["torch2"] = resumed(None, out["fused0"]["sharded"], SAVE + 4, stage=2)
    config = shipped("zero3_offload_param_cpu_adam.json")
    engine, ctx = T.make_engine(None, config=config)
    out["cpu3"] = T.run_iters(engine, ctx, range(T.ITERS), sharded_to=at("cpu3"), sharded_at=SAVE)
    out["cpu3"]["optimizer"] = type(engine.inner_optimizer).__name__
    out["cpu3r"] = resumed(config, out["cpu3"]["sharded"], SAVE)
    return out


@pytest.fixture(scope="module")
def runs(deepspeed_adam_ops, tmp_path_factory):
    return spawn(world2, 2, str(tmp_path_factory.mktemp("ds_optimizers")), timeout=300)


def test_deepspeeds_optimizers_are_built(runs):
    assert [runs[n]["optimizer"] for n in ("fused", "fused1", "fused3", "fused0")] == ["FusedAdam"] * 4
    assert [runs[n]["optimizer"] for n in ("cpu2", "cpu3", "cpu3r")] == ["DeepSpeedCPUAdam"] * 3
    assert runs["torch2"]["optimizer"] == "AdamW"


def test_deepspeeds_kernels_match_torch_adamw(runs):
    """Same seed, batches and rates: FusedAdam (ZeRO-1) and DeepSpeedCPUAdam (ZeRO-3, offloaded)
    against torch AdamW (ZeRO-1), from scratch, within the kernels' rounding."""
    for name in ("fused", "cpu3"):
        e = T.errors(f"{name} vs torch AdamW", runs[name], runs["torch"])
        assert e["loss"] <= KERNEL and e["weights"] <= KERNEL, (name, e)
    assert runs["fused"]["weights"].keys() == runs["torch"]["weights"].keys()
    differ = [k for k, v in runs["torch"]["weights"].items() if not torch.equal(runs["fused"]["weights"][k], v)]
    assert differ, "FusedAdam's weights equal torch AdamW's bit for bit: the kernel did not run"


def test_resume_on_the_same_optimizer_and_stage_is_exact(runs):
    """FusedAdam ZeRO-1 and DeepSpeedCPUAdam ZeRO-3 resumed from their own sharded checkpoints
    continue bit for bit; without replaying the CPU kernel's beta^t product they do not."""
    for resumed_run, full in (("fused1", "fused"), ("cpu3r", "cpu3")):
        assert runs[resumed_run]["loss"] == runs[full]["loss"][SAVE:], resumed_run
        for k, v in runs[full]["weights"].items():
            assert torch.equal(runs[resumed_run]["weights"][k], v), (resumed_run, k)
    control = runs["no_replay"]
    assert any(not torch.equal(control["weights"][k], v) for k, v in runs["fused"]["weights"].items())


def test_sharded_checkpoint_across_stages_engines_and_kernels(runs):
    """FusedAdam ZeRO-1 -> FusedAdam ZeRO-3 -> native (torch AdamW) -> DeepSpeedCPUAdam ZeRO-2 and
    FusedAdam stage 0 -> torch ZeRO-2, each continuing the uninterrupted FusedAdam run."""
    e = T.errors("FusedAdam ZeRO-1 -> ZeRO-3 vs uninterrupted", runs["fused3"], runs["fused"], offset=SAVE)
    assert e["loss"] <= 1e-6 and e["weights"] <= 1e-5, e
    for name, offset in (("native", SAVE + 2), ("cpu2", SAVE + 3), ("fused0", SAVE + 3), ("torch2", SAVE + 4)):
        e = T.errors(f"{name} resumed vs uninterrupted FusedAdam", runs[name], runs["fused"], offset=offset)
        assert e["loss"] <= KERNEL and e["weights"] <= KERNEL, (name, e)


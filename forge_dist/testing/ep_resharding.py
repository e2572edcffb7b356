"""forge-train's sharded checkpoint saved at EP=2 x TP=2 (experts TP-split inside) and resumed at
other layouts, in the world of 4 of forge_dist.testing.ep_deepspeed (its model, batches, run and
errors: losses and grad norms per iteration, the fp32 weights after the last, against the
uninterrupted run from SAVE_AT on).

  native  the native engine at EP2xTP2 (ZeRO-1), sharded checkpoint at SAVE_AT, resumed by the native
          engine at EP1 x TP2 x DP2 (ZeRO-1), EP2 x TP1 x DP2 (no ZeRO), EP4 (ZeRO-1), EP2 x TP2 with
          whole experts (expert_tensor_parallel_size 1), and by DeepSpeed at EP4 ZeRO-2
  ds      DeepSpeed at EP2xTP2 ZeRO-2 (the uninterrupted run of ep_deepspeed's RUNS), resumed by
          DeepSpeed at EP1 x TP2 x DP2 ZeRO-1 and by the native engine at EP2 x DP2
  into    ep_deepspeed's DeepSpeed EP4 ZeRO-2 checkpoint resumed by the native engine at EP2xTP2
  one     (the test process, no world) one process resumes each of the two (resume_one_process)
  control the native checkpoint resumed at EP2 x DP2 with each rank's two local experts swapped
          after the load (what a local-for-global index mix-up does): must fail the comparison
"""
from __future__ import annotations

import os
from typing import Dict

import torch

from forge_dist.testing.ep_deepspeed import ITERS, SAVE_AT, errors, make_engine, make_native, run, run_ds_ep

NATIVE_RESUMES = {"native_TP2xDP2_z1": ("TP2xDP2", 1), "native_EP2xDP2_z0": ("EP2xDP2", 0),
                  "native_EP4_z1": ("EP4", 1), "native_EP2xTP2_ETP1_z1": ("EP2xTP2_ETP1", 1)}


def _swap_local_experts(model) -> None:
    """The control: each placed layer's first two local experts exchange their weights."""
    from forge_dist.parallel.expert import ExpertParallelExperts

    for m in model.modules():
        if isinstance(m, ExpertParallelExperts) and m.n_local >= 2:
            a, b = m.local_experts()[:2]
            with torch.no_grad():
                for pa, pb in zip(a.parameters(), b.parameters()):
                    tmp = pa.detach().clone()
                    pa.copy_(pb)
                    pb.copy_(tmp)


def run_ds_ep_world(rank: int, world: int, workdir: str) -> Dict:
    """test_expert_deepspeed's worker, on every rank of a world of 4: ep_deepspeed.run_ds_ep's parity
    runs and resumes, then the EP2 x TP2 resharding below; rank 0's dict is the result."""
    out = run_ds_ep(rank, world, workdir)
    out.update(ep_tp_resharding(out, world, workdir))
    out.pop("uninterrupted")
    out.pop("ds_EP2xTP2")
    return out


def ep_tp_resharding(out: Dict, world: int, workdir: str) -> Dict:
    """On every rank of run_ds_ep_world's world; ``out["ds_EP2xTP2"]``: the uninterrupted DeepSpeed
    EP2xTP2 ZeRO-2 run with its sharded checkpoint (``["sharded"]``), ``out["uninterrupted"]`` the EP4
    ZeRO-2 one (its checkpoint in ``out["saved_sharded"]``). Returns {case: errors} (rank 0's
    matter; None where this rank gathered no weights) and both uninterrupted runs with their paths."""
    def compare(got, ref):
        return errors(got, ref, SAVE_AT) if got["weights"] is not None and ref["weights"] else None

    res: Dict = {}
    engine, ctx = make_native("top2", "EP2xTP2", world)
    native = run(engine, ctx, range(ITERS), sharded_to=os.path.join(workdir, "native_EP2xTP2_s"))
    for name, (layout, stage) in NATIVE_RESUMES.items():
        engine, ctx = make_native("top2", layout, world, zero_stage=stage)
        engine.load_state(native["sharded"])
        res[name] = compare(run(engine, ctx, range(SAVE_AT, ITERS)), native)
    engine, ctx = make_engine("top2", "EP4", 2, world)
    engine.load_state(native["sharded"])
    res["native->ds_EP4_z2"] = compare(run(engine, ctx, range(SAVE_AT, ITERS)), native)
    engine, ctx = make_native("top2", "EP2xDP2", world, zero_stage=0)
    engine.load_state(native["sharded"])
    _swap_local_experts(engine.model)
    res["control_swapped_experts"] = compare(run(engine, ctx, range(SAVE_AT, ITERS)), native)

    ds = out["ds_EP2xTP2"]
    engine, ctx = make_engine("top2", "TP2xDP2", 1, world)
    engine.load_state(ds["sharded"])
    res["ds->ds_TP2xDP2_z1"] = compare(run(engine, ctx, range(SAVE_AT, ITERS)), ds)
    engine, ctx = make_native("top2", "EP2xDP2", world)
    engine.load_state(ds["sharded"])
    res["ds->native_EP2xDP2_z1"] = compare(run(engine, ctx, range(SAVE_AT, ITERS)), ds)
    engine, ctx = make_native("top2", "EP2xTP2", world)  # into EP2xTP2: ep_deepspeed's EP4 ZeRO-2 checkpoint
    engine.load_state(out["saved_sharded"])
    res["ds_EP4->native_EP2xTP2_z1"] = compare(run(engine, ctx, range(SAVE_AT, ITERS)), out["uninterrupted"])
    res["bucketed_reduction_equal"] = bucketed_reduction_equal(world)
    strip = lambda r: {k: r[k] for k in ("loss", "grad_norm", "weights", "sharded")}  # noqa: E731
    return {"ep_tp_resharding": res, "EP2xTP2_runs": {"native": strip(native), "ds": strip(ds)}}


def bucketed_reduction_equal(world: int) -> bool:
    """reduce_expert_gradients at EP2 x DP2 (expert_dp of two ranks) in buckets of 64 bytes (four
    all-reduces here) gives exactly what one bucket gives."""
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.parallel.expert import grads
    from forge_dist.parallel.groups import ProcessGroups

    groups = ProcessGroups.build(ParallelConfig(expert_parallel_size=2).topology(world))
    g, rank = torch.Generator(), torch.distributed.get_rank()
    got = []
    for cap in (grads.BUCKET_BYTES, 64):
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 17, 5, 30)]
        for p in params:
            p.allreduce, p.grad = False, torch.randn(p.shape, generator=g.manual_seed(100 * rank + p.numel()))
        real, grads.BUCKET_BYTES = grads.BUCKET_BYTES, cap
        try:
            grads.reduce_expert_gradients(params, groups)
        finally:
            grads.BUCKET_BYTES = real
        got.append([p.grad for p in params])
    return all(torch.equal(a, b) for a, b in zip(*got)) and len(list(grads._buckets(got[1], 64))) == 4


def resume_one_process(uninterrupted: Dict) -> Dict:
    """In a process with no world: the sharded checkpoint of ``uninterrupted`` (a run's dict with
    its path in ``sharded``) resumed by LocalEngine on the global batch, against that run."""
    from forge_dist.testing.ep_deepspeed import (ACCUM, CLIP, ITERS, SAVE_AT, _model, _train_config, errors, lr,
                                                 micro_batch)
    from forge_dist.testing.local_run import local_engine, run_local

    model = _model("top2")
    engine = local_engine(model, _train_config(1), CLIP)
    engine.load_state(uninterrupted["sharded"])
    v, b = model.config.vocab_size, model.config.block_size
    got = run_local(engine, model, range(SAVE_AT, ITERS), lambda it: [micro_batch(it, m, v, b) for m in range(ACCUM)],
                    lr)
    return errors(got, uninterrupted, SAVE_AT)

"""Sharded initialisation (forge_dist.parallel.materialize): a tensor-parallel rank that builds on
the meta device, applies the plan and materialises only its shards holds exactly the slices of a
full single-process build, for every tensor-parallel test case; a rank resumed from a checkpoint
reads its slices tensor by tensor. Exact equality: the values come from the same streams."""
import os

import pytest
import torch

from forge_dist.testing.spawn import spawn

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    if list(sa) != list(sb):
        return f"names differ: {sorted(set(sa) ^ set(sb))[:4]}"
    bad = [n for n in sa if sa[n].shape != sb[n].shape or not torch.equal(sa[n], sb[n])]
    return f"values differ: {bad[:4]}" if bad else None


def compare_cases(rank, world_size, tp, selection, workdir):
    from forge_dist import ModelConfig
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.errors import ConfigError
    from forge_dist.io import save_pretrained
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.io.weights_reader import load_shards
    from forge_dist.parallel.materialize import materialize_shards
    from forge_dist.parallel.parallelize import parallelize
    from forge_dist.parallel.topology import Topology
    from forge_dist.testing.parity import select_cases

    groups = ProcessGroups.build(Topology(world_size, tp=tp))
    pc = ParallelConfig(tensor_parallel_size=tp)
    out = {}
    for name, kwargs in select_cases(selection):
        cfg = ModelConfig(**kwargs)
        try:
            torch.manual_seed(3)
            ref = parallelize(GPT(cfg), groups, pc)
        except ConfigError:
            out[name] = "refused"
            continue
        torch.manual_seed(3)
        deferred = GPT(cfg, defer_init=True)
        assert any(p.is_meta for p in deferred.parameters())
        parallelize(deferred, groups, pc)
        materialize_shards(deferred, groups)
        out[name] = _states_equal(ref, deferred) or "same"
    # resume: a full single-process checkpoint read shard by shard
    cfg = ModelConfig(**select_cases("core")[0][1])
    torch.manual_seed(5)
    full = GPT(cfg)
    path = os.path.join(workdir, "model")
    if rank == 0:
        save_pretrained(full, path)
    torch.distributed.barrier()
    ref = parallelize(full, groups, pc)
    torch.manual_seed(6)  # other drawn weights: loading must overwrite them all
    loaded = GPT(cfg, defer_init=True)
    parallelize(loaded, groups, pc)
    load_shards(loaded, path, groups)
    out["<resume>"] = _states_equal(ref, loaded) or "same"
    return out


@pytest.mark.timeout(200)
def test_sharded_init_equals_sliced_full_build_for_every_case(tmp_path):
    per_rank = spawn(compare_cases, 2, 2, "all", str(tmp_path), timeout=180, return_all=True)
    for rank, result in enumerate(per_rank):
        wrong = {k: v for k, v in result.items() if v not in ("same", "refused")}
        assert not wrong, f"rank {rank}: {wrong}"
        assert sum(v == "same" for v in result.values()) > len(result) // 2

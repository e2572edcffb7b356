"""RNG regions: dropout masks identical on TP ranks where activations are replicated and different
where they are sharded (attention heads; the residual stream under sequence parallelism);
replicas stay identical under dropout; activation checkpointing replays the same masks."""
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from forge_dist import ModelConfig
from forge_dist.config.parallel import ParallelConfig
from forge_dist.model.gpt import GPT
from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.parallelize import parallelize
from forge_dist.parallel.tensor.metadata import shard_info, tp_grad_sync
from forge_dist.parallel.tensor.random import RNGTracker, seed_everything
from forge_dist.parallel.topology import Topology
from forge_dist.testing.spawn import spawn

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, dropout=0.3)


def gathered(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def same_on_ranks(t) -> bool:
    a, b = gathered(t)
    return torch.equal(a, b)


def tracker_semantics(groups, failures):
    tracker = RNGTracker(groups.tp.rank)
    seed_everything(1234, groups)
    start = torch.get_rng_state()

    def draws():
        out = {"before": torch.rand(4)}
        with tracker.fork("sharded"):
            out["sharded"] = torch.rand(4)
            with tracker.fork("replicated"):
                out["nested replicated"] = torch.rand(4)
            out["sharded again"] = torch.rand(4)
        with tracker.fork("replicated"):
            out["replicated"] = torch.rand(4)
        out["after"] = torch.rand(4)
        return out

    first = draws()
    expect_equal = {"before": True, "sharded": False, "nested replicated": True, "sharded again": False,
                    "replicated": True, "after": True}
    for key, equal in expect_equal.items():
        if same_on_ranks(first[key]) != equal:
            failures.append(f"tracker: {key} draws {'differ' if equal else 'agree'} across TP ranks")
    if torch.equal(first["sharded"], first["sharded again"]):
        failures.append("tracker: the sharded stream did not continue after a nested region")
    torch.set_rng_state(start)  # what activation checkpointing does before recomputing
    again = draws()
    if any(not torch.equal(first[k], again[k]) for k in first) or tracker.depth != 0:
        failures.append("tracker: replay from the same global state gave different draws")


def record_dropout():
    """Patch F.dropout to record (ndim, dropped positions) of every call."""
    calls, original = [], F.dropout

    def recording(x, p=0.5, training=True, inplace=False):
        y = original(x, p, training, inplace)
        calls.append((x.dim(), (y == 0) & (x != 0), (x != 0).sum().item()))
        return y

    return calls, mock.patch.object(F, "dropout", recording)


def masks_follow_sharding(groups, failures):
    cfg = ModelConfig(**{**TINY, "n_layer": 1, "dropout": 0.5, "disable_flash_attention": True})
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for sp in (False, True):
        torch.manual_seed(0)
        model = parallelize(GPT(cfg), groups, ParallelConfig(tensor_parallel_size=2, sequence_parallel=sp))
        seed_everything(7, groups)
        calls, patch = record_dropout()
        with patch:
            model(x, x)
        kinds = [ndim for ndim, _, _ in calls]
        if kinds != [3, 4, 3, 3]:  # embedding, attention probabilities, attention output, MLP output
            failures.append(f"sp={sp}: unexpected dropout calls {kinds}")
            continue
        for (ndim, mask, nonzero), name in zip(calls, ["embedding", "attention probs", "attention output",
                                                       "mlp output"]):
            replicated = ndim == 3 and not sp
            if same_on_ranks(mask) != replicated:
                failures.append(f"sp={sp}: {name} masks {'differ' if replicated else 'agree'} across TP ranks")
            rate = mask.sum().item() / nonzero  # p = 0.5 of the entries that were not already zero
            if not 0.35 < rate < 0.65:
                failures.append(f"sp={sp}: {name} dropped {rate:.2f} of its entries with p=0.5")


def replicas_stay_identical(groups, failures):
    """With dropout on, every replicated parameter's gradient is identical on both TP ranks (after
    tp_grad_sync), so replicated activations saw identical masks; the loss agrees too."""
    for sp in (False, True):
        for fused in (True, False):
            cfg = ModelConfig(**{**TINY, "disable_flash_attention": not fused})
            torch.manual_seed(0)
            model = parallelize(GPT(cfg), groups, ParallelConfig(tensor_parallel_size=2, sequence_parallel=sp))
            seed_everything(11, groups)
            x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
            loss = model(x, x)[1]
            loss.backward()
            tp_grad_sync(model, groups)
            if not same_on_ranks(loss.detach()):
                failures.append(f"sp={sp} fused={fused}: loss differs across TP ranks")
            for n, p in model.named_parameters():
                if shard_info(p).dim is None and not same_on_ranks(p.grad):
                    failures.append(f"sp={sp} fused={fused}: replicated {n} has different gradients")


def checkpointing_replays_masks(groups, failures):
    for sp in (False, True):
        grads = []
        for ckpt in (False, True):
            cfg = ModelConfig(**{**TINY, "use_gradient_checkpointing": ckpt, "disable_flash_attention": True})
            torch.manual_seed(0)
            model = parallelize(GPT(cfg), groups, ParallelConfig(tensor_parallel_size=2, sequence_parallel=sp))
            seed_everything(5, groups)
            x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
            model(x, x)[1].backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        bad = [n for n in grads[0] if not torch.allclose(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-7)]
        if bad:
            failures.append(f"sp={sp}: checkpointed gradients differ (masks not replayed): {bad[:3]}")


def _rank_fn(rank, world_size):
    groups = ProcessGroups.build(Topology(world_size, tp=2))
    failures = []
    for check in (tracker_semantics, masks_follow_sharding, replicas_stay_identical, checkpointing_replays_masks):
        check(groups, failures)
    return failures


@pytest.mark.timeout(180)
def test_dropout_masks_follow_the_sharding():
    per_rank = spawn(_rank_fn, 2, timeout=150, return_all=True)
    assert per_rank == [[], []], "\n".join(f for fs in per_rank for f in fs)

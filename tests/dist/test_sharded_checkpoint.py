"""Sharded checkpoints on torch.distributed.checkpoint (forge_dist.train.sharded_checkpoint):
written at TP=2 x DP=2 after an AdamW step, each rank writing only its pieces, then resumed at
TP=1 (DP=4), TP=2 and (from an async save, taken before the weights moved on) TP=4: weights and AdamW moments equal, bit for bit, the slices of the saved
state, and the next step's loss equals the single-process run's (fp32). The index is JSON: a
pickled DCP ``.metadata`` planted beside it is never read."""
import os

import pytest
import torch

from forge_dist.testing.spawn import spawn

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def _train_step(model, opt, x, y, groups):
    from forge_dist.parallel.tensor.metadata import tp_grad_sync

    opt.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    if groups is not None:
        tp_grad_sync(model, groups)
    opt.step()
    return float(loss.detach())


def resume_layouts(rank, world_size, path):
    import pickle

    from forge_dist import ModelConfig
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.materialize import materialize_shards
    from forge_dist.parallel.parallelize import parallelize
    from forge_dist.parallel.tensor.metadata import gather_full_state_dict, shard_info, shard_tensor
    from forge_dist.parallel.topology import Topology
    from forge_dist.testing.models import TINY
    from forge_dist.train.sharded_checkpoint import async_save_sharded, load_sharded, save_sharded

    cfg = ModelConfig(**{**TINY, "vocab_size": 65, "dropout": 0.0})  # 65: vocab padding at TP=2, 4
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 65, (2, cfg.block_size), generator=g),
                torch.randint(0, 65, (2, cfg.block_size), generator=g)) for _ in range(2)]

    def build(tp, seed=0):
        groups = ProcessGroups.build(Topology(world_size, tp=tp))
        torch.manual_seed(seed)
        model = GPT(cfg, defer_init=True)
        parallelize(model, groups, ParallelConfig(tensor_parallel_size=tp))
        materialize_shards(model, groups)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), groups

    torch.manual_seed(0)
    ref = GPT(cfg)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    ref_losses = [_train_step(ref, ref_opt, *batches[0], None)]
    moments = {(name, key): ref_opt.state[p][key].clone() for name, p in ref.named_parameters()
               for key in ("exp_avg", "exp_avg_sq")}
    ref_losses.append(_train_step(ref, ref_opt, *batches[1], None))

    model, opt, groups = build(2)
    _train_step(model, opt, *batches[0], groups)
    saved = {k: v.clone() for k, v in gather_full_state_dict(model, groups).items()}
    files = save_sharded(path, model, opt, groups)
    future, _ = async_save_sharded(path + "-async", model, opt, groups)
    for p in model.parameters():  # training goes on: the async save staged its copy already
        p.data.add_(1.0)
    future.result()
    torch.distributed.barrier()
    if rank == 0:
        with open(os.path.join(path, ".metadata"), "wb") as fh:  # DCP's pickled index: must be ignored
            pickle.dump(_Boom(), fh)
    torch.distributed.barrier()
    out = {"files": files, "listing": sorted(os.listdir(path))}
    for tp in (1, 2, 4):
        model, opt, groups = build(tp, seed=9)  # other initial values: the load must replace them all
        load_sharded(path if tp != 4 else path + "-async", model, opt, groups)
        wrong = []
        for name, p in model.named_parameters():
            info = shard_info(p)
            want = saved[name] if info is None else shard_tensor(saved[name], info, groups.tp.rank, tp)
            if not torch.equal(p.detach(), want):
                wrong.append(name)
            for key in ("exp_avg", "exp_avg_sq"):
                full = moments[(name, key)]
                local = full if info is None else shard_tensor(full, info, groups.tp.rank, tp)
                if not torch.allclose(opt.state[p][key], local, rtol=1e-4, atol=1e-7):
                    wrong.append(f"{name}.{key}")
            if int(opt.state[p]["step"]) != 1:
                wrong.append(f"{name}.step")
        loss = _train_step(model, opt, *batches[1], groups)
        out[tp] = (wrong, loss, ref_losses[1])
    return out


class _Boom:
    def __reduce__(self):
        return (os._exit, (13,))  # unpickling it would kill the rank


@pytest.mark.timeout(200)
def test_sharded_checkpoint_resumes_at_tp1_tp2_tp4(tmp_path):
    per_rank = spawn(resume_layouts, 4, str(tmp_path / "ckpt"), timeout=180, return_all=True)
    for rank, out in enumerate(per_rank):
        assert out["files"], f"rank {rank} wrote nothing"
        for tp in (1, 2, 4):
            wrong, loss, ref = out[tp]
            assert not wrong, f"rank {rank}, TP={tp}: {wrong[:6]}"
            assert loss == pytest.approx(ref, rel=1e-5, abs=1e-6), (rank, tp)
    assert ".metadata.json" in per_rank[0]["listing"]

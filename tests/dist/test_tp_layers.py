"""Parallel layers against their full torch counterparts (column, row, column->row with sequence
parallelism, vocab-parallel embedding, cross-entropy and LM head), shard metadata, and the
refusal of modules without a rule. Tolerance: 1e-6 relative/absolute (fp32 sums over 2-4 ranks)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_dist import ModelConfig
from forge_dist.config.parallel import ParallelConfig
from forge_dist.model.gpt import GPT
from forge_dist.model.norm import RMSNorm
from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.parallelize import parallelize
from forge_dist.parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear
from forge_dist.parallel.tensor.metadata import (ShardInfo, gather_full_state_dict, shard_info, shard_tensor,
                                                 tp_grad_sync, unshard)
from forge_dist.parallel.tensor.plan import NoShardingRuleError, Plan
from forge_dist.parallel.tensor.rules import TP_RULES
from forge_dist.parallel.tensor.vocab import (VocabParallelEmbedding, VocabParallelLMHead, padded_vocab_size,
                                              vocab_parallel_cross_entropy)
from forge_dist.parallel.topology import Topology
from forge_dist.testing.spawn import spawn

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=61)


# --- pure: metadata layouts and refusals ---------------------------------------------------------
@pytest.mark.parametrize("info", [
    ShardInfo((8, 3), 0, 4), ShardInfo((3, 8), 1, 4), ShardInfo((8, 3), 0, 2),  # 2 shards on 4 ranks
    ShardInfo((16, 3), 0, 4, segments=2), ShardInfo((61, 5), 0, 4, padded_size=64)])
def test_shard_unshard_roundtrip(info):
    full = torch.randn(info.full_shape)
    shards = [shard_tensor(full, info, r, 4) for r in range(4)]
    assert torch.equal(unshard(shards, info), full)
    if info.segments == 2:  # rank 1 holds rows 2-3 of each half [a | b]
        assert torch.equal(shards[1], torch.cat([full[2:4], full[10:12]]))
    if info.num_shards == 2:
        assert torch.equal(shards[0], shards[1]) and not torch.equal(shards[1], shards[2])
    if info.padded_size:
        assert shards[3].shape == (16, 5) and torch.equal(shards[3][13:], torch.zeros(3, 5))


def test_tp1_is_the_plain_model():
    cfg = ModelConfig(**TINY)
    torch.manual_seed(0)
    plain = GPT(cfg)
    model = parallelize(copy.deepcopy(plain), ProcessGroups.single(), ParallelConfig())
    x = torch.randint(0, 61, (2, 16))
    assert torch.equal(model(x, x)[1], plain(x, x)[1])  # bitwise: same ops at TP=1
    full = gather_full_state_dict(model, ProcessGroups.single())
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_refusal_names_the_module_and_changes_nothing(monkeypatch):
    monkeypatch.delitem(TP_RULES._rules, RMSNorm)
    model = GPT(ModelConfig(**TINY))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = ProcessGroups.layout(Topology(2, tp=2), rank=0)
    with pytest.raises(NoShardingRuleError, match=r"transformer\.h\.0\.pre_ln_attn \(forge_dist\.model\.norm\.RMSNorm"):
        parallelize(model, groups, ParallelConfig(tensor_parallel_size=2))
    assert type(model.transformer.wte) is nn.Embedding and type(model.transformer.h[0].attn.c_proj) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(shard_info(p) for p in model.parameters())


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.other = nn.Parameter(torch.ones(2))


def test_a_rule_that_forgets_a_parameter_is_refused(monkeypatch):
    monkeypatch.setitem(TP_RULES._rules, Scaled, lambda m, ctx: Plan())
    groups = ProcessGroups.layout(Topology(2, tp=2), rank=0)
    with pytest.raises(NoShardingRuleError, match=r"does not say how to shard its parameter 'scale'"):
        parallelize(nn.Sequential(Scaled()), groups, ParallelConfig(tensor_parallel_size=2))


class MaxScaled(nn.Module):
    """Parameter-free, but its numerics need the whole tensor (like per-tensor quantization)."""

    def forward(self, x):
        return x / x.abs().max()


def test_parameter_free_modules_that_need_a_rule_are_refused(monkeypatch):
    monkeypatch.setattr(TP_RULES, "_required", (MaxScaled,))
    groups = ProcessGroups.layout(Topology(2, tp=2), rank=0)
    with pytest.raises(NoShardingRuleError, match=r"^0\.1 \(.*MaxScaled\) is a MaxScaled, whose numerics depend"):
        parallelize(nn.Sequential(nn.Sequential(nn.Identity(), MaxScaled())), groups,
                    ParallelConfig(tensor_parallel_size=2))


# --- spawned: layers against full torch modules --------------------------------------------------
def close(name, got, expected, failures, tol=1e-6):
    if got is None or got.shape != expected.shape or not torch.allclose(got, expected, rtol=tol, atol=tol):
        diff = "n/a" if got is None or got.shape != expected.shape else f"{(got - expected).abs().max().item():.3g}"
        failures.append(f"{name}: shape {None if got is None else tuple(got.shape)} vs {tuple(expected.shape)}, "
                        f"max diff {diff}")


def _layers(rank, world_size):
    failures = []
    torch.manual_seed(0)  # the same full layers and inputs on every rank
    for tp in (2, 4):
        groups = ProcessGroups.build(Topology(world_size, tp=tp))
        g = groups.tp
        shard = lambda full, p: shard_tensor(full, shard_info(p), g.rank, g.size)  # noqa: E731
        x = torch.randn(2, 8, 16)

        # column with gather_output and copy input: output and input grad are full
        full = nn.Linear(16, 24)
        col = ColumnParallelLinear.from_linear(full, g, gather_output=True)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        full(xa).square().sum().backward()
        col(xb).square().sum().backward()
        close(f"tp={tp} column output", col(x), full(x), failures)
        close(f"tp={tp} column input grad", xb.grad, xa.grad, failures)
        close(f"tp={tp} column weight grad", col.weight.grad, shard(full.weight.grad, col.weight), failures)
        close(f"tp={tp} column bias grad", col.bias.grad, shard(full.bias.grad, col.bias), failures)

        # column with 2 distinct shards on tp ranks and a [a | b] layout; the replicas of a shard use
        # it for different parts of the computation (like a KV head serving each rank's own query
        # heads), so each gets part of the upstream gradient and tp_grad_sync sums the parts
        full = nn.Linear(16, 32)
        col = ColumnParallelLinear.from_linear(full, g, num_shards=2, segments=2)
        out_info = ShardInfo((2, 8, 32), 2, 2, segments=2)
        up = torch.randn(2, 8, 32)
        k = tp // 2  # replicas per shard
        part = (g.rank % k + 1) / (k * (k + 1) / 2)  # this replica's share; shares sum to 1
        (full(x) * up).sum().backward()
        (col(x) * shard_tensor(up, out_info, g.rank, g.size) * part).sum().backward()
        tp_grad_sync(col, groups)
        close(f"tp={tp} replicated column output", col(x), shard_tensor(full(x), out_info, g.rank, g.size), failures)
        close(f"tp={tp} replicated column weight grad", col.weight.grad, shard(full.weight.grad, col.weight), failures)

        # row with a replicated input split here; bias added once
        full = nn.Linear(16, 8)
        row = RowParallelLinear.from_linear(full, g, input_is_parallel=False)
        full(x).sum().backward()
        row(x).sum().backward()
        close(f"tp={tp} row output (bias once)", row(x), full(x), failures)
        close(f"tp={tp} row bias grad", row.bias.grad, full.bias.grad, failures)
        close(f"tp={tp} row weight grad", row.weight.grad, shard(full.weight.grad, row.weight), failures)

        # column -> row with sequence parallelism: sequence shards in and out
        up_full, down_full = nn.Linear(16, 32), nn.Linear(32, 16)
        up_tp = ColumnParallelLinear.from_linear(up_full, g, input_mode="sequence")
        down_tp = RowParallelLinear.from_linear(down_full, g, sequence_parallel=True)
        xa, xs = x.clone().requires_grad_(), g.split(x, 1).requires_grad_()
        y_full = down_full(F.gelu(up_full(xa)))
        y_tp = down_tp(F.gelu(up_tp(xs)))
        close(f"tp={tp} sequence-parallel pair output", y_tp, g.split(y_full, 1), failures)
        y_full.square().sum().backward()
        y_tp.square().sum().backward()
        tp_grad_sync(down_tp, groups)
        close(f"tp={tp} sequence-parallel pair input grad", xs.grad, g.split(xa.grad, 1), failures)
        close(f"tp={tp} sequence-parallel row bias grad (partial, synced)", down_tp.bias.grad, down_full.bias.grad,
              failures)

        # vocab-parallel embedding with a padded vocabulary of 61
        emb = nn.Embedding(61, 8)
        vemb = VocabParallelEmbedding.from_embedding(emb, g, divisible_by=4)
        ids = torch.randint(0, 61, (3, 7))
        emb(ids).square().sum().backward()
        vemb(ids).square().sum().backward()
        close(f"tp={tp} vocab embedding output", vemb(ids), emb(ids), failures)
        close(f"tp={tp} vocab embedding grad", vemb.weight.grad, shard(emb.weight.grad, vemb.weight), failures)
        if vemb.weight.shape[0] * tp != padded_vocab_size(61, tp, 4):
            failures.append(f"tp={tp} vocab shard rows {vemb.weight.shape[0]}")

        # vocab-parallel cross-entropy: equals F.cross_entropy, 3 all-reduces of N floats, no gather
        logits = torch.randn(40, 61) * 3
        targets = torch.randint(0, 61, (40,))
        targets[::7] = -1
        info = ShardInfo((40, 61), 1, tp, padded_size=padded_vocab_size(61, tp, 4))
        la = logits.clone().requires_grad_()
        lb = shard_tensor(logits, info, g.rank, tp).requires_grad_()
        ref = F.cross_entropy(la, targets, ignore_index=-1)
        with groups.count_collectives() as counter:
            loss = vocab_parallel_cross_entropy(lb, targets, g, g.rank * lb.shape[1], 61)
            loss.backward()
        ref.backward()
        close(f"tp={tp} vocab cross-entropy", loss, ref, failures)
        close(f"tp={tp} vocab cross-entropy grad", lb.grad, shard_tensor(la.grad, info, g.rank, tp), failures)
        if counter.summary() != {("forward", "all_reduce"): 3} or counter.nbytes() != 3 * 40 * 4:
            failures.append(f"tp={tp} cross-entropy collectives {counter.summary()} {counter.nbytes()} bytes")
        nan = vocab_parallel_cross_entropy(lb.detach(), torch.full((40,), -1), g, g.rank * lb.shape[1], 61)
        if not torch.isnan(nan):
            failures.append(f"tp={tp} all-ignored loss {nan} (torch gives nan)")

        # LM head: (None, loss) with targets; without, the full unpadded logits
        w = torch.randn(61, 8)
        head = VocabParallelLMHead(w, g, 61, softcap=2.0, divisible_by=4)
        h = torch.randn(2, 5, 8)
        t = torch.randint(0, 61, (2, 5))
        full_logits = 2.0 * torch.tanh(F.linear(h, w) / 2.0)
        logits_out, loss = head(h, t)
        close(f"tp={tp} head loss", loss, F.cross_entropy(full_logits.view(-1, 61), t.view(-1)), failures)
        close(f"tp={tp} head sampling logits", head(h)[0], full_logits, failures)
        if logits_out is not None:
            failures.append("the loss path must not return (gathered) logits")

        # a parallelized GPT: tying survives, padding is never predicted or updated
        torch.manual_seed(1)
        model = parallelize(GPT(ModelConfig(**TINY)), groups, ParallelConfig(tensor_parallel_size=tp))
        if model.lm_head.weight is not model.transformer.wte.weight:
            failures.append(f"tp={tp} weight tying lost")
        model(ids, ids)[1].backward()
        tp_grad_sync(model, groups)
        torch.optim.AdamW(model.parameters(), lr=1e-2).step()
        rows = model.transformer.wte.weight  # this rank's rows [rank * n, (rank + 1) * n) of the padded table
        pad = rows[min(max(61 - g.rank * rows.shape[0], 0), rows.shape[0]):]
        if pad.numel() and pad.abs().max().item() != 0.0:
            failures.append(f"tp={tp} padded vocab rows moved: {pad.abs().max().item()}")
        if model(ids)[0].shape != (3, 1, 61):
            failures.append(f"tp={tp} sampling logits shape {tuple(model(ids)[0].shape)}")
    return failures


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_parallel_layers_match_full_layers():
    per_rank = spawn(_layers, 4, timeout=200, return_all=True)
    assert per_rank == [[]] * 4, "\n".join(f for fs in per_rank for f in fs)

"""Optimizer, learning-rate schedules, the local engine and MFU: hand-computed expectations."""
import math

import pytest
import torch

from forge_dist.errors import ConfigError
from forge_dist.train.context import RunContext
from forge_dist.train.engine import LocalEngine
from forge_dist.train.metrics import MFU, flops_per_token, peak_flops
from forge_dist.train.optim import build_optimizer
from forge_dist.train.options import TrainConfig
from forge_dist.train.schedule import LRSchedule


def _cfg(**kw):
    return TrainConfig(device="cpu", **kw)


# --- schedules ------------------------------------------------------------------------------------
def test_constant_schedule_ignores_warmup():
    s = LRSchedule.from_config(_cfg(lr_scheduler="none", learning_rate=1e-3, warmup_iters=100))
    assert [s(0), s(50), s(10_000)] == [1e-3, 1e-3, 1e-3]


def test_cosine_with_warmup_values():
    s = LRSchedule.from_config(_cfg(lr_scheduler="cosine", learning_rate=1.0, min_lr=0.1, warmup_iters=4,
                                    lr_decay_iters=14, max_iters=20))
    assert s(0) == pytest.approx(1 / 5)  # lr (it+1)/(w+1)
    assert s(3) == pytest.approx(4 / 5)
    assert s(4) == pytest.approx(1.0)  # cos(0): the peak
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: (1 + cos(pi/2)) / 2 = 0.5
    assert s(14) == pytest.approx(0.1)
    assert s(19) == pytest.approx(0.1)


def test_cosine_decays_to_max_iters_by_default():
    s = LRSchedule.from_config(_cfg(lr_scheduler="cosine", learning_rate=2.0, min_lr=0.0, warmup_iters=0, max_iters=10))
    assert s(5) == pytest.approx(1.0)
    assert s(10) == 0.0


def test_step_schedule_values():
    s = LRSchedule.from_config(_cfg(lr_scheduler="step", learning_rate=1.0, warmup_iters=2, step_lr_size=3,
                                    step_lr_gamma=0.5))
    assert [s(i) for i in range(2, 10)] == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25])
    assert s(1) == pytest.approx(2 / 3)


def test_exponential_schedule_values():
    s = LRSchedule.from_config(_cfg(lr_scheduler="exponential", learning_rate=1.0, warmup_iters=0,
                                    exponential_gamma=0.9))
    assert [s(0), s(1), s(3)] == pytest.approx([1.0, 0.9, 0.729])


# --- optimizer ------------------------------------------------------------------------------------
def test_adamw_defaults_are_reallm_forge(tiny_config):
    from forge_dist.model.gpt import GPT

    model = GPT(tiny_config)
    opt = build_optimizer(model, _cfg(), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    (group,) = opt.param_groups  # one group, as upstream's train.py
    assert group["lr"] == 1e-3 and group["betas"] == (0.9, 0.99)
    assert group["weight_decay"] == 0.01 and group["eps"] == 1e-8
    assert len(group["params"]) == len(list(model.parameters()))  # the tied wte/lm_head once


def test_weight_decay_split(tiny_config):
    from forge_dist.model.gpt import GPT

    model = GPT(tiny_config.replace(bias=True))
    decay, no_decay = build_optimizer(model, _cfg(weight_decay_split=True), "cpu").param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = {id(p) for p in decay["params"]}
    assert id(model.transformer.wte.weight) in ids
    assert id(model.transformer.h[0].attn.c_attn_q.bias) not in ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_float16_refused_on_cpu_suggests_bfloat16():
    with pytest.raises(ConfigError, match="bfloat16"):
        TrainConfig(device="cpu", dtype="float16")


def test_auto_dtype_on_cpu_is_float32():
    assert TrainConfig(device="cpu").resolved_dtype == "float32"


# --- engine ---------------------------------------------------------------------------------------
def _engine(model, clip=0.0, dtype="float32"):
    opt = build_optimizer(model, _cfg(), "cpu")
    return LocalEngine(model, opt, "cpu", dtype, grad_clip=clip)


def test_accumulation_matches_one_big_batch(tiny_config):
    from forge_dist.model.gpt import GPT

    torch.manual_seed(0)
    x = torch.randint(0, 64, (8, 16))
    y = torch.randint(0, 64, (8, 16))
    grads, losses = [], []
    for batches in ([(x, y)], [(x[:4], y[:4]), (x[4:], y[4:])]):
        torch.manual_seed(1)
        model = GPT(tiny_config)
        losses.append(_engine(model).forward_backward(batches))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_step_clips_and_sets_lr(tiny_config):
    from forge_dist.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(tiny_config)
    engine = _engine(model, clip=1e-3)
    x = torch.randint(0, 64, (2, 16))
    engine.forward_backward([(x, x)])
    before = [p.detach().clone() for p in model.parameters()]
    stats = engine.step(lr=0.5)
    assert float(stats["grad_norm"]) > 1e-3  # the norm before clipping is reported
    assert engine.optimizer.param_groups[0]["lr"] == 0.5
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bfloat16_autocast_step_on_cpu(tiny_config):
    from forge_dist.model.gpt import GPT

    model = GPT(tiny_config)
    engine = _engine(model, dtype="bfloat16")
    x = torch.randint(0, 64, (2, 16))
    loss = engine.forward_backward([(x, x)])
    engine.step(1e-3)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_context_single_process_collectives():
    ctx = RunContext()
    assert ctx.is_main and not ctx.distributed
    assert ctx.any(True) and not ctx.any(False)
    assert ctx.mean(2.5) == 2.5


def test_context_from_a_dist_context():
    from types import SimpleNamespace

    from forge_dist.parallel.topology import Topology

    # rank 5 of a tp=2 x dp=4 grid: data-parallel replica 2
    dist_ctx = SimpleNamespace(rank=5, world_size=8, device="cpu", topology=Topology(8, tp=2))
    ctx = RunContext.from_dist(dist_ctx)
    assert (ctx.rank, ctx.world_size, ctx.dp_rank, ctx.dp_size, ctx.is_main) == (5, 8, 2, 4, False)
    plain = RunContext.from_dist(SimpleNamespace(rank=1, world_size=2, device="cpu", topology=None))
    assert (plain.dp_rank, plain.dp_size) == (1, 2)


# --- MFU ------------------------------------------------------------------------------------------
def test_flops_per_token_formula(tiny_config):
    from forge_dist.model.gpt import GPT

    model = GPT(tiny_config)
    n = model.num_params()  # non-embedding: without wpe (16 x 32)
    assert n == sum(p.numel() for p in model.parameters()) - 16 * 32
    # 6N + 12 L H Q T with L=2, H=4, Q=8, T=16
    assert flops_per_token(model) == 6 * n + 12 * 2 * 4 * 8 * 16


@pytest.mark.parametrize("name,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "float16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12),
    ("Tesla V100-SXM2-16GB", "bfloat16", None),
    ("NVIDIA A10G", "bfloat16", None),
    ("cpu", "float32", None),
])
def test_peak_table(name, dtype, peak):
    assert peak_flops(name, dtype) == peak


def test_mfu_unknown_device_says_so(tiny_config):
    from forge_dist.model.gpt import GPT

    model = GPT(tiny_config)
    mfu = MFU(model, "cpu", "float32")
    assert mfu(1e6) is None and mfu.reason == "MFU n/a (unknown peak for cpu)"
    given = MFU(model, "cpu", "float32", peak=1e12)
    assert given(1e6) == pytest.approx(1e6 * flops_per_token(model) / 1e12)
    assert math.isfinite(given(1.0))


def test_float16_scaler_stats_report_scale_and_skipped_steps():
    # an inf gradient makes GradScaler skip the step and halve the scale: both reach the metrics
    import torch.nn as nn

    from forge_dist.train.engine import LocalEngine

    model = nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = LocalEngine(model, opt, "cpu", "float16", grad_clip=0.0, compile=False)
    before = model.weight.detach().clone()
    engine.scaler.scale(model(torch.ones(1, 2)).sum()).backward()  # as forward_backward does
    model.weight.grad.fill_(float("inf"))
    stats = engine.step(1e-3)
    assert stats["skipped_steps"] == 1 and stats["loss_scale"] == 65536.0 * 0.5
    assert torch.equal(model.weight, before)  # the step was skipped
    engine.scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    stats = engine.step(1e-3)
    assert stats["skipped_steps"] == 1 and not torch.equal(model.weight, before)
    fp32 = LocalEngine(model, opt, "cpu", "float32", 0.0, False)
    model(torch.ones(1, 2)).sum().backward()
    assert set(fp32.step(1e-3)) == {"grad_norm"}

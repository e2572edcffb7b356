"""The model through the switch: a tiny GPT gives the same loss and gradients with the fused
kernels as with FORGE_OPS=reference, for norm and softmax variants (the kernels are the default)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from forge_dist import ModelConfig
from forge_dist.model.gpt import GPT
from forge_dist.ops import registry

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
NORM = {"norm_fwd", "norm_bwd"}
ATTN = {"attention_fwd", "attention_bwd"}
# Attention with a score normaliser runs the fused attention kernel (model/attention/fused.py): no
# elementwise or rownorm kernel call, the normaliser's formula runs inside it.
CONFIGS = {  # name -> (options, the forge_ops operators the step must run)
    "rmsnorm_softmax": (dict(norm_variant_attn="rmsnorm", norm_variant_output="rmsnorm"), NORM),
    "layernorm_consmax_v2": (dict(norm_variant_attn="layernorm", norm_variant_output="layernorm",
                                  softmax_variant_attn="consmax_v2"), NORM | ATTN),
    "prmsnorm_polymax": (dict(norm_variant_attn="prmsnorm", softmax_variant_attn="polymax"), NORM | ATTN),
    "hypersphere_strongermax": (dict(norm_variant_attn="hyperspherenorm", softmax_variant_attn="strongermax",
                                     strongermax_use_learned_obo_per_head=True,
                                     strongermax_use_learned_temperature_factor=True), NORM | ATTN),
    "rmsnorm_eps_sigsoftmax": (dict(rmsnorm_eps=1e-5, softmax_variant_attn="sigsoftmax"), NORM | ATTN),
    "relumax_window": (dict(softmax_variant_attn="relumax", window_size=5), NORM | ATTN),
}


class OpsSeen(TorchDispatchMode):
    """Records which forge_ops operators run (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "forge_ops":
            self.names.add(func._opname)
        return func(*args, **(kwargs or {}))


def loss_and_grads(config, idx):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, **config}))
    with OpsSeen() as seen:
        _, loss = model(idx, idx)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, seen.names


@pytest.mark.parametrize("name", CONFIGS)
def test_kernels_match_reference(name, monkeypatch):
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    config, expected_ops = CONFIGS[name]
    loss_k, grads_k, seen = loss_and_grads(config, idx)
    assert expected_ops <= seen, seen
    monkeypatch.setenv("FORGE_OPS", "reference")
    registry.refresh()
    try:
        loss_r, grads_r, seen_r = loss_and_grads(config, idx)
        assert not seen_r
    finally:
        monkeypatch.delenv("FORGE_OPS")
        registry.refresh()
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=1e-6)
    assert grads_k.keys() == grads_r.keys()
    for n in grads_k:
        torch.testing.assert_close(grads_k[n], grads_r[n], rtol=2e-4, atol=2e-6, msg=lambda m: f"{name} {n}: {m}")

"""Causal language modelling: changing token t+1 never changes the logits at positions <= t.

Parametrised over the registries at collection time, so variants other modules register are
covered without editing this file: every attention variant x every MLP variant, and every
attention variant x every position encoding. Train mode (dropout 0), as in training.
"""
import pytest
import torch

import forge_dist.model  # noqa: F401  (registers every variant)
from forge_dist import ModelConfig
from forge_dist.model.gpt import GPT
from forge_dist.variants import ATTENTION, MLP, SOFTMAX

POSITIONS = {
    "rope": dict(use_rotary_embeddings=True),
    "soap": dict(use_rotary_embeddings=True, rope_variant="soap", sym_rot_num_angles=8),
    "fire": dict(use_fire_embeddings=True),
    "fire_shared_nope": dict(use_fire_embeddings=True, shared_fire_embeddings=True, use_abs_pos_embeddings=False),
}
EXTRAS = {  # attention options whose masks or statistics could leak if done wrong
    "window_gqa": dict(window_size=3, n_head=4, n_kv_group=2),
    "lobo_softcap": dict(use_flash_lobo=True, use_flash_lobo_per_head=True, attn_logit_softcapping=10.0),
    "manual_qknorm": dict(disable_flash_attention=True, use_qk_norm=True, use_qk_norm_scale=True),
    "co4_loops": dict(triadic_loops=3, n_latent=2),
}


def assert_causal(cfg, T=12, positions=(0, 4, 10)):
    torch.manual_seed(0)
    model = GPT(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (2, T))
    targets = torch.zeros_like(idx)  # targets make the model return logits for every position
    base, _ = model(idx, targets)
    for t in positions:
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1 + torch.arange(2)) % cfg.vocab_size
        logits, _ = model(changed, targets)
        torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=1e-5,
                                   msg=f"position <= {t} changed when token {t + 1} changed")
        assert not torch.allclose(logits[:, t + 1:], base[:, t + 1:]), "the change had no effect at all"


def tiny(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("mlp", MLP.names())
@pytest.mark.parametrize("attention", ATTENTION.names())
def test_attention_and_mlp_are_causal(attention, mlp):
    assert_causal(tiny(attention_variant=attention, mlp_variant=mlp))


@pytest.mark.parametrize("position", POSITIONS, ids=POSITIONS.keys())
@pytest.mark.parametrize("attention", ATTENTION.names())
def test_attention_with_positions_is_causal(attention, position):
    assert_causal(tiny(attention_variant=attention, **POSITIONS[position]))


@pytest.mark.parametrize("extra", EXTRAS, ids=EXTRAS.keys())
@pytest.mark.parametrize("attention", ATTENTION.names())
def test_attention_options_are_causal(attention, extra):
    assert_causal(tiny(attention_variant=attention, **EXTRAS[extra]))


@pytest.mark.parametrize("softmax", SOFTMAX.names())
@pytest.mark.parametrize("attention", ["causal", "infinite", "mla"])
def test_softmax_variants_are_causal(attention, softmax):
    assert_causal(tiny(attention_variant=attention, softmax_variant_attn=softmax, use_flash_lobo=True))

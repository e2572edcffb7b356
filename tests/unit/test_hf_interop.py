"""Hugging Face transformers import/export against the real transformers package (offline).

Every architecture both ways: a tiny forge_dist model exported and loaded by
AutoModelForCausalLM gives our logits (fp32, 1e-5 relative); a tiny random transformers model
built here from a config imports with its logits; forge -> hf -> forge is bit-exact; greedy
generation agrees token for token, through AutoTokenizer for our byte/char tokenizers.
"""
import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded
os.environ["TRANSFORMERS_OFFLINE"] = "1"
import transformers  # noqa: E402  (requirements-cpu.txt; a missing package fails here, never skips)

from forge_dist.errors import CheckpointError, ConfigError  # noqa: E402
from forge_dist.io import convert  # noqa: E402
from forge_dist.io.hf import load_hf, save_hf  # noqa: E402
from forge_dist.testing.models import make_model, same_state  # noqa: E402

ROTARY = dict(use_abs_pos_embeddings=False, use_rotary_embeddings=True, mlp_variant="swiglu",
              activation_variant="silu")
# one configuration per transformers architecture and option the mapping handles
EXPORTS = {
    "gpt2": dict(norm_variant_attn="layernorm", norm_variant_output="layernorm", bias=True),
    "gpt2_nobias_untied_relu": dict(norm_variant_attn="layernorm", norm_variant_output="layernorm",
                                    wte_weight_tying=False, activation_variant="relu", mlp_size=48),
    "llama_gqa_tied": dict(ROTARY, n_kv_group=2, rmsnorm_eps=1e-6),
    "llama_untied_bias": dict(ROTARY, wte_weight_tying=False, bias=True, mlp_up_bias=True, mlp_down_bias=True),
    "llama_eps_free_gelu": dict(ROTARY, activation_variant="gelu", mlp_size=40),
    "mistral_window": dict(ROTARY, n_kv_group=2, window_size=3),
    "mixtral": dict(ROTARY, n_kv_group=2, use_moe=True, moe_layer_freq=1, n_experts=3, moe_top_k=2,
                    wte_weight_tying=False),
}
ARCH = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
        "mixtral": "MixtralForCausalLM"}


def _forge_model(name):
    model = make_model(seed=3, **EXPORTS[name])
    if model.config.use_moe:  # Mixtral's router has no bias: ours must be zero to export
        with torch.no_grad():
            for block in model.transformer.h:
                block.mlp.router.route_linear.bias.zero_()
    return model


def _our_logits(model, idx):
    return model(idx, targets=idx)[0]  # with targets: every position's logits


def _assert_close(a, b, rel=1e-5):
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= rel * max(scale, 1.0), (a - b).abs().max().item()


def _hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


IDX = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_loads_in_transformers_with_our_logits(name, tmp_path):
    model = _forge_model(name)
    save_hf(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [ARCH[name.split("_")[0]]]
    hf = _hf_load(tmp_path / "hf")
    assert type(hf).__name__ == ARCH[name.split("_")[0]]
    with torch.no_grad():
        _assert_close(hf(IDX).logits, _our_logits(model, IDX))
    back, _ = load_hf(tmp_path / "hf")
    if "nobias" in name:  # GPT-2 always has biases: ours export as zeros and come back as bias=True
        assert back.config.bias and not back.transformer.h[0].attn.c_attn_q.bias.any()
        with torch.no_grad():
            assert torch.equal(_our_logits(back.eval(), IDX), _our_logits(model, IDX))
    else:
        assert same_state(back, model)  # forge -> hf -> forge is bit-exact

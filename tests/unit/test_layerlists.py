"""Per-layer overrides (attention_list, *_layerlist): a mixed causal / infinite / mla model gets
the shapes the lists ask for, cycles them, trains and decodes; invalid layers are refused."""
from types import SimpleNamespace

import pytest
import torch

import forge_dist.model  # noqa: F401  (registers every variant)
from forge_dist import ConfigError, ModelConfig
from forge_dist.config.layerwise import layer_overrides
from forge_dist.model.attention.causal import CausalSelfAttention
from forge_dist.model.attention.infinite import InfiniteHeadAttention
from forge_dist.model.attention.mla import MultiHeadLatentAttention
from forge_dist.model.cache import KVCache
from forge_dist.model.gpt import GPT

MIXED = dict(
    n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=64,
    attention_list=["causal", "infinite", "mla"],
    n_head_layerlist=[4, 3, 2],
    n_qk_head_dim_layerlist=[8, 12, 8],
    n_v_head_dim_layerlist=[8, 6, 8],
    mlp_size_layerlist=[48, 64, 80],
)


def mixed_model(**kw):
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**MIXED, **kw}))


def tokens(seed=1):
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_per_layer_configs_follow_the_lists_cyclically():
    cfg = ModelConfig(**MIXED)
    got = [(c.attention_variant, c.n_head, c.n_qk_head_dim, c.n_v_head_dim, c.mlp_size)
           for c in map(cfg.for_layer, range(cfg.n_layer))]
    assert got == [("causal", 4, 8, 8, 48), ("infinite", 3, 12, 6, 64), ("mla", 2, 8, 8, 80),
                   ("causal", 4, 8, 8, 48)]
    layer = cfg.for_layer(1)
    assert layer.attention_list == [] and layer.n_head_layerlist == []  # describes one layer only
    plain = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    assert plain.for_layer(1) is plain


def test_mixed_model_has_the_listed_shapes():
    h = mixed_model().transformer.h
    assert [type(b.attn) for b in h] == [CausalSelfAttention, InfiniteHeadAttention, MultiHeadLatentAttention,
                                         CausalSelfAttention]
    # causal: 4 heads of n_embd / 4 = 8
    assert h[0].attn.c_attn_q.weight.shape == (32, 32) and h[0].attn.qk_head_dim == 8
    # infinite: 3 heads of q/k dim 12 and v dim 6, heads summed before c_proj (d_v -> n_embd)
    a = h[1].attn
    assert a.c_attn_q.weight.shape == (36, 32) and a.c_attn_k.weight.shape == (36, 32)
    assert a.c_attn_v.weight.shape == (18, 32) and a.c_proj.weight.shape == (32, 6)
    # mla: 2 heads of n_embd / 2 = 16
    assert h[2].attn.q_proj.weight.shape == (32, 32) and h[2].attn.d_head == 16
    assert [b.mlp.c_fc.weight.shape[0] for b in h] == [48, 64, 80, 48]
    assert h[3].attn is not h[0].attn  # cycling reuses values, not modules


def test_mixed_model_forward_backward():
    m = mixed_model().train()
    x = tokens()
    logits, loss = m(x, x)
    assert logits.shape == (2, 16, 64) and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert missing == []


def test_mixed_model_decodes_with_a_cache():
    m = mixed_model().eval()
    x = tokens()
    with torch.no_grad():
        full = m(x[:, :6])[0]
        cache = KVCache(m.config.n_layer)
        m(x[:, :5], cache=cache)
        step = m(x[:, 5:6], cache=cache)[0]
    assert torch.allclose(full, step, atol=1e-5)


def test_concat_heads_and_kv_groups_per_layer():
    m = mixed_model(attention_list=["infinite"], use_concat_heads=True, n_head_layerlist=[4, 2],
                    n_kv_group_layerlist=[2, 1], n_qk_head_dim_layerlist=[8], n_v_head_dim_layerlist=[4, 16],
                    n_layer=2)
    a0, a1 = (b.attn for b in m.transformer.h)
    assert a0.c_attn_k.weight.shape == (2 * 8, 32) and a0.c_proj.weight.shape == (32, 4 * 4)
    assert a1.c_attn_k.weight.shape == (1 * 8, 32) and a1.c_proj.weight.shape == (32, 2 * 16)
    x = tokens()
    m(x, x)[1].backward()


def test_none_strings_map_to_none():
    """The string "none" (upstream's sweep files write it) means None for that layer."""
    stand_in = SimpleNamespace(field_names=lambda: ("attention_list", "n_qk_head_dim_layerlist", "mlp_size_layerlist"),
                               attention_list=[], n_qk_head_dim_layerlist=["none", 12, "None"],
                               mlp_size_layerlist=[])
    assert [layer_overrides(stand_in, i) for i in range(3)] == [
        {"n_qk_head_dim": None}, {"n_qk_head_dim": 12}, {"n_qk_head_dim": None}]


def test_an_invalid_layer_is_refused_by_number():
    with pytest.raises(ConfigError, match=r"layer 1 \(after the \*_layerlist overrides\).*n_head=3"):
        ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_head_layerlist=[2, 3])


def test_string_items_parse_like_upstream_sweeps():
    # upstream sweeps write list items as strings; "none" means "use the default" for that layer
    from forge_dist import ConfigError, ModelConfig

    c = ModelConfig(n_layer=3, n_head=4, n_embd=32, mlp_size_layerlist=["64", "none", 96],
                    n_head_layerlist=["2", 4])
    assert c.mlp_size_layerlist == [64, None, 96]
    assert [c.for_layer(i).mlp_hidden for i in range(3)] == [64, 4 * 32, 96]
    assert [c.for_layer(i).n_head for i in range(3)] == [2, 4, 2]
    with pytest.raises(ConfigError, match="n_head_layerlist"):
        ModelConfig(n_head_layerlist=["x"])

"""use_qk_norm_scale across the ReaLLM-Forge boundary: a checkpoint trained upstream on its fused
path computes the same logits here after import, and export -> import is exact.

The upstream function is written here from its formula (reference 2.5), not from our rule: on the
SDPA path upstream normalises q and k, multiplies q by g * sqrt(sqrt(d)) and lets SDPA scale by
1/sqrt(d); on its manual path the scores are q.k * g, as ours are in every path.
"""
import math

import torch
import torch.nn.functional as F

from forge_dist.config.loading import model_args_from_config
from forge_dist.io import load_ckpt, save_ckpt
from forge_dist.model.attention.core import DotProductAttention
from forge_dist.testing.models import fixed_batch, make_model, same_state

# layer 0: d = 8 and layer 1: d = 16, both on upstream's SDPA path; layer 2 has GQA (2 KV groups
# for 4 heads), which sends upstream to its manual path, where g is used as is
CFG = dict(n_layer=3, use_qk_norm=True, use_qk_norm_scale=True, n_head_layerlist=[4, 2, 4],
           n_kv_group_layerlist=[4, 2, 2])
UPSTREAM_FUSED = [True, True, False]


def _upstream_fused_mix(module):
    """Upstream CausalSelfAttention's SDPA branch with qk-norm scale, from its formula."""

    def mix(q, k, v, offset):
        q = q / (q.norm(dim=-1, keepdim=True) + 1e-6)
        k = k / (k.norm(dim=-1, keepdim=True) + 1e-6)
        q = q * (module.qk_norm_factor * math.sqrt(math.sqrt(q.shape[-1])))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return mix


def _upstream_logits(model, idx):
    """``model``'s parameters read as upstream reads them."""
    attns = [m for m in model.modules() if isinstance(m, DotProductAttention)]
    assert len(attns) == len(UPSTREAM_FUSED)
    for module, fused in zip(attns, UPSTREAM_FUSED):
        if fused:
            module.mix = _upstream_fused_mix(module)
    try:
        with torch.no_grad():
            return model(idx)[0]
    finally:
        for module in attns:
            module.__dict__.pop("mix", None)


def _logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx)[0]


def test_checkpoint_trained_upstream_on_its_fused_path_gives_the_same_logits(tmp_path):
    upstream = make_model(seed=3, **CFG)  # its g values play upstream's trained factors
    idx, _ = fixed_batch()
    want = _upstream_logits(upstream, idx)
    assert (want - _logits(upstream, idx)).abs().max() > 1e-2  # the two readings of g really differ
    ckpt = {"model": upstream.state_dict(), "model_args": model_args_from_config(upstream.config), "iter_num": 7}
    torch.save(ckpt, tmp_path / "ckpt.pt")

    imported, _ = load_ckpt(str(tmp_path / "ckpt.pt"))
    torch.testing.assert_close(_logits(imported, idx), want, rtol=1e-5, atol=1e-5)
    g = {n: p for n, p in imported.state_dict().items() if n.endswith("qk_norm_factor")}
    g_up = ckpt["model"]
    for i, (fused, d) in enumerate(zip(UPSTREAM_FUSED, (8, 16, 8))):
        name = f"transformer.h.{i}.attn.qk_norm_factor"
        expect = g_up[name] * d ** -0.25 if fused else g_up[name]
        torch.testing.assert_close(g[name], expect)

    # export gives upstream its own factors back, and a round trip is bit-exact
    file = save_ckpt(imported, str(tmp_path / "out"))
    exported = torch.load(file, weights_only=True)["model"]
    for i in range(3):
        name = f"transformer.h.{i}.attn.qk_norm_factor"
        torch.testing.assert_close(exported[name], g_up[name], rtol=1e-6, atol=0)
    again, _ = load_ckpt(file)
    assert same_state(again, imported)


def test_a_checkpoint_trained_further_upstream_is_rescaled_not_restored(tmp_path):
    model = make_model(seed=4, **CFG)
    file = save_ckpt(model, str(tmp_path / "out"))
    ckpt = torch.load(file, weights_only=True)
    name = "transformer.h.0.attn.qk_norm_factor"
    ckpt["model"][name] = ckpt["model"][name] + 0.5  # upstream went on training
    torch.save(ckpt, file)
    back, _ = load_ckpt(file)
    torch.testing.assert_close(back.state_dict()[name], ckpt["model"][name] * 8 ** -0.25)
    idx, _ = fixed_batch()
    up = make_model(seed=4, **CFG)  # upstream's own reading of the file it holds
    up.load_state_dict({n: ckpt["model"][n] for n in up.state_dict()})
    torch.testing.assert_close(_logits(back, idx), _upstream_logits(up, idx), rtol=1e-5, atol=1e-5)

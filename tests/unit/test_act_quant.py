"""Activation fake-quantization points (quantize_attn_act_*, quantize_mlp_act_*) in every attention
and MLP variant: which variant has which point, that each point quantizes exactly its tensor
(hand-derived values on the scoring core, the module output / input of every variant, the MLP
activation), softmax_input statistics over visible entries only, bits resolution, refusal of
points a variant lacks, a forward/backward smoke in a tiny GPT, and structural causality."""
import pytest
import torch
import torch.nn as nn

import forge_dist.model  # noqa: F401  (registers every variant)
from forge_dist import ConfigError, ModelConfig
from forge_dist.model.attention import build_attention
from forge_dist.model.attention import core
from forge_dist.model.attention.core import attend
from forge_dist.model.gpt import GPT
from forge_dist.ops.mask import MaskSpec
from forge_dist.model.mlp import build_mlp
from forge_dist.model.quantize import ATTN_ACT_POINTS, MLP_ACT_POINTS, ActQuantPoints
from forge_dist.variants import ATTENTION, MLP
from forge_dist.ops.reference import quantize as ref

METHODS = ("affine_quant", "symmetric_quant", "stochastic_quant", "ternary_quant")
DETERMINISTIC = ("affine_quant", "symmetric_quant", "ternary_quant")
IO = ("input", "output")
INNER = tuple(p for p in ATTN_ACT_POINTS if p not in IO)
# the points each variant computes; a newly registered variant must be added here
EXPECTED = {
    "attn": {"causal": ATTN_ACT_POINTS, "infinite": ATTN_ACT_POINTS, "mla": ATTN_ACT_POINTS,
             "co4": ATTN_ACT_POINTS, "linear": IO, "ssm": IO, "identity": IO},
    "mlp": {"mlp": MLP_ACT_POINTS, "swiglu": MLP_ACT_POINTS, "dual_path": MLP_ACT_POINTS,
            "kan": MLP_ACT_POINTS, "identity": IO},
}
ALIASES = {"iqa": "infinite"}  # another name of the same class
OPTION = {"attn": "attention_variant", "mlp": "mlp_variant"}
CASES = [(g, v, p) for g, table in EXPECTED.items() for v, points in table.items() for p in points]
UNSUPPORTED = [(g, v, p) for g, table in EXPECTED.items() for v, points in table.items()
               for p in (ATTN_ACT_POINTS if g == "attn" else MLP_ACT_POINTS) if p not in points]


def tiny(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def point_cfg(group, variant, point, method="affine_quant", bits=8, **kw):
    return tiny(**{OPTION[group]: variant, f"quantize_{group}_act_{point}": True,
                   "activations_quant_method": method, f"quantize_{group}_act_bits": bits}, **kw)


def build(group, cfg, seed=0):
    torch.manual_seed(seed)
    return (build_attention(cfg, 0, {}) if group == "attn" else build_mlp(cfg, 0)).eval()


def points(method="affine_quant", bits=8, group="attn", **flags):
    return ActQuantPoints(tiny(activations_quant_method=method, **{f"quantize_{group}_act_bits": bits},
                               **{f"quantize_{group}_act_{p}": True for p in flags}, store_activations=True),
                          group).eval()


# --- which variant has which point ---------------------------------------------------------------
@pytest.mark.parametrize("group", EXPECTED)
def test_every_variant_declares_its_points(group):
    registry = ATTENTION if group == "attn" else MLP
    declared = {ALIASES.get(v, v): tuple(registry.get(v).act_points) for v in registry.names()}
    assert declared == EXPECTED[group]


@pytest.mark.parametrize("group,variant,point", UNSUPPORTED)
def test_point_the_variant_lacks_is_refused(group, variant, point):
    with pytest.raises(ConfigError, match=rf"quantize_{group}_act_{point}=True.*{OPTION[group]}='{variant}'"):
        point_cfg(group, variant, point)


def test_unsupported_point_refused_per_layer():
    with pytest.raises(ConfigError, match="layer 1.*attention_variant='ssm'"):
        tiny(attention_list=["causal", "ssm"], quantize_attn_act_softmax_input=True)
    tiny(attention_list=["causal", "mla"], quantize_attn_act_softmax_input=True)  # both have scores


@pytest.mark.parametrize("group,variant", [(g, v) for g, table in EXPECTED.items() for v in table])
def test_group_switch_enables_the_variants_points_with_per_point_bits(group, variant):
    first = EXPECTED[group][variant][0]
    cfg = tiny(**{OPTION[group]: variant, f"quantize_{group}_act": True, f"quantize_{group}_act_bits": 6,
                  f"quantize_{group}_act_{first}_bits": 3, "activations_quant_method": "ternary_quant"})
    aq = build(group, cfg).act_quant
    assert list(aq) == list(EXPECTED[group][variant])
    assert {p: (m.quant_bits, m.quant_method) for p, m in aq.items()} == \
        {p: (3 if p == first else 6, "ternary_quant") for p in EXPECTED[group][variant]}


def test_points_off_build_no_quantizers():
    assert len(build("attn", tiny()).act_quant) == 0 and len(build("mlp", tiny()).act_quant) == 0


# --- the scoring core: each inner point quantizes exactly its tensor ---------------------------
def reference_attend(q, k, v, mask, point, method, bits, softcap=None, bias=None):
    """Upstream's manual path with one fake-quantized tensor; plain softmax, GQA by repetition."""
    def fq(name, t, keep=None):
        if name != point:
            return t
        deq = ref.fake_quantize(t, method, bits, mask=keep)
        return deq if keep is None else torch.where(keep, deq, t)

    q, k, v = fq("qk_mult_q_input", q), fq("qk_mult_k_input", k), fq("pv_mult_v_input", v)
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    keep = mask.keep(q.shape[-2], k.shape[-2])
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    scores = fq("softmax_input", scores, keep)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return fq("pv_mult_output", fq("pv_mult_p_input", probs) @ v)


SCORE_OPTIONS = {"plain": {}, "softcap_bias": {"softcap": 1.5, "bias": torch.linspace(-1, 1, 36).view(1, 6, 6)}}


@pytest.mark.parametrize("options", SCORE_OPTIONS)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("point", INNER)
def test_attend_point_matches_reference(point, method, fused, options):
    """Each point in upstream's order: after soft-capping and the FIRE-like bias for softmax_input."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask, opts = MaskSpec(causal=True, window=3), SCORE_OPTIONS[options]
    aq = points(method, 3, **{point: True})
    torch.manual_seed(7)  # stochastic rounding: the same draws in both
    got = attend(q, k, v, normalizer=None, mask=mask, scale=8 ** -0.5, fused=fused, act_quant=aq, **opts)
    torch.manual_seed(7)
    want = reference_attend(q, k, v, mask, point, method, 3, **opts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    plain = attend(q, k, v, normalizer=None, mask=mask, scale=8 ** -0.5, fused=fused, **opts)
    assert not torch.allclose(got, plain, atol=1e-3), "the point changed nothing"


# T = 3, q = k = 0: causal softmax rows [1,0,0], [1/2,1/2,0], [1/3,1/3,1/3]; v = [0, 1, 5] -> y = [0, 1/2, 2].
# 2 bits: affine scale (2 - 0)/3 = 2/3, zp = -2, codes round([0, .75, 3]) - 2 = [-2, -1, 1] -> [0, 2/3, 2];
# symmetric scale 2/1, round([0, .25, 1]) -> [0, 0, 2]; ternary scale mean|y| = 5/6,
# round([0, .6, 2.4]) clamped to [0, 1, 1] -> [0, 5/6, 5/6].
PV_GOLDEN = {"affine_quant": [0.0, 2 / 3, 2.0], "symmetric_quant": [0.0, 0.0, 2.0],
             "ternary_quant": [0.0, 5 / 6, 5 / 6]}


def _pv_case():
    q = k = torch.zeros(1, 1, 3, 1)
    return q, k, torch.tensor([0.0, 1.0, 5.0]).view(1, 1, 3, 1)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method", PV_GOLDEN)
def test_pv_output_two_bit_hand_values(method, fused):
    q, k, v = _pv_case()
    kw = dict(normalizer=None, mask=MaskSpec(causal=True), scale=1.0, fused=fused)
    assert attend(q, k, v, **kw).flatten().tolist() == pytest.approx([0.0, 0.5, 2.0])
    y = attend(q, k, v, act_quant=points(method, 2, pv_mult_output=True), **kw)
    assert y.flatten().tolist() == pytest.approx(PV_GOLDEN[method])


def test_pv_output_stochastic_two_bits_is_unbiased():
    # scale 2/3: y/scale = [0, .75, 3] -> y_1 is 0 or 2/3 (probability .75), the others exact
    q, k, v = _pv_case()
    aq = points("stochastic_quant", 2, pv_mult_output=True)
    torch.manual_seed(0)
    ys = torch.stack([attend(q, k, v, normalizer=None, mask=MaskSpec(), scale=1.0, act_quant=aq).flatten()
                      for _ in range(2000)])
    up = torch.isclose(ys[:, 1], torch.tensor(2 / 3))
    assert (up | ys[:, 1].eq(0)).all() and ys[:, 0].eq(0).all() and torch.allclose(ys[:, 2], torch.tensor(2.0))
    assert abs(ys[:, 1].mean().item() - 0.5) < 0.03


@pytest.mark.parametrize("method,s10", [("affine_quant", 1.0), ("ternary_quant", 1 / 3)])
def test_softmax_input_statistics_ignore_hidden_entries(method, s10):
    # scores = q k^T: [[0, 10000 (hidden)], [1, 0]]. Visible {0, 1, 0}: affine scale (1 - 0)/3 and
    # ternary mean|.| = 1/3 (the whole tensor would give 10000/3 and 2500.25). Quantized visible
    # scores: affine keeps 1 (on the grid), ternary clamps 1/scale = 3 to code 1 -> 1/3. Query 0
    # still sees key 0 only (y_0 = v_0), query 1: y_1 = (e^s10 * 1 + e^0 * 3) / (e^s10 + 1).
    q = torch.tensor([[0.0, 100.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    k = torch.tensor([[1.0, 0.0], [0.0, 100.0]]).view(1, 1, 2, 2)
    v = torch.tensor([[1.0], [3.0]]).view(1, 1, 2, 1)
    aq = points(method, 2, softmax_input=True)
    y = attend(q, k, v, normalizer=None, mask=MaskSpec(causal=True), scale=1.0, act_quant=aq)
    assert float(aq["softmax_input"].scale) == pytest.approx(1 / 3)
    e = torch.tensor(s10).exp().item()
    assert y.flatten().tolist() == pytest.approx([1.0, (e + 3) / (e + 1)])


def test_only_score_points_leave_the_fused_kernel(monkeypatch):
    # q, k, v and pv-output points wrap the fused kernel (same values as the materialised path);
    # softmax_input and pv_mult_p_input need the score matrix, so they take the materialised path
    calls = []
    fused_kernel = core._sdpa
    monkeypatch.setattr(core, "_sdpa", lambda *a: calls.append(1) or fused_kernel(*a))
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    around = points("affine_quant", 4, qk_mult_q_input=True, qk_mult_k_input=True, pv_mult_v_input=True,
                    pv_mult_output=True)
    kw = dict(normalizer=None, mask=MaskSpec(causal=True), scale=0.5)
    torch.testing.assert_close(attend(q, k, v, fused=True, act_quant=around, **kw),
                               attend(q, k, v, fused=False, act_quant=around, **kw))
    assert len(calls) == 1
    for point in ("softmax_input", "pv_mult_p_input"):
        attend(q, k, v, fused=True, act_quant=points("affine_quant", 4, **{point: True}), **kw)
    assert len(calls) == 1


# --- input / output points of every variant ---------------------------------------------------
IO_CASES = [(g, v, p) for g, v, p in CASES if p in IO]


@pytest.mark.parametrize("method", DETERMINISTIC)
@pytest.mark.parametrize("group,variant,point", IO_CASES)
def test_io_point_quantizes_the_module_input_or_output(group, variant, point, method):
    off = build(group, tiny(**{OPTION[group]: variant}))
    on = build(group, point_cfg(group, variant, point, method, bits=3))
    on.load_state_dict(off.state_dict())
    torch.manual_seed(2)
    x = torch.randn(2, 6, 32)
    if point == "input":
        want = off(ref.fake_quantize(x, method, 3))
    else:
        want = ref.fake_quantize(off(x), method, 3)
    torch.testing.assert_close(on(x), want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(on(x), off(x), atol=1e-4)


# --- MLP activation points --------------------------------------------------------------------
class Around(nn.Module):
    """act with fake quantization before (``point`` = activation_input) or after it."""

    def __init__(self, act, point, method, bits):
        super().__init__()
        self.act, self.point, self.method, self.bits = act, point, method, bits

    def forward(self, h):
        fq = lambda t: ref.fake_quantize(t, self.method, self.bits)  # noqa: E731
        return self.act(fq(h)) if self.point == "activation_input" else fq(self.act(h))


@pytest.mark.parametrize("method", DETERMINISTIC)
@pytest.mark.parametrize("point", ["activation_input", "activation_output"])
@pytest.mark.parametrize("variant", ["mlp", "swiglu", "kan"])
def test_activation_points_wrap_the_activation(variant, point, method):
    # offsets 0: act(h - 0) - 0 is act(h), so the point sits exactly around the activation module
    off = build("mlp", tiny(mlp_variant=variant))
    on = build("mlp", point_cfg("mlp", variant, point, method, bits=3))
    on.load_state_dict(off.state_dict())
    owner, name = (off.kan, "base_activation") if variant == "kan" else (off, "activation_variant")
    setattr(owner, name, Around(getattr(owner, name), point, method, 3))
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(on(x), off(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", DETERMINISTIC)
@pytest.mark.parametrize("point", ["activation_input", "activation_output"])
def test_dual_path_activation_points(point, method):
    # activation_input: h quantized once for both paths; activation_output: both paths' activations
    # quantized as one tensor (one scale)
    m = build("mlp", point_cfg("mlp", "dual_path", point, method, bits=3, mlp_x_offset=0.25, mlp_y_offset=0.5))
    x = torch.randn(2, 6, 32)
    act, xo, yo = m.activation_variant, 0.25, 0.5
    fq = lambda t: ref.fake_quantize(t, method, 3)  # noqa: E731
    h = m.c_fc(x)
    if point == "activation_input":
        h = fq(h)
    y1, y2 = act(h - xo) - yo, -act(-(h + xo)) - yo
    if point == "activation_output":
        y1, y2 = fq(torch.stack([y1, y2]))
    torch.testing.assert_close(m(x), m.c_proj1(y1) + m.c_proj2(y2), atol=1e-6, rtol=1e-6)


# --- a tiny GPT with one point on -------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("group,variant,point", CASES, ids=[f"{g}-{v}-{p}" for g, v, p in CASES])
def test_gpt_forward_backward_with_one_point(group, variant, point, method):
    torch.manual_seed(0)
    model = GPT(point_cfg(group, variant, point, method)).train()
    torch.manual_seed(0)
    plain = GPT(tiny(**{OPTION[group]: variant})).train()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    logits, loss = model(idx, idx)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and ".h." in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        assert not torch.allclose(logits, plain(idx, idx)[0]), "the point changed nothing"


# --- causality --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["affine_quant", "stochastic_quant"])
@pytest.mark.parametrize("mlp", EXPECTED["mlp"])
@pytest.mark.parametrize("attention", EXPECTED["attn"])
def test_no_gradient_from_later_tokens_with_every_point_on(attention, mlp, method):
    """Per-tensor statistics span the sequence, so forward values at t depend on later tokens
    (as upstream). Structurally the model stays causal: statistics carry no gradient and hidden
    scores stay hidden, so the logits at t have exactly zero gradient from later embeddings."""
    cfg = tiny(attention_variant=attention, mlp_variant=mlp, quantize_attn_act=True, quantize_mlp_act=True,
               activations_quant_method=method, quantize_attn_act_bits=4, quantize_mlp_act_bits=4)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    seen = {}

    def keep_grad(module, inputs, out):
        out.retain_grad()
        seen["x"] = out

    model.transformer.drop.register_forward_hook(keep_grad)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    logits, _ = model(idx, torch.zeros_like(idx))
    t = 5
    logits[:, t].sum().backward()
    grad = seen["x"].grad
    assert grad[:, t + 1:].eq(0).all(), "a later token reached position t through the gradient"
    assert grad[:, : t + 1].abs().sum() > 0

"""Blocked attention (forge_dist/model/attention/blocked.py) against the materialised (B, H, T, S)
path: every softmax variant x every mask option, forward and backward (q, k, v, the variant's
learned parameters, the sink logit and an additive bias), float64 tight and bfloat16 loose; and the
routing of attend() (blocked by default, materialised under FORGE_OPS=reference)."""
import pytest
import torch

import forge_dist.model  # noqa: F401  (registers every variant)
from forge_dist import ModelConfig
from forge_dist.model.attention import blocked
from forge_dist.model.attention import core
from forge_dist.model.attention.core import _NO_POINTS, _materialised, attend
from forge_dist.model.softmax import build_softmax
from forge_dist.ops.mask import MaskSpec
from forge_dist.variants import SOFTMAX

pytestmark = pytest.mark.timeout(120)

# (variant, options): every registered variant with its defaults, plus the options that change the
# blocked computation (shift rule, learned temperature/obo, clamp, no division, L, learned divisor).
CASES = [(name, {}) for name in sorted(SOFTMAX.names()) if name != "pfla_softmax"] + [
    ("softermax", dict(softermax_use_xmax=False)),
    ("sigsoftmax", dict(sigsoftmax_use_euler_base=False, sigsoftmax_base=2.0)),
    ("strongermax", dict(strongermax_strength=2.0, strongermax_use_learned_temperature_factor=True,
                         strongermax_use_learned_obo_per_head=True, strongermax_obo=0.5, div_by_seq_len=True,
                         strongermax_divisor=2.0)),
    ("strongermax", dict(strongermax_use_learned_obo=True, strongermax_obo=1.0, strongermax_clamping=True,
                         strongermax_clamp_value=0.5)),
    ("strongermax", dict(strongermax_xmax_guess=1.0)),
    ("strongermax", dict(strongermax_xmax_guess=-3.0, strongermax_overflow_recompute=True,
                         strongermax_overflow_recompute_value=1.0)),
    ("strongermax", dict(strongermax_div_by_sum_of_terms=False, strongermax_use_xmax=False)),
    ("consmax_v2", dict(consmax_v2_clamping=True, consmax_v2_clamp_value=0.3)),
    ("polymax", dict(div_by_seq_len=True)),
    ("saturatingconsmax", dict(div_by_seq_len=True, consmax_saturation=0.5)),
    ("pfla_softmax", dict(pfla_softmax_use_learned_divisor=True)),
    ("pfla_softmax", {}),  # normalised by the row sum of its curve
    ("pfla_softmax", dict(pfla_softmax_use_obo=True, pfla_softmax_use_learned_obo=True, pfla_softmax_learn_x=True,
                          pfla_softmax_mode="quadratic")),
]

# (mask, n_q, n_kv heads, n_keys, softcap, bias, sink): causal with everything; window + KV-cache offset
# + sink columns (the materialised path takes a sink logit or sink columns, not both); full
# (non-causal) attention without GQA.
MASKS = [
    (MaskSpec(causal=True), 11, 2, 11, 2.0, True, True),
    (MaskSpec(causal=True, window=4, q_offset=6, n_sink=2), 5, 2, 13, None, False, False),
    (MaskSpec(causal=False), 7, 4, 9, None, True, True),
]
HQ, D = 4, 3


def normaliser(name, opts, dtype):
    cfg = ModelConfig(n_layer=1, n_head=HQ, n_embd=16, block_size=16, vocab_size=32, softmax_variant_attn=name,
                      **opts)
    module = build_softmax(name, cfg, n_head=HQ).to(dtype)
    with torch.no_grad():  # move learned parameters off their (often symmetric) initial values
        for p in module.parameters():
            if p.dtype.is_floating_point and p.dim() > 0 and p.numel() == HQ:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return module


def inputs(case, dtype, seed=0):
    mask, T, hkv, S, softcap, bias, sink = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    return dict(q=rnd(2, HQ, T, D), k=rnd(2, hkv, S, D), v=rnd(2, hkv, S, D), mask=mask, softcap=softcap,
                bias=rnd(HQ, T, S, scale=0.5) if bias else None, sink=rnd(HQ, 1, 1) if sink else None)


def WRT(module, x):
    """Every tensor a gradient is checked for: inputs, bias, sink logit, the variant's parameters."""
    wrt = [t for t in (x["q"], x["k"], x["v"], x["bias"], x["sink"]) if t is not None]
    return wrt + [p for p in module.parameters() if p.requires_grad]


def both(module, x, block):
    """(materialised, blocked) outputs and gradients of every input and parameter."""
    wrt = WRT(module, x)
    n_rep = x["q"].shape[1] // x["k"].shape[1]
    results = []
    for run in ("materialised", "blocked"):
        if run == "materialised":
            y = _materialised(x["q"], x["k"], x["v"], n_rep, module, x["mask"], 0.7, x["softcap"], x["bias"],
                              x["sink"], 0.0, _NO_POINTS)
        else:
            y = blocked.blocked_attend(x["q"], x["k"], x["v"], normalizer=module, mask=x["mask"], scale=0.7,
                                       softcap=x["softcap"], bias=x["bias"], sink_logit=x["sink"], block=block,
                                       q_block=3)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)  # a non-uniform output gradient
        grads = torch.autograd.grad((y * w).sum(), wrt, allow_unused=True)
        results.append((y, grads))
    return results


@pytest.mark.parametrize("name,opts", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_blocked_equals_materialised_float64(name, opts):
    torch.manual_seed(0)
    module = normaliser(name, opts, torch.float64)
    assert blocked.supports(module, 9)
    for i, case in enumerate(MASKS):
        (ya, ga), (yb, gb) = both(module, inputs(case, torch.float64, seed=i), block=4)
        torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-12)
        for t, a, b in zip(WRT(module, inputs(case, torch.float64)), ga, gb):
            a, b = (torch.zeros_like(t) if g is None else g for g in (a, b))  # the sink of an elementwise
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)          # variant takes no mass: 0


@pytest.mark.parametrize("name", ["softmax", "consmax", "polymax", "strongermax", "sigsoftmax", "relu2max"])
def test_blocked_bfloat16_close_to_float64(name):
    """bf16 blocked against the float64 materialised result, within bf16's resolution."""
    torch.manual_seed(0)
    case = MASKS[0]
    m64 = normaliser(name, {}, torch.float64)
    m16 = normaliser(name, {}, torch.bfloat16)
    m16.load_state_dict(m64.state_dict())
    x64, x16 = inputs(case, torch.float64), inputs(case, torch.bfloat16)
    (y64, g64), _ = both(m64, x64, block=4)
    _, (y16, g16) = both(m16, x16, block=4)
    torch.testing.assert_close(y16.double().detach(), y64.detach(), rtol=0, atol=0.03 * float(y64.detach().abs().max()))
    for a, b in zip(g64[:3], g16[:3]):  # q, k, v
        torch.testing.assert_close(b.double(), a, rtol=0, atol=0.03 * float(a.abs().max()))


def test_pfla_row_sum_never_holds_the_scores():
    """pfla_softmax normalised by its row sum runs blocked: no (B, H, T, S) tensor in the forward."""
    module = normaliser("pfla_softmax", {}, torch.float64)
    assert blocked.supports(module, 9) and not module.elementwise
    x = inputs(MASKS[0], torch.float64)
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes.extend(t.shape for t in (out if isinstance(out, (tuple, list)) else (out,)) if torch.is_tensor(t))
            return out

    with Shapes():
        blocked.blocked_attend(x["q"], x["k"], x["v"], normalizer=module, mask=x["mask"], scale=0.7, block=4,
                               q_block=3)
    assert not [s for s in shapes if len(s) == 4 and s[-1] == 11 and s[-2] >= 4], "a full score row block"


@pytest.mark.parametrize("mode,expect", [("auto", "blocked"), ("reference", "materialised")])
def test_attend_routes_to_blocked_by_default(monkeypatch, mode, expect):
    """attend() runs the blocked path by default for every non-SDPA case no fused kernel takes (here:
    none takes any), the materialised one under FORGE_OPS=reference, with dropout, or with a
    score-level quant point; same result either way."""
    monkeypatch.setenv("FORGE_OPS", mode)
    monkeypatch.setattr(core, "fused_attend", lambda *a, **kw: None)
    calls = []
    real = blocked.blocked_attend
    monkeypatch.setattr(blocked, "blocked_attend", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    module = normaliser("consmax", {}, torch.float64)
    x = inputs(MASKS[0], torch.float64)
    y = attend(x["q"], x["k"], x["v"], normalizer=module, mask=x["mask"], scale=0.7, sink_logit=x["sink"])
    assert len(calls) == (1 if expect == "blocked" else 0)
    ref = _materialised(x["q"], x["k"], x["v"], 2, module, x["mask"], 0.7, None, None, x["sink"], 0.0, _NO_POINTS)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    calls.clear()
    attend(x["q"], x["k"], x["v"], normalizer=None, mask=x["mask"], scale=0.7, softcap=3.0)  # capped softmax
    assert len(calls) == (1 if expect == "blocked" else 0)
    calls.clear()
    attend(x["q"], x["k"], x["v"], normalizer=module, mask=x["mask"], scale=0.7, dropout_p=0.1)
    assert not calls and core  # dropout on probabilities needs them materialised


def test_compiled_model_has_no_graph_breaks_for_any_variant():
    """dynamo traces the whole tiny GPT, blocked attention included, in one graph for every variant
    (after one eager call: the first call loads the kernel library outside the trace)."""
    import torch._dynamo as dynamo

    from forge_dist.model.gpt import GPT

    idx = torch.randint(0, 32, (1, 16), generator=torch.Generator().manual_seed(0))
    breaks = {}
    for name in sorted(SOFTMAX.names()):
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=32,
                                softmax_variant_attn=name))
        model(idx, idx)
        dynamo.reset()
        explain = dynamo.explain(model)(idx, idx)
        if explain.graph_break_count:
            breaks[name] = [str(b.reason)[:200] for b in explain.break_reasons]
    dynamo.reset()
    assert not breaks, breaks

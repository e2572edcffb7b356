"""Softmax variants (score normalisers): formulas against hand-derived values, hidden keys,
gradients, sinks, div_by_seq_len, output use on logits, option checks, and a tiny-GPT smoke."""
import math

import pytest
import torch

import forge_dist.model  # noqa: F401  (registers every variant)
from forge_dist import ConfigError, ModelConfig
from forge_dist.model.attention.core import attend
from forge_dist.model.gpt import GPT
from forge_dist.ops.mask import MaskSpec
from forge_dist.variants import SOFTMAX
from forge_dist.model.softmax import build_softmax
from forge_dist.ops.reference import softmax_variants as ref

pytestmark = pytest.mark.timeout(120)

VARIANTS = sorted(SOFTMAX.names())
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
# With q_offset=1 on a 2x3 score matrix: query 0 sees keys 0, 1 (key 2 hidden); query 1 sees all.
MASK = MaskSpec(causal=True, q_offset=1)
H = 100.0  # score at the hidden key: any leak would dominate


def cfg(**kw):
    return ModelConfig(**{**TINY, **kw})


def run(name, row0, row1, n_head=None, mask=MASK, **kw):
    """The variant on one head, scores [[row0..., H], [row1...]] (1, 1, 2, 3)."""
    scores = torch.tensor([[[list(row0) + [H], list(row1)]]], dtype=torch.float64)
    module = build_softmax(name, cfg(**kw), n_head=n_head).double()
    return module(scores, mask)[0, 0]


def close(actual, expected, atol=1e-9):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-7, atol=atol)


# --- golden values ------------------------------------------------------------------------
LN2, LN3 = math.log(2), math.log(3)


def test_softmax_golden():
    # row 0: e^0, e^ln3 = 1, 3 -> /4;  row 1: e^0, e^ln2, e^ln5 = 1, 2, 5 -> /8
    close(run("softmax", [0, LN3], [0, LN2, math.log(5)]), [[1 / 4, 3 / 4, 0], [1 / 8, 2 / 8, 5 / 8]])


@pytest.mark.parametrize("use_xmax", [True, False])
def test_softermax_golden(use_xmax):
    # base 2: row 0: 2^1, 2^3 = 2, 8 -> /10;  row 1: 2^0, 2^1, 2^3 = 1, 2, 8 -> /11
    got = run("softermax", [1, 3], [0, 1, 3], softermax_use_xmax=use_xmax)
    close(got, [[0.2, 0.8, 0], [1 / 11, 2 / 11, 8 / 11]])


def test_strongermax_golden_strength_obo_divisor_seq_len():
    # S=2, real max, obo=1, D=2, L=3 keys.
    # row 0 [1, 3], max 3: 2^-2, 2^0 = 1/4, 1; / (1 + 5/4) = [1/9, 4/9]; / 3 / 2 -> [1/54, 4/54]
    # row 1 [0, 1, 3], max 3: 1/8, 1/4, 1; / (1 + 11/8) = [1/19, 2/19, 8/19]; / 6
    got = run("strongermax", [1, 3], [0, 1, 3], strongermax_strength=2.0, strongermax_obo=1.0,
              strongermax_divisor=2.0, div_by_seq_len=True)
    close(got, [[1 / 54, 4 / 54, 0], [1 / 114, 2 / 114, 8 / 114]])


def test_strongermax_temperature_and_clamp():
    # tau=2, clamp at 2: row 0 [1, 3] -> [1, 2], max 2: e^{-1/2}, 1 normalised
    got = run("strongermax", [1, 3], [0, 1, 3], strongermax_temperature_factor=2.0,
              strongermax_clamping=True, strongermax_clamp_value=2.0)
    a = math.exp(-0.5)
    # row 1 [0, 1, 2] after the clamp, max 2: e^-1, e^-1/2, 1
    b = [math.exp(-1), math.exp(-0.5), 1.0]
    close(got, [[a / (1 + a), 1 / (1 + a), 0], [v / sum(b) for v in b]])


def test_strongermax_overflow_recompute_is_per_row():
    # no sum, guess 1, overflow at 88. Row A [199, 200]: 200 - 1 > 88 -> real max 200: e^-1, e^0.
    # Row B [0, 2]: 2 - 1 <= 88 -> the guess 1: e^-1, e^1 (upstream decides for the whole batch
    # and would give row B e^-2, e^0).
    scores = torch.tensor([[[[199.0, 200.0], [0.0, 2.0]]]], dtype=torch.float64)
    m = build_softmax("strongermax", cfg(strongermax_xmax_guess=1.0, strongermax_overflow_recompute=True,
                                         strongermax_div_by_sum_of_terms=False)).double()
    close(m(scores, None)[0, 0], [[math.exp(-1), 1.0], [math.exp(-1), math.e]])


def test_strongermax_guess_without_recompute_subtracts_the_guess():
    # no sum, guess 1: row [0, 2] -> e^-1, e^1
    m = build_softmax("strongermax", cfg(strongermax_xmax_guess=1.0, strongermax_div_by_sum_of_terms=False))
    close(m(torch.tensor([[0.0, 2.0]], dtype=torch.float64), None), [[math.exp(-1), math.e]])


@pytest.mark.parametrize("euler", [True, False])
def test_sigsoftmax_golden(euler):
    if euler:  # e^x sigma(x): x=0 -> 1/2, x=ln3 -> 3 * 3/4 = 9/4, x=-ln3 -> 1/3 * 1/4 = 1/12
        row0, row1 = [0, LN3], [0, LN3, -LN3]
        t0, t1 = [1 / 2, 9 / 4], [1 / 2, 9 / 4, 1 / 12]
    else:  # base 2: 2^x / (1 + 2^-x): x=0 -> 1/2, x=1 -> 2/(3/2) = 4/3, x=-1 -> (1/2)/3 = 1/6
        row0, row1 = [0, 1], [0, 1, -1]
        t0, t1 = [1 / 2, 4 / 3], [1 / 2, 4 / 3, 1 / 6]
    got = run("sigsoftmax", row0, row1, sigsoftmax_use_euler_base=euler, sigsoftmax_base=2.0)
    close(got, [[t / sum(t0) for t in t0] + [0], [t / sum(t1) for t in t1]])


CONSMAX_BASE2 = dict(consmax_initial_beta=1.0, consmax_initial_gamma=4.0, consmax_use_euler_base=False,
                     consmax_base=2.0)


def test_consmax_golden():
    # 2^{x-1} / 4, elementwise: x=1 -> 1/4, x=3 -> 1, x=0 -> 1/8 (no sum over keys)
    close(run("consmax", [1, 3], [0, 1, 3], **CONSMAX_BASE2), [[0.25, 1.0, 0], [0.125, 0.25, 1.0]])


def test_consmax_v2_per_head_factors_and_clamp():
    m = build_softmax("consmax_v2", cfg(consmax_v2_clamping=True, consmax_v2_clamp_value=1.0,
                                        **CONSMAX_BASE2)).double()
    assert m.beta_factor.shape == (2, 1, 1) and m.gamma_factor.shape == (2, 1, 1)
    with torch.no_grad():
        m.beta_factor[1] = 2.0  # head 1: beta = 2
        m.gamma_factor[1] = 0.5  # head 1: gamma = 2
    scores = torch.tensor([[[[1.0, 3.0, H], [0.0, 1.0, 3.0]]] * 2], dtype=torch.float64)
    got = m(scores, MASK)[0]
    # head 0: 2^{min(x-1, 1)} / 4: x=1 -> 1/4; x=3 -> 2^1/4 = 1/2 (clamped); x=0 -> 1/8
    close(got[0], [[0.25, 0.5, 0], [0.125, 0.25, 0.5]])
    # head 1: 2^{min(x-2, 1)} / 2: x=1 -> 1/4; x=3 -> 1; x=0 -> 1/8
    close(got[1], [[0.25, 1.0, 0], [0.125, 0.25, 1.0]])


def test_consmax_quan_rounds_beta_gamma_with_straight_through_gradient():
    # beta 2.504 -> round(250.4)/100 = 2.5, gamma 100.04 -> round(1000.4)/10 = 100: e^{x-2.5}/100
    m = build_softmax("consmax_quan", cfg(consmax_initial_beta=2.504, consmax_initial_gamma=100.04)).double()
    scores = torch.tensor([[[[2.5, 2.5 + LN2, H], [2.5 - LN2, 2.5, 2.5 + math.log(5)]]]], dtype=torch.float64)
    y = m(scores, MASK)
    close(y[0, 0], [[0.01, 0.02, 0], [0.005, 0.01, 0.05]])
    y.sum().backward()
    # straight-through: d y / d beta = -y, so d sum / d beta = -(0.01+0.02+0.005+0.01+0.05) = -0.095
    close(m.beta.grad, [-0.095], atol=1e-12)


def test_saturatingconsmax_golden_with_seq_len():
    # beta=1, gamma=4, base 2, x_sat = 1 + 1 = 2, L = 3:
    # x=1 -> 2^0/4 = 1/4; x=0 -> 2^-1/4 = 1/8; x=3 >= 2 -> x_sat/4 = 1/2; then / 3
    got = run("saturatingconsmax", [1, 3], [0, 1, 3], consmax_saturation=1.0, div_by_seq_len=True,
              **CONSMAX_BASE2)
    close(got, [[0.25 / 3, 0.5 / 3, 0], [0.125 / 3, 0.25 / 3, 0.5 / 3]])


def test_saturatingconsmax_fixed_beta_gamma_are_not_parameters():
    m = build_softmax("saturatingconsmax", cfg(consmax_learnable_beta=False, consmax_learnable_gamma=False))
    assert dict(m.named_parameters()) == {} and m.beta == 2.5 and m.gamma == 100.0


POLY = dict(polymax_x_intercept=-2.0, polymax_y_intercept=1.0, polymax_power=2.0, polymax_divisor=4.0)


def test_polymax_golden():
    # x0=-2, y0=1, p=2, D=4: x=-3 -> 0; x=-1 -> (1/2)(-1)+1 = 1/2; x=0 -> 1; x=2 -> 4+1 = 5; / 4
    close(run("polymax", [-3, -1], [0, 2, -1], **POLY), [[0, 0.125, 0], [0.25, 1.25, 0.125]])


def test_vpolymax_golden():
    # slope y0/x0 = -1/2: x=-1 -> 1/2+1 = 3/2; x=-3 -> 0; x=0 -> 1; x=2 -> 5; / 4
    close(run("vpolymax", [-3, -1], [0, 2, -1], **POLY), [[0, 0.375, 0], [0.25, 1.25, 0.375]])


def test_exppolymax_golden_euler():
    # b=e, p=2, y0=1, D=1000: s = (ln e / 2)^(1/(2-1)) = 1/2
    # x=-1 -> e^-1; x=0 -> (1/2)^2 + 1 = 1.25; x=1 -> (3/2)^2 + 1 = 3.25; / 1000
    got = run("exppolymax", [-1, 0], [1, 0, -1])
    e1 = math.exp(-1)
    close(got, [[e1 / 1000, 1.25 / 1000, 0], [3.25 / 1000, 1.25 / 1000, e1 / 1000]])


def test_exppolymax_non_euler_base_works_and_slopes_match():
    # b=4, p=2, D=1: s = ln4 / 2 = ln2. x=-1 -> 4^-1 = 1/4; x=0 -> ln^2 2 + 1; x=1 -> (1+ln2)^2 + 1
    kw = dict(exppolymax_use_euler_base=False, exppolymax_base=4.0, exppolymax_divisor=1.0)
    got = run("exppolymax", [-1, 0], [1, 0, -1], **kw)
    close(got, [[0.25, LN2 ** 2 + 1, 0], [(1 + LN2) ** 2 + 1, LN2 ** 2 + 1, 0.25]])
    # slopes at 0: left ln4 * 4^0 = ln4; right 2 (0 + s) = 2 ln2 = ln4
    m = build_softmax("exppolymax", cfg(**kw)).double()
    x = torch.tensor([-1e-12, 0.0], dtype=torch.float64, requires_grad=True)
    m(x, None).sum().backward()
    close(x.grad, [math.log(4), math.log(4)], atol=1e-9)


def test_divisor_variants_golden():
    d = dict(relumax_divisor=2.0, relu2max_divisor=2.0, sigmoidmax_divisor=2.0, softplus_divisor=2.0,
             squareplus_divisor=2.0)
    # relu / 2: x=-1 -> 0, x=3 -> 3/2, x=0 -> 0, x=1 -> 1/2
    close(run("relumax", [-1, 3], [0, 1, 3], **d), [[0, 1.5, 0], [0, 0.5, 1.5]])
    # relu^2 / 2: 3 -> 9/2, 1 -> 1/2
    close(run("relu2max", [-1, 3], [0, 1, 3], **d), [[0, 4.5, 0], [0, 0.5, 4.5]])
    # sigma / 2: sigma(0) = 1/2 -> 1/4; sigma(ln3) = 3/4 -> 3/8; sigma(-ln3) = 1/4 -> 1/8
    close(run("sigmoidmax", [0, LN3], [-LN3, 0, LN3], **d), [[0.25, 0.375, 0], [0.125, 0.25, 0.375]])
    # ln(1 + e^x) / 2: x=0 -> ln2/2; x=ln3 -> ln4/2 = ln2; x=-ln3 -> ln(4/3)/2
    close(run("softplus", [0, LN3], [-LN3, 0, LN3], **d),
          [[LN2 / 2, LN2, 0], [math.log(4 / 3) / 2, LN2 / 2, LN2]])
    # (x + sqrt(x^2 + 4 ln^2 2)) / 2 / 2: x=0 -> (2 ln2)/2/2 = ln2/2;
    # x = 2 ln2 -> (2 ln2 + sqrt(8 ln^2 2)) / 2 / 2 = 2 ln2 (1 + sqrt2) / 4 = ln2 (1 + sqrt2) / 2
    t = LN2 * (1 + math.sqrt(2)) / 2
    close(run("squareplus", [0, 2 * LN2], [0, 0, 2 * LN2], **d), [[LN2 / 2, t, 0], [LN2 / 2, LN2 / 2, t]])


PFLA = dict(pfla_softmax_num_points=3, pfla_softmax_left_bound=-2.0, pfla_softmax_right_bound=2.0,
            pfla_softmax_init_activation="relu")


def _pfla_y(x):
    # knots linspace(-2, 2, 5)[1:-1] = -1, 0, 1; sqrt-values sqrt(max(relu, 1e-6)) = 1e-3, 1e-3, 1
    # linear mode lerps y = 1e-6, 1e-6, 1; left of -1 the first segment (flat), right of 1 held at 1
    if x >= 1:
        return 1.0
    if x <= 0:
        return 1e-6
    return 1e-6 + x * (1 - 1e-6)


def test_pfla_softmax_linear_golden():
    y0, y1 = [_pfla_y(0.5), _pfla_y(2.0)], [_pfla_y(-2.0), _pfla_y(0.0), _pfla_y(0.5)]
    got = run("pfla_softmax", [0.5, 2.0], [-2.0, 0.0, 0.5], **PFLA)
    close(got, [[v / (sum(y0) + 1e-6) for v in y0] + [0], [v / (sum(y1) + 1e-6) for v in y1]])


def test_pfla_softmax_quadratic_learned_divisor_and_obo():
    # quadratic: y = x * lerp(sqrt-values)^2: x=0.5 -> 0.5 (0.5e-3 + 0.5)^2 = 0.5 * 0.5005^2; x=2 -> 2 * 1
    y = [0.5 * 0.5005 ** 2, 2.0]
    got = run("pfla_softmax", [0.5, 2.0], [0.5, 2.0, 2.0], pfla_softmax_mode="quadratic",
              pfla_softmax_use_learned_divisor=True, pfla_softmax_gamma_init=2.0, **PFLA)
    g = 2 + 1e-6  # relu(gamma_raw) + eps
    close(got, [[y[0] / g, y[1] / g, 0], [y[0] / g, y[1] / g, y[1] / g]])
    # off-by-one: the addend is e^{pfla_softmax_obo} = e^0 = 1
    got = run("pfla_softmax", [0.5, 2.0], [0.5, 2.0, 2.0], pfla_softmax_mode="quadratic",
              pfla_softmax_use_obo=True, pfla_softmax_use_learned_obo=True, **PFLA)
    den0, den1 = y[0] + y[1] + 1e-6 + 1, y[0] + 2 * y[1] + 1e-6 + 1
    close(got, [[y[0] / den0, y[1] / den0, 0], [y[0] / den1, y[1] / den1, y[1] / den1]])


def test_pfla_lerp_is_continuous_at_knots():
    x_knots = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    y_knots = torch.tensor([0.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    x = torch.tensor([-1.5, -0.5, 1 - 1e-9, 1.0, 1 + 1e-9, 1.5, 5.0], dtype=torch.float64)
    # segment holding x: -1.5 -> first segment extended: -0.5; -0.5 -> 0.5; 1 -> 3 from both sides;
    # 1.5 -> (3 + 2)/2 = 2.5; right of the last knot -> held at 2
    close(ref.lerp_knots(x, x_knots, y_knots), [-0.5, 0.5, 3.0, 3.0, 3.0, 2.5, 2.0], atol=1e-8)


def test_pfla_learned_knots_are_used_in_increasing_order():
    m = build_softmax("pfla_softmax", cfg(pfla_softmax_learn_x=True, **PFLA)).double()
    scores = torch.tensor([[[[0.5, 2.0, H], [-2.0, 0.0, 0.5]]]], dtype=torch.float64)
    expected = m(scores, MASK)
    with torch.no_grad():  # knots -1, 0, 1 crossed into 0, -1, 1 together with their values
        m.x_vals.copy_(m.x_vals[[1, 0, 2]])
        m.y_vals.copy_(m.y_vals[[1, 0, 2]])
    torch.testing.assert_close(m(scores, MASK), expected)


# --- every registered variant: hidden keys, gradients, output use ---------------------------
PFLA_5_KNOTS = dict(pfla_softmax_num_points=5, pfla_softmax_left_bound=-3.0,
                    pfla_softmax_right_bound=3.0)  # knots at -2, -1, 0, 1, 2
# (name, overrides) exercising learned parameters and optional branches beyond the defaults
CASES = [(n, {}) for n in VARIANTS] + [
    ("consmax", dict(consmax_use_euler_base=False, consmax_base=3.0)),
    ("consmax_v2", dict(consmax_v2_clamping=True, consmax_v2_clamp_value=-0.5)),  # kink at x = 2
    ("saturatingconsmax", dict(consmax_saturation=0.5)),  # x_sat = 3
    ("strongermax", dict(strongermax_use_learned_obo_per_head=True, strongermax_obo=0.5,
                         strongermax_use_learned_temperature_factor=True,
                         strongermax_temperature_factor=1.5)),
    ("strongermax", dict(strongermax_use_learned_obo=True, strongermax_obo=1.0, strongermax_strength=3.0,
                         strongermax_clamping=True, strongermax_clamp_value=1.0, div_by_seq_len=True)),
    ("strongermax", dict(strongermax_xmax_guess=1.0, strongermax_overflow_recompute=True,
                         strongermax_overflow_recompute_value=0.5, strongermax_div_by_sum_of_terms=False)),
    ("softermax", dict(softermax_use_xmax=False)),
    ("sigsoftmax", dict(sigsoftmax_use_euler_base=False, sigsoftmax_base=3.0)),
    ("exppolymax", dict(exppolymax_use_euler_base=False, exppolymax_power=3.0, div_by_seq_len=True)),
    ("polymax", dict(polymax_x_intercept=-1.0, polymax_power=1.5, div_by_seq_len=True)),
    ("vpolymax", dict(polymax_x_intercept=-1.0, polymax_power=0.5)),
    ("pfla_softmax", dict(PFLA_5_KNOTS, pfla_softmax_learn_x=True, pfla_softmax_use_obo=True,
                          pfla_softmax_use_learned_obo=True)),
    ("pfla_softmax", dict(PFLA_5_KNOTS, pfla_softmax_mode="quadratic", pfla_softmax_use_learned_divisor=True,
                          pfla_softmax_density="quad", pfla_softmax_init_activation="silu")),
    ("pfla_softmax", dict(pfla_softmax_density="exp", pfla_softmax_use_obo=True)),
]
CASE_IDS = [n + ("-" + "-".join(f"{k}={v}" for k, v in kw.items()) if kw else "") for n, kw in CASES]


def _off_kink_scores(shape, seed=0):
    """Values at least 0.15 from every integer (the kinks the cases put at 0, +-1, 2, 3 ...)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-2, 3, shape, generator=g).double()
    return base + 0.15 + 0.7 * torch.rand(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_hidden_keys_are_exact_zeros_with_finite_gradients(name, kw):
    m = build_softmax(name, cfg(**kw))
    scores = (3 * torch.randn(2, 2, 3, 4, generator=torch.Generator().manual_seed(1))).requires_grad_()
    with torch.no_grad():
        scores[0, 1, 2, 0] = float("-inf")  # a pre-masked score counts as hidden too
    mask = MaskSpec(causal=True, q_offset=-1)  # query 0 sees nothing (a fully hidden row)
    keep = mask.keep(3, 4) & ~torch.isneginf(scores.detach())
    y = m(scores, mask)
    assert y.shape == scores.shape
    assert torch.isfinite(y).all()
    assert (y[~keep.expand_as(y)] == 0).all()
    assert (y[:, :, 0] == 0).all()
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert (scores.grad[~keep.expand_as(y)] == 0).all()
    for p in m.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_gradcheck(name, kw):
    m = build_softmax(name, cfg(**kw)).double()
    names = [n for n, _ in m.named_parameters()]
    # consmax_quan's parameters have a straight-through gradient (checked in its golden test), not
    # the zero derivative of rounding that finite differences see
    params = [p.detach().clone().requires_grad_(name != "consmax_quan") for _, p in m.named_parameters()]
    scores = _off_kink_scores((1, 2, 3, 4)).requires_grad_()

    def f(s, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (s, MaskSpec(causal=True, q_offset=1)))

    assert torch.autograd.gradcheck(f, (scores, *params))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("shape", [(3, 64), (2, 4, 64)])
def test_output_use_on_logits(name, shape):
    # built as the output normaliser: one "head" by default (n_head=2 in the config)
    m = build_softmax(name, cfg(strongermax_use_learned_obo_per_head=True), option="softmax_variant_output")
    for p in m.parameters():
        assert p.dim() != 3 or p.shape[0] == 1
    logits = 4 * torch.randn(shape)
    y = m(logits, None)
    assert y.shape == logits.shape and torch.isfinite(y).all()


# --- sinks, div_by_seq_len, softmax equivalences ---------------------------------------------
def test_strongermax_cli_defaults_equal_softmax():
    scores = 3 * torch.randn(2, 3, 5, 5)
    mask = MaskSpec(causal=True, window=2)
    c = cfg()
    expected = build_softmax("softmax", c)(scores, mask)
    torch.testing.assert_close(build_softmax("strongermax", c)(scores, mask), expected)


@pytest.mark.parametrize("name", ["softmax", "strongermax"])
def test_sink_column_joins_the_denominator(name):
    # sink logit ln C, C = 2. row 0 sees key 0 (s=0): 1 / (2 + 1) = 1/3, sink 2/3.
    # row 1 sees keys 0, 1 (s = 0, ln3): 1/(2+4), 3/(2+4) = 1/6, 1/2, sink 1/3.
    scores = torch.tensor([[[[LN2, 0.0, H], [LN2, 0.0, LN3]]]], dtype=torch.float64)
    probs = build_softmax(name, cfg()).double()(scores, MaskSpec(causal=True, n_sink=1))
    close(probs[0, 0], [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 6, 1 / 2]])


def test_attend_with_sink_matches_closed_form():
    # y_i = sum_{j<=i} e^{s_ij} v_j / (C + sum_{j<=i} e^{s_ij}), s = q.k / sqrt(d)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    log_c = torch.tensor([0.3, -0.7], dtype=torch.float64).reshape(2, 1, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    e = torch.exp(s) * torch.tril(torch.ones(4, 4, dtype=torch.float64))
    expected = (e @ v) / (torch.exp(log_c) + e.sum(-1, keepdim=True))
    for name in ["softmax", "strongermax"]:
        y = attend(q, k, v, normalizer=build_softmax(name, cfg()), mask=MaskSpec(causal=True),
                   scale=1 / math.sqrt(8), sink_logit=log_c, fused=False)
        torch.testing.assert_close(y, expected)


def test_div_by_seq_len_counts_real_keys_not_sinks():
    c = cfg(div_by_seq_len=True, relumax_divisor=1.0)
    m = build_softmax("relumax", c).double()
    # 1 sink + 3 real keys: L = 3 for every row (hidden keys of a causal row count, as upstream)
    scores = torch.tensor([[[[5.0, 3.0, H, H], [5.0, 3.0, 6.0, H]]]], dtype=torch.float64)
    close(m(scores, MaskSpec(causal=True, n_sink=1))[0, 0], [[5 / 3, 1.0, 0, 0], [5 / 3, 1.0, 2.0, 0]])
    # logits without a mask: L = V
    close(m(torch.tensor([[2.0, 4.0]], dtype=torch.float64), None), [[1.0, 2.0]])


# --- parameters: names, shapes, upstream checkpoints ------------------------------------------
def test_parameter_names_and_shapes_follow_upstream():
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.state_dict().items()}  # noqa: E731
    c = cfg(n_head=4)
    assert shapes(build_softmax("consmax", c)) == {"beta": (1,), "gamma": (1,)}  # upstream torch.Tensor([x])
    assert shapes(build_softmax("consmax_v2", c)) == {"beta_factor": (4, 1, 1), "gamma_factor": (4, 1, 1)}
    assert shapes(build_softmax("strongermax", cfg(strongermax_use_learned_obo_per_head=True,
                                                   strongermax_use_learned_temperature_factor=True))) == {
        "obo_offset": (2, 1, 1), "temperature_factor": (1,)}
    assert shapes(build_softmax("strongermax", c)) == {}
    assert shapes(build_softmax("pfla_softmax", cfg(pfla_softmax_use_learned_divisor=True))) == {
        "x_vals": (30,), "y_vals": (30,), "_gamma_raw": ()}
    assert shapes(build_softmax("consmax_v2", c, n_head=1)) == {"beta_factor": (1, 1, 1),
                                                                "gamma_factor": (1, 1, 1)}


def test_loads_upstream_one_element_scalars():
    m = build_softmax("consmax", cfg())
    m.load_state_dict({"beta": torch.tensor([1.5]), "gamma": torch.tensor([7.0])})
    assert m.beta.shape == (1,) and m.beta.item() == 1.5 and m.gamma.item() == 7.0


# --- option checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,needle", [
    (dict(softmax_variant_attn="nosuchmax"), "valid values"),
    (dict(softmax_variant_output="nosuchmax"), "softmax_variant_output"),
    (dict(softmax_variant_attn="polymax", polymax_x_intercept=1.0), "polymax_x_intercept"),
    (dict(softmax_variant_attn="strongermax", strongermax_overflow_recompute=True), "strongermax_xmax_guess"),
    (dict(softmax_variant_attn="pfla_softmax", pfla_softmax_use_learned_obo=True), "pfla_softmax_use_obo"),
    (dict(softmax_variant_attn="exppolymax", exppolymax_use_euler_base=False, exppolymax_base=0.5,
          exppolymax_power=3.0), "exppolymax_power"),
    (dict(softmax_variant_output="relumax", relumax_divisor=0.0), "relumax_divisor"),
])
def test_bad_options_are_config_errors(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        cfg(**kw)


# --- the variants inside a tiny GPT -------------------------------------------------------------
SMOKE = [(n, {}) for n in VARIANTS] + [
    ("consmax_v2", dict(n_head=4)),
    ("strongermax", dict(n_head=4, strongermax_use_learned_obo_per_head=True)),
    ("softmax", dict(use_flash_lobo=True, use_flash_lobo_per_head=True)),  # the sink path
]


@pytest.mark.parametrize("name,kw", SMOKE, ids=[n + ("-" + "-".join(kw) if kw else "") for n, kw in SMOKE])
def test_tiny_gpt_forward_backward(name, kw):
    torch.manual_seed(0)
    model = GPT(cfg(softmax_variant_attn=name, **kw))
    idx = torch.randint(0, 64, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 64) and torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    if name != "softmax":
        assert type(model.transformer.h[0].attn.softmax_layer_attn) is SOFTMAX.get(name)

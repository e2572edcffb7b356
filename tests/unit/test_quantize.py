"""Quantizers against hand-computed codes, straight-through gradients, the schedule, activation
points, quantized embeddings (alone and in the GPT), validation and the integer export."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_dist import ConfigError, ModelConfig
from forge_dist.model.quantize import (ActQuant, ActQuantPoints, QuantizedEmbedding, act_quant_setting,
                                       build_embedding, fake_quant, quant_level, set_quant_iteration)
from forge_dist.model.gpt import GPT
from forge_dist.model.linear import BitLinear1p58, QuantizedLinear
from forge_dist.ops.reference import quantize as ref

LOWER = torch.tril(torch.ones(2, 2, dtype=torch.bool))


def tiny(**kw):
    return ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, **kw)


def codes(q):
    return q.tolist()


# --- the four quantizers ---------------------------------------------------------------------
def test_affine_codes_and_dequant():
    # bits 3: qmin -4, qmax 3; scale = (2 - (-1.5)) / 7 = 0.5; zp = -round(-1.5/0.5) - 4 = 3 - 4 = -1
    # x/scale = [-3, -0.5, 1.2, 4] -> round (half to even) [-3, -0, 1, 4] + zp -> [-4, -1, 0, 3]
    zp, scale, q = ref.affine_quantize(torch.tensor([-1.5, -0.25, 0.6, 2.0]), 3)
    assert (float(zp), float(scale)) == (-1.0, 0.5)
    assert codes(q) == [-4, -1, 0, 3] and q.dtype == torch.int8
    # (q - zp) * scale = [-3, 0, 1, 4] * 0.5
    assert ref.dequantize(zp, scale, q).tolist() == [-1.5, 0.0, 0.5, 2.0]


def test_symmetric_codes_and_dequant():
    # bits 4: qmax 7; scale = 3.5 / 7 = 0.5; x/scale = [-7, 2, 0.4, 6] -> [-7, 2, 0, 6]
    zp, scale, q = ref.symmetric_quantize(torch.tensor([-3.5, 1.0, 0.2, 3.0]), 4)
    assert (float(zp), float(scale), codes(q)) == (0.0, 0.5, [-7, 2, 0, 6])
    assert ref.dequantize(zp, scale, q).tolist() == [-3.5, 1.0, 0.0, 3.0]


def test_symmetric_causal_statistics_and_masked_passthrough():
    # lower triangle {1.5, -3, 0.75}: max|x| = 3, bits 3 -> qmax 3, scale 1; the hidden -inf is
    # neither in the statistic nor changed: codes [[round(1.5)=2, 0], [-3, round(0.75)=1]]
    x = torch.tensor([[1.5, float("-inf")], [-3.0, 0.75]])
    zp, scale, q = ref.symmetric_quantize(x, 3, mask=LOWER)
    assert float(scale) == 1.0 and codes(q) == [[2, 0], [-3, 1]]
    y = fake_quant(x, "symmetric_quant", 3, mask=LOWER)
    assert y.tolist() == [[2.0, float("-inf")], [-3.0, 1.0]]


def test_stochastic_exact_levels_and_wide_storage():
    # bits 2: s = 3, max|x| = 3 -> scale 1; |x| / scale has no fraction -> deterministic codes
    zp, scale, q = ref.stochastic_quantize(torch.tensor([-3.0, 1.0, 0.0, 2.0]), 2)
    assert (float(scale), codes(q)) == (1.0, [-3, 1, 0, 2])
    # bits 8: s = 255, scale 1: codes +-255 need 9 bits -> int16 (upstream's int8 wraps them)
    _, scale, q = ref.stochastic_quantize(torch.tensor([-255.0, 200.0]), 8)
    assert q.dtype == torch.int16 and codes(q) == [-255, 200]


def test_stochastic_rounding_is_unbiased():
    # bits 1: s = 1, max|x| = 1 -> scale 1; 0.3 rounds up with probability 0.3 -> codes in {0, 1}
    x = torch.cat([torch.full((20000,), 0.3), torch.tensor([1.0])])
    _, scale, q = ref.stochastic_quantize(x, 1, generator=torch.Generator().manual_seed(0))
    body = q[:-1].float()
    assert set(body.unique().tolist()) <= {0.0, 1.0}
    assert abs(body.mean().item() - 0.3) < 0.02  # std of the mean is sqrt(0.21 / 20000) = 0.003


def test_ternary_absmean_and_causal_mean():
    # mean|x| = (0.75 + 0.25 + 0.5 + 2.5) / 4 = 1; round -> [-1, 0, 0 (tie), 2 -> clamp 1]
    zp, scale, q = ref.ternary_quantize(torch.tensor([-0.75, 0.25, 0.5, 2.5]), 8)
    assert (float(scale), codes(q)) == (1.0, [-1, 0, 0, 1])
    # causal: mean over the 3 lower entries (1 + 2 + 3) / 3 = 2 -> x/2 = [[0.5 -> 0, .], [-1, 1.5 -> 2 -> 1]]
    _, scale, q = ref.ternary_quantize(torch.tensor([[1.0, 9.0], [-2.0, 3.0]]), mask=LOWER)
    assert float(scale) == 2.0 and codes(q) == [[0, 0], [-1, 1]]
    assert float(ref.ternary_quantize(torch.zeros(3))[1]) == pytest.approx(1e-5)  # floor of the scale


def test_constant_tensor_gets_unit_scale():
    # max = min = 0 -> scale 1, zp = -0 + (-128); codes -128 dequantize to exactly 0
    zp, scale, q = ref.affine_quantize(torch.zeros(3), 8)
    assert float(scale) == 1.0 and ref.dequantize(zp, scale, q).tolist() == [0.0, 0.0, 0.0]


def test_storage_dtypes():
    assert [ref.storage_dtype(b) for b in (1, 8, 9, 16, 17, 32)] == \
        [torch.int8, torch.int8, torch.int16, torch.int16, torch.int32, torch.int32]


@pytest.mark.parametrize("method", ["affine_quant", "symmetric_quant", "stochastic_quant", "ternary_quant"])
def test_sharded_statistics_through_reduce_stats_match_whole_tensor(method):
    """Two 'ranks' each hold half of x; reducing their statistics gives the unsharded codes."""
    x = torch.tensor([[-3.0, 1.0, 2.0, 0.0], [3.0, -2.0, -1.0, 1.0]])  # exact levels for stochastic 2-bit
    shards = x.chunk(2, dim=1)
    local = []

    def record(v, op):
        local.append(v)
        return v

    quantizer = ref.QUANTIZERS[method]
    for s in shards:
        quantizer(s, 2, reduce_stats=record)
    n_stats = len(local) // 2
    ops = {"max": torch.maximum, "min": torch.minimum, "sum": torch.add}
    calls = iter(range(n_stats))

    def all_reduce(v, op):  # the statistic of shard 0 and shard 1, combined
        i = next(calls)
        return ops[op](local[i], local[n_stats + i])

    got = []
    for s in shards:
        calls = iter(range(n_stats))
        got.append(quantizer(s, 2, reduce_stats=all_reduce))
    whole = quantizer(x, 2)
    assert torch.equal(torch.cat([g[2] for g in got], dim=1), whole[2])
    assert all(torch.equal(g[1], whole[1]) for g in got)


# --- straight-through gradients and the schedule -------------------------------------------------
@pytest.mark.parametrize("method", ["affine_quant", "symmetric_quant", "stochastic_quant", "ternary_quant"])
@pytest.mark.parametrize("level", [1.0, 0.25])
def test_straight_through_gradient_is_identity(method, level):
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 7, dtype=torch.float64)
    y = fake_quant(x, method, 4, level)
    (y * g).sum().backward()
    assert torch.equal(x.grad, g)
    if method != "stochastic_quant":  # value: x + level (Q(x) - x), exactly Q(x) at level 1
        deq = ref.fake_quantize(x.detach(), method, 4)
        expected = deq if level == 1.0 else x.detach() + level * (deq - x.detach())
        assert torch.allclose(y.detach(), expected, atol=1e-12)


def test_quant_levels():
    assert quant_level(True, "static", 0.3, 100, 7) == 0.3
    assert quant_level(True, "linear", 0.0, 100, 25) == 0.25  # 25 / 100
    assert quant_level(True, "linear", 0.0, 100, 150) == 1.0  # min(1.5, 1)
    # upstream's formula as written: 10 / 100 + 100 * 0.002 = 0.1 + 0.2
    assert quant_level(True, "linear", 0.002, 100, 10) == pytest.approx(0.3)
    assert quant_level(False, "linear", 0.0, 100, 0) == 1.0  # eval: fully quantized
    assert quant_level(True, None, 0.0, None, 5) == 1.0


def test_act_quant_follows_model_iteration():
    cfg = tiny(quantize_mlp_act_input=True, activations_quant_method="symmetric_quant",
               quant_scheduler="linear", full_quant_iteration=100)
    model = nn.Sequential(ActQuantPoints(cfg, "mlp"))
    point = model[0]["input"]
    x = torch.randn(2, 3, 32)
    deq = ref.fake_quantize(x, "symmetric_quant", 8)
    set_quant_iteration(model, 40)  # level 40 / 100
    assert point.quant_iteration == 40
    assert torch.allclose(model[0]("input", x), x + 0.4 * (deq - x), atol=1e-6)
    model.eval()
    assert torch.equal(model[0]("input", x), deq)
    assert torch.equal(model[0]("output", x), x)  # a point that is off


def test_act_quant_without_trainer_counts_its_own_calls():
    cfg = tiny(quantize_mlp_act_input=True, quant_scheduler="linear", full_quant_iteration=4)
    q = ActQuant(cfg, "mlp_act_input", 8)
    x = torch.randn(4, 8)
    deq = ref.fake_quantize(x, "affine_quant", 8)
    for it in range(3):  # levels 0, 0.25, 0.5
        assert torch.allclose(q(x), x + it / 4 * (deq - x), atol=1e-6)


def test_act_point_resolution():
    cfg = tiny(quantize_attn_act_softmax_input=True, quantize_attn_act_output=True,
               quantize_attn_act_output_bits=4, quantize_mlp_act=True, quantize_mlp_act_bits=6)
    assert act_quant_setting(cfg, "attn", "softmax_input") == (True, 8)  # falsy bits -> group bits
    assert act_quant_setting(cfg, "attn", "output") == (True, 4)
    assert act_quant_setting(cfg, "attn", "input") == (False, 8)
    assert sorted(ActQuantPoints(cfg, "mlp")) == sorted(["input", "activation_input", "activation_output", "output"])
    with pytest.raises(ConfigError, match="valid"):
        act_quant_setting(cfg, "mlp", "softmax_input")


def test_store_activations_keeps_the_codes_used():
    cfg = tiny(quantize_mlp_act=True, store_activations=True, activations_quant_method="stochastic_quant")
    q = ActQuant(cfg, "mlp_act_input", 4)
    x = torch.randn(3, 5)
    y = q(x)
    assert q.codes.dtype == torch.int8 and q.codes.shape == x.shape
    assert torch.equal(ref.dequantize(q.zero_point, q.scale, q.codes), y)  # the draws actually used
    assert "codes" not in q.state_dict()  # transient, not checkpointed


# --- embeddings ----------------------------------------------------------------------------------
def test_quantized_embedding_value_and_straight_through_rows():
    cfg = tiny(quantize_wte=True, quantize_wte_bits=4)
    emb = build_embedding(cfg, "wte", 10, 6)
    assert isinstance(emb, QuantizedEmbedding)
    plain = nn.Embedding(10, 6)
    plain.weight.data.copy_(emb.weight.data)
    idx = torch.tensor([[1, 3, 3, 7]])
    out = emb(idx)
    table = ref.fake_quantize(emb.weight.detach(), "affine_quant", 4)  # statistics of the whole table
    assert torch.equal(out, table[idx])
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (plain(idx) * g).sum().backward()
    assert torch.equal(emb.weight.grad, plain.weight.grad)  # rows 1, 3 (twice), 7 get their gradient
    assert type(build_embedding(tiny(), "wpe", 16, 6)) is nn.Embedding


QUANT_EMBED = dict(quantize_wte=True, quantize_wte_bits=4, quantize_wpe=True, quantize_wpe_bits=5,
                   quantize_wpe_method="symmetric_quant")


def test_gpt_embeds_with_the_fake_quantized_tables_and_keeps_the_tie():
    torch.manual_seed(0)
    model = GPT(tiny(**QUANT_EMBED)).eval()
    wte, wpe = model.transformer.wte, model.transformer.wpe
    assert isinstance(wte, QuantizedEmbedding) and isinstance(wpe, QuantizedEmbedding)
    assert model.lm_head.weight is wte.weight  # weight tying: the head uses the float table, as upstream
    for table in (wte.weight, wpe.weight):  # init_weights drew the tables, N(0, 0.02)
        assert abs(table.std().item() - 0.02) < 0.004
    reference = copy.deepcopy(model)  # plain embeddings holding the fake-quantized tables
    tables = {"wte": (wte, "affine_quant", 4), "wpe": (wpe, "symmetric_quant", 5)}
    for name, (emb, method, bits) in tables.items():
        reference.transformer[name] = nn.Embedding.from_pretrained(ref.fake_quantize(emb.weight.detach(), method, bits))
    assert reference.lm_head.weight is not reference.transformer.wte.weight
    unquantized = copy.deepcopy(model)
    unquantized.transformer.wte = nn.Embedding.from_pretrained(wte.weight.detach())
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x, x)[0]
        assert torch.equal(logits, reference(x, x)[0])
        assert not torch.allclose(logits, unquantized(x, x)[0], atol=1e-4)  # 4 bits change the result


@pytest.mark.parametrize("tied", [True, False])
def test_gpt_quantized_embedding_rows_get_the_straight_through_gradient(tied):
    torch.manual_seed(0)
    model = GPT(tiny(**QUANT_EMBED, wte_weight_tying=tied)).train()
    wte = model.transformer.wte
    seen = {}

    def keep_output(module, inputs, out):
        out.retain_grad()
        seen["out"] = out

    wte.register_forward_hook(keep_output)
    x = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))  # rows 40.. unused
    model(x, x)[1].backward()
    out_grad = seen["out"].grad.reshape(-1, 32)
    through_lookup = torch.zeros_like(wte.weight).index_add_(0, x.reshape(-1), out_grad)
    used = torch.zeros(64, dtype=torch.bool)
    used[x.unique()] = True
    assert (through_lookup[used].abs().sum(1) > 1e-6).all()  # every used row learns through the lookup
    if tied:  # one table, two uses: the head's gradient adds to the lookup's
        assert model.lm_head.weight is wte.weight
        head_grad = wte.weight.grad - through_lookup
        assert head_grad[~used].abs().sum() > 0
    else:  # the table's gradient is exactly the lookup's, straight through the quantizer
        assert torch.allclose(wte.weight.grad, through_lookup, atol=1e-7)
        assert torch.equal(wte.weight.grad[~used], torch.zeros_like(wte.weight.grad[~used]))
    assert (model.transformer.wpe.weight.grad[:16].abs().sum(1) > 0).all()


# --- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(quant_scheduler="linear"), "full_quant_iteration"),
    (dict(quantize_linear_bits=0), "quantize_linear_bits"),
    (dict(quantize_linear_mlp_up_bits=40), "quantize_linear_mlp_up_bits"),
    (dict(quantize_wte_method="symmetric_quant", quantize_wte_bits=1), "quantize_wte_bits"),
    (dict(quantize_linear_method="int4_quant"), "valid values: affine_quant"),
    (dict(activations_quant_method="nope"), "activations_quant_method"),
    (dict(start_quant_level=1.5), "start_quant_level"),
    (dict(quantization_warmup_iters=-1), "quantization_warmup_iters"),
])
def test_bad_quantization_options_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kw)


# --- export --------------------------------------------------------------------------------------
def test_export_dequantizes_to_the_fake_quantized_weights(tmp_path):
    from safetensors.torch import load_file

    from forge_dist.io.forge_format import save_pretrained
    from forge_dist.io.quant_export import main

    cfg = tiny(linear_variant_attn="quantized_linear", linear_variant_mlp="bitlinear_1p58",
               quantize_linear_bits=6, quantize_linear_attn_v_method="symmetric_quant",
               quantization_warmup_iters=0, bias=True)
    model = GPT(cfg)
    save_pretrained(model, str(tmp_path / "ckpt"))
    assert main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--include-float"]) == 0
    t = load_file(str(tmp_path / "out" / "quantized.safetensors"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())

    def deq(name):
        return ref.dequantize(t[f"{name}.zero_point"].double(), t[f"{name}.scale"].double(), t[name])

    attn = model.transformer.h[0].attn
    q_name = "transformer.h.0.attn.c_attn_q.weight"
    assert t[q_name].dtype == torch.int8 and manifest["tensors"][q_name]["bits"] == 6
    assert torch.allclose(deq(q_name).float(), fake_quant(attn.c_attn_q.weight, "affine_quant", 6), atol=0)
    v_name = "transformer.h.1.attn.c_attn_v.weight"
    assert manifest["tensors"][v_name]["method"] == "symmetric_quant"
    v_weight = model.transformer.h[1].attn.c_attn_v.weight
    assert torch.equal(deq(v_name).float(), fake_quant(v_weight, "symmetric_quant", 6))
    up = "transformer.h.0.mlp.c_fc.weight"  # bitlinear_1p58: ternary codes with the absmean scale
    assert set(t[up].unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(deq(up).float(), fake_quant(model.transformer.h[0].mlp.c_fc.weight, "ternary_quant", 2))
    bias = "transformer.h.0.attn.c_attn_q.bias"  # 32-bit bias codes
    assert t[bias].dtype == torch.int32 and torch.allclose(deq(bias).float(), attn.c_attn_q.bias, atol=1e-6)
    model.eval()  # eval forward runs on exactly the exported weights
    x = torch.randn(1, 4, 32)
    # eval runs the int8 kernel (another summation order than BLAS): close, not bitwise
    torch.testing.assert_close(attn.c_attn_q(x), F.linear(x, deq(q_name).float(), deq(bias).float()), rtol=1e-5, atol=1e-6)
    assert torch.equal(t["transformer.wte.weight"], model.transformer.wte.weight)  # --include-float
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 1


def test_export_quantized_embedding_keeps_tied_head_float(tmp_path):
    from safetensors.torch import load_file

    from forge_dist.io.quant_export import export_quantized

    model = GPT(tiny(quantize_wte=True, quantize_wte_bits=4))
    manifest = export_quantized(model, str(tmp_path), include_float=True)
    t = load_file(str(tmp_path / "quantized.safetensors"))
    wte = "transformer.wte.weight"
    assert manifest["tensors"][wte]["bits"] == 4 and -8 <= int(t[wte].min()) and int(t[wte].max()) <= 7
    value = ref.dequantize(t[f"{wte}.zero_point"], t[f"{wte}.scale"], t[wte])
    assert torch.equal(value, fake_quant(model.transformer.wte.weight, "affine_quant", 4))
    assert "lm_head.weight" in manifest["float_parameters"] and wte not in manifest["float_parameters"]
    assert torch.equal(t["lm_head.weight"], model.lm_head.weight)


def test_quant_export_of_a_trained_model_dequantizes_to_what_eval_uses(tmp_path):
    """Train 3 steps, save with forge_dist.io, run forge-quant-export, compare with the eval model."""
    from safetensors.torch import load_file

    from forge_dist.io import from_pretrained, save_pretrained
    from forge_dist.io.quant_export import main

    cfg = tiny(linear_variant_attn="quantized_linear", linear_variant_mlp="bitlinear_1p58", bias=True,
               linear_variant_mlp_down="quantized_linear", quantize_linear_mlp_down_method="symmetric_quant",
               quantize_linear_bits=6, quantization_warmup_iters=1, **QUANT_EMBED)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    start = model.transformer.h[0].attn.c_attn_q.weight.detach().clone()
    for it in range(3):
        set_quant_iteration(model, it)
        opt.zero_grad()
        model(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
    assert not torch.equal(start, model.transformer.h[0].attn.c_attn_q.weight)
    save_pretrained(model, tmp_path / "ckpt", training={"iter_num": 3})
    assert main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    t = load_file(str(tmp_path / "out" / "quantized.safetensors"))

    def deq(name):
        return ref.dequantize(t[f"{name}.zero_point"].double(), t[f"{name}.scale"].double(), t[name]).float()

    loaded = from_pretrained(tmp_path / "ckpt")  # eval
    expected = {"transformer.wte.weight", "transformer.wpe.weight"}
    h = torch.randn(3, 5, 32)
    with torch.no_grad():
        for name, m in loaded.named_modules():
            if isinstance(m, QuantizedLinear):  # eval runs F.linear on exactly the exported values
                expected |= {f"{name}.weight", f"{name}.bias"}
                inp = h if m.in_features == 32 else torch.randn(3, 5, m.in_features)
                torch.testing.assert_close(m(inp), F.linear(inp, deq(f"{name}.weight"), deq(f"{name}.bias")),
                                           rtol=1e-5, atol=1e-6, msg=name)
            elif isinstance(m, BitLinear1p58):
                expected.add(f"{name}.weight")
                assert torch.equal(deq(f"{name}.weight"), fake_quant(m.weight, "ternary_quant", 2)), name
        assert set(json.loads((tmp_path / "out" / "manifest.json").read_text())["tensors"]) == expected
        assert t["transformer.h.1.mlp.c_proj.weight.zero_point"].item() == 0  # symmetric_quant
        idx = torch.tensor([[3, 7, 7, 60]])
        assert torch.equal(loaded.transformer.wte(idx), deq("transformer.wte.weight")[idx])
        assert torch.equal(loaded.transformer.wpe(torch.arange(16)), deq("transformer.wpe.weight"))
        trained = model.transformer.wte.weight  # the export holds the trained table, not a fresh one
        assert torch.equal(deq("transformer.wte.weight"), fake_quant(trained, "affine_quant", 4))

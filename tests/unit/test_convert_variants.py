"""ReaLLM-Forge conversion of quantized, MoE, LSV and shared-layer models (forge_dist/io/variant_rules.py):
exact round trips, the same loss in both formats, upstream's buffer names and values, and
hand-built upstream state dicts."""
import pytest
import torch

from forge_dist import CheckpointError, ConfigError
from forge_dist.config.loading import configs_equal
from forge_dist.io import convert, from_pretrained, load_any, save_ckpt, save_pretrained
from forge_dist.io.reallm_forge import EXTRA_KEY
from forge_dist.testing.models import TINY, same_state
from forge_dist.testing.models import fixed_batch as batch
from forge_dist.testing.models import make_model as make
from forge_dist.model.linear import BitLinearOptimized, QuantizedLinear
from forge_dist.variants import LSV
from forge_dist.ops.reference import quantize as ref

QUANTIZED = dict(linear_variant_attn="quantized_linear", linear_variant_mlp="quantized_linear", bias=True,
                 quantize_linear_bits=6, quantize_linear_attn_v_method="symmetric_quant", quantization_warmup_iters=0,
                 quantize_wte=True, quantize_wte_bits=6, quantize_wpe=True, quantize_wpe_method="symmetric_quant",
                 quantize_attn_act=True, quantize_mlp_act=True, quantize_mlp_act_output_bits=4)
LSV_BASE = dict(use_lsv=True, lsv_dataset_num=3, apply_lsv_at_layer_idx=1)
CASES = {
    "quantized_linear": QUANTIZED,
    "bitlinear": dict(linear_variant_attn="bitlinear_optimized", linear_variant_mlp="bitlinear_1p58", bias=True,
                      linear_variant_mlp_down="bitlinear"),
    "moe_softmax": dict(use_moe=True, n_experts=4, moe_layer_freq=2),
    "moe_noisy_quantized": dict(use_moe=True, n_experts=3, moe_top_k=1, moe_router_scheme="noisy_top_k",
                                n_layer=4, linear_variant_mlp="quantized_linear", quantization_warmup_iters=0),
    **{f"lsv_{v}": {**LSV_BASE, "lsv_variant": v} for v in LSV.names()},
    "shared": dict(n_layer=4, shared_mlp_size=2, shared_attn_sym=True, linear_variant_mlp="quantized_linear",
                   linear_variant_attn="bitlinear_optimized"),
}


def ckpt_of(model, path, **training):
    return torch.load(save_ckpt(model, path, training=training), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", CASES)
def test_forge_to_reallm_forge_to_forge_is_exact(tmp_path, name):
    model = make(**CASES[name])
    save_pretrained(model, tmp_path / "a", training={"iter_num": 9})
    convert(tmp_path / "a", tmp_path / "run", "reallm-forge")
    convert(tmp_path / "run", tmp_path / "b", "forge")
    back, training = load_any(tmp_path / "b")
    assert same_state(model, back) and configs_equal(model.config, back.config) and training["iter_num"] == 9


@pytest.mark.parametrize("name", CASES)
def test_same_loss_in_both_formats(tmp_path, name):
    model = make(**CASES[name])
    save_pretrained(model, tmp_path / "forge")
    save_ckpt(model, tmp_path / "run")
    x, y = batch()
    with torch.no_grad():  # eval: quantized_linear runs on its quantized weights in every copy
        reference = model(x, y)[1].item()
        for path in (tmp_path / "forge", tmp_path / "run"):
            loss = from_pretrained(path)(x, y)[1].item()
            assert abs(loss - reference) <= 1e-5 * abs(reference), path


def test_quantized_linear_export_writes_upstreams_buffers(tmp_path):
    model = make(**QUANTIZED)
    sd = ckpt_of(model, tmp_path / "c.pt", iter_num=12)["model"]
    q = "transformer.h.0.attn.c_attn_q."
    layer = model.transformer.h[0].attn.c_attn_q
    # affine 6 bits: zp = -round(min / scale) - 32, scale = (max - min) / 63, as upstream's eval stores it
    w = layer.weight.detach()
    scale = (w.max() - w.min()) / 63
    assert torch.equal(sd[q + "weight_zero_point"], (-torch.round(w.min() / scale) - 32).long().reshape(1))
    assert sd[q + "weight_zero_point"].dtype == torch.int64 and sd[q + "bias_zero_point"].shape == (1,)
    assert torch.equal(sd[q + "_step"], torch.tensor([12.0]))
    v = "transformer.h.0.attn.c_attn_v."  # symmetric: zero point 0
    assert sd[v + "weight_zero_point"].tolist() == [0]
    n_linear = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    assert sum(k.endswith("._step") for k in sd) == n_linear == 12
    assert not any(k.endswith(("quantized_weight", "weight_norm", "quantized_bias", "bias_norm")) for k in sd)
    assert torch.equal(ckpt_of(model, tmp_path / "d.pt")["model"][q + "_step"], torch.tensor([0.0]))


def test_quantized_linear_without_bias_has_no_bias_zero_point(tmp_path):
    sd = ckpt_of(make(linear_variant_mlp="quantized_linear"), tmp_path / "c.pt")["model"]
    assert "transformer.h.1.mlp.c_fc.weight_zero_point" in sd and "transformer.h.1.mlp.c_fc.bias_zero_point" not in sd


def test_bitlinear_optimized_exports_int8_signs_without_a_weight(tmp_path):
    model = make(**CASES["bitlinear"])
    ckpt = ckpt_of(model, tmp_path / "c.pt")
    p = "transformer.h.1.attn.c_proj."
    w = model.transformer.h[1].attn.c_proj.weight.detach()
    codes = ckpt["model"][p + "quantized_weights"]
    assert p + "weight" not in ckpt["model"] and codes.dtype == torch.int8
    assert torch.equal(codes, torch.sign(w - w.mean()).to(torch.int8))
    assert torch.equal(ckpt[EXTRA_KEY][p + "weight"], w)  # kept beside the state dict for the round trip
    assert "transformer.h.0.mlp.c_fc.weight" in ckpt["model"]  # bitlinear_1p58 keeps its float weight


def test_bitlinear_optimized_from_upstream_signs_alone_gives_the_same_eval(tmp_path):
    """An upstream-written checkpoint has only the signs: the weight becomes the sign matrix, whose
    own signs around its mean are the same codes, so eval is unchanged."""
    model = make(**CASES["bitlinear"])
    ckpt = ckpt_of(model, tmp_path / "c.pt")
    del ckpt[EXTRA_KEY]
    torch.save(ckpt, tmp_path / "upstream.pt")
    back = from_pretrained(tmp_path / "upstream.pt")
    layer = back.transformer.h[1].attn.c_proj
    assert torch.equal(layer.weight, ckpt["model"]["transformer.h.1.attn.c_proj.quantized_weights"].float())
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(back(x)[0], model(x)[0])
    for m in back.modules():
        if isinstance(m, BitLinearOptimized):
            assert torch.equal(m.quantized_weights, ref.sign_binarize(m.weight))
    ckpt[EXTRA_KEY] = {"transformer.h.1.attn.c_proj.weight": torch.randn(32, 32)}  # stale: signs differ
    torch.save(ckpt, tmp_path / "stale.pt")
    stale = from_pretrained(tmp_path / "stale.pt").transformer.h[1].attn.c_proj.weight
    assert set(stale.unique().tolist()) <= {-1.0, 0.0, 1.0}


def hand_built_quantized_upstream_state(model):
    """Key names written out from upstream's QuantizedLinear and create_activation_buffers, as a
    run leaves them after an eval: every buffer, with the _orig_mod. prefix of torch.compile."""
    ours = model.state_dict()
    sd = {k: v.clone() for k, v in ours.items()}
    for i in range(2):
        for proj in ("attn.c_attn_q", "attn.c_attn_k", "attn.c_attn_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            p = f"transformer.h.{i}.{proj}."
            sd[p + "_step"] = torch.tensor([250.0])
            sd[p + "weight_zero_point"] = torch.tensor([-3])
            sd[p + "bias_zero_point"] = torch.tensor([178933860])
            sd[p + "quantized_weight"] = torch.zeros(ours[p + "weight"].shape, dtype=torch.int8)
            sd[p + "weight_norm"] = torch.tensor(0.01)
            sd[p + "quantized_bias"] = torch.zeros(ours[p + "bias"].shape, dtype=torch.int32)
            sd[p + "bias_norm"] = torch.tensor(1e-10)
        for group, point in (("mlp", "input"), ("mlp", "output"), ("attn", "input")):
            for suffix in ("", "_scale", "_zero_point"):
                sd[f"transformer.h.{i}.{group}.{group}_act_{point}{suffix}"] = torch.ones(1)
    sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)  # manual attention path
    sd["transformer.h.1.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    return {"_orig_mod." + k: v for k, v in sd.items()}


def test_hand_built_upstream_quantized_linear_state_dict_loads(tmp_path):
    model = make(linear_variant_attn="quantized_linear", linear_variant_mlp="quantized_linear", bias=True,
                 quantize_mlp_act_input=True, quantize_mlp_act_output=True, quantize_attn_act_input=True,
                 store_activations=True, activations_quant_method="symmetric_quant")
    model_args = {**TINY, "n_kv_group": 4, "bias": True, "linear_variant_attn": "quantized_linear",
                  "linear_variant_mlp": "quantized_linear",
                  "quantize_mlp_act_input": True, "quantize_mlp_act_output": True, "quantize_attn_act_input": True,
                  "store_activations": True, "activations_quant_method": "symmetric_quant", "eval_interval": 250}
    torch.save({"model": hand_built_quantized_upstream_state(model), "model_args": model_args, "iter_num": 250,
                "best_val_loss": torch.tensor(2.0), "config": {}}, tmp_path / "ckpt.pt")
    loaded = from_pretrained(tmp_path)
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


def test_moe_and_lsv_keep_upstreams_names(tmp_path):
    moe = ckpt_of(make(**CASES["moe_noisy_quantized"]), tmp_path / "m.pt")["model"]
    for name in ("transformer.h.0.mlp.router.route_linear.weight", "transformer.h.0.mlp.router.route_linear.bias",
                 "transformer.h.2.mlp.router.noise_linear.bias", "transformer.h.2.mlp.experts.2.c_fc.weight",
                 "transformer.h.0.mlp.experts.0.c_proj._step", "transformer.h.1.mlp.c_fc.weight"):
        assert name in moe, name
    assert not any(k.startswith(("transformer.h.1.mlp.router", "transformer.h.3.mlp.experts")) for k in moe)
    comb = make(**CASES["lsv_linear_comb"])
    snap = ckpt_of(comb, tmp_path / "s.pt")["model"]
    late = torch.load(save_ckpt(comb, tmp_path / "l.pt", layout="latest"), weights_only=True)["model"]
    assert {k for k in snap if k.startswith("lsv")} == {"lsv_matrix.lsv_matrix", "lsv_matrix.linear_comb_matrix"}
    assert {k for k in late if k.startswith("lsv")} == {"lsv_matrix.lsv_embedding.weight",
                                                        "lsv_matrix.linear_comb_embedding.weight"}
    assert same_state(from_pretrained(tmp_path / "l.pt"), comb)
    one_hot = torch.load(save_ckpt(make(**CASES["lsv_one_hot"]), tmp_path / "o.pt", layout="latest"),
                         weights_only=True)["model"]
    assert "lsv_matrix.lsv_matrix" in one_hot  # only linear_comb was renamed upstream


def test_moe_training_options_are_dropped_and_capacity_is_refused(tmp_path):
    model = make(use_moe=True, n_experts=4, moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001, moe_noise_std=0.5)
    args = ckpt_of(model, tmp_path / "c.pt")["model_args"]
    assert args["use_moe"] and args["n_experts"] == 4
    assert not {"moe_aux_loss_coef", "moe_z_loss_coef", "moe_noise_std"} & set(args)
    assert same_state(from_pretrained(tmp_path / "c.pt"), model)
    with pytest.raises(ConfigError, match="moe_capacity_factor=1.25 is a forge_dist option"):
        save_ckpt(make(use_moe=True, n_experts=4, moe_capacity_factor=1.25), tmp_path / "cap.pt")


def test_a_bad_extra_entry_is_refused(tmp_path):
    ckpt = ckpt_of(make(), tmp_path / "c.pt")
    ckpt[EXTRA_KEY] = {"x": "not a tensor"}
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=EXTRA_KEY):
        from_pretrained(tmp_path / "bad.pt")

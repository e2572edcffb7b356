"""Steering vectors: the static vector changes exactly the chosen block's output, the obtained
mean is written only when asked, every LSV variant trains in a tiny GPT, dataset selection and
mixture follow their formulas, and gradients reach only the selected dataset."""
import os

import numpy as np
import pytest
import torch

import forge_dist.model  # noqa: F401  (registers every variant)
from forge_dist import ConfigError, ModelConfig
from forge_dist.model.gpt import GPT
from forge_dist.variants import LSV
from forge_dist.model.steering import (OneHotLSV, OneHotMLPLSV, RoutedLSV, load_vector, lsv_module, set_lsv_index,
                                       set_lsv_mixture, set_lsv_scaling_factor)

N_EMBD = 32
INDEXED = ("one_hot", "linear_comb", "one_hot_mlp")  # variants selected by the dataset index
ROUTED = tuple(v for v in LSV.names() if v not in INDEXED)


def tiny(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=N_EMBD, block_size=16, vocab_size=64)
    base.update(kw)
    return ModelConfig(**base)


def lsv_config(variant="one_hot", **kw):
    base = dict(use_lsv=True, lsv_dataset_num=3, lsv_variant=variant, apply_lsv_at_layer_idx=1)
    return tiny(**{**base, **kw})


def model_for(cfg, seed=0):
    torch.manual_seed(seed)
    return GPT(cfg)


def tokens(seed=1, batch=2):
    return torch.randint(0, 64, (batch, 16), generator=torch.Generator().manual_seed(seed))


class Recorder:
    """Input and output of every block and the input of ln_f, by forward hooks."""

    def __init__(self, model):
        self.inputs, self.outputs = {}, {}
        for i, block in enumerate(model.transformer.h):
            block.register_forward_pre_hook(lambda m, a, i=i: self.inputs.__setitem__(i, a[0].detach().clone()))
            block.register_forward_hook(lambda m, a, o, i=i: self.outputs.__setitem__(i, o.detach().clone()))
        n = len(model.transformer.h)
        model.transformer.ln_f.register_forward_pre_hook(
            lambda m, a: self.inputs.__setitem__(n, a[0].detach().clone()))


def save_npy(path, array):
    np.save(path, np.asarray(array, dtype=np.float32))
    return str(path)


# --- static vectors -------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_apply_vector_changes_exactly_block_k_output(tmp_path, k):
    v = torch.randn(N_EMBD, generator=torch.Generator().manual_seed(7))
    file = save_npy(tmp_path / "v.npy", v.numpy())
    plain = model_for(tiny()).eval()
    steered = GPT(tiny(apply_vector_at_layer_idx=k, apply_vector_file=file, apply_vector_scaling_factor=0.5)).eval()
    steered.load_state_dict(plain.state_dict())  # the vector is not in the state dict
    rp, rs = Recorder(plain), Recorder(steered)
    x = tokens()
    with torch.no_grad():
        plain(x, x)
        steered(x, x)
    for i in range(k):  # blocks up to and including block k compute the same thing
        assert torch.equal(rs.outputs[i], rp.outputs[i])
    # what follows block k (block k+1, or ln_f) receives block k's output + 0.5 v at every position
    assert torch.allclose(rs.inputs[k], rs.outputs[k - 1] + 0.5 * v, atol=1e-6, rtol=0)
    assert not torch.allclose(rs.inputs[k], rp.inputs[k])
    assert "steering.vector" not in steered.state_dict()


def test_vector_is_a_buffer_not_a_parameter(tmp_path):
    file = save_npy(tmp_path / "v.npy", np.ones(N_EMBD))
    m = GPT(tiny(apply_vector_at_layer_idx=1, apply_vector_file=file))
    assert all(p is not m.steering.vector for p in m.parameters())
    assert torch.equal(dict(m.named_buffers())["steering.vector"], torch.ones(N_EMBD))


def test_load_vector_accepts_upstream_shape_and_refuses_bad_files(tmp_path):
    v = np.arange(N_EMBD, dtype=np.float32)
    assert torch.equal(load_vector(save_npy(tmp_path / "a.npy", v.reshape(1, 1, -1)), N_EMBD), torch.from_numpy(v))
    with pytest.raises(ConfigError, match=r"apply_vector_file=.*shape \(4, 8\).*\(32,\)"):
        load_vector(save_npy(tmp_path / "b.npy", v.reshape(4, 8)), N_EMBD)
    with pytest.raises(ConfigError, match="does not exist"):
        load_vector(str(tmp_path / "missing.npy"), N_EMBD)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="pickle"):
        load_vector(str(tmp_path / "obj.npy"), N_EMBD)


def test_obtain_records_the_mean_and_writes_only_when_asked(tmp_path):
    target = tmp_path / "obtained"
    m = model_for(tiny(obtain_vector_at_layer_idx=1, obtain_vector_file=str(target))).eval()
    rec, outs = Recorder(m), []
    with torch.no_grad():
        for seed, batch in ((1, 2), (2, 3)):
            m(tokens(seed, batch))
            outs.append(rec.outputs[0].reshape(-1, N_EMBD))
    assert os.listdir(tmp_path) == []  # forward passes never write
    written = m.steering.save_obtained()
    assert written.endswith("obtained.npy") and os.listdir(tmp_path) == ["obtained.npy"]
    saved = np.load(written, allow_pickle=False)
    expected = torch.cat(outs).mean(0)  # over every position of both batches
    assert saved.shape == (N_EMBD,) and saved.dtype == np.float32
    assert np.allclose(saved, expected.numpy(), atol=1e-6)
    # the saved file is a valid apply_vector_file
    m2 = GPT(tiny(apply_vector_at_layer_idx=2, apply_vector_file=written))
    assert torch.allclose(m2.steering.vector, expected, atol=1e-6)
    m.steering.reset_obtained()
    with pytest.raises(ConfigError, match="no output of block 1"):
        m.steering.obtained()


def test_save_obtained_needs_a_configured_point_and_a_path(tmp_path):
    with pytest.raises(ConfigError, match="obtain_vector_at_layer_idx"):
        GPT(tiny()).steering.obtained()
    m = GPT(tiny(obtain_vector_at_layer_idx=2))
    m(tokens())
    with pytest.raises(ConfigError, match="obtain_vector_file"):
        m.steering.save_obtained()
    assert m.steering.save_obtained(str(tmp_path / "x.npy")).endswith("x.npy")


@pytest.mark.parametrize("kw, message", [
    (dict(apply_vector_at_layer_idx=0, apply_vector_file="v.npy"), "apply_vector_at_layer_idx=0 is outside 1..n_layer"),
    (dict(apply_vector_at_layer_idx=3, apply_vector_file="v.npy"), "outside 1..n_layer=2"),
    (dict(apply_vector_at_layer_idx=1), "apply_vector_file is None"),
    (dict(obtain_vector_at_layer_idx=5), "obtain_vector_at_layer_idx=5"),
    (dict(use_lsv=True, apply_lsv_at_layer_idx=1), "lsv_dataset_num.*len\\(dataset_list\\)"),
    (dict(use_lsv=True, lsv_dataset_num=2), "apply_lsv_at_layer_idx"),
    (dict(use_lsv=True, lsv_dataset_num=2, apply_lsv_at_layer_idx=3), "apply_lsv_at_layer_idx=3 is outside 0..n_layer"),
    (dict(use_lsv=True, lsv_dataset_num=2, apply_lsv_at_layer_idx=0, lsv_index=2), "lsv_index=2"),
    (dict(use_lsv=True, lsv_dataset_num=2, apply_lsv_at_layer_idx=0, lsv_variant="nope"), "lsv_variant='nope'"),
    (dict(lsv_dataset_num=0), "lsv_dataset_num=0"),
])
def test_config_rules(kw, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**kw)


# --- learned steering vectors ---------------------------------------------------------------
@pytest.mark.parametrize("variant", LSV.names())
def test_every_variant_trains_in_a_tiny_gpt(variant):
    m = model_for(lsv_config(variant)).train()
    x = tokens()
    _, loss = m(x, x)
    loss.backward()
    assert torch.isfinite(loss)
    lsv = m.lsv_matrix
    assert isinstance(lsv, LSV.get(variant)) and lsv_module(m) is lsv
    grads = [p.grad for p in lsv.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(n.startswith("lsv_matrix.") for n in m.state_dict() if "lsv" in n)


@pytest.mark.parametrize("variant", LSV.names())
def test_index_switching(variant):
    m = model_for(lsv_config(variant)).eval()
    x = tokens()
    outs = []
    with torch.no_grad():
        for i in range(3):
            set_lsv_index(m, i)
            outs.append(m(x, x)[0])
    if variant in INDEXED:
        assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    else:  # routed variants choose by the hidden state and ignore the index, as upstream
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


def test_one_hot_gradient_reaches_only_the_selected_row():
    m = model_for(lsv_config("one_hot")).train()
    set_lsv_index(m, 1)
    x = tokens()
    m(x, x)[1].backward()
    g = m.lsv_matrix.lsv_matrix.grad
    assert g[1].abs().sum() > 0
    assert torch.equal(g[0], torch.zeros(N_EMBD)) and torch.equal(g[2], torch.zeros(N_EMBD))


def test_one_hot_mlp_runs_and_trains_only_the_selected_mlp():
    m = model_for(lsv_config("one_hot_mlp")).train()
    set_lsv_index(m, 2)
    x = tokens()
    m(x, x)[1].backward()
    for i, mlp in enumerate(m.lsv_matrix.mlps):
        has = [p.grad is not None for p in mlp.parameters()]
        assert all(has) if i == 2 else not any(has)


def test_lsv_acts_at_its_point_with_the_one_hot_formula():
    """apply_lsv_at_layer_idx=0: block 1 receives embedding + scale * M[index]."""
    m = model_for(lsv_config("one_hot", apply_lsv_at_layer_idx=0)).eval()
    rec, x = Recorder(m), tokens()
    set_lsv_index(m, 2)
    set_lsv_scaling_factor(m, 3.0)
    with torch.no_grad():
        m(x)
        emb = m.embed(x)
    assert torch.allclose(rec.inputs[0], emb + 3.0 * m.lsv_matrix.lsv_matrix[2], atol=1e-6)


def test_linear_comb_formula():
    cfg = lsv_config("linear_comb")
    lsv = LSV.build("linear_comb", cfg)
    x = torch.randn(2, 4, N_EMBD)
    lsv.set_index(1)
    expected = x + lsv.linear_comb_matrix[1] @ lsv.lsv_matrix
    assert torch.allclose(lsv(x), expected, atol=1e-6)


def test_mixture_mode_then_back_to_one_hot():
    cfg = lsv_config("one_hot")
    lsv = OneHotLSV(cfg)
    x = torch.randn(2, 4, N_EMBD)
    w = [0.5, -1.0, 2.0]
    lsv.set_mixture(w)
    assert torch.allclose(lsv(x), x + torch.tensor(w) @ lsv.lsv_matrix, atol=1e-6)
    lsv.set_index(0)
    assert torch.allclose(lsv(x), x + lsv.lsv_matrix[0], atol=1e-6)
    mlp = OneHotMLPLSV(cfg)
    mlp.set_mixture(w)
    expected = x + sum(wi * f(x) for wi, f in zip(w, mlp.mlps))
    assert torch.allclose(mlp(x), expected, atol=1e-5)


def test_selection_errors():
    m = model_for(lsv_config("one_hot"))
    with pytest.raises(ConfigError, match="index 3 is out of range"):
        set_lsv_index(m, 3)
    with pytest.raises(ConfigError, match="2 weights"):
        set_lsv_mixture(m, [1.0, 2.0])
    with pytest.raises(ConfigError, match="use_lsv=True"):
        set_lsv_index(GPT(tiny()), 0)


def test_lsv_index_option_is_the_initial_index():
    m = model_for(lsv_config("one_hot", lsv_index=2))
    assert m.lsv_matrix.lsv_index == 2


def test_ohmt_hard_top2_with_straight_through_gradient():
    lsv = LSV.build("ohmt", lsv_config("ohmt"))
    x = torch.randn(2, 5, N_EMBD, requires_grad=True)
    r = lsv.route(x)
    assert set(r.detach().unique().tolist()) <= {0.0, 1.0} and torch.equal(r.detach().sum(-1), torch.full((2, 5), 2.0))
    chosen = lsv.router(x).topk(2, dim=-1).indices
    expected = x + sum(((chosen == i).any(-1, keepdim=True).float() * f(x)) for i, f in enumerate(lsv.mlps))
    assert torch.allclose(lsv(x), expected, atol=1e-6)
    lsv(x).sum().backward()
    assert lsv.router.weight.grad.abs().sum() > 0  # the straight-through path reaches the router


@pytest.mark.parametrize("variant", ROUTED)
def test_routed_weights(variant):
    lsv = LSV.build(variant, lsv_config(variant))
    assert isinstance(lsv, RoutedLSV)
    r = lsv.route(torch.randn(2, 5, N_EMBD))
    assert r.shape == (2, 5, 3)
    if variant in ("ohmm", "ohma", "mol"):  # softmax routers
        assert torch.allclose(r.sum(-1), torch.ones(2, 5), atol=1e-6)
    if variant == "ohmg":  # independent sigmoid gates
        assert ((r > 0) & (r < 1)).all()


def test_lsv_linears_get_the_model_init():
    m = model_for(lsv_config("one_hot_mlp"))
    first = m.lsv_matrix.mlps[0][0]
    assert torch.equal(first.bias, torch.zeros_like(first.bias))
    assert abs(first.weight.std().item() - 0.02) < 0.005


@pytest.mark.parametrize("variant", LSV.names())
def test_lsv_models_round_trip_through_reallm_forge_checkpoints(tmp_path, variant):
    from forge_dist.io import load_ckpt, save_ckpt

    m = model_for(lsv_config(variant)).eval()
    file = save_ckpt(m, str(tmp_path / "ckpt.pt"))
    ckpt = torch.load(file, map_location="cpu", weights_only=True)
    assert ckpt["model_args"]["use_lsv"] and ckpt["model_args"]["lsv_dataset_num"] == 3
    assert {k for k in ckpt["model"] if "lsv" in k} == {f"lsv_matrix.{k}" for k in m.lsv_matrix.state_dict()}
    back, _ = load_ckpt(file)
    back.eval()
    x = tokens()
    for model in (m, back):
        set_lsv_index(model, 2)
    with torch.no_grad():
        assert torch.equal(m(x)[0], back(x)[0])

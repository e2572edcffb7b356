"""Token embeddings: init variants (reference 2.16), factorisation, embedding scale, tying, init rules."""
import math
import pathlib

import numpy as np
import pytest
import torch

from forge_dist import ConfigError, ModelConfig
from forge_dist.model.gpt import GPT
from forge_dist.model.init import build_embedding_init
from forge_dist.variants import EMBED_INIT

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64)


def table(variant, shape=(64, 32), generator=None, **options):
    cfg = ModelConfig(**TINY, init_variant=variant, **options)
    return build_embedding_init(cfg, shape, generator=generator or torch.Generator().manual_seed(0))


def test_onehot_rows_are_scaled_unit_vectors():
    w = table("onehot", (20, 32), init_scale=0.5)
    assert torch.equal(w[:, :20], 0.5 * torch.eye(20)) and not w[:, 20:].any()


def test_onehot_needs_width_at_least_vocab():
    with pytest.raises(ConfigError, match="onehot.*width 32 < vocab_size 64"):
        table("onehot", (64, 32))


def test_hypercube_rows_are_the_binary_digits_of_the_row_index():
    w = table("hypercube", (64, 8), init_scale=0.25)
    assert set(w.unique().tolist()) <= {0.0, 0.25}
    decoded = (w / 0.25 * (2 ** torch.arange(8))).sum(1)
    assert torch.equal(decoded, torch.arange(64, dtype=torch.float32))


def test_hypercube_needs_enough_corners():
    with pytest.raises(ConfigError, match="2\\^5 = 32 < 64"):
        table("hypercube", (64, 5))


def test_rand_hypercube_rows_are_normalised_sign_corners():
    w = table("rand_hypercube", (64, 16), init_scale=0.3)
    assert torch.allclose(w.abs(), torch.full_like(w, 0.3 / 4))
    assert torch.allclose(w.norm(dim=1), torch.full((64,), 0.3))


def test_unique_hypercube_has_no_duplicates_or_antipodes():
    w = table("unique_hypercube", (32, 6), init_scale=2.0)  # all 2^(6-1) antipodal classes
    signs = torch.sign(w)
    keys = {tuple((r * r[0]).tolist()) for r in signs}
    assert len(keys) == 32
    assert torch.allclose(w.norm(dim=1), torch.full((32,), 2.0))


def test_unique_hypercube_refuses_too_large_a_vocab():
    with pytest.raises(ConfigError, match="2\\^\\(width-1\\) = 32 corners"):
        table("unique_hypercube", (33, 6))


def test_angle_hypersphere_rows_have_norm_init_radius():
    w = table("angle_hypersphere", init_radius=3.0)
    assert torch.allclose(w.norm(dim=1), torch.full((64,), 3.0), atol=1e-5)


def test_gaussian_norm_range_rows_are_in_range():
    # N(0, 0.02) rows in 32 dims have norms near 0.113: keep a band around it
    w = table("gaussian_norm_range", gaussian_min_norm=0.11, gaussian_max_norm=0.12)
    norms = w.norm(dim=1)
    assert ((norms >= 0.11) & (norms <= 0.12)).all()


def test_gaussian_norm_range_with_an_impossible_range_says_so():
    with pytest.raises(ConfigError, match="widen the range"):
        table("gaussian_norm_range", gaussian_min_norm=5.0, gaussian_max_norm=6.0)
    with pytest.raises(ConfigError, match="exceeds gaussian_max_norm"):
        table("gaussian_norm_range", gaussian_min_norm=2.0, gaussian_max_norm=1.0)


def test_gaussian_matches_mean_and_std():
    w = table("gaussian", (256, 64), embedding_mean_init=0.5, embedding_std_init=0.1)
    assert abs(w.mean().item() - 0.5) < 0.01 and abs(w.std().item() - 0.1) < 0.01


def test_numpy_import_reads_the_table_times_init_scale(tmp_path):
    data = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    np.save(tmp_path / "wte.npy", data)
    w = table("numpy_import", init_wte_npy=str(tmp_path / "wte.npy"), init_scale=0.5)
    assert torch.equal(w, torch.from_numpy(data) * 0.5)


def test_numpy_import_errors(tmp_path):
    np.save(tmp_path / "small.npy", np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(ConfigError, match="holds shape \\(3, 4\\).*\\(64, 32\\)"):
        table("numpy_import", init_wte_npy=str(tmp_path / "small.npy"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="need pickle and are refused"):
        table("numpy_import", init_wte_npy=str(tmp_path / "obj.npy"))
    with pytest.raises(ConfigError, match="does not exist"):
        table("numpy_import", init_wte_npy=str(tmp_path / "missing.npy"))


def test_model_uses_the_variant_for_wte_only():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, "vocab_size": 32}, init_variant="onehot", init_scale=0.5))
    assert torch.equal(model.transformer.wte.weight.detach(), 0.5 * torch.eye(32))
    assert model.lm_head.weight is model.transformer.wte.weight
    wpe = model.transformer.wpe.weight.detach()
    assert 0.01 < wpe.std().item() < 0.03  # the position table stays gaussian


def test_residual_projections_get_the_scaled_init():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, "n_layer": 8, "n_embd": 128}))
    expected = 0.02 / math.sqrt(2 * 8)
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - expected) / expected < 0.1
    assert abs(model.transformer.h[0].attn.c_attn_q.weight.std().item() - 0.02) < 0.002


# --- factorisation, scale, tying ------------------------------------------------------------
def test_factorised_embeddings_shapes_and_forward():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, n_embd_wte=8)).eval()
    t = model.transformer
    assert t.wte.weight.shape == (64, 8) and model.lm_head.weight.shape == (64, 8)
    assert t.scale_up.weight.shape == (32, 8) and t.scale_down.weight is t.scale_up.weight
    idx = torch.randint(0, 64, (2, 16))
    expected = t.wte(idx) @ t.scale_up.weight.T + t.wpe(torch.arange(16))
    assert torch.allclose(model.embed(idx), expected)
    h = torch.randn(2, 16, 32)
    logits, _ = model.head(h, targets=torch.zeros(2, 16, dtype=torch.long))
    assert torch.allclose(logits, (t.ln_f(h) @ t.scale_up.weight) @ model.lm_head.weight.T, atol=1e-6)


def test_untied_factorisation_and_head():
    model = GPT(ModelConfig(**TINY, n_embd_wte=8, n_embd_wte_scale_tying=False, wte_weight_tying=False))
    t = model.transformer
    assert t.scale_down.weight is not t.scale_up.weight
    assert model.lm_head.weight is not t.wte.weight
    names = dict(model.named_parameters())
    assert {"transformer.scale_down.weight", "lm_head.weight"} <= set(names)


def test_embedding_scale_parameter():
    model = GPT(ModelConfig(**TINY, use_embedding_scale=True)).eval()
    assert model.embedding_scale.shape == (1,)
    assert torch.allclose(model.embedding_scale, torch.tensor([math.sqrt(32)]))
    assert "embedding_scale" in model.state_dict()
    idx = torch.randint(0, 64, (2, 16))
    t = model.transformer
    assert torch.allclose(model.embed(idx), t.wte(idx) * math.sqrt(32) + t.wpe(torch.arange(16)), atol=1e-6)
    custom = GPT(ModelConfig(**TINY, use_embedding_scale=True, embedding_scale_init=2.5))
    assert custom.embedding_scale.item() == 2.5
    assert "embedding_scale" not in GPT(ModelConfig(**TINY)).state_dict()


def test_embeddings_doc_lists_every_init_variant():
    doc = (pathlib.Path(__file__).parents[2] / "docs" / "options" / "embeddings.md").read_text()
    for name in EMBED_INIT.names():
        assert f"| `{name}` |" in doc, name

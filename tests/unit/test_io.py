"""Checkpoints: our safetensors directory, ReaLLM-Forge ckpt.pt import/export, forge-convert."""
import argparse
import json
import os
import runpy
import sys

import pytest
import torch

import forge_dist
from forge_dist import CheckpointError, ConfigError
from forge_dist.config.loading import configs_equal, model_args_from_config
from forge_dist.io import convert, forge_format, from_pretrained, load_any, save_ckpt, save_pretrained
from forge_dist.io.convert import main as convert_main
from forge_dist import variants as registries
from forge_dist.testing.models import same_state
from forge_dist.testing.models import fixed_batch as batch
from forge_dist.testing.models import make_model as make

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- our format ----------------------------------------------------------------------------------
def test_our_format_round_trip_is_exact_and_keeps_ties(tmp_path):
    model = make(n_embd_wte=16, use_embedding_scale=True, n_kv_group=2)
    save_pretrained(model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    back = from_pretrained(tmp_path / "ckpt")
    assert not back.training and back.config == model.config and same_state(model, back)
    assert back.lm_head.weight is back.transformer.wte.weight
    assert back.transformer.scale_down.weight is back.transformer.scale_up.weight
    from safetensors import safe_open

    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        stored = set(f.keys())
        aliases = json.loads(f.metadata()[forge_format.ALIASES_KEY])
    assert "lm_head.weight" not in stored and aliases["lm_head.weight"] == "transformer.wte.weight"
    assert aliases["transformer.scale_down.weight"] == "transformer.scale_up.weight"
    x, y = batch()
    assert torch.equal(model(x, y)[1], back(x, y)[1])


def test_cross_layer_shared_modules_are_stored_once_and_stay_shared(tmp_path):
    model = make(n_layer=4, shared_attn_size=2)
    save_pretrained(model, tmp_path / "ckpt")
    from safetensors import safe_open

    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        aliases = json.loads(f.metadata()[forge_format.ALIASES_KEY])
    assert aliases["transformer.h.1.attn.c_attn_q.weight"] == "transformer.h.0.attn.c_attn_q.weight"
    back = from_pretrained(tmp_path / "ckpt")
    assert back.transformer.h[1].attn is back.transformer.h[0].attn and same_state(model, back)


def test_config_json_has_the_format_version(tmp_path):
    save_pretrained(make(), tmp_path / "ckpt", training={"iter_num": 5})
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["format"] == "forge_dist" and meta["format_version"] == forge_format.FORMAT_VERSION
    assert meta["model_config"]["n_layer"] == 2 and meta["training"] == {"iter_num": 5}
    meta["format_version"] = forge_format.FORMAT_VERSION + 1
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="upgrade forge_dist"):
        from_pretrained(tmp_path / "ckpt")


def test_save_replaces_our_checkpoint_but_never_foreign_content(tmp_path):
    save_pretrained(make(seed=0), tmp_path / "ckpt")
    newer = make(seed=1)
    save_pretrained(newer, tmp_path / "ckpt")
    assert same_state(from_pretrained(tmp_path / "ckpt"), newer)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_pretrained(newer, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "other"]  # no temporaries left


def test_a_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    old = make(seed=0)
    save_pretrained(old, tmp_path / "ckpt")
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(make(seed=1), tmp_path / "ckpt")
    assert same_state(from_pretrained(tmp_path / "ckpt"), old)
    assert os.listdir(tmp_path) == ["ckpt"]


def test_tied_names_with_different_values_are_refused(tmp_path):
    model = make(wte_weight_tying=False)
    save_ckpt(model, tmp_path / "out")
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    ckpt["model_args"]["wte_weight_tying"] = True
    torch.save(ckpt, tmp_path / "tied.pt")
    with pytest.raises(CheckpointError, match="lm_head.weight and transformer.wte.weight differ"):
        from_pretrained(tmp_path / "tied.pt")


# --- ReaLLM-Forge ckpt.pt ------------------------------------------------------------------------
def test_exported_ckpt_loads_without_pickle_and_has_upstream_keys(tmp_path):
    file = save_ckpt(make(), tmp_path / "out", training={"iter_num": 12, "best_val_loss": 2.5})
    ckpt = torch.load(file, map_location="cpu", weights_only=True)
    assert {"model", "model_args", "iter_num", "best_val_loss", "config"} <= set(ckpt)
    assert ckpt["iter_num"] == 12 and torch.is_tensor(ckpt["best_val_loss"]) and ckpt["best_val_loss"].item() == 2.5
    assert ckpt["model_args"]["n_kv_group"] == 4
    assert "transformer.h.0.attn.bias" not in ckpt["model"]  # default = upstream's SDPA path: no mask buffer


@pytest.mark.parametrize("extra", [{"n_kv_group": 2}, {"softmax_variant_attn": "relumax"}, {"window_size": 4},
                                   {"disable_flash_attention": True}])
def test_manual_attention_paths_get_upstreams_causal_mask_buffer(tmp_path, extra):
    ckpt = torch.load(save_ckpt(make(**extra), tmp_path / "c.pt"), weights_only=True)
    mask = ckpt["model"]["transformer.h.1.attn.bias"]
    assert torch.equal(mask, torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))


def test_forge_to_reallm_forge_to_forge_is_exact(tmp_path):
    model = make(n_kv_group=2, use_peri_ln=True, use_rotary_embeddings=True, rope_length=4,
                 use_embedding_scale=True, n_embd_wte=16)
    save_pretrained(model, tmp_path / "a", training={"iter_num": 3, "best_val_loss": 1.5})
    assert convert_main([str(tmp_path / "a"), str(tmp_path / "run"), "--to", "reallm-forge"]) == 0
    assert convert_main([str(tmp_path / "run"), str(tmp_path / "b"), "--to", "forge"]) == 0
    back, training = load_any(tmp_path / "b")
    assert same_state(model, back) and configs_equal(model.config, back.config)
    assert training["iter_num"] == 3 and training["best_val_loss"] == 1.5


def test_reallm_forge_to_forge_to_reallm_forge_keeps_weights_and_run_info(tmp_path):
    model = make()
    save_ckpt(model, tmp_path / "run", training={"iter_num": 40, "best_val_loss": 1.25,
                                                  "reallm_forge_config": {"dataset": "shakespeare_char"}})
    convert(tmp_path / "run", tmp_path / "forge", "forge")
    convert(tmp_path / "forge", tmp_path / "run2.pt", "reallm-forge")
    a = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "run2.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["model_args"] == b["model_args"] and b["iter_num"] == 40 and b["config"]["dataset"] == "shakespeare_char"


def test_layouts_spell_peri_ln_and_embedding_scale_as_each_upstream_version(tmp_path):
    model = make(use_peri_ln=True, use_embedding_scale=True)
    snap = torch.load(save_ckpt(model, tmp_path / "s.pt"), weights_only=True)["model"]
    late = torch.load(save_ckpt(model, tmp_path / "l.pt", layout="latest"), weights_only=True)["model"]
    assert "transformer.h.0.out_ln_attn.gain" in snap and snap["embedding_scale"].shape == ()
    assert "transformer.h.0.peri_ln_attn.gain" in late and late["embedding_scale"].shape == (1,)
    for file in ("s.pt", "l.pt"):
        assert same_state(from_pretrained(tmp_path / file), model)
    with pytest.raises(ConfigError, match="layout='newest'.*snapshot, latest"):
        save_ckpt(model, tmp_path / "x.pt", layout="newest")


def hand_built_upstream_state(model, n_layer=2):
    """The source model's tensors under key names written out from reference 2.2 (default
    causal + mlp + pre-LN RMSNorm, GQA so upstream's manual path keeps ``attn.bias``), with the
    ``_orig_mod.`` prefix torch.compile adds."""
    ours = model.state_dict()
    sd = {"transformer.wte.weight": ours["transformer.wte.weight"],
          "transformer.wpe.weight": ours["transformer.wpe.weight"],
          "transformer.ln_f.gain": ours["transformer.ln_f.gain"],
          "lm_head.weight": ours["transformer.wte.weight"]}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        for name in ("pre_ln_attn.gain", "pre_ln_mlp.gain", "attn.c_attn_q.weight", "attn.c_attn_k.weight",
                     "attn.c_attn_v.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight",
                     "mlp.activation_x_offset", "mlp.activation_y_offset"):
            sd[p + name] = ours[p + name].clone()
        sd[p + "attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    return {"_orig_mod." + k: v for k, v in sd.items()}


def test_hand_built_reallm_forge_state_dict_loads_with_the_same_logits(tmp_path):
    model = make(n_kv_group=2)
    model_args = {"n_layer": 2, "n_head": 4, "n_kv_group": 2, "n_embd": 32, "block_size": 16, "vocab_size": 64,
                  "bias": False, "dropout": 0.0, "eval_interval": 250, "attention_list": None}
    torch.save({"model": hand_built_upstream_state(model), "model_args": model_args, "iter_num": 100,
                "best_val_loss": torch.tensor(2.0), "best_iter": 90, "config": {"dataset": "shakespeare_char"},
                "optimizer": None, "scheduler": None}, tmp_path / "ckpt.pt")
    loaded = forge_dist.from_pretrained(tmp_path)  # the out_dir holding ckpt.pt
    x, _ = batch()
    assert torch.allclose(loaded(x)[0], model(x)[0], rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_newer_upstream_peri_ln_names_and_scalar_shapes_are_accepted(tmp_path):
    model = make(use_peri_ln=True, use_embedding_scale=True)
    sd = {k.replace("out_ln_", "peri_ln_"): v for k, v in model.state_dict().items()}
    sd["embedding_scale"] = sd["embedding_scale"].reshape(())
    torch.save({"model": sd, "model_args": model_args_from_config(model.config)}, tmp_path / "c.pt")
    assert same_state(from_pretrained(tmp_path / "c.pt"), model)


def test_a_file_that_needs_pickle_is_refused_with_a_clear_message(tmp_path):
    model = make()
    torch.save({"model": model.state_dict(), "model_args": model_args_from_config(model.config),
                "config": argparse.Namespace(dataset="shakespeare_char")}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path / "ckpt.pt")
    msg = str(e.value)
    assert "needs pickle" in msg and "arbitrary code" in msg and "vars(namespace)" in msg


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint forge_dist can read"):
        from_pretrained(tmp_path / "empty")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="expected keys \\['model', 'model_args'\\]"):
        from_pretrained(tmp_path / "other.pt")
    model = make()
    sd = model.state_dict()
    del sd["transformer.ln_f.gain"]
    torch.save({"model": sd, "model_args": model_args_from_config(model.config)}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing transformer.ln_f.gain"):
        from_pretrained(tmp_path / "partial.pt")
    torch.save({"model": model.state_dict(), "model_args": {**model_args_from_config(model.config), "n_lpe": 2}},
               tmp_path / "lpe.pt")
    with pytest.raises(ConfigError, match="lpe.pt.*n_lpe=2.*learned position embeddings"):
        from_pretrained(tmp_path / "lpe.pt")


def test_convert_cli_reports_errors_and_the_tools_wrapper_runs(tmp_path, capsys, monkeypatch):
    assert convert_main([str(tmp_path / "nothing"), str(tmp_path / "dst"), "--to", "forge"]) == 2
    assert "forge-convert: error:" in capsys.readouterr().err
    save_pretrained(make(), tmp_path / "src")
    monkeypatch.setattr(sys, "argv", ["convert_checkpoint.py", str(tmp_path / "src"), str(tmp_path / "o.pt"),
                                      "--to", "reallm-forge"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(REPO, "tools", "convert_checkpoint.py"), run_name="__main__")
    assert e.value.code == 0 and (tmp_path / "o.pt").is_file()


# --- the same weights in both formats give the same loss, for every registered variant ----------
VARIANTS = [(opt, name) for opt, reg in (("softmax_variant_attn", registries.SOFTMAX),
                                         ("norm_variant_attn", registries.NORM),
                                         ("activation_variant", registries.ACTIVATION),
                                         ("mlp_variant", registries.MLP),
                                         ("attention_variant", registries.ATTENTION))
            for name in reg.names()]


@pytest.mark.parametrize("option, name", VARIANTS, ids=[f"{o}={n}" for o, n in VARIANTS])
def test_same_loss_in_both_formats(tmp_path, option, name):
    # MLA in upstream's sizes (latent 4 d_h, rotary d_h / 2 with d_h = 8): it ignores the options
    extra = dict(mla_latent_dim=32, mla_rotary_dim=4) if name == "mla" else {}
    model = make(**{option: name}, **extra)
    save_pretrained(model, tmp_path / "forge")
    save_ckpt(model, tmp_path / "run")
    x, y = batch()
    with torch.no_grad():
        reference = model(x, y)[1].item()
        for path in (tmp_path / "forge", tmp_path / "run"):
            loss = from_pretrained(path)(x, y)[1].item()
            assert abs(loss - reference) <= 1e-5 * abs(reference), path

"""Hugging Face transformers import/export against the real transformers package (offline).

Every architecture both ways: a tiny forge_dist model exported and loaded by
AutoModelForCausalLM gives our logits (fp32, 1e-5 relative); a tiny random transformers model
built here from a config imports with its logits; forge -> hf -> forge is bit-exact; greedy
generation agrees token for token, through AutoTokenizer for our byte/char tokenizers.
"""
import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded
os.environ["TRANSFORMERS_OFFLINE"] = "1"
import transformers  # noqa: E402  (requirements-cpu.txt; a missing package fails here, never skips)

from forge_dist.errors import CheckpointError, ConfigError  # noqa: E402
from forge_dist.io import convert  # noqa: E402
from forge_dist.io.hf import load_hf, save_hf  # noqa: E402
from forge_dist.testing.hf import ARCH, EXPORTS, ROTARY, export_model as _forge_model  # noqa: E402
from forge_dist.testing.models import make_model, same_state  # noqa: E402

def _our_logits(model, idx):
    return model(idx, targets=idx)[0]  # with targets: every position's logits


def _assert_close(a, b, rel=1e-5):
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= rel * max(scale, 1.0), (a - b).abs().max().item()


def _hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


IDX = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_loads_in_transformers_with_our_logits(name, tmp_path):
    model = _forge_model(name)
    save_hf(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [ARCH[name.split("_")[0]]]
    hf = _hf_load(tmp_path / "hf")
    assert type(hf).__name__ == ARCH[name.split("_")[0]]
    with torch.no_grad():
        _assert_close(hf(IDX).logits, _our_logits(model, IDX))
    back, _ = load_hf(tmp_path / "hf")
    if "nobias" in name:  # GPT-2 always has biases: ours export as zeros and come back as bias=True
        assert back.config.bias and not back.transformer.h[0].attn.c_attn_q.bias.any()
        with torch.no_grad():
            assert torch.equal(_our_logits(back.eval(), IDX), _our_logits(model, IDX))
    else:
        assert same_state(back, model) or name.startswith("gemma2")  # forge -> hf -> forge is bit-exact
        _assert_close(_our_logits(back.eval(), IDX), _our_logits(model, IDX), rel=1e-6)  # gemma2: 1 + (g - 1)


SMALL = dict(vocab_size=64, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=16)
IMPORTS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                            activation_function="gelu"),
    "llama": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False),
    "llama_bias_tied": lambda: transformers.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True,
                                                        tie_word_embeddings=True, hidden_act="gelu"),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=5,
                                                  rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=4,
                                                  num_experts_per_tok=2, sliding_window=None,
                                                  rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                                                layer_types=["sliding_attention"] * 2, sliding_window=5,
                                                hidden_activation="gelu", attn_logit_softcapping=1.0,
                                                final_logit_softcapping=3.0),
}


def _random_hf(name, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(IMPORTS[name]()).eval()
    with torch.no_grad():  # norms away from ones, biases away from zeros
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", sorted(IMPORTS))
def test_import_random_transformers_model(name, tmp_path):
    hf = _random_hf(name)
    hf.save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "forge"), "forge")  # forge-convert HF_DIR DST --to forge
    from forge_dist.io import from_pretrained

    ours = from_pretrained(tmp_path / "forge")
    with torch.no_grad():
        _assert_close(_our_logits(ours, IDX), hf(IDX).logits)


@pytest.mark.parametrize("option, extra", [
    ("softmax_variant_attn", dict(ROTARY, softmax_variant_attn="relumax")),
    ("norm_variant_attn", dict(ROTARY, norm_variant_attn="hyperspherenorm")),
    ("use_qk_norm", dict(ROTARY, use_qk_norm=True)),
    ("use_peri_ln", dict(ROTARY, attn_logit_softcapping=30.0)),  # Gemma 2 has soft-capping with its post-norms
    ("use_embedding_scale", dict(ROTARY, final_logit_softcapping=30.0, use_peri_ln=True)),
    ("linear_variant_attn", dict(ROTARY, linear_variant_attn="quantized_linear")),
    ("rope_length", dict(ROTARY, rope_length=4)),
    ("use_abs_pos_embeddings", dict(ROTARY, use_abs_pos_embeddings=True)),  # Llama has no learned positions
    ("bias", dict(ROTARY, window_size=3, bias=True)),  # Mistral has no biases, Llama no window
    ("activation_variant", dict(ROTARY, activation_variant="squared_relu")),
    ("moe_layer_freq", dict(ROTARY, use_moe=True, n_experts=2)),
    ("use_parallel_mlp", dict(norm_variant_attn="layernorm", norm_variant_output="layernorm", use_parallel_mlp=True)),
])
def test_export_refuses_what_has_no_exact_equivalent(option, extra, tmp_path):
    model = make_model(**extra)
    with pytest.raises(ConfigError, match=option):
        save_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # refused before anything is written


def test_export_refuses_a_router_bias(tmp_path):
    model = make_model(**EXPORTS["mixtral"])  # make_model perturbs the router bias away from zero
    with pytest.raises(ConfigError, match="route_linear.bias"):
        save_hf(model, tmp_path / "hf")


def test_sharded_export_loads_both_ways(tmp_path):
    model = _forge_model("llama_untied_bias")
    save_hf(model, tmp_path / "hf", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "hf" / "model.safetensors").exists()
    with torch.no_grad():
        _assert_close(_hf_load(tmp_path / "hf")(IDX).logits, _our_logits(model, IDX))
    assert same_state(load_hf(tmp_path / "hf")[0], model)


def test_import_refuses_pickle_unknown_architecture_and_fields(tmp_path):
    hf = _random_hf("llama")
    hf.save_pretrained(tmp_path / "bin", safe_serialization=False) if _can_save_pickle() else \
        _fake_pickle_dir(tmp_path / "bin", hf)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_hf(tmp_path / "bin")
    from forge_dist.io.convert import main as convert_main

    assert convert_main([str(tmp_path / "bin"), str(tmp_path / "out"), "--to", "forge"]) == 2  # one line, no traceback
    assert not (tmp_path / "out").exists()
    hf.save_pretrained(tmp_path / "ok")
    cfg = {**hf.config.to_dict(), **json.loads((tmp_path / "ok" / "config.json").read_text())}  # every field spelled out
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    assert load_hf(tmp_path / "ok")[0].config.n_kv_group == 2  # metadata fields (id2label, ...) are fine
    for change, word in ((dict(architectures=["GPTNeoXForCausalLM"]), "GPTNeoXForCausalLM"),
                         (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
                          "rope_parameters"),
                         (dict(some_new_field=1), "some_new_field"),
                         (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
                         (dict(max_position_embeddings=None), "max_position_embeddings"),
                         (dict(hidden_act="gelu_pytorch_tanh"), "hidden_act")):
        (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ConfigError, match=word):
            load_hf(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "intermediate_size"}))
    with pytest.raises(ConfigError, match="lacks the field 'intermediate_size'"):
        load_hf(tmp_path / "ok")


def _can_save_pickle():
    import inspect

    return "safe_serialization" in inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters


def _fake_pickle_dir(path, hf):
    """transformers 5 writes safetensors only: a .bin directory as older versions wrote it."""
    path.mkdir()
    hf.config.to_json_file(path / "config.json")
    torch.save(hf.state_dict(), path / "pytorch_model.bin")


def _tokenizer(kind, model_type="bpe"):
    from forge_dist.data.prepare import CORPUS
    from forge_dist.data.spm import SentencePieceTokenizer
    from forge_dist.data.tokenizer import ByteTokenizer, CharTokenizer

    if kind == "sentencepiece":
        return SentencePieceTokenizer.train(CORPUS.read_text(encoding="utf-8")[:60_000], 600, model_type)
    return ByteTokenizer() if kind == "byte" else CharTokenizer.from_text("Hello wörld, the quick brown fox!\n")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_exports_as_a_fast_tokenizer_with_the_same_ids(model_type, tmp_path):
    from forge_dist.data.prepare import CORPUS
    from forge_dist.io.hf.tokenizer import read_tokenizer

    tok = _tokenizer("sentencepiece", model_type)
    save_hf(make_model(**{**EXPORTS["llama_gqa_tied"], "vocab_size": tok.vocab_size}), tmp_path / "hf", tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = CORPUS.read_text(encoding="utf-8")[60_000:70_000] + " Zoë  naïve   12345 \u2713 \u65e5\u672c\n\n  x"
    for chunk in [text] + text.split("\n"):
        ids = tok.encode(chunk)
        assert hf_tok(chunk, add_special_tokens=False).input_ids == ids
        assert hf_tok.decode(ids) == tok.decode(ids)
    assert read_tokenizer(str(tmp_path / "hf")).encode(text) == tok.encode(text)


@pytest.mark.parametrize("name, kind", [("llama_gqa_tied", "byte"), ("gpt2", "char"), ("mixtral", "byte"),
                                        ("mistral_window", "char"), ("llama_untied_bias", "sentencepiece"),
                                        ("gemma2_softcap", "byte")])
def test_autotokenizer_and_model_reproduce_greedy_sampling(name, kind, tmp_path):
    """What forge-sample prints at temperature 0 equals AutoTokenizer + generate(do_sample=False)."""
    from forge_dist.inference.generate import generate

    tok = _tokenizer(kind)
    model = _forge_model(name, seed=5, vocab_size=tok.vocab_size)
    save_hf(model, tmp_path / "hf", tokenizer=tok)
    prompt = "the wörld"
    ours = generate(model, tok.encode(prompt), 7, temperature=0)

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(prompt)
    out = _hf_load(tmp_path / "hf").generate(ids, max_new_tokens=7, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == ours
    assert hf_tok.decode(out[0]) == tok.decode(tok.encode(prompt) + ours)


def test_cli_exports_with_the_dataset_tokenizer_and_samples_from_the_export(tmp_path, capsys):
    """forge-convert SRC DST --to hf --dataset D, then forge-sample on the transformers directory
    (its tokenizer found there) prints what AutoTokenizer + generate give."""
    from forge_dist.inference import sample
    from forge_dist.io import save_pretrained
    from forge_dist.io.convert import main as convert_main
    from forge_dist.testing.data import corpus_dataset

    dataset = corpus_dataset(tmp_path, 5_000)
    from forge_dist.data.dataset import load_tokenizer

    tok = load_tokenizer(dataset)
    save_pretrained(make_model(seed=2, **{**EXPORTS["llama_gqa_tied"], "vocab_size": tok.vocab_size}), tmp_path / "m")
    assert convert_main([str(tmp_path / "m"), str(tmp_path / "hf"), "--to", "hf", "--dataset", dataset]) == 0
    capsys.readouterr()
    assert sample.main(["--out_dir", str(tmp_path / "hf"), "--start", "The ", "--temperature", "0",
                        "--max_new_tokens", "8", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.split("\n---------------")[0]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf_tok("The ", return_tensors="pt").input_ids
    assert printed == hf_tok.decode(_hf_load(tmp_path / "hf").generate(ids, max_new_tokens=8, do_sample=False)[0])


def test_a_transformers_tokenizer_prepares_data_and_samples(tmp_path, capsys):
    """forge-prepare --tokenizer_from HF_DIR tokenizes as AutoTokenizer does; forge-sample on the
    directory uses that tokenizer and prints what transformers' greedy generate gives."""
    from forge_dist.data.dataset import load_tokenizer
    from forge_dist.data.prepare import CORPUS
    from forge_dist.data.prepare import main as prepare_main
    from forge_dist.inference import sample
    from forge_dist.testing.hf import hf_bpe_tokenizer

    text = CORPUS.read_text(encoding="utf-8")[:20_000]
    hf_tok = hf_bpe_tokenizer(text)
    config = IMPORTS["llama"]()
    config.vocab_size = len(hf_tok)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    hf_tok.save_pretrained(tmp_path / "hf")
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    assert prepare_main(["--input", str(tmp_path / "in.txt"), "--out_dir", str(tmp_path / "data"),
                         "--tokenizer_from", str(tmp_path / "hf")]) == 0
    ours = load_tokenizer(str(tmp_path / "data"))
    assert ours.kind == "huggingface" and ours.encode(text[:500]) == hf_tok(text[:500]).input_ids
    capsys.readouterr()
    assert sample.main(["--out_dir", str(tmp_path / "hf"), "--start", "The fox", "--temperature", "0",
                        "--max_new_tokens", "6", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.split("\n---------------")[0]
    ids = hf_tok("The fox", return_tensors="pt").input_ids
    assert printed == hf_tok.decode(_hf_load(tmp_path / "hf").generate(ids, max_new_tokens=6, do_sample=False)[0])
    # the tokenizer travels: hf -> forge (forge-sample needs no --dataset there) -> hf again
    convert(str(tmp_path / "hf"), str(tmp_path / "forge"), "forge")
    assert sample.main(["--out_dir", str(tmp_path / "forge"), "--start", "The fox", "--temperature", "0",
                        "--max_new_tokens", "6", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split("\n---------------")[0] == printed
    convert(str(tmp_path / "forge"), str(tmp_path / "hf2"), "hf")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")
    assert again(text[:500]).input_ids == hf_tok(text[:500]).input_ids


def test_an_unreadable_tokenizer_is_reported_not_silently_dropped(tmp_path):
    from forge_dist.io.hf.tokenizer import read_tokenizer

    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="tokenizer_config|could not be read"):
        assert read_tokenizer(str(tmp_path)) is None

"""forge-convert streams tensor by tensor from every source to every target (io/stream_export.py,
io/torch_zip_stream.py) and writes what the whole-model path writes: the same zip records of the
ckpt.pt (torch.save's), the same safetensors and transformers files, byte for byte.
DeepSpeed and sharded (DCP) sources: tests/dist/test_deepspeed_dp.py and tests/dist/test_sharded_init.py."""
import json
import os
import re
import zipfile
from collections import Counter

import pytest
import torch

from forge_dist import ModelConfig
from forge_dist.io import save_pretrained
from forge_dist.io.convert import convert, load_source
from forge_dist.io.reallm_forge import save_ckpt
from forge_dist.model.gpt import GPT
from test_convert_variants import CASES as VARIANTS  # noqa: E402  (quantized, bitlinear, MoE, LSV, shared layers)

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50)
LLAMA = dict(use_rotary_embeddings=True, use_abs_pos_embeddings=False, mlp_variant="swiglu", activation_variant="silu")
REALLM = {  # the export rules at work: qk-norm rescale, peri-LN rename, scalar reshape, causal-mask buffers,
    # and every variant family's rule (quantized linears' zero points, bitlinear signs, MoE, LSV, shared layers)
    "qk_scale_peri_ln": dict(use_qk_norm=True, use_qk_norm_scale=True, use_peri_ln=True, use_embedding_scale=True),
    "manual_attention_untied": dict(softmax_variant_attn="consmax", wte_weight_tying=False),
    **VARIANTS,
}


def zip_records(file):
    """{record name without torch's archive folder (the file's stem): bytes}."""
    with zipfile.ZipFile(file) as z:
        return {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}


def safetensors_parts(file):
    """(parsed header, data bytes): save_file orders a header's __metadata__ keys at random."""
    raw = open(file, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def whole_path(src, dst, to, **kw):
    from forge_dist.io.hf import save_hf

    model, training = load_source(src)
    return save_ckpt(model, dst, training=training, **kw) if to == "reallm-forge" else save_hf(model, dst, **kw)


@pytest.fixture
def watched(monkeypatch):
    """Records the sources forge-convert streams from and every call of the whole-model path."""
    import sys

    from forge_dist.io import stream_export

    convert_module = sys.modules["forge_dist.io.convert"]  # forge_dist.io.convert is also the function
    seen = {"sources": [], "whole": []}
    load = convert_module.load_source
    monkeypatch.setattr(convert_module, "load_source", lambda src: seen["whole"].append(src) or load(src))
    opened = stream_export.open_source
    monkeypatch.setattr(stream_export, "open_source", lambda src: seen["sources"].append(opened(src)) or
                        seen["sources"][-1])
    return seen


@pytest.mark.parametrize("variant", sorted(REALLM))
@pytest.mark.parametrize("layout", ["snapshot", "latest"])
def test_reallm_forge_export_streams_the_whole_path_bytes(tmp_path, variant, layout, watched):
    torch.manual_seed(0)
    src = str(tmp_path / "m")
    save_pretrained(GPT(ModelConfig(**{**TINY, **REALLM[variant]})), src, training={"iter_num": 7})
    streamed = convert(src, str(tmp_path / "s" / "ckpt.pt"), "reallm-forge", layout=layout)
    (source,) = watched["sources"]
    assert not watched["whole"], variant
    # each tensor read once; a cross-layer-shared one at most once per layer holding it (each has its zero points)
    held = Counter(source._first.get(n, n) for n in source.names)
    reads = Counter(source.reads)
    assert all(n <= (held[k] if variant == "shared" else 1) for k, n in reads.items()), reads
    whole = whole_path(src, str(tmp_path / "w" / "ckpt.pt"), "reallm-forge", layout=layout)
    got, want = zip_records(streamed), zip_records(whole)
    assert list(got) == list(want) and all(got[k] == want[k] for k in want), [k for k in want if got.get(k) != want[k]]
    assert os.path.getsize(streamed) == os.path.getsize(whole)
    assert torch.load(streamed, weights_only=True)["iter_num"] == 7


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_hf_export_streams_the_whole_path_bytes(tmp_path, shard_bytes, watched):
    from forge_dist.io import stream_export

    torch.manual_seed(1)
    src = str(tmp_path / "m")
    save_pretrained(GPT(ModelConfig(**TINY, **LLAMA)), src)
    if shard_bytes is None:
        convert(src, str(tmp_path / "s"), "hf")
    else:  # several shards and their index
        stream_export.save_hf_streamed(stream_export.open_source(src), str(tmp_path / "s"), max_shard_bytes=shard_bytes)
    assert not watched["whole"]
    whole_path(src, str(tmp_path / "w"), "hf", **({"max_shard_bytes": shard_bytes} if shard_bytes else {}))
    names = sorted(os.listdir(tmp_path / "w"))
    assert names == sorted(os.listdir(tmp_path / "s")) and (shard_bytes is None) == ("model.safetensors" in names)
    for name in names:
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "w" / name).read_bytes(), name


@pytest.mark.parametrize("variant", ["qk_scale_peri_ln", "manual_attention_untied", "bitlinear", "moe_softmax"])
def test_a_reallm_forge_ckpt_converts_streamed_to_every_target(tmp_path, variant, watched):
    """A ckpt.pt source is memory-mapped and read tensor by tensor: --to forge and --to reallm-forge
    write the whole path's bytes (the same safetensors file and config; the same zip records)."""
    from forge_dist.io.forge_format import WEIGHTS_NAME, save_pretrained as whole_forge

    torch.manual_seed(2)
    src = save_ckpt(GPT(ModelConfig(**{**TINY, **REALLM[variant]})), str(tmp_path / "up" / "ckpt.pt"),
                    training={"iter_num": 3, "best_val_loss": 2.5})
    convert(src, str(tmp_path / "s"), "forge")
    again = convert(src, str(tmp_path / "s2" / "ckpt.pt"), "reallm-forge")
    assert not watched["whole"] and len(watched["sources"]) == 2
    model, training = load_source(src)
    whole_forge(model, str(tmp_path / "w"), training=training)
    assert safetensors_parts(tmp_path / "s" / WEIGHTS_NAME) == safetensors_parts(tmp_path / "w" / WEIGHTS_NAME)
    assert (tmp_path / "s" / "config.json").read_bytes() == (tmp_path / "w" / "config.json").read_bytes()
    assert zip_records(again) == zip_records(whole_path(src, str(tmp_path / "w2" / "ckpt.pt"), "reallm-forge"))


def test_a_registered_rule_that_needs_values_takes_the_whole_path(tmp_path, monkeypatch, watched):
    """No built-in rule needs the values to plan the file; one a user registers may: forge-convert
    falls back to the whole model and still writes the file."""
    from forge_dist.io import reallm_forge_rules as rules

    class Norm(rules.StateDictRule):  # a value-dependent output: fails on the meta device
        def to_upstream(self, sd, conv):
            w = sd.get("transformer.wte.weight")
            return sd if w is None else {**sd, "wte_norm": torch.tensor([float(w.norm())])}

    monkeypatch.setattr(rules, "RULES", [*rules.RULES, Norm()])
    src = str(tmp_path / "m")
    save_pretrained(GPT(ModelConfig(**TINY)), src)
    streamed = convert(src, str(tmp_path / "s" / "ckpt.pt"), "reallm-forge")
    assert watched["whole"] and torch.load(streamed, weights_only=True)["model"]["wte_norm"].shape == (1,)


def test_a_streamed_ckpt_builds_each_causal_mask_once(tmp_path, monkeypatch):
    """Each block's export builds its own layer's mask buffer, not all L of them (O(L), not O(L^2))."""
    from forge_dist.io.reallm_forge import RULES, DerivedBuffer

    (rule,) = [r for r in RULES if isinstance(r, DerivedBuffer)]
    built, build = [], rule.build
    monkeypatch.setattr(rule, "build", lambda *a: built.append(torch.empty(()).is_meta) or build(*a))
    src = str(tmp_path / "m")
    save_pretrained(GPT(ModelConfig(**{**TINY, **REALLM["manual_attention_untied"], "n_layer": 4})), src)
    convert(src, str(tmp_path / "s" / "ckpt.pt"), "reallm-forge")
    assert built.count(False) == 4  # the values: one per layer (the plan on meta builds the rest)


# one transformers directory per architecture (and Gemma 2's gain offset, GPT-2's fused transposed
# qkv, RoPE row permutations, GQA, Mixtral's per-expert tensors and implied router bias)
HF_SOURCES = ["gpt2", "llama_gqa_tied", "mistral_window", "mixtral", "gemma2_softcap"]


@pytest.mark.parametrize("name", HF_SOURCES)
def test_a_transformers_directory_converts_streamed_to_every_target(tmp_path, name, watched, monkeypatch):
    """Each of our tensors is read as a block (io/safetensors_file.py) through its mapping's slicer (io/hf/slices.py),
    never a whole transformers tensor or the model; every target gets the whole path's bytes, or the
    same refusal (a ckpt.pt has no rmsnorm_eps)."""
    from forge_dist.data.tokenizer import CharTokenizer
    from forge_dist.errors import ConfigError
    from forge_dist.io.forge_format import WEIGHTS_NAME, save_pretrained as whole_forge
    from forge_dist.io.hf import files, save_hf
    from forge_dist.io.hf.slices import HfSlices
    from forge_dist.testing.hf import export_model

    tok = CharTokenizer.from_text("Hello world, the quick brown fox!\n")
    src = str(tmp_path / "hf")
    shards = {"max_shard_bytes": 20_000} if name == "mixtral" else {}  # several files and their index
    save_hf(export_model(name, seed=4, vocab_size=tok.vocab_size), src, tokenizer=tok, **shards)
    assert ("model.safetensors.index.json" in os.listdir(src)) == bool(shards)
    model, training = load_source(src)
    assert training["tokenizer"] == tok.spec()
    whole = {"forge": lambda dst: whole_forge(model, dst, training=training) or dst,
             "reallm-forge": lambda dst: save_ckpt(model, os.path.join(dst, "ckpt.pt"), training=training),
             "hf": lambda dst: save_hf(model, dst, tokenizer=tok)}
    readers, close, refused = [], HfSlices.close, []
    with monkeypatch.context() as m:  # the streamed path never reads a tensor whole
        m.setattr(files, "read_tensors", lambda path: pytest.fail("a transformers tensor read whole"))
        m.setattr(HfSlices, "close", lambda self: readers.append(self) or close(self))
        for to in whole:
            dst = str(tmp_path / "s" / to) + ("/ckpt.pt" if to == "reallm-forge" else "")
            try:
                streamed = convert(src, dst, to)
            except ConfigError as e:
                with pytest.raises(ConfigError, match=re.escape(str(e))):
                    whole[to](str(tmp_path / "w" / to))
                refused.append(to)
                continue
            want = whole[to](str(tmp_path / "w" / to))
            if to == "reallm-forge":
                assert zip_records(streamed) == zip_records(want)
                continue
            assert sorted(os.listdir(streamed)) == sorted(os.listdir(want))
            for f in os.listdir(want):
                same = (safetensors_parts if f == WEIGHTS_NAME and to == "forge" else lambda p: open(p, "rb").read())
                assert same(os.path.join(streamed, f)) == same(os.path.join(want, f)), (to, f)
    assert refused == ([] if name in ("gpt2", "mistral_window", "mixtral") else ["reallm-forge"]), refused
    assert not watched["whole"] and len(readers) == 3 and not any(r.whole_reads or r._files for r in readers)
    for source in watched["sources"]:
        assert len(source.reads) == len(set(source.reads)), name


def test_a_ckpt_with_a_missing_tensor_is_refused_as_the_whole_path_refuses(tmp_path):
    from forge_dist.errors import CheckpointError

    src = save_ckpt(GPT(ModelConfig(**TINY)), str(tmp_path / "ckpt.pt"))
    ckpt = torch.load(src, weights_only=True)
    del ckpt["model"]["transformer.h.1.mlp.c_fc.weight"]
    torch.save(ckpt, src)
    with pytest.raises(CheckpointError, match="missing transformer.h.1.mlp.c_fc.weight"):
        convert(src, str(tmp_path / "out"), "forge")


def test_a_planned_record_that_comes_back_different_is_refused(tmp_path):
    from forge_dist.errors import CheckpointError
    from forge_dist.io.torch_zip_stream import save_streamed

    obj = {"a": torch.empty(3, device="meta")}
    with pytest.raises(CheckpointError, match="not the tensor planned"):
        save_streamed(obj, str(tmp_path / "x.pt"), lambda t: torch.zeros(4))


def test_slice_readers_never_map_their_files_and_close_them(tmp_path):
    """SafetensorsSlices and HfSlices read pieces with pread (io/safetensors_file.py): the file is
    never memory-mapped (its pages would count in the rank's resident memory), and leaving the
    reader (a context manager) closes its descriptor."""
    from forge_dist.io.hf import save_hf
    from forge_dist.io.hf.slices import HfSlices
    from forge_dist.io.slice_read import SafetensorsSlices

    def mapped(path):
        with open("/proc/self/maps") as f:
            return str(path) in f.read()

    def opened(path):
        return any(os.path.realpath(os.path.join("/proc/self/fd", fd)) == str(path)
                   for fd in os.listdir("/proc/self/fd"))

    model = GPT(ModelConfig(**TINY, **LLAMA))
    save_pretrained(model, tmp_path / "m")
    save_hf(model, tmp_path / "hf")
    for reader_of, file in ((SafetensorsSlices, tmp_path / "m" / "model.safetensors"),
                            (HfSlices, tmp_path / "hf" / "model.safetensors")):
        with reader_of(str(file.parent)) as reader:
            value = reader.full("transformer.h.0.attn.c_attn_q.weight", torch.float32)
            assert opened(file) and not mapped(file)
        assert not opened(file) and not mapped(file) and torch.equal(value, model.transformer.h[0].attn.c_attn_q.weight)


def test_a_bad_layout_is_refused_by_name_without_loading_the_model(tmp_path, watched):
    """A ConfigError of the export (``layout``) is the user's to fix, not a rule that needs values:
    it is raised as is, never turned into the whole-model fallback (which would load the model first)."""
    from forge_dist.errors import ConfigError

    src = str(tmp_path / "m")
    save_pretrained(GPT(ModelConfig(**TINY)), src)
    with pytest.raises(ConfigError, match="layout='bogus'.*valid values: snapshot"):
        convert(src, str(tmp_path / "s" / "ckpt.pt"), "reallm-forge", layout="bogus")
    assert not watched["whole"] and not os.path.exists(tmp_path / "s")

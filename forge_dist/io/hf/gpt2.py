"""GPT-2 style models <-> transformers' GPT2LMHeadModel.

GPT-2 (modeling_gpt2.py): x = wte + wpe; each block x += attn(ln_1(x)); x += mlp(ln_2(x));
ln_f; logits = x wte^T (or an untied lm_head). LayerNorm eps 1e-5 (ours: the same), scores
scaled by 1/sqrt(head_dim), MLP c_proj(act(c_fc x)) with activation_function.

Its layers are Conv1D, weights stored (in, out): ours are transposed; q, k and v are one
``c_attn`` (C, 3C). GPT-2 always has every bias: a bias-free model of ours exports zeros there
(exact), and imports back with bias=True.
"""
from __future__ import annotations

from typing import List

from forge_dist.errors import ConfigError
from forge_dist.io.hf.mapping import (ACTIVATIONS, Family, Tensor, check_hf_fields, concatenated, entry, equals,
                                      is_bool, is_positive_int, optional, transposed)


class GPT2(Family):
    architecture = "GPT2LMHeadModel"
    model_type = "gpt2"
    fixed = {"norm_variant_attn": "layernorm", "norm_variant_output": "layernorm", "use_abs_pos_embeddings": True,
             "use_rotary_embeddings": False, "mlp_variant": "mlp"}
    mapped = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "mlp_size", "mlp_expansion_factor",
              "mlp_up_bias", "mlp_down_bias", "wte_weight_tying", "activation_variant")

    def check_more(self, cfg):
        if cfg.activation_variant not in ACTIVATIONS:
            raise ConfigError(self.refusal("activation_variant", cfg.activation_variant,
                                           f"one of {', '.join(ACTIVATIONS)}"))

    def to_hf_config(self, cfg):
        return {"vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.mlp_hidden,
                "activation_function": ACTIVATIONS[cfg.activation_variant], "layer_norm_epsilon": 1e-5,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.wte_weight_tying,
                "attn_pdrop": cfg.dropout, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout}

    def from_hf_config(self, hf):
        check_hf_fields(hf, self, {
            "vocab_size": is_positive_int, "n_positions": is_positive_int, "n_embd": is_positive_int,
            "n_layer": is_positive_int, "n_head": is_positive_int,
            "n_inner": lambda v: v is None or is_positive_int(v),
            "activation_function": equals(*ACTIVATIONS.values()), "layer_norm_epsilon": equals(1e-5),
            "scale_attn_weights": equals(True), "scale_attn_by_inverse_layer_idx": equals(False),
            "reorder_and_upcast_attn": equals(False), "tie_word_embeddings": is_bool})
        name = hf.get("activation_function", "gelu_new")  # GPT-2's default: the tanh approximation
        act = {v: k for k, v in ACTIVATIONS.items()}.get(name)
        if act is None:
            raise ConfigError(f"config.json field activation_function={name!r} of {self.architecture} has no exact "
                              f"equivalent in forge_dist's model (supported: {', '.join(ACTIVATIONS.values())})")
        C = hf["n_embd"]
        return dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_embd=C, n_layer=hf["n_layer"],
                    n_head=hf["n_head"], mlp_size=hf.get("n_inner") or 4 * C, activation_variant=act, bias=True,
                    wte_weight_tying=hf.get("tie_word_embeddings", True), **self.fixed)

    def tensors(self, cfg) -> List[Tensor]:
        C, F, b = cfg.n_embd, cfg.mlp_hidden, cfg.bias
        out = [entry("transformer.wte.weight", "transformer.wte.weight"),
               entry("transformer.wpe.weight", "transformer.wpe.weight")]
        for i in range(cfg.n_layer):
            ours, theirs = f"transformer.h.{i}.", f"transformer.h.{i}."
            qkv = tuple(f"{ours}attn.c_attn_{p}" for p in "qkv")
            out += [
                entry(theirs + "ln_1.weight", ours + "pre_ln_attn.weight"),
                optional(theirs + "ln_1.bias", ours + "pre_ln_attn.bias", b, (C,)),
                Tensor(theirs + "attn.c_attn.weight", tuple(n + ".weight" for n in qkv),
                       *concatenated((C, C, C), dim=1, transpose=True)),
                Tensor(theirs + "attn.c_attn.bias", tuple(n + ".bias" for n in qkv),
                       *concatenated((C, C, C), dim=0)) if b else Tensor(theirs + "attn.c_attn.bias", (), shape=(3 * C,)),
                entry(theirs + "attn.c_proj.weight", ours + "attn.c_proj.weight", transposed()),
                optional(theirs + "attn.c_proj.bias", ours + "attn.c_proj.bias", b, (C,)),
                entry(theirs + "ln_2.weight", ours + "pre_ln_mlp.weight"),
                optional(theirs + "ln_2.bias", ours + "pre_ln_mlp.bias", b, (C,)),
                entry(theirs + "mlp.c_fc.weight", ours + "mlp.c_fc.weight", transposed()),
                optional(theirs + "mlp.c_fc.bias", ours + "mlp.c_fc.bias", cfg.mlp_up_bias_resolved, (F,)),
                entry(theirs + "mlp.c_proj.weight", ours + "mlp.c_proj.weight", transposed()),
                optional(theirs + "mlp.c_proj.bias", ours + "mlp.c_proj.bias", cfg.mlp_down_bias_resolved, (C,)),
            ]
        out += [entry("transformer.ln_f.weight", "transformer.ln_f.weight"),
                optional("transformer.ln_f.bias", "transformer.ln_f.bias", b, (C,))]
        if not cfg.wte_weight_tying:
            out.append(entry("lm_head.weight", "lm_head.weight"))
        return out

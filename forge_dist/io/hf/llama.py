"""RMSNorm + RoPE + SwiGLU + GQA decoders <-> transformers' Llama and Mistral (and, through
mixtral.py, Mixtral): one base class, the architectures differ only in what they allow.

Checked formula by formula against modeling_llama.py / modeling_mistral.py (transformers 5.23):
  norm        x * rsqrt(mean(x^2) + eps) * w; ours x / sqrt(mean(x^2) (+ eps)) * gain: the same with
              rms_norm_eps = rmsnorm_eps, 0 for our eps-free default
  RoPE        theta_i = 10000^(-2i/D) over the whole head (rope_length = head_dim); we rotate
              interleaved pairs, they rotate halves: q/k rows are permuted (mapping.rope_rows)
  attention   scale head_dim^-0.5; query head h reads KV head h // (H / H_kv) on both sides
  window      ours: key j visible to query i when i - window <= j <= i (window + 1 keys);
              Mistral's sliding_window W: i - W < j <= i. So W = window_size + 1
  MLP         down(act(gate x) * up x) = our c_fc_out(act(c_fc_in1 x) * c_fc_in2 x)
  biases      Llama's attention_bias covers q, k, v and o (our ``bias``), mlp_bias gate, up and
              down (our mlp_up_bias = mlp_down_bias). Qwen2 biases q, k, v but not o: no match.
Not expressible, refused by name: QK-norm (ours divides by ||x|| + 1e-6, Qwen3's RMSNorm puts eps
inside the root), partial RoPE, learned positions, every norm/softmax/linear variant. Soft-capping
comes with Gemma 2's block (gemma2.py).
"""
from __future__ import annotations

from typing import List

from forge_dist.errors import ConfigError
from forge_dist.io.hf.mapping import (ACTIVATIONS, Family, Tensor, check_hf_fields, entry, equals, is_bool,
                                      is_positive_int, rope_rows)

ROPE_THETA = 10000.0  # forge_dist.model.position.RotaryEmbedding's base


def _rope_ok(v) -> bool:
    return isinstance(v, dict) and v.get("rope_type", "default") == "default" and \
        float(v.get("rope_theta", ROPE_THETA)) == ROPE_THETA and set(v) <= {"rope_type", "rope_theta"}


class RotaryDecoder(Family):
    """The shared Llama-family mapping; subclasses say which extras their architecture has."""

    has_biases = False  # attention_bias / mlp_bias fields
    has_window = False  # sliding_window field
    default_eps = 1e-6  # the architecture's rms_norm_eps when config.json leaves it out
    default_tied = False  # its tie_word_embeddings default
    fixed = {"use_abs_pos_embeddings": False, "use_rotary_embeddings": True, "mlp_variant": "swiglu"}
    mapped = ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_group", "n_embd", "mlp_size",
              "mlp_expansion_factor", "wte_weight_tying", "rmsnorm_eps", "rope_length", "activation_variant",
              "bias", "mlp_up_bias", "mlp_down_bias", "window_size")

    def check_more(self, cfg):
        if cfg.activation_variant not in ACTIVATIONS:
            raise ConfigError(self.refusal("activation_variant", cfg.activation_variant,
                                           f"one of {', '.join(ACTIVATIONS)}"))
        if cfg.rope_length not in (None, cfg.head_dim):
            raise ConfigError(self.refusal("rope_length", cfg.rope_length, f"RoPE over the whole head, "
                                           f"rope_length=None or {cfg.head_dim}"))
        if not self.has_biases:
            for name in ("bias", "mlp_up_bias", "mlp_down_bias"):
                if getattr(cfg, name):
                    raise ConfigError(self.refusal(name, getattr(cfg, name), "no biases (LlamaForCausalLM has "
                                                   "them, without sliding window)"))
        elif cfg.mlp_up_bias_resolved != cfg.mlp_down_bias_resolved:
            raise ConfigError(self.refusal("mlp_down_bias", cfg.mlp_down_bias, f"the same bias setting as the up "
                                           f"projections (mlp_bias covers gate, up and down): "
                                           f"{cfg.mlp_up_bias_resolved}"))
        if cfg.window_size is not None and not self.has_window:
            raise ConfigError(self.refusal("window_size", cfg.window_size, "None (MistralForCausalLM has a "
                                           "sliding window, without biases)"))

    # --- config ----------------------------------------------------------------------------
    def to_hf_config(self, cfg):
        hf = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden,
              "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
              "num_key_value_heads": cfg.kv_groups, "head_dim": cfg.head_dim,
              "hidden_act": ACTIVATIONS[cfg.activation_variant], "max_position_embeddings": cfg.block_size,
              "rms_norm_eps": float(cfg.rmsnorm_eps or 0.0),
              "rope_parameters": {"rope_theta": ROPE_THETA, "rope_type": "default"},
              "tie_word_embeddings": cfg.wte_weight_tying, "attention_dropout": cfg.dropout}
        if self.has_biases:
            hf.update(attention_bias=cfg.bias, mlp_bias=cfg.mlp_up_bias_resolved, pretraining_tp=1)
        if self.has_window:
            hf["sliding_window"] = None if cfg.window_size is None else cfg.window_size + 1
        return hf

    def accepted_fields(self) -> dict:
        acc = {"vocab_size": is_positive_int, "hidden_size": is_positive_int, "intermediate_size": is_positive_int,
               "num_hidden_layers": is_positive_int, "num_attention_heads": is_positive_int,
               "num_key_value_heads": lambda v: v is None or is_positive_int(v), "head_dim": lambda v: True,
               "hidden_act": equals(*ACTIVATIONS.values()), "max_position_embeddings": is_positive_int,
               "rms_norm_eps": lambda v: isinstance(v, (int, float)) and v >= 0,
               "rope_parameters": lambda v: v is None or _rope_ok(v),
               "rope_theta": lambda v: float(v) == ROPE_THETA, "rope_scaling": equals(None),
               "tie_word_embeddings": is_bool}
        if self.has_biases:
            acc.update(attention_bias=is_bool, mlp_bias=is_bool, pretraining_tp=equals(1))
        if self.has_window:
            acc["sliding_window"] = lambda v: v is None or is_positive_int(v)
        return acc

    def from_hf_config(self, hf):
        check_hf_fields(hf, self, self.accepted_fields())
        C, H = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, C // H) or C % H:
            raise ConfigError(f"config.json field head_dim={hf.get('head_dim')!r} of {self.architecture}: forge_dist "
                              f"needs head_dim = hidden_size / num_attention_heads = {C / H:g}")
        if "rope_parameters" not in hf and "rope_theta" not in hf:  # the architecture's own default applies
            raise ConfigError(f"config.json of {self.architecture} names no rope_parameters/rope_theta; "
                              f"forge_dist needs rope_theta={ROPE_THETA:g}")
        eps = float(hf.get("rms_norm_eps", self.default_eps))
        window = hf.get("sliding_window") if self.has_window else None
        kv = hf.get("num_key_value_heads") or H
        return dict(vocab_size=hf["vocab_size"], n_embd=C, n_head=H, n_kv_group=None if kv == H else kv,
                    n_layer=hf["num_hidden_layers"], mlp_size=hf["intermediate_size"],
                    block_size=hf["max_position_embeddings"], rmsnorm_eps=eps or None,
                    activation_variant={v: k for k, v in ACTIVATIONS.items()}[hf.get("hidden_act", "silu")],
                    wte_weight_tying=hf.get("tie_word_embeddings", self.default_tied),
                    bias=bool(hf.get("attention_bias", False)), mlp_up_bias=bool(hf.get("mlp_bias", False)),
                    mlp_down_bias=bool(hf.get("mlp_bias", False)),
                    window_size=None if window is None else window - 1, **self.fixed)

    # --- tensors ---------------------------------------------------------------------------
    norm_transform = None  # Gemma 2 stores w with y = norm(x) * (1 + w)

    def layer_norms(self, ours: str, theirs: str):
        """(their norm, our norm module) of one layer."""
        return [(theirs + "input_layernorm", ours + "pre_ln_attn"), (theirs + "post_attention_layernorm", ours + "pre_ln_mlp")]

    def mlp_tensors(self, cfg, ours: str, theirs: str, layer: int) -> List[Tensor]:
        b = cfg.mlp_up_bias_resolved
        out = []
        for hf_name, our_name in (("gate_proj", "c_fc_in1"), ("up_proj", "c_fc_in2"), ("down_proj", "c_fc_out")):
            out.append(entry(f"{theirs}mlp.{hf_name}.weight", f"{ours}mlp.{our_name}.weight"))
            if b:
                out.append(entry(f"{theirs}mlp.{hf_name}.bias", f"{ours}mlp.{our_name}.bias"))
        return out

    def tensors(self, cfg) -> List[Tensor]:
        D = cfg.head_dim
        out = [entry("model.embed_tokens.weight", "transformer.wte.weight")]
        for i in range(cfg.n_layer):
            ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
            out += [entry(t + ".weight", o + ".gain", self.norm_transform) for t, o in self.layer_norms(ours, theirs)]
            for hf_name, our_name, rope in (("q_proj", "c_attn_q", True), ("k_proj", "c_attn_k", True),
                                            ("v_proj", "c_attn_v", False), ("o_proj", "c_proj", False)):
                for kind in ("weight", "bias") if cfg.bias else ("weight",):
                    out.append(entry(f"{theirs}self_attn.{hf_name}.{kind}", f"{ours}attn.{our_name}.{kind}",
                                     rope_rows(D) if rope else None))
            out += self.mlp_tensors(cfg, ours, theirs, i)
        out.append(entry("model.norm.weight", "transformer.ln_f.gain", self.norm_transform))
        if not cfg.wte_weight_tying:
            out.append(entry("lm_head.weight", "lm_head.weight"))
        return out


class Llama(RotaryDecoder):
    architecture = "LlamaForCausalLM"
    model_type = "llama"
    has_biases = True


class Mistral(RotaryDecoder):
    architecture = "MistralForCausalLM"
    model_type = "mistral"
    has_window = True

"""Peri-LN decoders with soft-capping <-> transformers' Gemma2ForCausalLM.

Gemma 2 (modeling_gemma2.py) is llama.py's decoder plus, each checked against ours:
  embeddings  x = wte(idx) * sqrt(hidden_size): our use_embedding_scale with the scale still at
              sqrt(n_embd) (it is learnable here: a trained-away value is refused by name)
  norms       x * rsqrt(mean(x^2) + eps) * (1 + w), also the final one: w = our gain - 1 (exact in
              value up to float rounding of 1 + (gain - 1), so logits match and round trips can
              differ in the last bit of a gain)
  block       x + post_attention_layernorm(attn(input_layernorm(x))), then the same with
              pre/post_feedforward_layernorm: our pre-LN plus peri-LN (use_peri_ln, out_ln_*)
  attention   scaling query_pre_attn_scalar^-0.5 = head_dim^-0.5; scores = c tanh(scores / c)
              before the mask (attn_logit_softcapping), as ours; layer_types all full, or all
              sliding with sliding_window = window_size + 1; attention_bias on q, k, v, o; no MLP bias
  logits      c tanh(logits / c) (final_logit_softcapping), as our LM head
"""
from __future__ import annotations

import torch

from forge_dist.errors import ConfigError
from forge_dist.io.hf.llama import RotaryDecoder
from forge_dist.io.hf.mapping import ACTIVATIONS, elementwise, equals

_NO_CAP = lambda v: v is None or (isinstance(v, (int, float)) and v > 0)  # noqa: E731


def _gain_offset():
    return (lambda ts: ts[0] - 1.0), elementwise(lambda t: [t + 1.0])


class Gemma2(RotaryDecoder):
    architecture = "Gemma2ForCausalLM"
    model_type = "gemma2"
    has_biases = True
    has_window = True
    default_tied = True
    fixed = {**RotaryDecoder.fixed, "use_peri_ln": True, "use_embedding_scale": True}
    mapped = RotaryDecoder.mapped + ("attn_logit_softcapping", "final_logit_softcapping")
    norm_transform = _gain_offset()

    def check_more(self, cfg):
        for name, on in (("mlp_up_bias", cfg.mlp_up_bias_resolved), ("mlp_down_bias", cfg.mlp_down_bias_resolved)):
            if on:
                raise ConfigError(self.refusal(name, getattr(cfg, name), "no MLP biases (bias=True alone gives "
                                               "them: set mlp_up_bias=False, mlp_down_bias=False)"))
        super().check_more(cfg)

    def to_hf_config(self, cfg):
        hf = super().to_hf_config(cfg)
        del hf["mlp_bias"], hf["pretraining_tp"]
        hf["hidden_activation"] = hf.pop("hidden_act")
        window = hf.pop("sliding_window")
        hf.update(query_pre_attn_scalar=cfg.head_dim, attn_logit_softcapping=cfg.attn_logit_softcapping,
                  final_logit_softcapping=cfg.final_logit_softcapping,
                  sliding_window=cfg.block_size if window is None else window,  # unused by full_attention layers,
                  # but transformers builds the sliding mask whenever the field is set, and fails when it is not
                  layer_types=["full_attention" if window is None else "sliding_attention"] * cfg.n_layer)
        return hf

    def accepted_fields(self):
        acc = super().accepted_fields()
        for key in ("mlp_bias", "pretraining_tp"):
            acc.pop(key)
        acc.update(hidden_activation=equals(*ACTIVATIONS.values()), attn_logit_softcapping=_NO_CAP,
                   final_logit_softcapping=_NO_CAP, query_pre_attn_scalar=lambda v: True,
                   layer_types=lambda v: v is None or len(set(v)) == 1, use_bidirectional_attention=equals(None, False))
        return acc

    def from_hf_config(self, hf):
        hf = dict(hf)
        C, H = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("query_pre_attn_scalar") != C // H:
            raise ConfigError(f"config.json field query_pre_attn_scalar={hf.get('query_pre_attn_scalar')!r} of "
                              f"{self.architecture}: forge_dist scales scores by head_dim^-0.5, so it must be {C // H}")
        types = hf.get("layer_types") or ["sliding_attention", "full_attention"]
        if len(set(types)) != 1:
            raise ConfigError(f"config.json field layer_types={types!r} of {self.architecture}: forge_dist's window "
                              f"applies to every layer; all must be full_attention or all sliding_attention")
        if types[0] == "full_attention":
            hf["sliding_window"] = None
        hf["hidden_act"] = hf.pop("hidden_activation", "gelu_pytorch_tanh")
        kwargs = super().from_hf_config({k: v for k, v in hf.items()
                                         if k not in ("layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
                                                      "final_logit_softcapping", "use_bidirectional_attention")})
        return {**kwargs, "attn_logit_softcapping": hf.get("attn_logit_softcapping"),
                "final_logit_softcapping": hf.get("final_logit_softcapping")}

    def layer_norms(self, ours, theirs):
        return [(theirs + "input_layernorm", ours + "pre_ln_attn"), (theirs + "post_attention_layernorm", ours + "out_ln_attn"),
                (theirs + "pre_feedforward_layernorm", ours + "pre_ln_mlp"),
                (theirs + "post_feedforward_layernorm", ours + "out_ln_mlp")]

    def implied(self, cfg):
        return {"embedding_scale": torch.sqrt(torch.tensor([float(cfg.n_embd)]))}

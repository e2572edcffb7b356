"""Top-k softmax MoE decoders <-> transformers' MixtralForCausalLM.

Mixtral is Mistral's decoder (llama.py) with every MLP a sparse MoE block (modeling_mixtral.py):
router logits W_g x (no bias), p = softmax over all experts, the top-k p renormalised to sum to 1,
y = sum_k p_k w2(act(w1 x) * w3 x). Ours (forge_dist.model.moe.TopKRouter): top-k of the logits
W_r x + b, softmax over those k: the same weights (softmax is monotonic, and renormalising the
top-k of a softmax is the softmax of the top-k logits) when b = 0. So every layer must be an MoE
layer (moe_layer_freq=1), dropless (moe_capacity_factor=None) with the plain softmax router, and
the router bias must be zero: Mixtral's router has none (checked on the weights at export, zeros
on import). Experts are saved per expert as w1 (gate) / w3 (up) / w2 (down), the layout
transformers 5.23 writes and reads.
"""
from __future__ import annotations

from typing import List

import torch

from forge_dist.io.hf.llama import RotaryDecoder
from forge_dist.io.hf.mapping import Tensor, entry, is_positive_int


class Mixtral(RotaryDecoder):
    architecture = "MixtralForCausalLM"
    model_type = "mixtral"
    has_window = True
    default_eps = 1e-5
    fixed = {**RotaryDecoder.fixed, "use_moe": True, "moe_layer_freq": 1, "moe_router_scheme": "softmax",
             "moe_capacity_factor": None}
    mapped = RotaryDecoder.mapped + ("n_experts", "moe_top_k")

    def to_hf_config(self, cfg):
        return {**super().to_hf_config(cfg), "num_local_experts": cfg.n_experts,
                "num_experts_per_tok": cfg.moe_top_k, "router_aux_loss_coef": cfg.moe_aux_loss_coef}

    def accepted_fields(self):
        return {**super().accepted_fields(), "num_local_experts": is_positive_int,
                "num_experts_per_tok": is_positive_int}

    def from_hf_config(self, hf):
        return {**super().from_hf_config(hf), "n_experts": hf["num_local_experts"],
                "moe_top_k": hf["num_experts_per_tok"]}

    def mlp_tensors(self, cfg, ours, theirs, layer) -> List[Tensor]:
        out = [entry(f"{theirs}block_sparse_moe.gate.weight", f"{ours}mlp.router.route_linear.weight")]
        for e in range(cfg.n_experts):
            for hf_name, our_name in (("w1", "c_fc_in1"), ("w2", "c_fc_out"), ("w3", "c_fc_in2")):
                out.append(entry(f"{theirs}block_sparse_moe.experts.{e}.{hf_name}.weight",
                                 f"{ours}mlp.experts.{e}.{our_name}.weight"))
        return out

    def implied(self, cfg):
        return {f"transformer.h.{i}.mlp.router.route_linear.bias": torch.zeros(cfg.n_experts)
                for i in range(cfg.n_layer)}

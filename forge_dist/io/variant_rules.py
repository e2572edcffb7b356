"""ReaLLM-Forge conversion rules of the variant families whose state differs from upstream's.

Each rule finds its variant by module type in the forge_dist model (``Conversion.modules``), so
quantized linears inside MoE experts, shared layers or per-projection overrides are all found.
Names checked against upstream's module code (checkpoints.md, "Verified against upstream"):

  QuantizedLinearState   quantized_linear (variations/linear_variations.py) registers the
                         persistent buffers ``_step`` (1,) float, ``weight_zero_point`` and, with a
                         bias, ``bias_zero_point`` ((1,) int64); ``quantized_weight``,
                         ``weight_norm``, ``quantized_bias``, ``bias_norm`` start as None and join
                         the state dict after the first eval forward. We derive all of them:
                         import drops them, export writes what upstream's strict load needs,
                         ``_step`` = the checkpoint's iteration and the zero points upstream's
                         eval stores (weight at its bits, bias at 32; computed exactly, where
                         upstream's float32 can change the bias one's last digits; upstream
                         recomputes both before reading them), never the None ones.
  BitLinearOptimizedSigns  bitlinear_optimized keeps int8 signs ``quantized_weights`` and deletes
                         ``weight`` upstream; we train the float weight. Export writes the signs our
                         eval uses, sign(W - mean W), and keeps W in ``Conversion.extra``; import
                         takes W back from there when its signs match, else W = the signs (whose
                         own signs around their mean are the codes again when they are +-1 and not
                         all equal).
  StoredActivations      with store_activations upstream registers ``<group>_act_<point>``,
                         ``..._scale`` and ``..._zero_point`` buffers on the attention/MLP module
                         (quant_utils.create_activation_buffers), filled by every forward; ours
                         are non-persistent, so import drops them (export has none to write).
  RenameTensors          the latest layout's LSV names: linear_comb became two nn.Embedding
                         tables ``lsv_embedding`` / ``linear_comb_embedding`` (klei22/nanoGPT
                         40b3af9); the snapshot keeps ``lsv_matrix`` / ``linear_comb_matrix``.

MoE (``mlp.router.route_linear.*``, ``mlp.router.noise_linear.*``, ``mlp.experts.{e}.*``), the
other LSV variants and the quantized embeddings (no buffers upstream) have upstream's names and
need no rule.
"""
from __future__ import annotations

from typing import Dict

import torch

from forge_dist.io.reallm_forge import StateDictRule, register_rule
from forge_dist.model.linear import BIAS_BITS, BitLinearOptimized, QuantizedLinear
from forge_dist.model.quantize import ActQuantPoints
from forge_dist.variants import QUANTIZER
from forge_dist.model.steering import LinearCombinationLSV
from forge_dist.ops.reference import quantize as ref

UPSTREAM_QUANT_BUFFERS = ("_step", "weight_zero_point", "bias_zero_point", "quantized_weight", "weight_norm",
                          "quantized_bias", "bias_norm")
STORED_ACTIVATION_SUFFIXES = ("", "_scale", "_zero_point")


def upstream_zero_point(t: torch.Tensor, method: str, bits: int) -> torch.Tensor:
    """The zero point upstream's eval stores for ``t``, as its (1,) int64 buffer. A private
    generator keeps stochastic_quant from drawing on the global random stream (its zero point is
    0 whatever it draws). A meta ``t`` (forge-convert's streamed plan, io/stream_export.py) gets a
    meta buffer of that shape and dtype: the value is computed from the weight when its block is
    written."""
    if t.is_meta:
        return torch.empty(1, dtype=torch.int64, device="meta")
    zp = QUANTIZER.get(method)(t.detach(), bits, generator=torch.Generator(device=t.device))[0]
    return torch.round(zp).to(torch.int64).reshape(1).cpu()


class QuantizedLinearState(StateDictRule):
    def from_upstream(self, sd, conv):
        drop = {p + b for p, _ in conv.modules(QuantizedLinear) for b in UPSTREAM_QUANT_BUFFERS}
        return {n: t for n, t in sd.items() if n not in drop}

    def to_upstream(self, sd, conv):
        out = dict(sd)
        for p, m in conv.modules(QuantizedLinear):
            out[p + "_step"] = torch.tensor([float(conv.iter_num)])
            out[p + "weight_zero_point"] = upstream_zero_point(sd[p + "weight"], m.quant_method, m.quant_bits)
            if m.bias is not None:
                out[p + "bias_zero_point"] = upstream_zero_point(sd[p + "bias"], m.quant_method, BIAS_BITS)
        return out


class BitLinearOptimizedSigns(StateDictRule):
    def from_upstream(self, sd, conv):
        out = dict(sd)
        for p, m in conv.modules(BitLinearOptimized):
            codes = out.pop(p + "quantized_weights", None)
            if codes is None:
                continue  # already ours (a float weight)
            kept = conv.extra.get(p + "weight")
            if kept is not None and kept.shape == codes.shape and torch.equal(ref.sign_binarize(kept), codes):
                out[p + "weight"] = kept
            else:
                out[p + "weight"] = codes.to(m.weight.dtype)
        return out

    def to_upstream(self, sd, conv):
        out = dict(sd)
        for p, _ in conv.modules(BitLinearOptimized):
            w = out.pop(p + "weight")
            out[p + "quantized_weights"] = ref.sign_binarize(w)  # as our eval computes them
            conv.extra[p + "weight"] = w
        return out


class StoredActivations(StateDictRule):
    def from_upstream(self, sd, conv):
        drop = set()
        for p, module in conv.modules(torch.nn.Module):
            for child in module.children():
                if isinstance(child, ActQuantPoints):
                    drop |= {p + q.name + s for q in child.values() for s in STORED_ACTIVATION_SUFFIXES}
        return {n: t for n, t in sd.items() if n not in drop}


class RenameTensors(StateDictRule):
    """Tensors of ``cls`` modules named differently in some layouts: ``names[layout]`` maps our
    local name to upstream's; import accepts every layout's spelling."""

    def __init__(self, cls, names: Dict[str, Dict[str, str]]):
        self.cls, self.names = cls, names

    def from_upstream(self, sd, conv):
        table = {p + theirs: p + ours for p, _ in conv.modules(self.cls)
                 for names in self.names.values() for ours, theirs in names.items()}
        return {table.get(n, n): t for n, t in sd.items()}

    def to_upstream(self, sd, conv):
        names = self.names.get(conv.layout, {})
        table = {p + ours: p + theirs for p, _ in conv.modules(self.cls) for ours, theirs in names.items()}
        return {table.get(n, n): t for n, t in sd.items()}


for _rule in (QuantizedLinearState(), BitLinearOptimizedSigns(), StoredActivations(),
              RenameTensors(LinearCombinationLSV, {"latest": {"lsv_matrix": "lsv_embedding.weight",
                                                              "linear_comb_matrix": "linear_comb_embedding.weight"}})):
    register_rule(_rule)

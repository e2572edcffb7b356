"""Linear variants (linear_variant_attn/_mlp and per-projection overrides).

Every variant except ``kan`` is an ``nn.Linear`` subclass with ``weight`` (out, in) and optional
``bias``, so tensor parallelism can split it by rows or columns without knowing the variant; the
per-tensor statistics of its quantizer pass through the module's ``reduce_stats`` hook
(forge_dist.model.quantize), which a sharded layer sets to an all-reduce, and a row-parallel shard
sums its partial product through ``reduce_partial`` before the bias and any output scaling
(``project``). ``kan`` is a KAN network (no row/column split exists for it).

  linear          y = x W^T + b
  quantized_linear  QAT: y = x Q(W)^T + b after quantization_warmup_iters (straight-through)
  bitlinear_1p58  BitNet b1.58 (Ma et al. 2024): absmean ternary W, per-token absmax 8-bit x
  bitlinear       BitNet (Wang et al. 2023), Beomi's form: y = rescale(x sign(W - mean W)^T + b)
  bitlinear_optimized  bitlinear whose inference runs on a cached int8 sign matrix
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_dist import ops
from forge_dist.model.projections import PROJECTIONS
from forge_dist.model.quantize import ExportedTensor, QuantizedModule, fake_quant, weights_version
from forge_dist.variants import LINEAR
from forge_dist.ops.reference import quantize as ref

BIAS_BITS = 32  # upstream quantizes the bias at the accumulator width in eval


def project(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """F.linear(x, weight, bias). A row-parallel shard (``layer.reduce_partial`` set by tensor
    parallelism; None on one device) sums its partial product over its group first, then adds the
    bias once."""
    if layer.reduce_partial is None:
        return F.linear(x, weight, bias)
    y = layer.reduce_partial(F.linear(x, weight))
    return y if bias is None else y + bias


@LINEAR.register("linear")
def _plain_linear(in_features, out_features, config, method, bits, bias):
    return nn.Linear(in_features, out_features, bias=bias)


@LINEAR.register("quantized_linear")
class QuantizedLinear(QuantizedModule, nn.Linear):
    """Quantization-aware linear layer (after Transformer-Quantization, as upstream).

    Training: plain for the first ``quantization_warmup_iters`` iterations, then the weight is
    fake-quantized with a straight-through gradient, W_eff = W + level (Q(W) - W).
    Eval: fully quantized; the codes, scale and zero point of W (and of the bias, at 32 bits) are
    cached in upstream's buffers ``quantized_weight``, ``weight_norm``, ``weight_zero_point``
    (``quantized_bias``, ``bias_norm``, ``bias_zero_point``) and refreshed when the weights change.
    They are non-persistent: checkpoints keep only the float weights they derive from.
    """

    reduce_partial = None

    def __init__(self, in_features, out_features, config, method="affine_quant", bits=8, bias=True):
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_quant(config, method, bits)
        self.warmup_iters = config.quantization_warmup_iters
        for name in ("quantized_weight", "weight_norm", "weight_zero_point",
                     "quantized_bias", "bias_norm", "bias_zero_point"):
            self.register_buffer(name, None, persistent=False)
        self._cached_version = None

    def forward(self, x):  # (..., in) -> (..., out)
        if self.training:
            quantize, level = self.quant_state()
            if not quantize:
                return project(self, x, self.weight, self.bias)
            w = fake_quant(self.weight, self.quant_method, self.quant_bits, level, reduce_stats=self.reduce_stats)
            return project(self, x, w, self.bias)
        self.refresh_quantized()
        b = None
        if self.bias is not None:
            b = ref.dequantize(self.bias_zero_point, self.bias_norm, self.quantized_bias, x.dtype)
        if self.reduce_partial is None and self.quantized_weight.dtype == torch.int8:
            # int8 codes stay int8 in memory: the fused weight-only kernel dequantises in the matmul
            return ops.int8_linear(x, self.quantized_weight, self.weight_norm, self.weight_zero_point, b)
        w = ref.dequantize(self.weight_zero_point, self.weight_norm, self.quantized_weight, x.dtype)
        return project(self, x, w, b)

    @torch.no_grad()
    def refresh_quantized(self) -> None:
        """Quantize the current weights into the buffers unless they are already up to date."""
        version = weights_version(self.weight, self.bias)
        if version == self._cached_version:
            return
        self.weight_zero_point, self.weight_norm, self.quantized_weight = self.quantize_tensor(self.weight)
        if self.bias is not None:
            self.bias_zero_point, self.bias_norm, self.quantized_bias = self.quantize_tensor(self.bias, BIAS_BITS)
        self._cached_version = version

    def export_tensors(self) -> Dict[str, ExportedTensor]:
        self.refresh_quantized()
        out = {"weight": self.exported((self.weight_zero_point, self.weight_norm, self.quantized_weight))}
        if self.bias is not None:
            out["bias"] = self.exported((self.bias_zero_point, self.bias_norm, self.quantized_bias), BIAS_BITS)
        return out


def _straight_through(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Forward value ``target``, gradient of the identity: x + (target - x).detach()."""
    return x + (target - x).detach()


@LINEAR.register("bitlinear_1p58")
class BitLinear1p58(nn.Linear):
    """BitNet b1.58 (arXiv 2402.17764): W -> mean|W| round(W / mean|W|) clamped to {-1, 0, 1};
    x -> per-token absmax 8-bit, x_hat = round(x Q_p / max|x|) max|x| / Q_p; both straight-through.
    ``method``/``bits`` are ignored (always ternary weights, 8-bit inputs), as upstream; the bias
    is added after the quantized product."""

    input_bits = 8
    reduce_stats = None
    reduce_partial = None

    def __init__(self, in_features, out_features, config=None, method=None, bits=None, bias=True):
        super().__init__(in_features, out_features, bias=bias)

    def quantized_weight(self) -> torch.Tensor:
        return fake_quant(self.weight, "ternary_quant", 2, reduce_stats=self.reduce_stats)

    def forward(self, x):  # (..., in) -> (..., out)
        x_q = fake_quant(x, "symmetric_quant", self.input_bits, dim=-1, reduce_stats=self.reduce_stats)
        out = project(self, x_q, self.quantized_weight(), None)
        return out if self.bias is None else out + self.bias

    def export_tensors(self) -> Dict[str, ExportedTensor]:
        with torch.no_grad():
            q = ref.ternary_quantize(self.weight.detach(), reduce_stats=self.reduce_stats)
        return {"weight": ExportedTensor(*q, "ternary_quant", 2)}


@LINEAR.register("bitlinear")
class BitLinear(nn.Linear):
    """BitNet's BitLinear in Beomi's form (as upstream): W_b = sign(W - mean W) with a
    straight-through gradient, y = x W_b^T + b, then y is mapped to [-Q_b, Q_b] (Q_b = 2^7) by its
    absmax: clamp(y Q_b / (gamma + eps)), not rounded and not mapped back, as upstream. gamma is
    taken per token (upstream: over the whole output tensor, which lets every position see the
    magnitude of later ones; see docs/divergences.md)."""

    output_bits = 8
    eps = 1e-5
    reduce_stats = None
    reduce_partial = None

    def __init__(self, in_features, out_features, config=None, method=None, bits=None, bias=True):
        super().__init__(in_features, out_features, bias=bias)

    def binarized_weight(self) -> torch.Tensor:
        reduce = self.reduce_stats or ref.no_reduce  # a shard's mean is the whole weight's
        count = reduce(self.weight.new_tensor(float(self.weight.numel())), "sum")
        centred = self.weight - reduce(self.weight.sum(), "sum") / count  # mean(W), with its gradient
        codes = ref.sign_binarize(self.weight.detach(), self.reduce_stats)
        return _straight_through(centred, codes.to(self.weight.dtype))

    def rescale(self, y: torch.Tensor) -> torch.Tensor:
        return ref.absmax_rescale(y, self.output_bits, self.eps, dim=-1, reduce_stats=self.reduce_stats)

    def forward(self, x):  # (..., in) -> (..., out)
        return self.rescale(project(self, x, self.binarized_weight(), self.bias))

    def export_tensors(self) -> Dict[str, ExportedTensor]:
        """sign(W - mean W) with scale 1: upstream's bitlinear has no weight scale."""
        codes = ref.sign_binarize(self.weight.detach(), self.reduce_stats)
        one = torch.ones((), dtype=self.weight.dtype, device=codes.device)
        return {"weight": ExportedTensor(torch.zeros_like(one), one, codes, "sign", 2)}


@LINEAR.register("bitlinear_optimized")
class BitLinearOptimized(BitLinear):
    """``bitlinear`` that keeps its int8 sign matrix ``quantized_weights`` (upstream's name) for
    inference. Upstream deletes the float weight, which leaves nothing to train (sign() has no
    useful gradient); here the float weight stays the trained parameter and the int8 codes are a
    non-persistent cache, refreshed in eval when the weight has changed."""

    def __init__(self, in_features, out_features, config=None, method=None, bits=None, bias=True):
        super().__init__(in_features, out_features, config, method, bits, bias)
        self.register_buffer("quantized_weights", None, persistent=False)
        self._cached_version = None

    @torch.no_grad()
    def refresh_quantized(self) -> None:
        version = weights_version(self.weight)
        if version != self._cached_version:
            self.quantized_weights = ref.sign_binarize(self.weight.detach(), self.reduce_stats)
            self._cached_version = version

    def forward(self, x):
        if self.training:
            return super().forward(x)
        self.refresh_quantized()
        return self.rescale(project(self, x, self.quantized_weights.to(x.dtype), self.bias))


@LINEAR.register("kan")
def _kan_linear(in_features, out_features, config, method, bits, bias):
    """A KAN network in place of the projection (no bias, as upstream). Not an nn.Linear: tensor
    parallelism cannot split it by rows or columns and must keep it whole."""
    from forge_dist.model.kan import KANetwork

    return KANetwork(in_features, out_features, config)


def build_linear(projection: str, in_features: int, out_features: int, config, bias: bool) -> nn.Module:
    """Build the linear layer of one named projection (q, k, v, attn_proj, mlp_up, mlp_down).

    A falsy per-projection value falls back to the group default, as upstream's set_variant does.
    """
    own, group, method_opt, bits_opt = PROJECTIONS[projection]
    variant_option = own if getattr(config, own) else group
    variant = getattr(config, variant_option)
    method = getattr(config, method_opt) or config.quantize_linear_method
    bits = getattr(config, bits_opt) or config.quantize_linear_bits
    return LINEAR.build(variant, in_features, out_features, config, method, bits, bias, option=variant_option)

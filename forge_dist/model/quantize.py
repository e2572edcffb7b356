"""Quantization-aware training: fake quantization with straight-through gradients.

The numerics (codes, scales, zero points) live in ``forge_dist.ops.reference.quantize``; this
module adds what training needs around them:

- ``QUANTIZER`` registry entries (affine_quant, symmetric_quant, stochastic_quant, ternary_quant);
- ``fake_quant``: y = x + level (Q(x) - x) in the forward pass, dy/dx = 1 in the backward pass
  (straight-through estimator, Bengio et al. 2013). Upstream's activation path returns Q(x)
  through an integer cast, so only the scale carried a gradient; here every quantized point
  passes the gradient straight through (docs/divergences.md);
- the schedule (``quant_scheduler`` static | linear, ``start_quant_level``, ``full_quant_iteration``)
  read from one model-wide training iteration that the trainer sets once per step with
  ``set_quant_iteration(model, it)``; nothing is threaded through forward calls;
- ``ActQuant``: the fake-quant of one named activation point (attention / MLP);
- ``QuantizedEmbedding`` (quantize_wte / quantize_wpe) whose rows get the straight-through gradient.

Tensor parallelism: a module's ``reduce_stats`` attribute (None = single device) is the one hook
through which every per-tensor statistic passes; a sharded layer sets it to an all-reduce.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_dist import ops
from forge_dist.config.validate import register_rule
from forge_dist.errors import ConfigError
from forge_dist.model.projections import PROJECTIONS
from forge_dist.variants import QUANTIZER
from forge_dist.ops.reference import quantize as ref

for _name, _fn in ref.QUANTIZERS.items():
    QUANTIZER.register(_name)(_fn)

ATTN_ACT_POINTS = ("input", "qk_mult_q_input", "qk_mult_k_input", "softmax_input", "pv_mult_p_input",
                   "pv_mult_v_input", "pv_mult_output", "output")
MLP_ACT_POINTS = ("input", "activation_input", "activation_output", "output")
ACT_POINTS = {"attn": ATTN_ACT_POINTS, "mlp": MLP_ACT_POINTS}
MAX_BITS = 32


class ExportedTensor(NamedTuple):
    """One quantized tensor as hardware takes it: value = (codes - zero_point) * scale."""

    zero_point: torch.Tensor
    scale: torch.Tensor
    codes: torch.Tensor
    method: str
    bits: int


# --- schedule ------------------------------------------------------------------------------------
def quant_level(training: bool, scheduler: Optional[str], start_level: float,
                full_quant_iteration: Optional[int], iteration: int) -> float:
    """How far toward its quantized value a tensor is moved (0 = float, 1 = fully quantized).

    eval: 1. No scheduler: 1. static: start_quant_level. linear: upstream's formula as written,
    min(it / full_quant_iteration + full_quant_iteration * start_quant_level, 1).
    """
    if not training or scheduler is None:
        return 1.0
    if scheduler == "static":
        return float(start_level)
    if scheduler == "linear":
        return min(iteration / full_quant_iteration + full_quant_iteration * start_level, 1.0)
    raise ConfigError(f"quant_scheduler={scheduler!r} is not valid; valid values: None, static, linear")


class _StraightThrough(torch.autograd.Function):
    """forward: x + level (Q(x) - x) (exactly Q(x) at level 1); backward: identity."""

    @staticmethod
    def forward(ctx, x, dequantized: Callable[[torch.Tensor], torch.Tensor], level: float):
        deq = dequantized(x)
        return deq if level == 1.0 else torch.lerp(x, deq, level)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def fake_quant(x: torch.Tensor, method: str, bits: int, level: float = 1.0, *, mask=None, dim=None,
               reduce_stats=None, stats_from=None, record: Optional[Callable] = None) -> torch.Tensor:
    """Straight-through fake quantization of x. Entries outside ``mask`` are returned unchanged
    (and excluded from the statistics), so masked scores may hold -inf. ``record(zp, scale, q)``
    receives the codes actually used (stochastic rounding draws them once)."""
    if level == 0.0 and record is None:
        return x
    if level == 1.0 and record is None and mask is None and stats_from is None and reduce_stats is None:
        return ops.fake_quantize(x, method, bits, dim=dim)  # the fused kernel where it applies
    quantizer = QUANTIZER.get(method)

    def dequantized(t):
        zp, scale, q = quantizer(t, bits, mask=mask, dim=dim, reduce_stats=reduce_stats, stats_from=stats_from)
        if record is not None:
            record(zp, scale, q)
        deq = ref.dequantize(zp, scale, q, t.dtype)
        return deq if mask is None else torch.where(mask, deq, t)

    return _StraightThrough.apply(x, dequantized, level)


class QuantizedModule:
    """Mixin of every quantizing module: method, bits, schedule, and the training iteration.

    ``set_quant_iteration`` turns the iteration into this module's (quantize?, level) once per
    step, so forward reads values that change rarely (torch.compile guards on them). A model run
    without it counts this module's own training forward calls instead (upstream's ``_step``).
    """

    quant_iteration: Optional[int] = None
    reduce_stats: Optional[ref.ReduceStats] = None
    warmup_iters: int = 0  # iterations that run unquantized (quantized_linear's warmup)

    def _init_quant(self, config, method: str, bits: int) -> None:
        QUANTIZER.check(method)
        self.quant_method = method
        self.quant_bits = int(bits)
        self.quant_scheduler = config.quant_scheduler
        self.start_quant_level = config.start_quant_level
        self.full_quant_iteration = config.full_quant_iteration
        self._own_steps = 0
        self._state = None  # (quantize?, level) at quant_iteration

    def state_at(self, iteration: int):
        """(quantize?, level) of a training step."""
        level = quant_level(True, self.quant_scheduler, self.start_quant_level, self.full_quant_iteration, iteration)
        return iteration >= self.warmup_iters, level

    def set_iteration(self, iteration: int) -> None:
        self.quant_iteration = int(iteration)
        self._state = self.state_at(self.quant_iteration)

    def quant_state(self):
        """(quantize?, level) now: eval is always fully quantized."""
        if not self.training:
            return True, 1.0
        if self._state is not None:
            return self._state
        self._own_steps += 1
        return self.state_at(self._own_steps - 1)

    def current_level(self) -> float:
        quantize, level = self.quant_state()
        return level if quantize else 0.0

    def quantize_tensor(self, t: torch.Tensor, bits: Optional[int] = None) -> ref.Quantized:
        """(zero_point, scale, codes) of t with this module's method."""
        with torch.no_grad():
            return QUANTIZER.get(self.quant_method)(t.detach(), bits or self.quant_bits,
                                                    reduce_stats=self.reduce_stats)

    def exported(self, quantized: ref.Quantized, bits: Optional[int] = None) -> ExportedTensor:
        return ExportedTensor(*quantized, self.quant_method, bits or self.quant_bits)


def set_quant_iteration(model: nn.Module, iteration: int) -> None:
    """Tell every quantizing module of ``model`` the current training iteration (call once per step)."""
    for m in model.modules():
        if isinstance(m, QuantizedModule):
            m.set_iteration(iteration)


def weights_version(*tensors) -> tuple:
    """Identity of tensors' contents: changes when an optimizer or load_state_dict writes them."""
    return tuple((t._version, t.data_ptr()) for t in tensors if t is not None)


# --- activations -------------------------------------------------------------------------------
class ActQuant(QuantizedModule, nn.Module):
    """Fake quantization of one activation point, e.g. ``attn_act_softmax_input``.

    With ``store_activations`` the last codes, scale and zero point are kept as (non-persistent)
    buffers ``codes``, ``scale``, ``zero_point`` for inspection and export.
    """

    def __init__(self, config, name: str, bits: int, method: Optional[str] = None):
        super().__init__()
        self.name = name
        self._init_quant(config, method or config.activations_quant_method, bits)
        self.store = config.store_activations
        if self.store:
            for b in ("codes", "scale", "zero_point"):
                self.register_buffer(b, None, persistent=False)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fake_quant(x, self.quant_method, self.quant_bits, self.current_level(), mask=mask,
                          reduce_stats=self.reduce_stats, record=self._record if self.store else None)

    def _record(self, zero_point, scale, codes):
        self.zero_point, self.scale, self.codes = zero_point, scale, codes

    def export_tensors(self) -> Dict[str, ExportedTensor]:
        """The last stored activation (empty unless store_activations and a forward has run)."""
        if not self.store or self.codes is None:
            return {}
        return {"activation": self.exported((self.zero_point, self.scale, self.codes))}

    def extra_repr(self) -> str:
        return f"{self.name}, method={self.quant_method}, bits={self.quant_bits}"


def act_quant_setting(config, group: str, point: str):
    """(enabled, bits) of one point: on with quantize_{group}_act or its own flag; a falsy
    per-point bits falls back to quantize_{group}_act_bits (upstream's set_variant)."""
    if point not in ACT_POINTS[group]:
        raise ConfigError(f"unknown {group} activation quantization point {point!r}; valid: "
                          f"{', '.join(ACT_POINTS[group])}")
    prefix = f"quantize_{group}_act"
    enabled = getattr(config, prefix) or getattr(config, f"{prefix}_{point}")
    bits = getattr(config, f"{prefix}_{point}_bits") or getattr(config, f"{prefix}_bits")
    return bool(enabled), bits


class ActQuantPoints(nn.ModuleDict):
    """The enabled activation-quant points of one attention or MLP module.

    ``self.act_quant = ActQuantPoints(config, "attn")`` then ``x = self.act_quant("input", x)``;
    a point that is off returns x untouched. ``mask`` (True = visible) is for softmax_input.
    """

    def __init__(self, config, group: str):
        super().__init__()
        for point in ACT_POINTS[group]:
            enabled, bits = act_quant_setting(config, group, point)
            if enabled:
                self[point] = ActQuant(config, f"{group}_act_{point}", bits)

    def forward(self, point: str, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if point not in self:
            return x
        return self[point](x, mask)


# --- embeddings ----------------------------------------------------------------------------------
class QuantizedEmbedding(QuantizedModule, nn.Embedding):
    """An embedding table fake-quantized per tensor (statistics over the whole table); only the
    looked-up rows are quantized, and they pass the gradient straight through to the table rows.
    Upstream dequantizes the whole table through an integer cast, so rows got almost no gradient."""

    def __init__(self, num_embeddings: int, embedding_dim: int, config, method: str, bits: int):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim)
        self._init_quant(config, method, bits)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (...) -> (..., D)
        rows = F.embedding(idx, self.weight)
        return fake_quant(rows, self.quant_method, self.quant_bits, self.current_level(),
                          reduce_stats=self.reduce_stats, stats_from=self.weight.detach())

    def export_tensors(self) -> Dict[str, ExportedTensor]:
        return {"weight": self.exported(self.quantize_tensor(self.weight))}


def build_embedding(config, which: str, num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """``transformer.wte`` / ``transformer.wpe``: quantized when quantize_{which} is set."""
    if getattr(config, f"quantize_{which}"):
        return QuantizedEmbedding(num_embeddings, embedding_dim, config, getattr(config, f"quantize_{which}_method"),
                                  getattr(config, f"quantize_{which}_bits"))
    return nn.Embedding(num_embeddings, embedding_dim)


# --- validation ----------------------------------------------------------------------------------
def _resolved_quant_settings(cfg):
    """(option naming it, method, bits) for every quantized tensor kind the config can produce."""
    for which in ("wte", "wpe"):
        yield (f"quantize_{which}_bits", getattr(cfg, f"quantize_{which}_method"),
               getattr(cfg, f"quantize_{which}_bits"))
    for group, points in ACT_POINTS.items():
        for point in points:
            own = f"quantize_{group}_act_{point}_bits"
            yield (own if getattr(cfg, own) else f"quantize_{group}_act_bits",
                   cfg.activations_quant_method, act_quant_setting(cfg, group, point)[1])
    for _, _, method_opt, bits_opt in PROJECTIONS.values():
        bits_option = bits_opt if getattr(cfg, bits_opt) else "quantize_linear_bits"
        yield bits_option, getattr(cfg, method_opt) or cfg.quantize_linear_method, getattr(cfg, bits_option)


@register_rule
def rule_quantization(cfg):
    if cfg.quant_scheduler == "linear" and not (cfg.full_quant_iteration and cfg.full_quant_iteration > 0):
        raise ConfigError(f"quant_scheduler=linear needs full_quant_iteration > 0 (the iteration at which "
                          f"quantization is complete); got full_quant_iteration={cfg.full_quant_iteration}")
    if cfg.quantization_warmup_iters < 0:
        raise ConfigError(f"quantization_warmup_iters={cfg.quantization_warmup_iters} must be >= 0")
    if not 0.0 <= cfg.start_quant_level <= 1.0:
        raise ConfigError(f"start_quant_level={cfg.start_quant_level} must be in [0, 1]")
    for option, method, bits in _resolved_quant_settings(cfg):
        if not 1 <= bits <= MAX_BITS:
            raise ConfigError(f"{option}={bits} must be between 1 and {MAX_BITS}")
        if method == "symmetric_quant" and bits < 2:
            raise ConfigError(f"{option}={bits} is too small for symmetric_quant; use bits >= 2")

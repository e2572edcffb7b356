"""The rules that map state dicts between ReaLLM-Forge's ckpt.pt and forge_dist (the file itself:
forge_dist/io/reallm_forge.py). Module names are the same on both sides by design; the differences
live in ``RULES`` below, the one place that maps state dicts between the two:

  StripPrefixes   ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) prefixes, import only
  RenameModules   module spellings that changed upstream (peri-LN ``out_ln_*`` at the snapshot,
                  ``peri_ln_*`` later): both accepted on import, the layout's spelling on export
  ScalarShape     one-element parameters whose shape changed upstream (``embedding_scale``: 0-d at
                  the snapshot, (1,) later)
  DerivedBuffer   tensors upstream keeps in its state dict and forge_dist derives instead (the
                  causal-mask ``attn.bias``): dropped on import, rebuilt on export
  FusedQKNormScale  the learned qk-norm scale g of the layers where upstream's causal attention
                  takes its SDPA path (effective scale g·d^(-1/4) there, g here): rescaled both
                  ways, so an imported checkpoint computes upstream's function

Export targets a ``layout``: "snapshot" (the reference snapshot 42dfe7f, default) or "latest"
(upstream master as stored in the public index, which renamed the items above).

A variant family whose state differs from upstream's adds its rule with ``register_rule``
(forge_dist/io/variant_rules.py: quantized linears' buffers, bitlinear_optimized's signs,
stored activations, the latest layout's LSV names); each rule maps whole state dicts so it may
rename, drop, synthesise, split or stack tensors. Rules see a ``Conversion``: the forge_dist model
on our side (its modules tell a rule which names belong to which variant), the layout, the
iteration, and ``extra``, tensors we keep that upstream's state dict has no slot for; they travel
in the ckpt.pt under ``forge_dist_tensors``, which upstream ignores.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from forge_dist.config.model_config import ModelConfig
from forge_dist.errors import ConfigError

LAYOUTS = ("snapshot", "latest")  # ReaLLM-Forge versions an export can target (module docstring)

StateDict = Dict[str, torch.Tensor]


@dataclass
class Conversion:
    """What a rule may read besides the state dict it maps."""

    model: nn.Module  # the forge_dist GPT being loaded into (import) or exported from (export)
    layout: str = "snapshot"  # the upstream version an export targets (import accepts all)
    iter_num: int = 0  # the checkpoint's training iteration
    extra: StateDict = field(default_factory=dict)  # our tensors upstream has no slot for

    @property
    def cfg(self) -> ModelConfig:
        return self.model.config

    def layers(self) -> Iterable[int]:
        """The transformer blocks the state dict being mapped holds: all of them (a part of it, one
        block at a time: forge-convert's streamed export, io/stream_export.py)."""
        return range(self.cfg.n_layer)

    def modules(self, cls) -> Iterator[Tuple[str, nn.Module]]:
        """(state-dict prefix, module) of every ``cls`` module, a shared one under every name it
        has (as state_dict lists it)."""
        for name, module in self.model.named_modules(remove_duplicate=False):
            if isinstance(module, cls):
                yield (name + "." if name else ""), module


class StateDictRule:
    """Maps a whole state dict in each direction; the default is the identity."""

    def from_upstream(self, sd: StateDict, conv: Conversion) -> StateDict:
        return sd

    def to_upstream(self, sd: StateDict, conv: Conversion) -> StateDict:
        return sd


class StripPrefixes(StateDictRule):
    def __init__(self, *prefixes: str):
        self.prefixes = prefixes

    def from_upstream(self, sd, conv):
        out = {}
        for name, t in sd.items():
            for p in self.prefixes:
                while name.startswith(p):
                    name = name[len(p):]
            out[name] = t
        return out


class RenameModules(StateDictRule):
    """Dotted name components: ``accepted`` upstream spellings -> ours on import;
    ``exported[layout]`` ours -> upstream on export."""

    def __init__(self, accepted: Dict[str, str], exported: Optional[Dict[str, Dict[str, str]]] = None):
        self.accepted, self.exported = accepted, exported or {}

    @staticmethod
    def _rename(sd, table):
        if not table:
            return sd
        return {".".join(table.get(part, part) for part in name.split(".")): t for name, t in sd.items()}

    def from_upstream(self, sd, conv):
        return self._rename(sd, self.accepted)

    def to_upstream(self, sd, conv):
        return self._rename(sd, self.exported.get(conv.layout, {}))


class ScalarShape(StateDictRule):
    """A one-element tensor ``name`` whose shape differs between layouts; ours is (1,)."""

    def __init__(self, name: str, shapes: Dict[str, tuple]):
        self.name, self.shapes = name, shapes

    def from_upstream(self, sd, conv):
        t = sd.get(self.name)
        if t is not None and t.numel() == 1:
            sd = {**sd, self.name: t.reshape(1)}
        return sd

    def to_upstream(self, sd, conv):
        if self.name in sd:
            sd = {**sd, self.name: sd[self.name].reshape(self.shapes[conv.layout])}
        return sd


class DerivedBuffer(StateDictRule):
    """A per-layer tensor upstream stores and we derive: ``transformer.h.{i}.<suffix>``.

    ``build(layer_cfg, cfg)`` returns the tensor upstream holds for that layer, or None where
    upstream has none.
    """

    def __init__(self, suffix: str, build: Callable[[ModelConfig, ModelConfig], Optional[torch.Tensor]]):
        self.suffix, self.build = suffix, build
        self.pattern = re.compile(r"transformer\.h\.\d+\." + re.escape(suffix) + "$")

    def from_upstream(self, sd, conv):
        return {n: t for n, t in sd.items() if not self.pattern.match(n)}

    def to_upstream(self, sd, conv):
        out, cfg = dict(sd), conv.cfg
        from forge_dist.model.sharing import module_config

        for i in conv.layers():
            kind = self.suffix.split(".")[0]  # "attn" or "mlp": the module the buffer belongs to
            t = self.build(module_config(cfg, i, kind), cfg)  # the config that module was built from
            if t is not None:
                out[f"transformer.h.{i}.{self.suffix}"] = t
        return out


def upstream_attention_is_manual(layer_cfg: ModelConfig) -> bool:
    """Whether upstream's CausalSelfAttention takes its manual (non-SDPA) path, which registers
    the persistent causal-mask buffer ``bias``: any softmax variant, a window, GQA, FIRE, soft-capping,
    attention activation quantization or disable_flash_attention (reference 2.5)."""
    c = layer_cfg
    quant = [c.quantize_attn_act, c.quantize_attn_act_bits]
    for name in c.field_names():
        if name.startswith("quantize_attn_act_"):
            group = c.quantize_attn_act_bits if name.endswith("_bits") else c.quantize_attn_act
            quant.append(getattr(c, name) or group)  # upstream's set_variant fallback
        elif name.startswith("quantize_linear_attn_") and name.endswith("_bits"):
            quant.append(getattr(c, name) or c.quantize_linear_bits)
    quantized = any(v is True or (type(v) is int and v == 1) for v in quant)  # upstream tests `== True`
    return (c.softmax_variant_attn != "softmax" or c.window_size is not None or c.kv_groups != c.n_head
            or c.use_fire_embeddings or bool(c.attn_logit_softcapping) or quantized
            or c.disable_flash_attention)


def causal_mask_buffer(layer_cfg: ModelConfig, cfg: ModelConfig) -> Optional[torch.Tensor]:
    """``attn.bias``: tril(ones(block, block)) viewed (1, 1, block, block), where upstream has it."""
    variant = layer_cfg.attention_variant
    if variant == "infinite" or (variant == "causal" and upstream_attention_is_manual(layer_cfg)):
        L = cfg.block_size
        return torch.tril(torch.ones(L, L)).view(1, 1, L, L)
    return None


class FusedQKNormScale(StateDictRule):
    """``attn.qk_norm_factor`` where upstream's CausalSelfAttention takes its SDPA path.

    Upstream's fused path pre-multiplies q by g·d^(1/4) and SDPA scales by d^(-1/2): the scores are
    q·k·g·d^(-1/4); its manual path and its ``infinite`` variant use q·k·g (reference 2.5). We use
    q·k·g in every path (docs/divergences.md), so import stores g·d^(-1/4) for those layers and
    export stores g·d^(1/4): the logits match both ways, d being the layer's query head dim.
    Export also keeps our g among the extra tensors; import takes it back while upstream's value
    is still the one exported (a checkpoint trained on upstream afterwards is rescaled instead).
    """

    pattern = re.compile(r"transformer\.h\.(\d+)\.attn\.qk_norm_factor$")

    @staticmethod
    def upstream_factor(layer_cfg: ModelConfig) -> Optional[float]:
        """upstream's effective scale / g for this layer, or None where it is g itself."""
        c = layer_cfg
        if c.attention_variant == "causal" and c.use_qk_norm_scale and not upstream_attention_is_manual(c):
            return c.head_dim ** -0.25
        return None

    def _layers(self, sd, conv):
        """(name, factor) of every rescaled tensor in ``sd``."""
        from forge_dist.model.sharing import module_config

        for name in sd:
            m = self.pattern.match(name)
            factor = self.upstream_factor(module_config(conv.cfg, int(m.group(1)), "attn")) if m else None
            if factor is not None:
                yield name, factor

    @staticmethod
    def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
        return (t.double() * factor).to(t.dtype)

    def from_upstream(self, sd, conv):
        out = dict(sd)
        for name, factor in self._layers(sd, conv):
            ours = conv.extra.get(name)  # our exact value, kept by export: a round trip is bit-exact
            exact = ours is not None and torch.equal(self._scaled(ours, 1 / factor), sd[name])
            out[name] = ours if exact else self._scaled(sd[name], factor)
        return out

    def to_upstream(self, sd, conv):
        out = dict(sd)
        for name, factor in self._layers(sd, conv):
            out[name] = self._scaled(sd[name], 1 / factor)
            conv.extra[name] = sd[name]
        return out


RULES: List[StateDictRule] = [
    StripPrefixes("_orig_mod.", "module."),
    RenameModules(accepted={"peri_ln_attn": "out_ln_attn", "peri_ln_mlp": "out_ln_mlp"},
                  exported={"latest": {"out_ln_attn": "peri_ln_attn", "out_ln_mlp": "peri_ln_mlp"}}),
    ScalarShape("embedding_scale", {"snapshot": (), "latest": (1,)}),
    DerivedBuffer("attn.bias", causal_mask_buffer),
    FusedQKNormScale(),
]


def register_rule(rule: StateDictRule) -> StateDictRule:
    """Add a variant family's mapping. Rules run in list order both ways, so a registered rule
    sees names without prefixes and in our spelling on import, and every built-in rule applied
    on export."""
    RULES.append(rule)
    return rule


def from_upstream_state_dict(sd: StateDict, conv: Conversion) -> StateDict:
    for rule in RULES:
        sd = rule.from_upstream(sd, conv)
    return sd


def to_upstream_state_dict(sd: StateDict, conv: Conversion) -> StateDict:
    """Our state dict in upstream's names; tensors upstream cannot hold go to ``conv.extra``."""
    if conv.layout not in LAYOUTS:
        raise ConfigError(f"layout={conv.layout!r} is not a ReaLLM-Forge layout; valid values: {', '.join(LAYOUTS)}")
    for rule in RULES:
        sd = rule.to_upstream(sd, conv)
    return sd

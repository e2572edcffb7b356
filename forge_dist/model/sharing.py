"""Cross-layer sharing (shared_{attn,mlp}_{size,seq,sym}): several layers reuse one module object.

The plan is a pure function of (n_layer, size, seq, sym), built separately for attention and MLP
(ReaLLM-Forge's shared_param_utils.py):

    sym       build ceil(n_layer / 2) "physical" layers and mirror them: the physical layer of
              layer i is 0 1 2 1 0 (odd n_layer) or 0 1 2 2 1 0 (even; the middle pair repeats)
    size = k  physical layer p uses module p // k: a new module every k layers   (A A B B C C)
    seq = s   a cyclic pool of s modules, in blocks of k: module (p // k) % s    (A B A B, AA BB AA)

Module indices are numbered in order of first use, so the plan of an unshared model is 0 .. L-1.
Tied layers hold the *same* module object: ``state_dict()`` lists it under every layer prefix (as
upstream), ``parameters()`` yields it once, and its gradient is the sum over every use. A pipeline
split finds cross-stage ties by identity or through ``GPT.sharing_plan``.

Per-layer overrides follow upstream: the module of physical layer p is built from the
``*_layerlist`` values of its sharing group p // size and the ``attention_list`` entry of p
(both are layer p's own values when size = 1). Layers that share a module must agree on every
override that shapes it (``mlp_*`` fields for the MLP, the others for attention); otherwise the
model is refused, since one module object cannot have two shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch.nn as nn

from forge_dist.config.layerwise import layer_overrides
from forge_dist.errors import ConfigError

KINDS = ("attn", "mlp")


def physical_layers(n_layer: int, sym: bool = False) -> List[int]:
    """Layer -> the physical layer whose module it uses: identity, or mirrored with ``sym``."""
    if not sym:
        return list(range(n_layer))
    first = list(range((n_layer + 1) // 2))
    mirror = first[:-1] if n_layer % 2 else first  # odd: the centre layer is not repeated
    return first + mirror[::-1]


def sharing_plan(n_layer: int, size: int = 1, seq: int = 1, sym: bool = False) -> List[int]:
    """Layer -> module index (numbered in order of first use)."""
    if size < 1 or seq < 1:
        raise ConfigError(f"sharing size={size} and seq={seq} must both be >= 1")
    if seq > 1:
        return [(p // size) % seq for p in physical_layers(n_layer, sym)]
    return [p // size for p in physical_layers(n_layer, sym)]


def _options(config, kind: str) -> Tuple[int, int, bool]:
    return (getattr(config, f"shared_{kind}_size"), getattr(config, f"shared_{kind}_seq"),
            getattr(config, f"shared_{kind}_sym"))


@dataclass(frozen=True)
class SharingPlan:
    """Module index of every layer, per kind; equal indices mean one shared module object."""
    attn: Tuple[int, ...]
    mlp: Tuple[int, ...]

    @classmethod
    def from_config(cls, config) -> "SharingPlan":
        return cls(*(tuple(sharing_plan(config.n_layer, *_options(config, k))) for k in KINDS))

    def groups(self, kind: str) -> List[List[int]]:
        """Layers of each module, in module order: e.g. [[0, 4], [1, 3], [2]] for sym over 5."""
        out: Dict[int, List[int]] = {}
        for layer, m in enumerate(getattr(self, kind)):
            out.setdefault(m, []).append(layer)
        return [out[m] for m in sorted(out)]

    def ties(self, kind: str) -> List[List[int]]:
        """Only the groups of more than one layer (what a pipeline split must keep in sync)."""
        return [g for g in self.groups(kind) if len(g) > 1]

    @property
    def is_shared(self) -> bool:
        return any(self.ties(k) for k in KINDS)


def module_config(config, layer: int, kind: str):
    """The config the ``kind`` module of ``layer`` is built from (see the module docstring).

    Equals ``config.for_layer(layer)`` when that kind is not shared with size > 1 or sym."""
    size, _, sym = _options(config, kind)
    p = physical_layers(config.n_layer, sym)[layer]
    group = p // size
    cfg = config.for_layer(group)
    if group != p and config.attention_list:  # upstream picks attention_list by layer, not group
        cfg = cfg.replace(attention_variant=config.attention_list[p % len(config.attention_list)])
    return cfg


def _shaping_fields(config, kind: str) -> List[str]:
    """Per-layer override targets that shape a module of ``kind``."""
    return [f for f in layer_overrides(config, 0) if f.startswith("mlp_") == (kind == "mlp")]


class SharedModules:
    """The ``kind`` module of each layer, built on first use (so attention and MLP of a layer are
    built in layer order) and reused wherever the plan repeats its index.

    ``build(layer_config, physical_layer)`` makes one module; the physical layer decides e.g. MoE
    placement (upstream uses the building layer's index)."""

    def __init__(self, config, kind: str, build: Callable[[object, int], nn.Module]):
        self.config, self.kind, self.build = config, kind, build
        self.plan = sharing_plan(config.n_layer, *_options(config, kind))
        self.physical = physical_layers(config.n_layer, _options(config, kind)[2])
        self.fields = _shaping_fields(config, kind)
        self.built: Dict[int, Tuple[nn.Module, int, object]] = {}  # index -> (module, first layer, config)

    def __getitem__(self, layer: int) -> nn.Module:
        m = self.plan[layer]
        cfg = module_config(self.config, layer, self.kind)
        if m not in self.built:
            self.built[m] = (self.build(cfg, self.physical[layer]), layer, cfg)
        else:
            self._check_compatible(layer, cfg)
        return self.built[m][0]

    def _check_compatible(self, layer: int, cfg) -> None:
        _, first, first_cfg = self.built[self.plan[layer]]
        for f in self.fields:
            a, b = getattr(first_cfg, f), getattr(cfg, f)
            if a != b:
                opts = "/".join(f"shared_{self.kind}_{o}" for o in ("size", "seq", "sym"))
                raise ConfigError(
                    f"layers {first} and {layer} share one {self.kind} module ({opts}), but their per-layer "
                    f"overrides differ: {f}={a!r} vs {b!r}. One module cannot have both shapes: give layers "
                    f"that share a module equal *_layerlist / attention_list values, or change {opts}")

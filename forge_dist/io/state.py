"""State dicts with shared tensors: store each tensor once, load into a model whose ties exist.

A model's ``state_dict()`` lists a tied tensor under every name it has (``lm_head.weight`` and
``transformer.wte.weight``; a cross-layer-shared module under every layer prefix). Files store
each tensor once under its first name plus an alias table; loading expands the aliases and
copies into the freshly built model, whose constructor already re-created the ties.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from forge_dist.errors import CheckpointError


def _identity(t: torch.Tensor):
    """Two names are the same tensor when they view the same memory the same way."""
    if t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def alias_groups(state: Mapping[str, torch.Tensor]) -> List[List[str]]:
    """Names that refer to one tensor, first name first (only groups of two or more)."""
    groups: Dict[object, List[str]] = {}
    for name, t in state.items():
        key = _identity(t)
        if key is not None:
            groups.setdefault(key, []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def dedupe(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors stored once, {alias: stored name}). Tensors are detached, on CPU, contiguous and
    own their memory (safetensors refuses tensors that share storage)."""
    aliases = {alias: group[0] for group in alias_groups(state) for alias in group[1:]}
    tensors, storages = {}, set()
    for name, t in state.items():
        if name in aliases:
            continue
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into memory another tensor also uses
        storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return tensors, aliases


def expand_aliases(tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str], source: str) -> Dict[str, torch.Tensor]:
    out = dict(tensors)
    for alias, name in aliases.items():
        if name not in tensors:
            raise CheckpointError(f"{source}: alias {alias!r} points to {name!r}, which is not stored")
        out[alias] = tensors[name]
    return out


@torch.no_grad()
def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load (``check_state``) into ``model``."""
    own = model.state_dict()
    check_state(own, state, source, alias_groups(own))
    model.load_state_dict(dict(state), strict=True)


def check_state(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str,
                ties: List[List[str]]) -> None:
    """Name every missing/unexpected/mis-shaped key of ``state`` against a model's state dict
    ``own`` (real or meta tensors) and check that the names the model ties (``ties``: groups, first
    name first) hold equal values in the checkpoint (else one would silently win)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit the model built from its config: "
                              f"missing {_short(missing)}; unexpected {_short(unexpected)}")
    for name, t in state.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(own[name].shape)}")
    for group in ties:
        first = state[group[0]]
        for other in group[1:]:
            if not torch.equal(state[other].to(first.dtype), first):
                raise CheckpointError(f"{source}: {other} and {group[0]} differ, but the config ties "
                                      f"them (wte_weight_tying / n_embd_wte_scale_tying / sharing)")


def _short(names: List[str], n: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more

"""Checkpoints of an expert-parallel model, keyed by global expert index.

A placed layer registers its experts under their global index (``...mlp.experts.{e}.*``), so
this rank's state dict already has one-process names; what it lacks are the other ranks' experts.
Both functions below gather them over the expert-parallel group (one all-gather per dtype of the
flattened expert tensors: every rank of the group holds as many experts, of the same shapes) and
return what one process would have:

  full_expert_state_dict      the model's logical state dict (on data-parallel rank 0)
  global_optimizer_state      the optimizer state dict with one-process parameter indices
  local_optimizer_state       its inverse on load: this rank's entries, by local index

So an EP=2 checkpoint is an ordinary one-process checkpoint: it resumes at EP=1, EP=4 or on one
process, and forge-convert reads it as any other.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from forge_dist.parallel.expert.dispatch import ExpertParallelExperts
from forge_dist.parallel.groups import ProcessGroups


def _placed(model: nn.Module) -> Dict[str, ExpertParallelExperts]:
    """{'<path>.': placed experts} under every name they are reachable by (shared layers too)."""
    return {f"{name}.": m for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, ExpertParallelExperts)}


def _split(name: str, placed: Dict[str, ExpertParallelExperts]) -> Optional[Tuple[str, int, str]]:
    """(prefix, global expert index, rest) of an expert tensor's name, else None."""
    for prefix in placed:
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            return prefix, int(index), rest
    return None


def _renamed(name: str, placed, source: int) -> str:
    """The name of the same tensor on expert-parallel rank ``source``."""
    prefix, index, rest = _split(name, placed)
    m = placed[prefix]
    return f"{prefix}{source * m.n_local + index - m.first}.{rest}"


def expand_names(names: List[str], placed) -> List[str]:
    """One-process order of ``names`` (this rank's, in order): each placed layer's local experts
    replaced by all its experts, 0 .. E-1, with the tensors of the first local one as pattern."""
    out: List[str] = []
    done = set()
    for name in names:
        part = _split(name, placed)
        if part is None:
            out.append(name)
            continue
        prefix = part[0]
        if prefix in done:
            continue
        done.add(prefix)
        m = placed[prefix]
        rests = [r for p, i, r in (_split(n, placed) for n in names if _split(n, placed))
                 if p == prefix and i == m.first]
        out += [f"{prefix}{e}.{r}" for e in range(m.n_experts) for r in rests]
    return out


def _gather(tensors: List[torch.Tensor], groups: ProcessGroups) -> List[List[torch.Tensor]]:
    """[source rank][i]: every expert-parallel rank's version of ``tensors[i]``."""
    ep = groups.ep
    out: List[List[Optional[torch.Tensor]]] = [[None] * len(tensors) for _ in range(ep.size)]
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for members in by_dtype.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in members])
        stacked = ep.all_gather(flat.unsqueeze(0), dim=0, phase="gather")  # (ep, N)
        for s in range(ep.size):
            offset = 0
            for i in members:
                n = tensors[i].numel()
                out[s][i] = stacked[s, offset:offset + n].view_as(tensors[i]).clone()
                offset += n
    return out


def gather_experts(state: "OrderedDict[str, torch.Tensor]", model: nn.Module,
                   groups: ProcessGroups) -> "OrderedDict[str, torch.Tensor]":
    """This rank's (TP-gathered) state dict -> the one with every expert, in one-process order.
    Collective over the expert-parallel group."""
    placed = _placed(model)
    names = [n for n in state if _split(n, placed)]
    per_source = _gather([state[n] for n in names], groups)
    every = {_renamed(n, placed, s): per_source[s][i] for s in range(groups.ep.size) for i, n in enumerate(names)}
    every.update({n: t for n, t in state.items() if n not in every and not _split(n, placed)})
    return OrderedDict((n, every[n]) for n in expand_names(list(state), placed))


def full_expert_state_dict(model: nn.Module, groups: ProcessGroups) -> Optional[dict]:
    """The logical state dict on data-parallel rank 0 (None elsewhere). Collective over the ranks
    of the first expert-parallel group of data-parallel replicas (their TP ranks included)."""
    if groups.coord.edp != 0:
        return None
    if groups.tp.size > 1:
        from forge_dist.parallel.tensor.metadata import gather_full_state_dict

        local = gather_full_state_dict(model, groups)
    else:
        local = model.state_dict()
    full = gather_experts(local, model, groups)
    return full if groups.coord.dp == 0 else None


def gather_expert_entries(entries: Dict[str, dict], modules: List[nn.Module], groups: ProcessGroups) -> Dict[str, dict]:
    """{name: optimizer state entry} of this rank's parameters (names as in ``modules``, e.g.
    pipeline stages) -> the same with every expert's entry under its global name; the moments are
    all-gathered over the EP group, the other values (AdamW's step) are this rank's. Collective
    over the expert-parallel group."""
    placed: Dict[str, ExpertParallelExperts] = {}
    for m in modules:
        placed.update(_placed(m))
    experts = [n for n in entries if _split(n, placed)]
    where = [(n, k) for n in experts for k, v in entries[n].items() if torch.is_tensor(v) and v.dim() > 0]
    per_source = _gather([entries[n][k] for n, k in where], groups)
    out = {n: e for n, e in entries.items() if n not in experts}
    for s in range(groups.ep.size):
        for (n, k), v in zip(where, per_source[s]):
            # AdamW's step copied: one tensor in several entries is shared memory, which safetensors refuses
            entry = out.setdefault(_renamed(n, placed, s), {key: val.clone() if torch.is_tensor(val) else val
                                                            for key, val in entries[n].items()
                                                            if not (torch.is_tensor(val) and val.dim() > 0)})
            entry[k] = v
    return out


def _group_names(param_groups: List[dict], names: List[str]) -> List[List[str]]:
    return [[names[i] for i in g["params"]] for g in param_groups]


def one_process_groups(param_groups: List[dict], names: List[str], model: nn.Module) -> Tuple[List[str], List[dict]]:
    """(every parameter's name in one process's optimizer order, ``param_groups`` with one-process
    indices) from this rank's groups (``names[i]``: local parameter i); the identity without
    placed experts. What a sharded checkpoint records of the optimizer (no communication)."""
    placed = _placed(model)
    global_groups = [expand_names(g, placed) for g in _group_names(param_groups, names)]
    flat = [n for g in global_groups for n in g]
    index = {n: i for i, n in enumerate(flat)}
    return flat, [{**g, "params": [index[n] for n in gn]} for g, gn in zip(param_groups, global_groups)]


def global_optimizer_state(sd: dict, names: List[str], model: nn.Module, groups: ProcessGroups) -> dict:
    """This rank's optimizer state dict (moments already TP-gathered; ``names[i]`` the name of
    local parameter i) -> one process's, with every expert's moments. Collective over the EP group."""
    placed = _placed(model)
    flat, param_groups = one_process_groups(sd["param_groups"], names, model)
    index = {n: i for i, n in enumerate(flat)}
    state: Dict[int, dict] = {}
    experts: List[Tuple[str, str, torch.Tensor]] = []  # (name, key, tensor) of every expert moment
    for i, entry in sd["state"].items():
        if _split(names[i], placed) is None:
            state[index[names[i]]] = entry
            continue
        for k, v in entry.items():
            if torch.is_tensor(v) and v.dim() > 0:
                experts.append((names[i], k, v))
    per_source = _gather([v for _, _, v in experts], groups)
    for s in range(groups.ep.size):
        for (name, k, _), v in zip(experts, per_source[s]):
            target = index[_renamed(name, placed, s)]
            if target not in state:
                local = sd["state"][names.index(name)]
                state[target] = {key: (val.clone() if torch.is_tensor(val) else val) for key, val in local.items()
                                 if not (torch.is_tensor(val) and val.dim() > 0)}  # e.g. AdamW's step
            state[target][k] = v
    return {"state": state, "param_groups": param_groups}


def local_optimizer_state(sd: dict, names: List[str], local_param_groups: List[dict], model: nn.Module) -> dict:
    """Inverse of global_optimizer_state for this rank: the saved one-process state dict -> the
    entries of this rank's parameters under their local indices (no communication)."""
    placed = _placed(model)
    local_groups = _group_names(local_param_groups, names)
    global_groups = [expand_names(g, placed) for g in local_groups]
    index = {n: i for i, n in enumerate(n for g in global_groups for n in g)}
    state = {i: sd["state"][index[n]] for i, n in enumerate(names) if index.get(n) in sd["state"]}
    param_groups = [{**saved, "params": list(mine["params"])} for saved, mine in zip(sd["param_groups"], local_param_groups)]
    return {"state": state, "param_groups": param_groups}

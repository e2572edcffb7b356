"""ZeRO-1 under expert parallelism: the AdamW state of dense parameters sharded over ``dp``, that of
expert parameters over ``expert_dp``.

The replicas of a dense parameter are the whole data-parallel group, but those of an expert are
only the ranks holding the same experts (``expert_dp``; the other ranks of ``dp`` hold other
experts under the same local positions). So one ZeroRedundancyOptimizer over ``dp`` (the native
ZeRO-1: forge_dist.parallel.zero) cannot own expert parameters: it would broadcast rank r's expert
over a rank holding another. ``ExpertZeroOptimizer`` runs two of torch's ZeroRedundancyOptimizer,
one per kind of parameter and group (DeepSpeed's ZeRO does the same with its expert parameter
groups: train/deepspeed_moe.py), behind the param_groups of one optimizer: the caller's groups, in
its order, so the engine sets the learning rate, clips and checkpoints as with one AdamW.
A group of one rank (``expert_dp`` at EP = DP) gets a plain AdamW.

Checkpoints: the sharded format reads and writes each part's local state (zero.local_state);
the gathered one consolidates each part on its group's rank 0 (``consolidate_state_dict``) and
``state_dict`` returns one process's indices (dense entries only where they were consolidated).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from forge_dist.parallel.expert.placement import is_expert_param
from forge_dist.parallel.groups import ProcessGroups


class ExpertZeroOptimizer:
    """``optimizer_class`` over ``param_groups`` with its state sharded over ``groups.dp`` (dense)
    and ``groups.expert_dp`` (experts); see the module doc."""

    def __init__(self, param_groups: List[Dict], groups: ProcessGroups, optimizer_class=torch.optim.AdamW,
                 **defaults):
        from forge_dist.parallel.zero import zero_optimizer

        self.param_groups = [dict(g, params=list(g["params"])) for g in param_groups]
        self.parts: List[Tuple[object, List[int], object]] = []  # (optimizer, its groups' indices here, RankGroup)
        for expert, group in ((False, groups.dp), (True, groups.expert_dp)):
            mine = [(i, {**g, "params": [p for p in g["params"] if is_expert_param(p) == expert]})
                    for i, g in enumerate(self.param_groups)]
            mine = [(i, g) for i, g in mine if g["params"]]
            if not mine:
                continue
            sub = [g for _, g in mine]
            opt = (zero_optimizer(sub, group, optimizer_class, **defaults) if group.size > 1
                   else optimizer_class(sub, **defaults))
            self.parts.append((opt, [i for i, _ in mine], group))
        for opt, index, _ in self.parts:  # every option the optimizer filled in, on our groups too
            for i, g in zip(index, opt.param_groups):
                self.param_groups[i].update({k: v for k, v in g.items() if k not in self.param_groups[i]})
        self.defaults = dict(defaults)

    @property
    def optimizers(self) -> List[object]:
        return [opt for opt, _, _ in self.parts]

    def _sync_options(self) -> None:
        for opt, index, _ in self.parts:
            for i, g in zip(index, opt.param_groups):
                g.update({k: v for k, v in self.param_groups[i].items() if k != "params"})

    @torch.no_grad()
    def step(self, closure=None):
        self._sync_options()  # the learning rate the engine wrote into our groups
        for opt in self.optimizers:
            opt.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    @property
    def state(self) -> Dict[torch.Tensor, dict]:
        """The state this rank holds (its part of each)."""
        from forge_dist.parallel.zero import local_state

        return local_state(self)

    # --- the gathered format --------------------------------------------------------------------
    def consolidate_state_dict(self, to: int = 0) -> None:
        """Each ZeRO part's state on rank ``to`` of its group (collective over dp and expert_dp)."""
        from forge_dist.parallel.zero import is_zero

        for opt, _, _ in self.parts:
            if is_zero(opt):
                opt.consolidate_state_dict(to=to)

    def _flat(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """One optimizer's state dict over our groups: the state of every part held whole here (a
        plain one, or a ZeRO part consolidated on this rank of its group)."""
        from forge_dist.parallel.zero import is_zero

        index = {id(p): i for i, p in enumerate(self._flat())}
        state: Dict[int, dict] = {}
        for opt, _, group in self.parts:
            if is_zero(opt) and (group.rank != 0 or not opt._all_state_dicts):  # consolidated there only
                continue
            params = [p for g in opt.param_groups for p in g["params"]]
            for j, entry in opt.state_dict()["state"].items():
                state[index[id(params[j])]] = entry
        groups, start = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + n))})
            start += n
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """One optimizer's state dict over our groups (each ZeRO part keeps its own share)."""
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"the state has {len(state_dict['param_groups'])} parameter groups, this optimizer "
                             f"{len(self.param_groups)}")
        index = {id(p): i for i, p in enumerate(self._flat())}
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        self._sync_options()
        for opt, which, _ in self.parts:
            params = [p for g in opt.param_groups for p in g["params"]]
            state = {j: state_dict["state"][index[id(p)]] for j, p in enumerate(params)
                     if index[id(p)] in state_dict["state"]}
            groups, start = [], 0
            for i, g in zip(which, opt.param_groups):
                n = len(g["params"])
                groups.append({**{k: v for k, v in state_dict["param_groups"][i].items() if k != "params"},
                               "params": list(range(start, start + n))})
                start += n
            opt.load_state_dict({"state": state, "param_groups": groups})

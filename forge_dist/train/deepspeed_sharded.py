"""The DeepSpeed engine's part of the sharded checkpoint (train/sharded_save.py): the same DCP
entries the native engines write (``model/<name>`` from the fp32 master weights,
``optim/<name>/{exp_avg,exp_avg_sq,step}``, logical names and shapes), each rank writing only what
its ZeRO partition owns, so DeepSpeed at any ZeRO stage and forge_dist's own engines resume each
other's checkpoints at any data- or tensor-parallel size.

What a rank owns of a parameter is a flat range of its TP-local tensor:
  ZeRO-1/2, BF16_Optimizer  DeepSpeed's tensor-fragment mapping (``_hp_mapping``: the range
                            ``lp_fragment_address``, the fp32 master ``hp_fragment`` and the Adam
                            state fragments), none when the partition holds nothing of it;
  ZeRO-3                    the parameter's own partition (``ds_tensor``: rank r owns
                            [r x partition_numel, ...)), through safe_{get,set}_local_*;
  stage 0 (fp32, fp16)      the whole tensor (``_per_parameter_masters``), DCP deduplicating the
                            data-parallel replicas.
The range is cut into contiguous boxes and mapped through the TP split
(parallel/sharded_state.fragment_pieces), so DCP writes each value once and reshards on load by
itself. A load writes into copies of the owned ranges, sets them through the same API, then
refreshes the low-precision parameters the forward uses from the masters (DeepSpeed's own
update_lp_params, or ZeRO-3's step-end copy of each sub-group and gather of persistent parameters).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from forge_dist.errors import CheckpointError
from forge_dist.parallel.sharded_state import LocalShards, fragment_pieces
from forge_dist.parallel.tensor.metadata import shard_info
from forge_dist.train.deepspeed_adam import adam_kind, set_step

MOMENTS = ("exp_avg", "exp_avg_sq")


class DeepSpeedShardedState:
    """Mixed into DeepSpeedEngine and DeepSpeedPipelineEngine (with DeepSpeedLogicalState): needs
    ``ds``, ``model``, ``groups``, ``_named`` (logical names), ``_masters``, ``_buffer_dtypes``,
    ``inner_optimizer`` and ``_optim_group_params`` (or its own ``optimizer_layout``)."""

    # --- what this rank owns of each parameter ----------------------------------------------------
    def _owned(self, p) -> Optional[Tuple[int, int]]:
        """(start, numel) of the flat range of ``p``'s TP-local tensor this rank's optimizer steps."""
        if hasattr(p, "ds_id"):
            pn = p.partition_numel()
            start = dist.get_rank(group=p.ds_process_group) * pn
            return start, max(0, min(pn, p.ds_numel - start))
        if hasattr(p, "_hp_mapping"):
            m = p._hp_mapping
            return None if m is None else (m.lp_fragment_address.start, m.lp_fragment_address.numel)
        return 0, p.numel()

    def _fragment(self, p, key: Optional[str]) -> Optional[torch.Tensor]:
        """The owned range of ``p``'s fp32 master (key None) or Adam state ``key``, flat (a ZeRO-3
        partition padded to partition_numel); None where no such state exists yet."""
        if hasattr(p, "ds_id"):
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            if key is None:
                value = safe_get_local_fp32_param(p)
            else:
                state = self.inner_optimizer.state.get(self.ds.optimizer.fp32_partitioned_groups_flat[0])
                value = safe_get_local_optimizer_state(p, key) if state else None
            # NVMe offload: the view is of a swap buffer DeepSpeed reuses for the next sub-group
            return value.clone() if value is not None and nvme_swapped(self.ds.optimizer) else value
        if hasattr(p, "_hp_mapping"):
            m = p._hp_mapping
            if key is None:
                return m.hp_fragment
            return m.get_optim_state_fragment(key) if m.optim_fragment and key in m.optim_fragment else None
        value = self._master(p, key)
        return None if value is None else value.reshape(-1)

    def _set_fragment(self, p, key: Optional[str], value: torch.Tensor) -> None:
        if hasattr(p, "ds_id"):
            from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

            if key is None:
                safe_set_local_fp32_param(p, value)
            else:
                safe_set_local_optimizer_state(p, value, key)
            return
        target = self._fragment(p, key)
        with torch.no_grad():
            target.copy_(value.view_as(target))

    # --- the DCP state ----------------------------------------------------------------------------
    def _tp_shape(self, p) -> Tuple[int, ...]:
        return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)

    def _pieces(self, p, fragment: torch.Tensor) -> LocalShards:
        info = shard_info(p)
        start, numel = self._owned(p)
        shape = self._tp_shape(p)
        pieces = fragment_pieces(fragment.reshape(-1).narrow(0, 0, numel), start, shape, info, self.groups)
        return LocalShards(pieces, tuple(info.full_shape) if info is not None else shape)

    def sharded_state(self, writing: bool = False, with_optim: bool = True) -> Dict[str, object]:
        """The DCP state of this rank (see the module doc). Writing: views of the live masters and
        moments; otherwise copies of the owned ranges to load into (load_sharded_state sets them)."""
        state: Dict[str, object] = {}
        self._targets: List[Tuple[str, torch.Tensor, Optional[str], torch.Tensor]] = []
        step = self._adam_step()
        moments = with_optim and (step > 0 or not writing)  # none before the first step
        for name, p in self._named:
            if writing and not self._writes(name):
                continue
            if moments:  # every rank holds every step (DCP writes it once)
                state[f"optim/{name}/step"] = torch.tensor(float(step))
            owned = self._owned(p)
            if owned is None or owned[1] == 0:
                continue
            for key in (None, *MOMENTS) if moments else (None,):
                live = self._fragment(p, key)
                if live is None:
                    continue
                # ZeRO-3's local fragments are views of its flat partitions: DCP reads into them in
                # place, with no second copy of this rank's state (docs/BENCHMARKS.md, resume)
                value = live if writing or hasattr(p, "ds_id") else live.detach().clone()
                state[f"model/{name}" if key is None else f"optim/{name}/{key}"] = self._pieces(p, value)
                if not writing:
                    self._targets.append((name, p, key, value))
        for name, b in self._persistent_buffers():
            if writing and not self._writes(name):
                continue
            value = b.detach().to(self._buffer_dtypes.get(name, b.dtype))
            if not writing:
                value = value.clone()
                self._targets.append((name, b, "buffer", value))
            state[f"model/{name}"] = LocalShards.of(value, shard_info(b), self.groups)
        return state

    def _writes(self, name: str) -> bool:
        """Whether this rank writes ``name`` (the pipeline engine: a tensor two stages hold, by the first)."""
        return True

    def _persistent_buffers(self) -> List[Tuple[str, torch.Tensor]]:
        """(logical name, tensor) of the model's persistent buffers."""
        named = dict(self.model.named_buffers())
        return [(n, t) for n, t in self.model.state_dict(keep_vars=True).items() if n in named and t is named[n]]

    def sharded_meta(self) -> dict:
        """What optimizer.json records beyond the layout (rank 0 writes it)."""
        return {"scaler": {}, "deepspeed": {"global_steps": int(self.ds.global_steps),
                                            "skipped_steps": int(self.ds.skipped_steps),
                                            "zero_stage": int(self.ds.zero_optimization_stage())}}

    def optimizer_layout(self) -> Tuple[List[str], List[dict]]:
        """(parameter names in one process's optimizer order, its groups with indices and options):
        the native engines' optimizer.json fields, so either engine resumes the other's checkpoint.
        Under expert parallelism: our groups before DeepSpeed split off the experts' (the native
        engine's groups), each placed layer's experts listed as all of them by global index."""
        from forge_dist.parallel.expert.state import one_process_groups

        names = {id(p): n for n, p in self._named}
        layout = getattr(self, "_layout_group_params", None) or self._optim_group_params
        split = {id(p): i for i, group in enumerate(self._optim_group_params) for p in group}
        local = [names[id(p)] for group in layout for p in group]
        groups, start = [], 0
        last = len(self.ds.optimizer.param_groups) - 1
        for i, group in enumerate(layout):
            options = self.ds.optimizer.param_groups[min(split.get(id(group[0]), i) if group else i, last)]
            groups.append({**{k: v for k, v in options.items()
                              if k not in ("params", "moe", "name") and plain_option(v)},
                           "params": list(range(start, start + len(group)))})
            start += len(group)
        return one_process_groups(groups, local, self.model)

    # --- resume -----------------------------------------------------------------------------------
    def load_sharded_state(self, path: str, verify: Optional[Callable[[List[str]], None]] = None) -> None:
        """Fill the masters, Adam state and the forward's parameters from the sharded checkpoint at
        ``path`` (written by any engine at any layout; collective)."""
        from forge_dist.io.checkpoint_read import MODEL_DIR
        from forge_dist.io.dcp_storage import read_index
        from forge_dist.io.sharded_read import dcp_directory
        from forge_dist.io.statefile import load_state
        from forge_dist.train.sharded_checkpoint import load_pieces

        extra = load_state(path, "optimizer", map_location="cpu")
        names, _ = self.optimizer_layout()
        if extra.get("param_names") != names:
            raise CheckpointError(f"the optimizer state in {path} does not fit this run's optimizer (other parameters "
                                  f"or parameter groups); keep the model options and weight_decay_split as they "
                                  f"were, or start from the weights with --init_from prev_run")
        directory = dcp_directory(os.path.join(path, MODEL_DIR))
        metadata = read_index(directory)
        index = metadata.state_dict_metadata
        has_optim = any(k.startswith("optim/") for k in index)
        if has_optim and adam_kind(self.inner_optimizer) is None:
            raise CheckpointError(f"{path} holds Adam state; this run steps with "
                                  f"{type(self.inner_optimizer).__name__}, which keeps another state: resume "
                                  f"with an Adam optimizer (torch's, FusedAdam or DeepSpeedCPUAdam)")
        if has_optim:
            self._materialize_adam_state(1)  # zeros to load into; the saved step is set below
        state = self.sharded_state(with_optim=has_optim)
        missing = [k for k in state if k.startswith("model/") and k not in index]
        if missing:
            raise CheckpointError(f"{path} lacks {missing[:4]}: it is from another model")
        state = {k: v for k, v in state.items() if k in index}  # moments never saved keep their zeros
        load_pieces(directory, state, metadata, verify)
        with torch.no_grad():
            for name, p, key, value in self._targets:
                entry = f"model/{name}" if key in (None, "buffer") else f"optim/{name}/{key}"
                if entry not in state:
                    continue
                if key == "buffer":
                    p.copy_(value.to(p.dtype))
                else:
                    self._set_fragment(p, key, value)
        step = _saved_step(state, self._named)
        if has_optim:
            set_step(self.inner_optimizer, step)  # and DeepSpeed's CPU kernel (deepspeed_adam.py)
        self._refresh_forward_params()
        saved = extra.get("deepspeed") or {}
        self.ds.global_steps = int(saved.get("global_steps", step))
        self.ds.skipped_steps = int(saved.get("skipped_steps", 0))

    def _refresh_forward_params(self) -> None:
        """The low-precision parameters the forward uses, from the fp32 masters just loaded
        (collective over data parallelism for ZeRO)."""
        opt = self.ds.optimizer
        if any(hasattr(p, "ds_id") for _, p in self._named):  # what ZeRO-3's step does after the update
            for i in range(len(opt.fp16_groups)):
                swapped = nvme_swapped(opt) and opt._swappable_optimizer_subgroup(i)
                if swapped:  # the sub-group's fp32 partition is in memory only while swapped in
                    opt._optimizer_states_and_gradient_swap_in(i)
                opt._reassign_or_swap_out_partitioned_parameters(i)
                if swapped:
                    opt._optimizer_states_and_gradient_swap_out(i)
            if opt.persistent_parameters:
                opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
            opt.invalidate_secondary_tensor()
            return
        if any(hasattr(p, "_hp_mapping") for _, p in self._named):
            opt.update_lp_params()
            return
        with torch.no_grad():
            for _, p in self._named:
                base, _ = self._masters[id(p)]
                if base is not p:
                    p.copy_(self._master(p).to(p.dtype))


def nvme_swapped(zero_optimizer) -> bool:
    """Whether ZeRO-3 swaps optimizer sub-groups to NVMe (``offload_optimizer.device: nvme``): their
    fp32 partitions and moments are then in DeepSpeed's swap buffers only between a swap-in and the
    next one, so this rank's state is copied out while it is read (the save stages it in CPU memory)."""
    return bool(getattr(zero_optimizer, "swap_optimizer", False))


def plain_option(value) -> bool:
    """An optimizer group option JSON keeps (optimizer.json)."""
    return value is None or isinstance(value, (bool, int, float, str)) or (
        isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value))


def _saved_step(state: Dict[str, object], named) -> int:
    """The Adam step read back (one for every parameter; 0 when saved before the first step)."""
    for name, _ in named:
        value = state.get(f"optim/{name}/step")
        if torch.is_tensor(value):
            return int(value.item())
    return 0

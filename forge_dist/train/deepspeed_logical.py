"""Layout-free views of a DeepSpeed engine's state: fp32 master weights and Adam moments by logical
parameter name (TP shards gathered, ZeRO partitions read through DeepSpeed's tensor-fragment API),
and the way back: a logical copy re-partitioned onto any data-parallel size, TP size or ZeRO stage
(safe_set_full_*). Collective over DP and TP; under expert parallelism every expert is gathered over
the expert-parallel group too (forge_dist.parallel.expert.state), so the names are one process's."""
from __future__ import annotations

from collections import OrderedDict
import os
import sys
from typing import Callable, Dict, Optional

import torch

from forge_dist.errors import CheckpointError
from forge_dist.io import deepspeed_ckpt as dsc
from forge_dist.io.deepspeed_safe import weights_only_loads
from forge_dist.parallel.tensor.metadata import full_tensor, shard_info, shard_tensor
from forge_dist.train.deepspeed_adam import adam_kind, current_step, new_step, replay_bias_correction

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class DeepSpeedLogicalState:
    """Mixed into DeepSpeedEngine: needs ``ds``, ``model``, ``groups``, ``device``, ``layout``,
    ``_named``, ``_plain``, ``_masters``, ``_buffer_dtypes`` and ``inner_optimizer``."""

    def _per_parameter_masters(self) -> Dict[int, tuple]:
        """id(param) -> (tensor the optimizer steps, offset of the param in it) where the fp32 master
        is not partitioned: the parameter itself (stage 0 fp32) or DeepSpeed's fp16/bf16 wrapper
        without ZeRO (a copy per parameter, or one flat copy per group). ZeRO-1/2/3 and
        BF16_Optimizer partitions are read through DeepSpeed's tensor-fragment API instead."""
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        opt = self.ds.optimizer
        if self._plain:
            return {id(p): (p, 0) for _, p in self._named}
        out = {}
        if isinstance(opt, FP16_UnfusedOptimizer):
            for lows, highs in zip(opt.fp16_groups, opt.fp32_groups):
                out.update({id(lo): (hi, 0) for lo, hi in zip(lows, highs)})
        elif isinstance(opt, FP16_Optimizer):
            for lows, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
                offset = 0
                for lo in lows:
                    out[id(lo)] = (flat, offset)
                    offset += lo.numel()
        return out

    def _master(self, p: torch.Tensor, key: Optional[str] = None) -> Optional[torch.Tensor]:
        """This TP rank's full fp32 master value of ``p`` (key None) or its Adam state ``key``."""
        hit = self._masters.get(id(p))
        if hit is None:
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            return safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        base, offset = hit
        if key is not None:
            state = self.inner_optimizer.state.get(base)
            if not state:
                return None
            base = state[key]
        return base.detach().reshape(-1).narrow(0, offset, p.numel()).view(p.shape).float()

    def _set_master(self, p: torch.Tensor, value: torch.Tensor, key: Optional[str] = None) -> None:
        """Set this TP rank's full value of ``p``'s master (key None: then also the parameter the
        forward uses, which DeepSpeed otherwise refreshes only after a step) or Adam state ``key``."""
        hit = self._masters.get(id(p))
        if hit is not None:
            base, offset = hit
            target = base if key is None else self.inner_optimizer.state[base][key]
            target.detach().view(-1).narrow(0, offset, p.numel()).copy_(value.reshape(-1))
            if key is None and base is not p:
                p.detach().copy_(value.to(p.dtype))
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if key is not None:
            safe_set_full_optimizer_state(p, value, key)
            return
        safe_set_full_fp32_param(p, value)
        if hasattr(p, "ds_id"):  # ZeRO-3: gather, write, re-partition (collective)
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value.to(p.dtype))
        else:
            p.detach().copy_(value.to(p.dtype))

    def _logical(self, fn: Callable, keep: bool = True, all_experts: bool = True) -> "OrderedDict[str, torch.Tensor]":
        """name -> the logical tensor ``fn`` gives for each parameter (collective); with ``keep``
        False the tensors are gathered for the others and dropped here; ``all_experts`` False: this
        rank's experts only."""
        out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        experts = all_experts and self.groups.ep.size > 1
        for name, p in self._named:
            local = fn(p)
            full = None if local is None else full_tensor(local, shard_info(p), self.groups)
            out[name] = None if full is None or not (keep or experts) else full.to("cpu", copy=True)
        if experts:
            out = self._all_experts(out)
            if not keep:
                out = OrderedDict((name, None) for name in out)
        return out

    def _all_experts(self, state: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
        """This rank's experts -> every expert by global index (collective over the EP group)."""
        if self.groups.ep.size == 1:
            return state
        from forge_dist.parallel.expert.state import gather_experts

        return gather_experts(state, self.model, self.groups)

    def full_state_dict(self, keep: bool = True) -> Optional["OrderedDict[str, torch.Tensor]"]:
        """Logical names -> full fp32 master weights and buffers (in their original dtype), tied
        tensors under every name as in model.state_dict(). Every rank must call it. ``keep``
        False (every rank but the writer of a gathered checkpoint): each tensor is gathered for the
        others and dropped at once, so this rank holds one full parameter at a time, never the
        model, and gets None (under expert parallelism every rank keeps its copy: gather_experts
        needs them)."""
        keep = keep or self.groups.ep.size > 1
        master = self._logical(self._master, keep=keep, all_experts=False)
        first = {id(p): name for name, p in self._named}
        out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        for name, t in self.model.state_dict(keep_vars=True).items():
            if id(t) in first:
                out[name] = master[first[id(t)]]
            else:
                value = t.detach().to(self._buffer_dtypes.get(name, t.dtype))
                full = full_tensor(value, shard_info(t), self.groups)
                out[name] = full.to("cpu", copy=True) if keep else None
        return self._all_experts(out) if keep else None

    def export_model(self, ctx) -> Optional[torch.nn.Module]:
        """A plain single-device GPT with the full fp32 weights on rank 0 (None elsewhere), for
        weights files and sampling; collective, like full_state_dict."""
        from forge_dist.io.state import load_state as load_model_state
        from forge_dist.model.gpt import GPT

        state = self.full_state_dict(keep=ctx.is_main)
        if not ctx.is_main:
            return None
        plain = GPT(self.model.config)
        load_model_state(plain, state, "the DeepSpeed engine's weights")
        return plain.eval()

    def _adam_step(self) -> int:
        return current_step(self.inner_optimizer)

    def logical_optimizer_state(self, keep: bool = True) -> dict:
        """fp32 master weights and Adam moments by logical name, TP shards gathered (collective;
        ``keep`` False: this rank only takes part, its copy holds no tensors)."""
        step = self._adam_step()
        params = {name: {"fp32": t} for name, t in self._logical(self._master, keep).items()}
        for key in ADAM_KEYS if step else ():
            for name, t in self._logical(lambda p: self._master(p, key), keep).items():
                params[name][key] = t
        return {"format": dsc.LOGICAL_FORMAT, "layout": self.layout, "step": step,
                "global_steps": int(self.ds.global_steps), "skipped_steps": int(self.ds.skipped_steps),
                "params": params}

    def load_own_or_logical_state(self, directory: str) -> None:
        """Resume through DeepSpeed's own files when the layout is the saved one (its partitions load
        as they are), else re-partition from the logical copy, which any layout reads."""
        ds_dir = os.path.join(directory, dsc.DS_DIR)
        meta = dsc.read_layout(ds_dir)
        if meta["layout"] == self.layout:
            with weights_only_loads(ds_dir):  # and SafeCheckpointEngine: no pickle from the files runs
                path, _ = self.ds.load_checkpoint(ds_dir, tag=meta["tag"], load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load {ds_dir} (tag {meta['tag']})")
            return
        self.load_logical_file(directory)
        if self.groups.global_rank == 0:
            print(f"resumed {directory} on a new layout {self.layout} (saved as {meta['layout']}): optimizer "
                  f"state re-partitioned from its logical copy", file=sys.stderr, flush=True)

    def _logical_step(self, state: dict) -> int:
        """The step of a logical optimizer copy (decoded, or its JSON structure), checked against this run."""
        if state.get("format") != dsc.LOGICAL_FORMAT:
            raise CheckpointError(f"not a forge_dist logical optimizer state (format {state.get('format')!r})")
        step = int(state["step"])
        inner = self.inner_optimizer
        if step and adam_kind(inner) is None:
            raise CheckpointError(f"changing the layout re-partitions Adam state; this run steps with "
                                  f"{type(inner).__name__}: resume at the saved layout {state['layout']} or with "
                                  f"an Adam optimizer (torch's, FusedAdam or DeepSpeedCPUAdam)")
        missing = [n for n, _ in self._named if n not in state["params"]]
        if missing:
            raise CheckpointError(f"the logical optimizer state lacks {missing[:4]}: it is from another model")
        return step

    def load_logical_file(self, directory: str) -> None:
        """A gathered checkpoint's logical optimizer copy (``deepspeed_logical.*``) on this layout.
        Under ZeRO-3 each rank reads only its partitions of it (the pieces ``sharded_state`` lists,
        block reads: io/slice_read.StateFileSlices), never the copy whole; the
        other stages and expert-parallel runs still load it whole."""
        from forge_dist.io.slice_read import StateFileSlices
        from forge_dist.io.statefile import load_state

        if self.groups.ep.size > 1 or not any(hasattr(p, "ds_id") for _, p in self._named):
            self.load_logical_optimizer_state(load_state(directory, dsc.LOGICAL_NAME))
            return
        with StateFileSlices(directory, dsc.LOGICAL_NAME) as reader:
            saved = reader.structure
            self._partitions_from(self._logical_step(saved), lambda name, key: (reader, f"params/{name}/{key}"))
        self.ds.global_steps = int(saved["global_steps"])
        self.ds.skipped_steps = int(saved["skipped_steps"])

    def load_native_partitions(self, directory: str) -> bool:
        """forge_dist's own gathered checkpoint (``model/`` weights, one process's AdamW state in
        ``optimizer.*``) under ZeRO-3 without experts: each rank reads only its partitions of the
        weights and moments (block reads, no mmap), never the files whole. False where it does not apply
        (``logical_from_native`` then reads them whole)."""
        from forge_dist.io.checkpoint_read import MODEL_DIR
        from forge_dist.io.slice_read import SafetensorsSlices, StateFileSlices

        if self.groups.ep.size > 1 or not any(hasattr(p, "ds_id") for _, p in self._named):
            return False
        names = self.optimizer_layout()[0]
        with StateFileSlices(directory, "optimizer") as opt, \
                SafetensorsSlices(os.path.join(directory, MODEL_DIR)) as weights:
            sd = opt.structure.get("optimizer") or {}
            check_native_count(directory, sd, names)
            entries = sd.get("state") or {}
            entries = dict(entries["__items__"]) if "__items__" in entries else entries
            step = next((e["step"] for e in entries.values() if "step" in e), 0)
            if isinstance(step, dict):  # a tensor (torch's AdamW)
                i = next(k for k, e in entries.items() if "step" in e)
                step = opt.full(f"optimizer/state/{i}/step", torch.float64)
            step = int(float(step))
            index = {n: i for i, n in enumerate(names)}

            def source(name: str, key: str):
                if key == "fp32":
                    return weights, name
                stored = f"optimizer/state/{index[name]}/{key}"
                return (opt, stored) if opt.stored(stored) is not None else None  # none: zeros
            self._partitions_from(step, source)
        self.ds.global_steps, self.ds.skipped_steps = step, 0
        return True

    def _partitions_from(self, step: int, source: Callable) -> None:
        """Fill this rank's ZeRO-3 partitions of the fp32 masters (and, when ``step``, the Adam
        moments, created at that step) from ``source(name, key)``: (SliceReader, its name there),
        or None (left as zeros); each reader is asked only for the pieces ``sharded_state`` lists."""
        if step:
            self._materialize_adam_state(step)
        state = self.sharded_state(with_optim=bool(step))  # views of this rank's partitions
        wanted: Dict[int, tuple] = {}
        for name, _ in self._named:
            for key in ("fp32", *ADAM_KEYS) if step else ("fp32",):
                entry = f"model/{name}" if key == "fp32" else f"optim/{name}/{key}"
                found = source(name, key) if entry in state else None
                if found is not None:
                    wanted.setdefault(id(found[0]), (found[0], {}))[1][found[1]] = state[entry].pieces
        for reader, pieces in wanted.values():
            reader.read(pieces)
        with torch.no_grad():
            for _, p, key, value in self._targets:
                if key != "buffer":  # parameters only
                    self._set_fragment(p, key, value)
        self._refresh_forward_params()

    def load_logical_optimizer_state(self, state: dict) -> None:
        step = self._logical_step(state)
        tp_rank, tp = self.groups.tp.rank, self.groups.tp.size

        def local(name: str, p, key: str) -> torch.Tensor:
            full = state["params"][name][key]
            info = shard_info(p)
            return (full if info is None else shard_tensor(full, info, tp_rank, tp)).to(self.device)

        if step:
            self._materialize_adam_state(step)
        with torch.no_grad():
            for name, p in self._named:
                self._set_master(p, local(name, p, "fp32"))
                for key in ADAM_KEYS if step else ():
                    self._set_master(p, local(name, p, key), key)
        self.ds.global_steps = int(state["global_steps"])
        self.ds.skipped_steps = int(state["skipped_steps"])

    def _materialize_adam_state(self, step: int) -> None:
        """Create Adam's state (zeros, ``step``) for every tensor the optimizer steps, and
        link DeepSpeed's ZeRO-1/2/bf16 fragments to it (DeepSpeed does both at its first step)."""
        inner = self.inner_optimizer
        on_device = any(g.get("fused") or g.get("capturable") for g in inner.param_groups)
        # ZeRO-3 puts its flat fp32 sub-groups into the optimizer's groups only while it steps
        stepped = getattr(self.ds.optimizer, "fp32_partitioned_groups_flat", None)
        if stepped is None:
            stepped = [p for g in inner.param_groups for p in g["params"]]
        zero = self.ds.optimizer
        for i, p in enumerate(stepped):
            # NVMe offload: a swapped sub-group exists in memory between DeepSpeed's swap-in and swap-out
            swapped = getattr(zero, "swap_optimizer", False) and zero._swappable_optimizer_subgroup(i)
            if swapped:
                zero._optimizer_states_and_gradient_swap_in(i)
            inner.state[p] = {"step": new_step(inner, step, p.device if on_device else "cpu"),
                              "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            if swapped:
                zero._optimizer_states_and_gradient_swap_out(i)
        replay_bias_correction(inner, step)  # DeepSpeed's CPU kernel: deepspeed_adam.py
        self.link_adam_fragments()

    def link_adam_fragments(self) -> None:
        """Point every parameter's ZeRO-1/2/bf16 fragment at its group's Adam state. DeepSpeed links
        them once, right after stepping its first parameter group, so a later group (the experts'
        own, or the no-decay group) would have none until this runs once after the first step."""
        inner = self.inner_optimizer
        for _, p in self._named:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                hp = inner.param_groups[mapping.param_group_index]["params"][0]
                if inner.state.get(hp):
                    mapping.set_optim_state_fragment(hp, inner.state[hp])


def logical_from_native(directory: str, names) -> dict:
    """The gathered checkpoint of forge_dist's own engines (weights in model/, one process's AdamW
    state dict in optimizer.*, parameters numbered in ``names``' order) as a logical optimizer copy,
    which load_logical_optimizer_state re-partitions at any ZeRO stage. Full tensors on every rank:
    what the gathered format costs."""
    from forge_dist.io.checkpoint_read import MODEL_DIR
    from forge_dist.io.forge_format import read_weights
    from forge_dist.io.statefile import load_state

    saved = load_state(directory, "optimizer", map_location="cpu")
    sd = saved.get("optimizer") or {}
    check_native_count(directory, sd, names)
    weights = read_weights(os.path.join(directory, MODEL_DIR))
    step = next((int(float(e["step"])) for e in sd["state"].values() if "step" in e), 0)
    params = {}
    for i, name in enumerate(names):
        fp32 = weights[name].float()
        entry = sd["state"].get(i) or {}
        params[name] = {"fp32": fp32, **{k: entry[k].float() if k in entry else torch.zeros_like(fp32)
                                         for k in ADAM_KEYS}}
    return {"format": dsc.LOGICAL_FORMAT, "layout": saved.get("layout"), "step": step, "global_steps": step,
            "skipped_steps": 0, "params": params}


def one_process_adamw_state(logical: dict, order, hyper) -> dict:
    """The one-process torch AdamW state dict of a logical optimizer copy: what forge_dist's own
    engines keep in a checkpoint's optimizer.* (so they resume it). Parameters are numbered in
    ``order`` (per group, canonical names in one process's order: pipeline_engine.one_process_order),
    each group takes its hyperparameters from ``hyper``."""
    index = {name: i for i, name in enumerate(n for names in order for n in names)}
    step = int(logical["step"])
    state = {}
    for name, entry in logical["params"].items() if step else ():
        state[index[name]] = {"step": torch.tensor(float(step)), **{k: entry[k] for k in ADAM_KEYS}}
    groups, start = [], 0
    for h, names in zip(hyper, order):
        groups.append({**h, "params": list(range(start, start + len(names)))})
        start += len(names)
    return {"state": state, "param_groups": groups}


def check_native_count(directory: str, sd: dict, names) -> None:
    """A native optimizer state (or its JSON structure) steps as many parameters as this model."""
    count = sum(len(g["params"]) for g in sd.get("param_groups", ()))
    if count != len(names):
        raise CheckpointError(f"the optimizer state in {directory} has {count} parameters, this model {len(names)}: "
                              f"it is from another model (or another weight_decay_split)")

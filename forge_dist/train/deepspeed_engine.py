"""The DeepSpeed engine behind forge-train's engine seam (``--deepspeed_config FILE``).

    engine = deepspeed_engine_factory(model, train_cfg, values, ctx)   # build.build_run calls it

``deepspeed.initialize`` receives our model (tensor-parallel or not), our torch AdamW with our
parameter groups (or, when the JSON names an optimizer, our parameter groups for DeepSpeed's own:
CPU Adam under offload), the resolved JSON (forge_dist.config.deepspeed) and an ``mpu`` built
from our ProcessGroups, so ZeRO partitions over the data-parallel ranks only. DeepSpeed owns
gradient accumulation (``engine.backward`` / ``engine.step`` per micro-batch), the data-parallel
reduction, clipping and loss scaling; our learning-rate schedule is applied by writing the rate
into the optimizer's parameter groups before every step.

Tensor parallelism, from the ShardInfo on every parameter:
  * ``tensor_model_parallel`` is set on the ranks that must count a parameter in the gradient
    norm, which DeepSpeed sums over the model-parallel group: a split parameter on the first rank
    of each distinct shard, a replicated one on TP rank 0 only (DeepSpeed's rule for unmarked
    parameters), so every value counts once;
  * partial gradients (replicated parameters used on local heads or sequence shards, replicated KV
    heads) are summed over their TP ranks by a gradient hook on the parameter, which runs as each
    gradient is produced, before DeepSpeed's own hooks and its data-parallel reduction (ZeRO-2/3
    reduce inside backward, so a sync after ``engine.backward`` would come too late). Summing over
    TP and averaging over DP commute, so this is tp_grad_sync, once per micro-batch.

Checkpoints (``save_state(tmp_dir, ctx)``, all ranks): DeepSpeed's own ``save_checkpoint`` into
``tmp_dir/deepspeed/`` (any ZeRO stage, exact resume at the same layout), its layout in
``deepspeed/forge_layout.json`` (forge_dist.io.deepspeed_ckpt), and a logical copy of the optimizer
(fp32 master weights, exp_avg, exp_avg_sq, step by parameter name, TP shards gathered) in
``deepspeed_logical.*``. ``load_state`` uses DeepSpeed's files when the data-parallel size, TP
size, ZeRO stage and precision are unchanged, and otherwise re-partitions the logical copy through
DeepSpeed's tensor-fragment API (safe_set_full_*), so a run can resume on a different number of
ranks.
"""
from __future__ import annotations

import importlib
import os
import sys
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from forge_dist.config.deepspeed import ResolvedDeepSpeed, load_deepspeed_config, resolve_deepspeed_config
from forge_dist.errors import CheckpointError, ConfigError
from forge_dist.io import deepspeed_ckpt as dsc
from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.mpu import DeepSpeedMPU
from forge_dist.parallel.tensor.metadata import full_tensor, shard_info, shard_tensor, tp_grad_norm
from forge_dist.train.optim import build_optimizer, param_groups
from forge_dist.train.statefile import load_state, save_state

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
Batch = Sequence[torch.Tensor]


def skip_shm_build() -> None:
    """On the CPU accelerator DeepSpeed JIT-builds ``deepspeed_shm_comm`` (about 35 s on a fresh
    machine) at its first init, for its inference all-reduce, which training never calls."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        module = importlib.import_module("deepspeed.comm.torch")
        if hasattr(module, "build_shm_op"):
            module.build_shm_op = lambda: None


def set_model_parallel_attributes(model: torch.nn.Module, groups: ProcessGroups) -> int:
    """Mark the parameters this rank counts in DeepSpeed's gradient norm (see the module doc);
    returns how many are marked on this rank."""
    tp_rank, tp = groups.tp.rank, groups.tp.size
    marked = 0
    for p in {id(p): p for p in model.parameters()}.values():
        info = shard_info(p)
        split = info is not None and info.dim is not None and info.num_shards > 1
        copies = tp // info.num_shards if split else tp  # ranks holding the same values
        p.tensor_model_parallel = tp > 1 and split and tp_rank % copies == 0
        marked += int(p.tensor_model_parallel)
    return marked


def register_tp_grad_hooks(model: torch.nn.Module, groups: ProcessGroups) -> List:
    """Sum partial gradients over the ranks holding the same copy as they are produced."""
    handles = []
    for p in {id(p): p for p in model.parameters()}.values():
        info = shard_info(p)
        if info is None or not info.partial_grad or not p.requires_grad:
            continue
        group = info.reduce_group(groups)
        if group.size > 1:
            handles.append(p.register_hook(lambda g, group=group: group.all_reduce(g, phase="grad_sync")))
    return handles


class DeepSpeedEngine:
    """forge-train's engine seam over a DeepSpeed engine (see forge_dist.train.engine)."""

    name = "deepspeed"

    def __init__(self, ds_engine, model, groups: ProcessGroups, resolved: ResolvedDeepSpeed, device: str,
                 buffer_dtypes: Dict[str, torch.dtype]):
        self.ds = ds_engine
        self.model = model  # the module DeepSpeed wraps (TP-sharded, ZeRO-3 partitioned, bf16 cast)
        self.groups = groups
        self.resolved = resolved
        self.device = torch.device(device)
        self.gas = resolved.config["gradient_accumulation_steps"]
        self._buffer_dtypes = buffer_dtypes
        self._named = list(model.named_parameters())  # unique parameters under their first name
        self._plain = self.ds.optimizer is self.inner_optimizer  # stage 0 fp32: our AdamW steps the params
        self._masters = self._per_parameter_masters()
        for state in self.inner_optimizer.state.values():  # see deepspeed_engine_factory
            if "step" in state:
                state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0
        self.layout = {"dp_size": groups.topology.dp, "tp_size": groups.topology.tp, "pp_size": groups.topology.pp,
                       "zero_stage": resolved.zero_stage, "precision": resolved.precision}

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that steps: ours, or the one a ZeRO/bf16 wrapper drives over its partitions."""
        return getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)

    # --- the loop -------------------------------------------------------------------------------
    def forward_backward(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        if len(micro_batches) != self.gas:
            raise ValueError(f"{len(micro_batches)} micro-batches, but the DeepSpeed config accumulates "
                             f"gradient_accumulation_steps={self.gas}")
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            _, loss = self.ds(x.to(self.device), y.to(self.device))
            self.ds.backward(loss)  # scaled by 1/gas (and the loss scale) inside
            if i + 1 < len(micro_batches):
                self.ds.step()  # not a boundary: DeepSpeed only counts the micro-step
            total += loss.detach().float()
        return total / len(micro_batches)

    def step(self, lr: float) -> dict:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        norm = tp_grad_norm(self.model, self.groups) if self._plain else None  # DeepSpeed keeps none here
        self.ds.step()  # the accumulation boundary: clip, step, zero gradients
        if norm is None:
            norm = self.ds.get_global_grad_norm()
        stats = {"grad_norm": None if norm is None else float(norm), "skipped_steps": int(self.ds.skipped_steps)}
        if self.resolved.precision == "fp16":
            scale = getattr(self.ds.optimizer, "loss_scale", None) or getattr(self.ds.optimizer, "cur_scale", None)
            stats["loss_scale"] = None if scale is None else float(scale)
        return stats

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, loss = self.ds(x.to(self.device), y.to(self.device))
        return loss.float()

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    # --- logical (layout-free) views: collective over DP and TP --------------------------------
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

    def _logical(self, fn: Callable, keep: bool = True) -> "OrderedDict[str, torch.Tensor]":
        """name -> the logical tensor ``fn`` gives for each parameter (collective); with ``keep``
        False the tensors are gathered for the others and dropped here."""
        out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        for name, p in self._named:
            local = fn(p)
            full = None if local is None else full_tensor(local, shard_info(p), self.groups)
            out[name] = None if full is None or not keep else full.to("cpu", copy=True)
        return out

    def full_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """Logical names -> full fp32 master weights and buffers (in their original dtype), tied
        tensors under every name as in model.state_dict(). Every rank must call it."""
        master = self._logical(self._master)
        first = {id(p): name for name, p in self._named}
        out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        for name, t in self.model.state_dict(keep_vars=True).items():
            if id(t) in first:
                out[name] = master[first[id(t)]]
            else:
                value = t.detach().to(self._buffer_dtypes.get(name, t.dtype))
                out[name] = full_tensor(value, shard_info(t), self.groups).to("cpu", copy=True)
        return out

    def export_model(self, ctx) -> Optional[torch.nn.Module]:
        """A plain single-device GPT with the full fp32 weights on rank 0 (None elsewhere), for
        weights files and sampling; collective, like full_state_dict."""
        from forge_dist.io.state import load_state as load_model_state
        from forge_dist.model.gpt import GPT

        state = self.full_state_dict()
        if not ctx.is_main:
            return None
        plain = GPT(self.model.config)
        load_model_state(plain, state, "the DeepSpeed engine's weights")
        return plain.eval()

    def _adam_step(self) -> int:
        for state in self.inner_optimizer.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

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

    # --- checkpoints ----------------------------------------------------------------------------
    def save_state(self, directory: str, ctx) -> None:
        ds_dir = os.path.join(directory, dsc.DS_DIR)
        self.ds.save_checkpoint(ds_dir, client_state={"forge_dist_layout": self.layout})
        logical = self.logical_optimizer_state(keep=ctx.is_main)  # 16 bytes per parameter, rank 0 only
        if ctx.is_main:
            dsc.write_layout(ds_dir, self.model, self.layout, int(self.ds.global_steps))
            save_state(logical, directory, dsc.LOGICAL_NAME)
        ctx.barrier()

    def load_state(self, directory: str) -> None:
        ds_dir = os.path.join(directory, dsc.DS_DIR)
        meta = dsc.read_layout(ds_dir)
        if meta["layout"] == self.layout:
            path, _ = self.ds.load_checkpoint(ds_dir, tag=meta["tag"], load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load {ds_dir} (tag {meta['tag']})")
            return
        self.load_logical_optimizer_state(load_state(directory, dsc.LOGICAL_NAME))
        if self.groups.global_rank == 0:
            print(f"resumed {directory} on a new layout {self.layout} (saved as {meta['layout']}): optimizer "
                  f"state re-partitioned from its logical copy", file=sys.stderr, flush=True)

    def load_logical_optimizer_state(self, state: dict) -> None:
        if state.get("format") != dsc.LOGICAL_FORMAT:
            raise CheckpointError(f"not a forge_dist logical optimizer state (format {state.get('format')!r})")
        step = int(state["step"])
        inner = self.inner_optimizer
        if step and not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            raise CheckpointError(f"changing the layout re-partitions torch AdamW state; this run steps with "
                                  f"{type(inner).__name__} (the config's \"optimizer\" section): resume at the "
                                  f"saved layout {state['layout']} or remove the section")
        missing = [n for n, _ in self._named if n not in state["params"]]
        if missing:
            raise CheckpointError(f"the logical optimizer state lacks {missing[:4]}: it is from another model")
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
        """Create torch AdamW's state (zeros, ``step``) for every tensor the optimizer steps, and
        link DeepSpeed's ZeRO-1/2/bf16 fragments to it (DeepSpeed does both at its first step)."""
        inner = self.inner_optimizer
        on_device = any(g.get("fused") or g.get("capturable") for g in inner.param_groups)
        # ZeRO-3 puts its flat fp32 sub-groups into the optimizer's groups only while it steps
        stepped = getattr(self.ds.optimizer, "fp32_partitioned_groups_flat", None)
        if stepped is None:
            stepped = [p for g in inner.param_groups for p in g["params"]]
        for p in stepped:
            inner.state[p] = {"step": torch.tensor(float(step), dtype=torch.float32,
                                                   device=p.device if on_device else "cpu"),
                              "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for _, p in self._named:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                hp = inner.param_groups[mapping.param_group_index]["params"][0]
                mapping.set_optim_state_fragment(hp, inner.state[hp])


def _load(values: dict):
    """(raw config, its name in messages) from --deepspeed_config (a path, or a dict in code)."""
    source = values.get("deepspeed_config")
    if not source:
        raise ConfigError("the DeepSpeed engine needs --deepspeed_config FILE (ready configs: configs/deepspeed/)")
    if isinstance(source, dict):
        return source, "deepspeed config"
    return load_deepspeed_config(source), f"--deepspeed_config {source}"


def _check_options(train_cfg) -> None:
    if train_cfg.compile:
        raise ConfigError("--compile is not applied under --deepspeed_config (DeepSpeed wraps the module); "
                          "drop --compile")


def preflight(values: dict, train_cfg, model_config, parallel_config, world_size: int) -> ResolvedDeepSpeed:
    """forge-train calls this before any process group exists (forge_dist.train.launch): the config
    must resolve for this world (data-parallel size = world / (tensor x pipeline sizes))."""
    raw, name = _load(values)
    _check_options(train_cfg)
    mp = parallel_config.tensor_parallel_size * parallel_config.pipeline_parallel_size
    return resolve_deepspeed_config(raw, train_cfg, max(world_size // mp, 1), model_config=model_config,
                                    pipeline_parallel_size=parallel_config.pipeline_parallel_size, source=name)


def _groups(ctx) -> ProcessGroups:
    groups = getattr(ctx, "groups", None)
    if groups is not None:
        return groups
    from forge_dist.parallel.topology import Topology

    if not dist.is_initialized():
        from forge_dist.dist.init import init_distributed

        init_distributed()  # a launched world exports RANK ... MASTER_PORT; one process: an in-memory store
    world = dist.get_world_size()
    if world == 1:  # DeepSpeed asserts LOCAL_RANK, and without all five it tries MPI discovery
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", "29500")):
            os.environ.setdefault(key, value)
        return ProcessGroups.single()
    return ProcessGroups.build(Topology(world))


def deepspeed_engine_factory(model, train_cfg, values: dict, ctx) -> DeepSpeedEngine:
    """The engine_factory of build.build_run for ``--deepspeed_config`` (see the module doc)."""
    raw, name = _load(values)
    _check_options(train_cfg)
    groups = _groups(ctx)
    topo = groups.topology
    if getattr(ctx, "dp_size", topo.dp) != topo.dp:
        raise ConfigError(f"the run context has {ctx.dp_size} data-parallel ranks, the process groups {topo.dp}")
    resolved = resolve_deepspeed_config(raw, train_cfg, topo.dp, model_config=getattr(model, "config", None),
                                        pipeline_parallel_size=topo.pp, source=name)
    if topo.pp > 1:
        raise ConfigError(f"pipeline_parallel_size={topo.pp}: the DeepSpeed engine runs tensor and data "
                          f"parallelism; launch with pipeline_parallel_size=1")
    import deepspeed

    skip_shm_build()
    set_model_parallel_attributes(model, groups)
    register_tp_grad_hooks(model, groups)
    buffer_dtypes = {n: b.dtype for n, b in model.named_buffers()}
    device = train_cfg.resolved_device
    # The rate starts at 0: our schedule sets it before every step, and DeepSpeed's fp16/bf16
    # wrappers without ZeRO take one zero-gradient step at construction, which at rate 0 leaves the
    # weights exactly as they are (weight decay included); the engine resets its step counter.
    if resolved.ds_optimizer:
        optimizer = None
        params = [dict(g, lr=0.0) for g in param_groups(model, train_cfg.adamw_weight_decay,
                                                         train_cfg.weight_decay_split)]
    else:
        optimizer = build_optimizer(model, train_cfg, torch.device(device).type)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        params = None
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                              config=resolved.config, mpu=DeepSpeedMPU.build(groups))
    return DeepSpeedEngine(ds_engine, model, groups, resolved, device, buffer_dtypes)

"""The DeepSpeed engine behind forge-train's engine seam (``--deepspeed_config FILE``).

    engine = deepspeed_engine_factory(model, train_cfg, values, ctx)   # build.build_run calls it

``deepspeed.initialize`` receives our model (tensor-parallel or not), our torch AdamW with our
parameter groups (or, when the JSON names an optimizer, our parameter groups for DeepSpeed's own:
CPU Adam under offload), the resolved JSON (forge_dist.config.deepspeed) and an ``mpu`` built
from our ProcessGroups, so ZeRO partitions over the data-parallel ranks only. DeepSpeed owns
gradient accumulation (``engine.backward`` / ``engine.step`` per micro-batch), the data-parallel
reduction, clipping and loss scaling; our learning-rate schedule is applied by writing the rate
into the optimizer's parameter groups before every step.

Tensor parallelism (deepspeed_tp.py): parameters marked for DeepSpeed's gradient norm and partial
gradients summed over their TP ranks by hooks.

Expert parallelism (deepspeed_moe.py): placed experts declared as DeepSpeed MoE parameters, with our
expert groups registered as DeepSpeed's and the optimizer groups split its way, so ZeRO-1/2 reduce
expert gradients over ``expert_dp``; its sharded checkpoint holds each rank's experts under their
global names (optimizer.json: the groups before the experts' were split off).

Checkpoints: a launched run writes forge-train's sharded format (train/deepspeed_sharded.py: each rank
its ZeRO partitions, any engine and layout resumes it). The gathered format
(``save_state(tmp_dir, ctx)``, all ranks): DeepSpeed's own ``save_checkpoint`` into
``tmp_dir/deepspeed/`` (any ZeRO stage, exact resume at the same layout; read back through
forge_dist.io.deepspeed_safe, which refuses any pickled object beyond a short allow-list), its layout in
``deepspeed/forge_layout.json`` (forge_dist.io.deepspeed_ckpt), and a logical copy of the optimizer
(fp32 master weights, exp_avg, exp_avg_sq, step by parameter name, TP shards gathered) in
``deepspeed_logical.*``. ``load_state`` uses DeepSpeed's files when the data-parallel size, TP
size, ZeRO stage and precision are unchanged, and otherwise re-partitions the logical copy through
DeepSpeed's tensor-fragment API (safe_set_full_*; deepspeed_logical.py), so a run can resume on a
different number of ranks.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from forge_dist.config.deepspeed import ResolvedDeepSpeed, load_deepspeed_config, resolve_deepspeed_config
from forge_dist.errors import CheckpointError, ConfigError
from forge_dist.io import deepspeed_ckpt as dsc
from forge_dist.io.deepspeed_safe import install as install_safe_checkpoint_engine
from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.mpu import DeepSpeedMPU
from forge_dist.parallel.tensor.metadata import tp_grad_norm
from forge_dist.train.deepspeed_init import (has_meta_parameters, partitioned_materialize,
                                             wants_meta_model)
from forge_dist.train.deepspeed_internals import check_deepspeed
from forge_dist.train.deepspeed_logical import ADAM_KEYS, DeepSpeedLogicalState, logical_from_native  # noqa: F401
from forge_dist.train.deepspeed_sharded import DeepSpeedShardedState
from forge_dist.train.deepspeed_moe import declared_moe, has_placed_experts, moe_param_groups, register_expert_groups
from forge_dist.train.deepspeed_zero3 import memory_efficient_linear, share_fp32_master
from forge_dist.train import deepspeed_gloo
from forge_dist.train.deepspeed_tp import (one_reduction_per_step, register_tp_grad_hooks, set_model_parallel_attributes,
                                          sum_partial_grads, tp_sum_mode)
from forge_dist.train.optim import build_optimizer, param_groups
from forge_dist.train.statefile import save_state

Batch = Sequence[torch.Tensor]


def skip_shm_build() -> None:
    """On the CPU accelerator DeepSpeed JIT-builds ``deepspeed_shm_comm`` (about 35 s on a fresh
    machine) at its first init, for its inference all-reduce, which training never calls."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        module = importlib.import_module("deepspeed.comm.torch")
        if hasattr(module, "build_shm_op"):
            module.build_shm_op = lambda: None


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_muon_uncompiled() -> bool:
    """DeepSpeed's ZeRO and bf16 optimizers import its Muon module to ask whether the optimizer is
    Muon, and that module's kernels are decorated with ``torch.compile`` at import, which loads all
    of Inductor (measured: 2.5 s and 43 MB of resident memory on every rank, docs/BENCHMARKS.md,
    "ZeRO-3 under DeepSpeed at DP=2"). forge-train trains with AdamW only (config/deepspeed.py
    refuses any other optimizer), so Muon never runs here: it is imported once, first, with the
    decorator DeepSpeed itself uses where torch has no compile (``compiler.dummy_decorator``). A
    no-op once the module is imported; returns whether this call imported it."""
    import sys

    if MUON_MODULE in sys.modules:
        return False
    from deepspeed.runtime import compiler

    real = compiler.compile
    compiler.compile = lambda: compiler.dummy_decorator
    try:
        importlib.import_module(MUON_MODULE)
    except ImportError:  # a DeepSpeed without Muon: nothing to skip
        return False
    finally:
        compiler.compile = real
    return True


class DeepSpeedEngine(DeepSpeedShardedState, DeepSpeedLogicalState):
    """forge-train's engine seam over a DeepSpeed engine (see forge_dist.train.engine)."""

    name = "deepspeed"
    tp_sums: Optional[str] = None  # None | coalesce | no_sync | hooks: see deepspeed_tp.tp_sum_mode

    def __init__(self, ds_engine, model, groups: ProcessGroups, resolved: ResolvedDeepSpeed, device: str,
                 buffer_dtypes: Dict[str, torch.dtype], group_params: Optional[list] = None,
                 layout_params: Optional[list] = None):
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
        self.ep = groups.ep.size
        self._optim_group_params = group_params or []  # the optimizer's parameters by group: sharded checkpoints
        self._layout_group_params = layout_params  # the same before the experts' groups were split off
        self._fragments_linked = False
        zero = resolved.config.get("zero_optimization", {})
        self._zero3_linear = resolved.zero_stage == 3 and zero.get("memory_efficient_linear", True) is not False
        if self.ep > 1:
            self.layout["ep_size"] = self.ep

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that steps: ours, or the one a ZeRO/bf16 wrapper drives over its partitions."""
        return getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)

    # --- the loop -------------------------------------------------------------------------------
    def forward_backward(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        if len(micro_batches) != self.gas:
            raise ValueError(f"{len(micro_batches)} micro-batches, but the DeepSpeed config accumulates "
                             f"gradient_accumulation_steps={self.gas}")
        with memory_efficient_linear(self._zero3_linear):  # ZeRO-3: see deepspeed_zero3.py
            return self._forward_backward(micro_batches)

    def _forward_backward(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        if self.tp_sums in ("coalesce", "no_sync"):  # partial gradients: one TP bucket, then DeepSpeed's DP pass
            with one_reduction_per_step(self.ds, self.tp_sums):
                for x, y in micro_batches:
                    _, loss = self.ds(x.to(self.device), y.to(self.device))
                    self.ds.backward(loss)
                    total += loss.detach().float()
                sum_partial_grads(self.ds, self.model, self.groups)
            return total / len(micro_batches)
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
        if not self._fragments_linked and len(self.inner_optimizer.param_groups) > 1:
            self.link_adam_fragments()  # every group's, not only the first one's (deepspeed_logical.py)
            self._fragments_linked = True
        if norm is None:
            norm = self.ds.get_global_grad_norm()
        stats = {"grad_norm": None if norm is None else float(norm), "skipped_steps": int(self.ds.skipped_steps)}
        if self.resolved.precision == "fp16":
            scale = getattr(self.ds.optimizer, "loss_scale", None) or getattr(self.ds.optimizer, "cur_scale", None)
            stats["loss_scale"] = None if scale is None else float(scale)
        return stats

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with memory_efficient_linear(self._zero3_linear):
            _, loss = self.ds(x.to(self.device), y.to(self.device))
        return loss.float()

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    # --- checkpoints ----------------------------------------------------------------------------
    def save_state(self, directory: str, ctx) -> None:
        ds_dir = os.path.join(directory, dsc.DS_DIR)
        if self.ep == 1:  # DeepSpeed's MoE files assume its own MoE modules: the logical copy only (deepspeed_moe.py)
            self.ds.save_checkpoint(ds_dir, client_state={"forge_dist_layout": self.layout})
        logical = self.logical_optimizer_state(keep=ctx.is_main)  # 16 bytes per parameter, rank 0 only
        if ctx.is_main:
            if self.ep == 1:
                dsc.write_layout(ds_dir, self.model, self.layout, int(self.ds.global_steps))
            save_state(logical, directory, dsc.LOGICAL_NAME)
        ctx.barrier()

    def load_state(self, directory: str) -> None:
        from forge_dist.train.sharded_save import is_sharded_checkpoint, load_engine_state

        if is_sharded_checkpoint(directory):  # any engine's, any layout: this rank's partitions
            load_engine_state(self, directory, self.groups)
            return
        ds_dir = os.path.join(directory, dsc.DS_DIR)
        if not os.path.isfile(os.path.join(directory, f"{dsc.LOGICAL_NAME}.json")) and os.path.isfile(
                os.path.join(directory, "optimizer.json")):  # forge_dist's own engines, gathered
            if self.ep > 1:
                raise CheckpointError(f"{directory} is a gathered checkpoint of forge_dist's own engine, which "
                                      f"--deepspeed_config with expert_parallel_size > 1 cannot resume yet; resume "
                                      f"it without --deepspeed_config, or from a sharded checkpoint")
            if not self.load_native_partitions(directory):  # ZeRO-3: this rank's partitions only
                self.load_logical_optimizer_state(logical_from_native(directory, self.optimizer_layout()[0]))
            return
        if self.ep > 1 or not os.path.isdir(ds_dir):  # expert parallelism, or saved by one: the logical copy
            self.load_logical_file(directory)
            return
        self.load_own_or_logical_state(directory)


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
    resolved = resolve_deepspeed_config(raw, train_cfg, max(world_size // mp, 1), model_config=model_config,
                                        pipeline_parallel_size=parallel_config.pipeline_parallel_size, source=name)
    if parallel_config.expert_parallel_size > 1:
        check_expert_zero(resolved, parallel_config.expert_parallel_size, name)
    if parallel_config.pipeline_parallel_size > 1:  # ZeRO-2/3 with a pipeline was refused just above
        from forge_dist.train.deepspeed_pipeline import check_deepspeed_pipeline

        check_deepspeed_pipeline(parallel_config, model_config)
    return resolved


def check_expert_zero(resolved: ResolvedDeepSpeed, ep: int, source: str) -> None:
    """DeepSpeed's ZeRO-2 partitions expert gradients over expert_dp only with contiguous gradients
    and reduce-scatter (it asserts both at init); ZeRO-3 with MoE is refused by the config check."""
    zero = resolved.config.get("zero_optimization", {})
    if resolved.zero_stage == 2:
        for key in ("contiguous_gradients", "reduce_scatter"):
            if zero.get(key, True) is False:
                raise ConfigError(f"{source}: zero_optimization.{key}=false with expert_parallel_size={ep}: "
                                  f"DeepSpeed's ZeRO-2 reduces expert gradients over the expert-data-parallel "
                                  f"group only with {key}=true; set it to true (or remove it)")


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
    """The engine_factory of build.build_run for ``--deepspeed_config`` (see the module doc). Under
    ZeRO-3 ``model`` may still be on the meta device (build_run asks ``wants_meta_model``): it is
    then drawn straight into ZeRO-3 partitions (deepspeed_init.py)."""
    raw, name = _load(values)
    _check_options(train_cfg)
    groups = _groups(ctx)
    topo = groups.topology
    if getattr(ctx, "dp_size", topo.dp) != topo.dp:
        raise ConfigError(f"the run context has {ctx.dp_size} data-parallel ranks, the process groups {topo.dp}")
    resolved = resolve_deepspeed_config(raw, train_cfg, topo.dp, model_config=getattr(model, "config", None),
                                        pipeline_parallel_size=topo.pp, source=name)
    import deepspeed

    check_deepspeed()  # the internals used below are where this engine expects them
    skip_shm_build()
    import_muon_uncompiled()
    deepspeed_gloo.install()  # ZeRO's gloo all-gathers and reduce-scatters in place (same bits)
    if topo.pp > 1:  # DeepSpeed's PipelineModule over our stages
        from forge_dist.train.deepspeed_pipeline import deepspeed_pipeline_factory

        return deepspeed_pipeline_factory(model, train_cfg, ctx, resolved, groups)
    set_model_parallel_attributes(model, groups)
    mpu = DeepSpeedMPU.build(groups)
    if has_meta_parameters(model):  # build.build_run left it on meta (wants_meta_model): ZeRO-3 draws it
        if resolved.zero_stage != 3:
            raise ConfigError(f"the model is on the meta device but the DeepSpeed config has ZeRO stage "
                              f"{resolved.zero_stage}: only stage 3 materialises it (partitioned)")
        weights = getattr(model, "prev_run_weights", None)  # build_model: --init_from prev_run's SliceReader
        partitioned_materialize(model, resolved.config, groups, mpu, weights)
        if weights is not None:
            weights.close()  # this rank's partitions are read
            model.prev_run_weights = None
    buffer_dtypes = {n: b.dtype for n, b in model.named_buffers()}
    device = train_cfg.resolved_device
    # The rate starts at 0: our schedule sets it before every step, and DeepSpeed's fp16/bf16
    # wrappers without ZeRO take one zero-gradient step at construction, which at rate 0 leaves the
    # weights exactly as they are (weight decay included); the engine resets its step counter.
    experts = has_placed_experts(model)
    if experts and resolved.zero_stage == 2:
        check_expert_zero(resolved, topo.ep, name)
    optim_groups = param_groups(model, train_cfg.adamw_weight_decay, train_cfg.weight_decay_split)
    layout_params = [list(g["params"]) for g in optim_groups]  # the native engine's groups: optimizer.json
    if experts:  # DeepSpeed's expert groups are ours; its optimizer groups split dense/expert (deepspeed_moe.py)
        register_expert_groups(groups, {k: mpu.handle(k) for k in ("ep", "expert_dp")})
        optim_groups = moe_param_groups(optim_groups)
    group_params = [list(g["params"]) for g in optim_groups]  # before DeepSpeed swaps in its flat partitions
    if resolved.ds_optimizer:
        optimizer = None
        params = [dict(g, lr=0.0) for g in optim_groups]
    else:
        optimizer = build_optimizer(model, train_cfg, torch.device(device).type, groups=optim_groups)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        params = None
    declaration = (declared_moe(model, groups, model.config.n_experts) if experts else contextlib.nullcontext())
    with declaration:
        ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                                  config=resolved.config, mpu=mpu)
    install_safe_checkpoint_engine(ds_engine)  # DeepSpeed's own loads unpickle anything
    if resolved.zero_stage == 3:
        share_fp32_master(ds_engine.optimizer)  # fp32: the partition is its own master (deepspeed_zero3.py)
    engine = DeepSpeedEngine(ds_engine, model, groups, resolved, device, buffer_dtypes, group_params, layout_params)
    engine.tp_sums = tp_sum_mode(ds_engine, model, groups)  # how partial gradients are summed (deepspeed_tp.py)
    if engine.tp_sums == "hooks":
        register_tp_grad_hooks(model, groups)
    return engine


deepspeed_engine_factory.wants_meta_model = wants_meta_model  # build.build_run asks it (ZeRO-3)

"""DeepSpeed's own pipeline engine over forge_dist's stages (``--deepspeed_config`` with
``--pipeline_parallel_size P > 1``).

    engine = deepspeed_pipeline_factory(model, train_cfg, ctx, resolved, groups)  # deepspeed_engine calls it

The plain GPT becomes a ``deepspeed.pipe.PipelineModule`` (deepspeed_pipe_module.py) of n_layer + 2
layers, each a GPTChunk (parallel/pipeline/stage.py: the GPT's own forward pieces under the GPT's
own parameter names):

    layer 0          the embeddings (GPTChunk first stage, no block)     TiedLayerSpec "wte"
    layer i + 1      block i (and the steering point after it)            LayerSpec
    layer n + 1      final norm and head (HeadChunk: the loss runs in     TiedLayerSpec "wte"
                     the pipeline's loss_fn, which alone receives labels)

forge-train hands over the GPT on the meta device (train/model_build.py): DeepSpeed builds only this
stage's layers from it, and only their parameters get values (drawn from the one-process streams, or
only their pieces read from a checkpoint), so no rank materialises another stage's layers.

The stage boundaries are forge_dist's split (split.py: balanced with the embedding and head counted,
or ``--pipeline_layers``), passed to DeepSpeed as explicit partition bounds. The tied token table and
LM head are DeepSpeed's tied module: each end stage builds its own piece under the key "wte", and
DeepSpeed broadcasts the table at start and all-reduces its gradient over the two stages every step.

``forward_backward`` is ``engine.train_batch`` over the step's gradient_accumulation_steps
micro-batches, with DeepSpeed's OptimizerStep instruction held back until ``step(lr)``, so the
trainer's bad-step check and learning-rate schedule still sit between the backward and the update.

Checkpoints: forge-train's sharded format on a launch (train/deepspeed_sharded.py: each stage rank
writes its stages' ZeRO partitions under one-process names, the tied table by the first stage), or
the gathered one: DeepSpeed's own (``layer_XX-model_states.pt`` per layer, under the GPT's names, and its
ZeRO optimizer files), ``forge_layout.json``, the logical optimizer copy of the DeepSpeed engine
(deepspeed_logical.*, gathered over the stages) and, when torch AdamW steps, the one-process AdamW
state (optimizer.*): a pipeline run resumes at another layout under DeepSpeed (PP=1, other DP) or
under forge_dist's own engines (one process, TP, the native pipeline), and ``forge-convert`` reads
the layer files without DeepSpeed.

MoE: every block's auxiliary losses reach the objective through GPTChunk's AuxLossGrad with a
gradient of 1 / gradient_accumulation_steps (DeepSpeed scales the last stage's loss by it, and
what the earlier stages receive is already scaled), and the logged loss adds every stage's.

Tensor (and sequence) parallelism inside the stages: DeepSpeed's PipeModelDataParallelTopology has
Megatron's rank order, as our Topology; the pieces are sharded by forge_dist's TP rules, their
partial gradients summed over TP by hooks (deepspeed_tp.py), and the tied table's shards tied per
TP rank by DeepSpeed.

Refused before launch (``check_deepspeed_pipeline``): schedules other than 1f1b and virtual stages, modules shared across stages other than the tied
table (and the tied factorised-embedding adapters), expert parallelism; ZeRO-2/3 by the config
resolution.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from forge_dist.errors import ConfigError
from forge_dist.io import deepspeed_ckpt as dsc
from forge_dist.io.deepspeed_safe import install as install_safe_checkpoint_engine
from forge_dist.parallel.grad_norm import global_grad_norm
from forge_dist.parallel.pipeline.stage import GPTChunk, merge_stage_parts
from forge_dist.train.deepspeed_logical import DeepSpeedLogicalState
from forge_dist.train.deepspeed_pipe_module import canonical_names, pipeline_module
from forge_dist.train.deepspeed_sharded import DeepSpeedShardedState, plain_option
from forge_dist.train.statefile import save_state


# --- refusals (no process group, no model) ---------------------------------------------------------
def _tied_names(model_config) -> set:
    """Logical parameters the two end stages may both hold (DeepSpeed ties them)."""
    out = set()
    if model_config.wte_weight_tying:
        out.add("transformer.wte.weight")
    if model_config.n_embd_wte is not None and model_config.n_embd_wte_scale_tying:
        out.add("transformer.scale_up.weight")
    return out


def check_deepspeed_pipeline(parallel_config, model_config) -> None:
    """ConfigError naming the option for what DeepSpeed's pipeline path does not run."""
    pp = parallel_config.pipeline_parallel_size
    what = f"--deepspeed_config with pipeline_parallel_size={pp}"
    native = "train it with the native pipeline engine (no --deepspeed_config)"
    if parallel_config.expert_parallel_size > 1:
        raise ConfigError(f"expert_parallel_size={parallel_config.expert_parallel_size} with {what}: DeepSpeed's "
                          f"pipeline engine would average placed experts over data parallelism; use "
                          f"expert_parallel_size=1 (MoE runs with experts whole on each stage), or {native}")
    if parallel_config.pipeline_schedule != "1f1b" or (parallel_config.virtual_pipeline_size or 1) > 1:
        raise ConfigError(f"pipeline_schedule={parallel_config.pipeline_schedule} / virtual_pipeline_size="
                          f"{parallel_config.virtual_pipeline_size} with {what}: DeepSpeed's pipeline engine runs its "
                          f"own 1F1B schedule, one stage per rank; use --pipeline_schedule 1f1b, or {native}")
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.pipeline.split import pipeline_plan
    from forge_dist.parallel.pipeline.stage import build_stages

    plan = pipeline_plan(parallel_config, model_config)
    with torch.device("meta"):
        shared = set(build_stages(GPT(model_config), plan, 0).holders) - _tied_names(model_config)
    if shared:
        raise ConfigError(f"{what}: {sorted(shared)[:4]} are shared by layers on different stages ({plan.describe()}); "
                          f"DeepSpeed ties only the token table here: set --pipeline_layers so the sharing layers "
                          f"share a stage, or {native}")


# --- the engine ------------------------------------------------------------------------------------
class DeepSpeedPipelineEngine(DeepSpeedShardedState, DeepSpeedLogicalState):
    """forge-train's engine seam over DeepSpeed's PipelineEngine (see forge_dist.train.engine)."""

    name = "deepspeed"  # DeepSpeed's step bookkeeping: a bad step stops the run (train/bad_steps.py)

    def __init__(self, ds_engine, pipe, chunks: List[GPTChunk], canonical: Dict[str, str], groups, resolved,
                 device: str):
        from deepspeed.runtime.pipe import schedule
        from deepspeed.runtime.pipe.engine import PipelineEngine

        self.ds, self.model, self.groups, self.resolved = ds_engine, pipe, groups, resolved
        self.chunks = chunks
        self.device = torch.device(device)
        self.gas = resolved.config["gradient_accumulation_steps"]
        named: Dict[int, tuple] = {}  # the pieces' names are the GPT's; a tied copy takes its first name
        for chunk in chunks:
            for name, p in chunk.named_parameters(remove_duplicate=False):
                named.setdefault(id(p), (canonical[name], p))
        self._named = list(named.values())
        self._tied = _tied_names(pipe.config)
        self._buffer_dtypes = {}
        self._plain = self.ds.optimizer is self.inner_optimizer
        self._masters = self._per_parameter_masters()
        for state in self.inner_optimizer.state.values():  # the wrappers' step at construction (lr 0)
            if "step" in state:
                state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0
        topo = groups.topology
        self.layout = {"dp_size": topo.dp, "tp_size": topo.tp, "pp_size": topo.pp,
                       "zero_stage": resolved.zero_stage, "precision": resolved.precision}
        self._step_pending = False
        self._fragments_linked = False

        def hold_step(engine, **kwargs):  # OptimizerStep, deferred to step(lr)
            self._step_pending = True

        self.ds._INSTRUCTION_MAP = {**PipelineEngine._INSTRUCTION_MAP, schedule.OptimizerStep: hold_step}
        self._shape = None

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)

    def _feed(self, batches):
        shape = tuple(batches[0][0].shape)
        if self._shape is not None and shape != self._shape:
            self.ds.reset_activation_shape()  # DeepSpeed caches the activation shapes it sends
        self._shape = shape
        return iter([(x.to(self.device), y.to(self.device)) for x, y in batches])

    # --- the loop -------------------------------------------------------------------------------
    def forward_backward(self, micro_batches: Sequence) -> torch.Tensor:
        if len(micro_batches) != self.gas:
            raise ValueError(f"{len(micro_batches)} micro-batches, but the DeepSpeed config accumulates "
                             f"gradient_accumulation_steps={self.gas}")
        for chunk in self.chunks:
            chunk.aux_sum = torch.zeros((), dtype=torch.float64)
        loss = self.ds.train_batch(self._feed(micro_batches))  # mean over micro-batches and DP, on every stage
        loss = loss.detach().float().reshape(())
        if not self.model.config.use_moe:
            return loss
        aux = sum((c.aux_sum for c in self.chunks), torch.zeros((), dtype=torch.float64)).reshape(1)
        aux = self.groups.pp.all_reduce(aux, phase="loss")  # every stage's auxiliary losses
        aux = self.groups.dp.all_reduce(aux, phase="loss") / (self.gas * self.groups.dp.size)
        return loss + aux[0].float()

    def _plain_grad_norm(self) -> torch.Tensor:
        """The global norm DeepSpeed's fp32 stage-0 path does not keep: each logical gradient once
        (the copies _mark_norm_params counts; parallel/grad_norm.py)."""
        terms = ((p.grad, 1, False) for p in self.model.parameters() if p.grad is not None and p.model_parallel)
        return global_grad_norm(terms, [self.groups.tp, self.groups.pp], device=self.device)

    def step(self, lr: float) -> dict:
        if not self._step_pending:
            raise RuntimeError("step() without forward_backward(): DeepSpeed's pipeline has no gradients to apply")
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        norm = self._plain_grad_norm() if self._plain else None
        self.ds._exec_optimizer_step()  # clip, step, zero gradients; global_steps + 1
        self._step_pending = False
        if not self._fragments_linked and len(self.inner_optimizer.param_groups) > 1:
            self.link_adam_fragments()  # every group's ZeRO fragments (deepspeed_logical.py)
            self._fragments_linked = True
        if norm is None:
            norm = self.ds.get_global_grad_norm()
        return {"grad_norm": None if norm is None else float(norm), "skipped_steps": int(self.ds.skipped_steps)}

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.ds.eval_batch(self._feed([(x, y)]), num_micro_batches=1)
        return loss.float().reshape(())

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    # --- layout-free state: each stage's part, gathered to global rank 0 ------------------------
    def _gather_stages(self, mine: dict) -> Optional[list]:
        """Every stage's ``mine`` on global rank 0 (TP rank 0 of data-parallel replica 0 sends; None
        elsewhere)."""
        if self.groups.coord.dp != 0 or self.groups.tp.rank != 0:
            return None
        pp = self.groups.pp
        parts = [None] * pp.size if pp.rank == 0 else None
        dist.gather_object(mine, parts, dst=pp.ranks[0], group=pp.handle)
        return parts

    def full_state_dict(self, keep: bool = True) -> Optional[dict]:
        """The logical fp32 weights (and buffers) on global rank 0; collective. Only the ranks that
        send their stage to it (TP rank 0 of replica 0) keep their stage's tensors, whatever ``keep``."""
        from forge_dist.parallel.tensor.metadata import full_tensor, shard_info

        sends = self.groups.coord.dp == 0 and self.groups.tp.rank == 0
        master = self._logical(self._master, keep=sends)  # collective over DP under ZeRO-1, over TP when split
        ids = {id(p): name for name, p in self._named}
        mine = {}
        for chunk in self.chunks:
            for name, t in chunk.state_dict(keep_vars=True).items():
                mine[name] = master[ids[id(t)]] if id(t) in ids else \
                    full_tensor(t.detach(), shard_info(t), self.groups).to("cpu", copy=True)
        parts = self._gather_stages(mine)
        if parts is None:
            return None
        return merge_stage_parts(parts, self.model.config, "DeepSpeed pipeline")

    def logical_optimizer_state(self, keep: bool = True) -> dict:
        local = super().logical_optimizer_state(keep=self.groups.coord.dp == 0)
        parts = self._gather_stages(local["params"])
        local["params"] = {} if parts is None or not keep else {k: v for part in parts for k, v in part.items()}
        return local

    optimizer_grouping = (0.0, False)  # (weight_decay, weight_decay_split) of the torch AdamW it steps

    def save_state(self, directory: str, ctx) -> None:
        """DeepSpeed's files, the logical copy, and (stepping torch AdamW) the one-process AdamW state
        in optimizer.*, which forge_dist's own engines resume at any layout."""
        ds_dir = os.path.join(directory, dsc.DS_DIR)
        self.ds.save_checkpoint(ds_dir, client_state={"forge_dist_layout": self.layout})
        logical = self.logical_optimizer_state(keep=ctx.is_main)
        if ctx.is_main:
            from forge_dist.model.gpt import GPT

            with torch.device("meta"):
                plain = GPT(self.model.config)
            dsc.write_layout(ds_dir, plain, self.layout, int(self.ds.global_steps))
            save_state(logical, directory, dsc.LOGICAL_NAME)
            inner = self.inner_optimizer
            if type(inner) is torch.optim.AdamW:
                from forge_dist.train.deepspeed_logical import one_process_adamw_state
                from forge_dist.train.pipeline_engine import one_process_order

                hyper = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
                full = one_process_adamw_state(logical, one_process_order(self.model.config, *self.optimizer_grouping),
                                               hyper)
                save_state({"optimizer": full, "scaler": None, "engine": self.name, "layout": ctx.layout()},
                           directory, "optimizer")
        ctx.barrier()

    def load_state(self, directory: str) -> None:
        from forge_dist.train.sharded_save import is_sharded_checkpoint, load_engine_state

        if is_sharded_checkpoint(directory):  # any engine's, any layout: this rank's stages and partitions
            load_engine_state(self, directory, self.groups)
            return
        self.load_own_or_logical_state(directory)

    # --- the sharded checkpoint (train/deepspeed_sharded.py) ---------------------------------------
    def _writes(self, name: str) -> bool:
        """The tied table (and tied adapters), which both end stages hold: written by the first."""
        return name not in self._tied or self.groups.pp.rank == 0

    def _persistent_buffers(self) -> List[tuple]:
        """Each stage piece's persistent buffers under the GPT's names (GPTChunk keeps them)."""
        out, seen = [], set()
        for chunk in self.chunks:
            params = {id(p) for p in chunk.parameters()}
            for name, t in chunk.state_dict(keep_vars=True).items():
                if id(t) not in params and name not in seen:
                    seen.add(name)
                    out.append((name, t))
        return out

    def optimizer_layout(self):
        """One process's parameter order and groups (pipeline_engine.one_process_order), as the
        native engines record them."""
        from forge_dist.train.pipeline_engine import one_process_order

        order = one_process_order(self.model.config, *self.optimizer_grouping)
        groups, start = [], 0
        options = self.ds.optimizer.param_groups
        for i, names in enumerate(order):
            hyper = options[min(i, len(options) - 1)]
            groups.append({**{k: v for k, v in hyper.items() if k != "params" and plain_option(v)},
                           "params": list(range(start, start + len(names)))})
            start += len(names)
        return [n for names in order for n in names], groups


def _pipeline_section(resolved, groups, parallel_config) -> dict:
    """DeepSpeed splits a stage's output over the TP ranks before sending it (``pipe_partitioned``,
    ``grad_partitioned``: on by default), which assumes the TP ranks hold the same activation; under
    sequence parallelism each holds its own sequence shard, so the split is turned off."""
    config = dict(resolved.config)
    if groups.tp.size > 1 and parallel_config.sequence_parallel:
        section = dict(config.get("pipeline") or {})
        for key in ("pipe_partitioned", "grad_partitioned"):
            if section.get(key):
                raise ConfigError(f"{resolved.source}: pipeline.{key}=true with --sequence_parallel: each TP rank "
                                  f"sends its own sequence shard; set it to false or remove it")
            section[key] = False
        config["pipeline"] = section
    return config


def deepspeed_pipeline_factory(model, train_cfg, ctx, resolved, groups) -> DeepSpeedPipelineEngine:
    """Called by deepspeed_engine_factory when pipeline_parallel_size > 1 (config resolved, DeepSpeed
    checked, the shm build skipped)."""
    import deepspeed

    from forge_dist.parallel.pipeline.split import pipeline_plan
    from forge_dist.train.optim import build_optimizer, param_groups

    check_deepspeed_pipeline(ctx.parallel_config, model.config)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)  # wraps our world
    canonical = canonical_names(model)
    plan = pipeline_plan(ctx.parallel_config, model.config, train_cfg.gradient_accumulation_steps)
    weights = getattr(model, "pipeline_weights", None)  # train/model_build.py: (SliceReader, fresh_ok)
    pipe, chunks = pipeline_module(model, plan, groups, ctx.parallel_config, weights)  # this stage's only
    if weights is not None:
        weights[0].close()  # this stage's pieces are read
    for chunk in chunks:  # see the module doc (MoE)
        chunk.aux_grad_scale = 1.0 / train_cfg.gradient_accumulation_steps
    device = train_cfg.resolved_device
    if resolved.ds_optimizer:  # rate 0 at construction: see deepspeed_engine_factory
        optimizer = None
        params = [dict(g, lr=0.0) for g in param_groups(pipe, train_cfg.adamw_weight_decay,
                                                         train_cfg.weight_decay_split)]
    else:
        optimizer = build_optimizer(pipe, train_cfg, torch.device(device).type)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        params = None
    ds_engine, _, _, _ = deepspeed.initialize(model=pipe, optimizer=optimizer, model_parameters=params,
                                              config=_pipeline_section(resolved, groups, ctx.parallel_config))
    install_safe_checkpoint_engine(ds_engine)  # DeepSpeed's own loads unpickle anything
    engine = DeepSpeedPipelineEngine(ds_engine, pipe, chunks, canonical, groups, resolved, device)
    engine.optimizer_grouping = (train_cfg.adamw_weight_decay, train_cfg.weight_decay_split)
    return engine

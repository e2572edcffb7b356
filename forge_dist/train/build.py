"""From parsed options to a ready run: configs resolved, data opened, model, engine and loader built.

Every user error (bad option, missing dataset, vocabulary mismatch, a checkpoint that is corrupt or
from an incompatible model) is raised here as ConfigError/CheckpointError, before the first step.

Where each value comes from:
  scratch   dataclass defaults < preset or --config < command line; vocab_size from the dataset
            unless given
  resume    the same, then the checkpoint's saved options, then whatever the user gave explicitly
            (so ``--init_from resume --max_iters 2000`` continues the run with its own settings);
            weights, optimizer, loader, RNG and counters from the checkpoint
  prev_run  model options from the --prev_run_ckpt model (ours or a ReaLLM-Forge ckpt.pt) with the
            explicit model options on top; matching weights copied, iteration reset to 0
Launch options (option groups with ``resumable=False``: the parallel sizes, --deepspeed_config) are
never taken from a checkpoint: how a run is launched is decided by the command that launches it.

Two phases, so that a parallel launch can refuse bad input before any process group exists:
``resolve_run(parsed, groups)`` decides every value and reads the dataset's metadata and the
checkpoint (no model, no communication); ``build_run(..., resolved=)`` then builds the full model
(the same seed on every rank), hands it to the engine factory (which may shard it), and opens the
loader on this rank's data-parallel slice.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch

from forge_dist.config.model_config import ModelConfig
from forge_dist.errors import CheckpointError, ConfigError
from forge_dist.train import checkpoint as ckpt
from forge_dist.train.arguments import OptionGroup, ParsedOptions
from forge_dist.train.context import RunContext
from forge_dist.train.datasets import fill_lsv_dataset_num, open_data, open_loader
from forge_dist.train.engine import LocalEngine
from forge_dist.train.optim import build_optimizer
from forge_dist.train.options import TrainConfig


@dataclass
class Run:
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    values: Dict[str, Any]  # every option, resolved (written to out_dir and into checkpoints)
    ctx: RunContext
    data_dir: str
    tokenizer: Any
    loader: Any
    model: torch.nn.Module
    engine: Any
    start_iter: int = 0
    best_val_loss: float = math.inf
    best_iter: Optional[int] = None
    evals_since_best: int = 0
    resumed_from: Optional[str] = None
    notes: list = field(default_factory=list)  # one-line remarks for the user (rank 0 prints them)
    flops_per_token: Optional[float] = None  # of the full model (counted before any sharding), for MFU
    resumed_state: Optional[dict] = None  # the trainer state of the checkpoint resumed from
    data_dirs: list = field(default_factory=list)  # every dataset folder (several with --dataset_list)


@dataclass
class Resolved:
    """Everything decided before the model exists (and before any process group)."""
    values: Dict[str, Any]
    train_cfg: TrainConfig
    model_cfg: ModelConfig
    data_dir: str
    meta: Any
    resume_path: Optional[str]
    saved: Optional[dict]
    prev_state: Optional[dict]
    notes: list
    data_dirs: list = field(default_factory=list)  # [data_dir], or the --dataset_list folders


def local_engine(model, train_cfg: TrainConfig, values: dict, ctx: RunContext):
    device = train_cfg.resolved_device
    return LocalEngine(model, build_optimizer(model, train_cfg, torch.device(device).type), device,
                       train_cfg.resolved_dtype, train_cfg.grad_clip, train_cfg.compile)


def _group(groups: Sequence[OptionGroup], cls) -> OptionGroup:
    return next(g for g in groups if g.cls is cls)


def _resume_checkpoint(values: dict) -> str:
    name = values.get("init_from_ckpt")
    root = os.path.join(values["out_dir"], ckpt.ROOT)
    if name:
        path = name if os.path.isdir(name) else os.path.join(root, name)
        if not os.path.isdir(path):
            raise CheckpointError(f"--init_from_ckpt {name}: no such checkpoint (have: "
                                  f"{', '.join(ckpt.list_checkpoints(root)) or 'none'})")
        return ckpt.resolve_checkpoint(path)
    return ckpt.resolve_checkpoint(values["out_dir"])


def _known(values: dict, groups: Sequence[OptionGroup]) -> dict:
    """The saved options a resume takes over: those of this version's resumable option groups."""
    keys = {k for g in groups if g.resumable for k in g.keys()}
    return {k: v for k, v in values.items() if k in keys}


def _check_vocab(model_vocab: int, data_vocab: int, data_dir: str, source: str) -> None:
    if model_vocab < data_vocab:
        raise ConfigError(f"vocab mismatch: dataset {data_dir} has {data_vocab} token ids but {source} has "
                          f"vocab_size={model_vocab}; use a dataset prepared with the model's tokenizer, or "
                          f"train from scratch (vocab_size is then taken from the data)")


def _prev_run_model(path: str, explicit_model: dict, notes: list):
    """(model config, state dict) of --prev_run_ckpt with the explicit model options applied."""
    from forge_dist.io import load_any

    found = ckpt.find_training_checkpoint(path)
    if found is not None:
        ckpt.verify_checkpoint(found)
    src_path = path if found is None else os.path.join(found, ckpt.MODEL_DIR)
    src, _ = load_any(src_path)
    cfg = src.config.replace(**explicit_model) if explicit_model else src.config
    notes.append(f"initialised from {path} (iteration reset to 0)")
    return cfg, src.state_dict()


@torch.no_grad()
def _copy_matching(model, state: dict, source: str, notes: list) -> None:
    """prev_run: copy tensors present in both by name; a shape clash means an incompatible model."""
    own = model.state_dict()
    shared = [k for k in own if k in state]
    if not shared:
        raise CheckpointError(f"{source} shares no parameter names with this model; it is from an "
                              f"incompatible model family")
    for k in shared:
        if tuple(own[k].shape) != tuple(state[k].shape):
            raise CheckpointError(f"{source} is from an incompatible model: {k} has shape "
                                  f"{tuple(state[k].shape)}, this model needs {tuple(own[k].shape)}; "
                                  f"keep the size options (n_layer, n_embd, n_head, ...) of that run")
        own[k].copy_(state[k])
    fresh = len(own) - len(shared)
    if fresh:
        notes.append(f"{fresh} tensors not in {source} keep their fresh initialisation")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _resolve_values(parsed: ParsedOptions, groups: Sequence[OptionGroup]):
    """(values, checkpoint to resume or None, its trainer state or None)."""
    values = dict(parsed.values)
    if values["init_from"] != "resume":
        return values, None, None
    path = _resume_checkpoint(values)
    ckpt.verify_checkpoint(path)
    saved = ckpt.load_trainer_state(path)
    return {**values, **_known(saved["config"], groups), **parsed.explicit}, path, saved


def _model_config(parsed: ParsedOptions, group: OptionGroup, values: dict, train_cfg: TrainConfig,
                  data_vocab: int, data_dir: str, resume_path: Optional[str], notes: list):
    """(ModelConfig, prev_run state dict or None), with the vocabulary checked against the data."""
    prev_state = None
    if train_cfg.init_from == "prev_run":
        explicit = parsed.group_kwargs(group, parsed.explicit)
        cfg, prev_state = _prev_run_model(train_cfg.prev_run_ckpt, explicit, notes)
        fill_lsv_dataset_num(_model_values(cfg), train_cfg)  # the checkpoint's LSV must fit the datasets
        source = f"checkpoint {train_cfg.prev_run_ckpt}"
    else:
        kwargs = parsed.group_kwargs(group, values)
        if resume_path is None and "vocab_size" not in parsed.explicit:
            kwargs["vocab_size"] = data_vocab
        fill_lsv_dataset_num(kwargs, train_cfg)
        cfg = ModelConfig(**kwargs)
        source = f"checkpoint {resume_path}" if resume_path else "the model options"
    _check_vocab(cfg.vocab_size, data_vocab, data_dir, source)
    return cfg, prev_state


def _build_model(cfg: ModelConfig, train_cfg: TrainConfig, prev_state, resume_path, notes: list):
    from forge_dist.model.gpt import GPT

    seed_everything(train_cfg.seed)  # the same initial weights on every rank
    device = train_cfg.resolved_device
    if device.startswith("cuda"):
        if torch.device(device).index is not None:  # plain "cuda": the current device (a launch set it)
            torch.cuda.set_device(torch.device(device))
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = GPT(cfg)
    if prev_state is not None:
        _copy_matching(model, prev_state, train_cfg.prev_run_ckpt, notes)
    if resume_path is not None:
        ckpt.load_weights(model, resume_path)
    return model.to(device)


def restore_rng(saved: dict, ctx: RunContext, seed: int, notes: Optional[list] = None) -> None:
    """Each rank's RNG streams as saved, when the layout is the one saved (an exact continuation,
    dropout masks included). On another layout the saved streams cannot give the same masks: rank
    0's python/numpy/torch states are restored and, in a parallel run, the torch stream is then
    reseeded like a fresh start (equal on a TP group, different across data-parallel replicas)
    at seed + iteration, so the continuation is still deterministic."""
    per_rank, layout = saved.get("rng_ranks"), saved.get("layout")
    same = layout == ctx.layout() if layout is not None else not ctx.distributed
    if same and per_rank is not None and len(per_rank) == ctx.world_size:
        ckpt.set_rng_state(per_rank[ctx.rank])
        return
    ckpt.set_rng_state(saved["rng"])
    if ctx.distributed or (layout is not None and layout.get("world_size", 1) > 1):
        if ctx.groups is not None:
            from forge_dist.parallel.tensor.random import seed_everything as seed_parallel

            seed_parallel(seed + int(saved["iteration"]), ctx.groups)
        if notes is not None:
            notes.append(f"the checkpoint was written by {_fmt_layout(layout)}, this run is {_fmt_layout(ctx.layout())}: "
                         f"weights and optimizer state are resharded; dropout streams restart from seed + iteration")


def _fmt_layout(layout: Optional[dict]) -> str:
    if not layout:
        return "a run of unknown layout"
    sp = " with sequence parallelism" if layout.get("sequence_parallel") else ""
    return (f"{layout['world_size']} process(es) (tensor_parallel_size={layout['tensor_parallel_size']}, "
            f"{layout['dp_size']} data-parallel replica(s){sp})")


def check_data(resolved: "Resolved", dp_size: int) -> None:
    """The loader checks (a dataset too small for block_size; on resume, a changed global batch)
    for a launch of ``dp_size`` data-parallel replicas, before any process group exists."""
    loader = open_loader(resolved.data_dirs, resolved.model_cfg, resolved.train_cfg, 0, dp_size)
    if resolved.saved is not None:
        loader.load_state_dict(resolved.saved["loader"])


def _restore(run: Run, path: str, saved: dict) -> None:
    """Everything but the weights from a resumed checkpoint."""
    run.engine.load_state(path)
    run.loader.load_state_dict(saved["loader"])
    restore_rng(saved, run.ctx, run.train_cfg.seed, notes=run.notes)
    run.resumed_state = saved
    run.start_iter, run.best_val_loss = int(saved["iteration"]), float(saved["best_val_loss"])
    run.best_iter, run.evals_since_best = saved.get("best_iter"), int(saved.get("evals_since_best", 0))
    run.resumed_from = path
    run.notes.append(f"resumed from {path} at iteration {run.start_iter}")


def resolve_run(parsed: ParsedOptions, groups: Sequence[OptionGroup]) -> Resolved:
    """Every option value, the dataset's metadata and the checkpoint to resume, checked; raises
    ConfigError/CheckpointError. Builds nothing and communicates with no other rank."""
    model_group, train_group = _group(groups, ModelConfig), _group(groups, TrainConfig)
    values, resume_path, saved = _resolve_values(parsed, groups)
    train_cfg = TrainConfig(**parsed.group_kwargs(train_group, values))
    data_dirs, meta = open_data(train_cfg, parsed.explicit)
    data_dir = data_dirs[0]
    notes: list = []
    model_cfg, prev_state = _model_config(parsed, model_group, values, train_cfg, meta.vocab_size, data_dir,
                                          resume_path, notes)
    resolved = {**values, **{model_group.prefix + k: v for k, v in _model_values(model_cfg).items()},
                **{train_group.prefix + k: v for k, v in train_cfg.to_dict().items()}}
    return Resolved(resolved, train_cfg, model_cfg, data_dir, meta, resume_path, saved, prev_state, notes,
                    data_dirs)


def shard_model(model: torch.nn.Module, ctx: RunContext, seed: int) -> torch.nn.Module:
    """A launched run's model before any engine sees it: sharded over ctx.groups.tp when
    tensor_parallel_size > 1 (sliced from the full weights every rank built alike, or loaded from a
    checkpoint's logical weights, so any TP size starts from the same model), and the dropout
    streams seeded: equal on a TP group, different across data-parallel replicas."""
    from forge_dist.parallel.parallelize import parallelize
    from forge_dist.parallel.tensor.random import seed_everything as seed_parallel

    names = [n for n, _ in model.named_parameters()]
    if ctx.tp_size > 1:
        parallelize(model, ctx.groups, ctx.parallel_config)
        after = [n for n, _ in model.named_parameters()]
        if after != names:  # optimizer state in checkpoints is stored in this order
            raise RuntimeError(f"parallelize changed the parameters' names or order: {names} -> {after}")
    seed_parallel(seed, ctx.groups)
    return model


def _rank_train_config(train_cfg: TrainConfig, ctx: RunContext) -> TrainConfig:
    """``--device cuda`` (or auto) on a multi-GPU launch means this rank's GPU (cuda:LOCAL_RANK,
    which init_distributed selected). Only the running copy changes: config.yaml and checkpoints
    keep the device as given, so a resume on another layout picks its own GPUs."""
    device = train_cfg.resolved_device
    if ctx.distributed and device == "cuda" and str(ctx.device).startswith("cuda:"):
        return train_cfg.replace(device=str(ctx.device))
    return train_cfg


def build_run(parsed: ParsedOptions, groups: Sequence[OptionGroup], ctx: Optional[RunContext] = None,
              engine_factory: Callable = local_engine, resolved: Optional[Resolved] = None) -> Run:
    """The ready run. ``engine_factory(model, train_cfg, values, ctx)`` receives the model (weights
    already loaded on resume; in a launched run already sharded over ctx.groups by shard_model) and
    returns the engine (see engine.py)."""
    from forge_dist.train.metrics import flops_per_token

    ctx = ctx or RunContext()
    r = resolved or resolve_run(parsed, groups)
    train_cfg = _rank_train_config(r.train_cfg, ctx)
    model = _build_model(r.model_cfg, train_cfg, r.prev_state, r.resume_path, r.notes)
    flops = flops_per_token(model)  # the full model's, before it is sharded
    if ctx.groups is not None:
        shard_model(model, ctx, train_cfg.seed)
    engine = engine_factory(model, train_cfg, r.values, ctx)
    loader = open_loader(r.data_dirs or [r.data_dir], r.model_cfg, train_cfg, ctx.dp_rank, ctx.dp_size)
    run = Run(r.model_cfg, train_cfg, r.values, ctx, r.data_dir, loader.tokenizer(), loader,
              model, engine, notes=r.notes, flops_per_token=flops, data_dirs=list(r.data_dirs or [r.data_dir]))
    if r.saved is not None:
        _restore(run, r.resume_path, r.saved)
    return run


def _model_values(cfg: ModelConfig) -> dict:
    return {name: getattr(cfg, name) for name in cfg.field_names()}

"""From parsed options to a ready run: model, engine and loader built, a resumed state restored.

Two phases, so that a parallel launch can refuse bad input before any process group exists:
``resolve_run(parsed, groups)`` (resolve.py) decides every value and reads the dataset's metadata
and the checkpoint (no model, no communication); ``build_run(..., resolved=)`` then builds the
model (model_build.py: the same seed on every rank; a tensor-parallel rank materialises only its
shards), hands it to the engine factory (which may
shard it), opens the loader on this rank's data-parallel slice and restores the counters, loader
position and RNG streams (rng.py) of a resumed run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from forge_dist.config.model_config import ModelConfig
from forge_dist.train.arguments import OptionGroup, ParsedOptions
from forge_dist.train.context import RunContext
from forge_dist.train.datasets import open_loader
from forge_dist.train.engine import LocalEngine
from forge_dist.train.model_build import build_model, seed_everything, shard_model  # noqa: F401 (old paths)
from forge_dist.train.optim import build_optimizer
from forge_dist.train.options import TrainConfig
from forge_dist.train.resolve import Resolved, _known, check_data, resolve_run  # noqa: F401 (old paths)
from forge_dist.train.rng import restore_rng


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


def local_engine(model, train_cfg: TrainConfig, values: dict, ctx: RunContext):
    device = train_cfg.resolved_device
    return LocalEngine(model, build_optimizer(model, train_cfg, torch.device(device).type), device,
                       train_cfg.resolved_dtype, train_cfg.grad_clip, train_cfg.compile)


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
    ctx = ctx or RunContext()
    r = resolved or resolve_run(parsed, groups)
    train_cfg = _rank_train_config(r.train_cfg, ctx)
    wants_meta = getattr(engine_factory, "wants_meta_model", None)  # ZeRO-3 draws it into partitions
    on_meta = bool(wants_meta and wants_meta(r.values))
    model, flops = build_model(r.model_cfg, train_cfg, ctx, r.prev_state, r.resume_path, r.notes, on_meta=on_meta)
    engine = engine_factory(model, train_cfg, r.values, ctx)
    loader = open_loader(r.data_dirs or [r.data_dir], r.model_cfg, train_cfg, ctx.dp_rank, ctx.dp_size)
    run = Run(r.model_cfg, train_cfg, r.values, ctx, r.data_dir, loader.tokenizer(), loader,
              model, engine, notes=r.notes, flops_per_token=flops, data_dirs=list(r.data_dirs or [r.data_dir]))
    if r.saved is not None:
        _restore(run, r.resume_path, r.saved)
    return run

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
    keys = {k for g in groups for k in g.keys()}
    return {k: v for k, v in values.items() if k in keys}


def _open_data(train_cfg: TrainConfig):
    from forge_dist.data.dataset import read_meta, resolve_dataset

    data_dir = resolve_dataset(train_cfg.dataset)
    meta = read_meta(data_dir)
    if "val" not in meta.splits:
        raise ConfigError(f"dataset {data_dir} has no val split, which training evaluates on; prepare it "
                          f"with a validation fraction above 0 (see forge-prepare --help)")
    return str(data_dir), meta


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
        source = f"checkpoint {train_cfg.prev_run_ckpt}"
    else:
        kwargs = parsed.group_kwargs(group, values)
        if resume_path is None and "vocab_size" not in parsed.explicit:
            kwargs["vocab_size"] = data_vocab
        cfg = ModelConfig(**kwargs)
        source = f"checkpoint {resume_path}" if resume_path else "the model options"
    _check_vocab(cfg.vocab_size, data_vocab, data_dir, source)
    return cfg, prev_state


def _build_model(cfg: ModelConfig, train_cfg: TrainConfig, prev_state, resume_path, notes: list):
    from forge_dist.model.gpt import GPT

    seed_everything(train_cfg.seed)  # the same initial weights on every rank
    device = train_cfg.resolved_device
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = GPT(cfg)
    if prev_state is not None:
        _copy_matching(model, prev_state, train_cfg.prev_run_ckpt, notes)
    if resume_path is not None:
        ckpt.load_weights(model, resume_path)
    return model.to(device)


def _restore(run: Run, path: str, saved: dict) -> None:
    """Everything but the weights from a resumed checkpoint."""
    run.engine.load_state(path)
    run.loader.load_state_dict(saved["loader"])
    ckpt.set_rng_state(saved["rng"])
    run.start_iter, run.best_val_loss = int(saved["iteration"]), float(saved["best_val_loss"])
    run.best_iter, run.evals_since_best = saved.get("best_iter"), int(saved.get("evals_since_best", 0))
    run.resumed_from = path
    run.notes.append(f"resumed from {path} at iteration {run.start_iter}")


def build_run(parsed: ParsedOptions, groups: Sequence[OptionGroup], ctx: Optional[RunContext] = None,
              engine_factory: Callable = local_engine) -> Run:
    from forge_dist.data.loader import BatchLoader

    ctx = ctx or RunContext()
    model_group, train_group = _group(groups, ModelConfig), _group(groups, TrainConfig)
    values, resume_path, saved = _resolve_values(parsed, groups)
    train_cfg = TrainConfig(**parsed.group_kwargs(train_group, values))
    data_dir, meta = _open_data(train_cfg)
    notes: list = []
    model_cfg, prev_state = _model_config(parsed, model_group, values, train_cfg, meta.vocab_size, data_dir,
                                          resume_path, notes)
    resolved = {**values, **{model_group.prefix + k: v for k, v in _model_values(model_cfg).items()},
                **{train_group.prefix + k: v for k, v in train_cfg.to_dict().items()}}
    model = _build_model(model_cfg, train_cfg, prev_state, resume_path, notes)
    engine = engine_factory(model, train_cfg, resolved, ctx)
    loader = BatchLoader.from_dir(data_dir, model_cfg.block_size, train_cfg.batch_size,
                                  grad_accum_steps=train_cfg.gradient_accumulation_steps,
                                  dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, seed=train_cfg.seed)
    run = Run(model_cfg, train_cfg, resolved, ctx, data_dir, loader.splits["train"].tokenizer(), loader, model,
              engine, notes=notes)
    if saved is not None:
        _restore(run, resume_path, saved)
    return run


def _model_values(cfg: ModelConfig) -> dict:
    return {name: getattr(cfg, name) for name in cfg.field_names()}

"""Option resolution: every value of a run decided before the model exists (and before any
process group), with the dataset's metadata and the checkpoint to resume read and checked.

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
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from forge_dist.config.model_config import ModelConfig
from forge_dist.errors import CheckpointError, ConfigError
from forge_dist.train import checkpoint as ckpt
from forge_dist.train.arguments import OptionGroup, ParsedOptions
from forge_dist.train.datasets import fill_lsv_dataset_num, open_data, open_loader
from forge_dist.train.options import TrainConfig
from forge_dist.train.resume_options import resume_overrides


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
    prev_state: Any  # --init_from prev_run: the weights' SliceReader (io/slice_read.py)
    notes: list
    data_dirs: list = field(default_factory=list)  # [data_dir], or the --dataset_list folders


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
    """(model config, SliceReader of the weights) of --prev_run_ckpt with the explicit model options
    applied. Our model directories (gathered safetensors, or a sharded checkpoint's dcp/) are opened,
    not read: each rank reads only its pieces when the model is built (train/model_build.py); a
    ReaLLM-Forge ckpt.pt (memory-mapped) or a transformers directory (safetensors' lazy slices) is
    mapped to our names tensor by tensor, never converted whole (io/pretrained.py open_slices_any).
    The names and shapes are checked here, against the model built on the meta device."""
    from forge_dist.io.pretrained import open_slices_any
    from forge_dist.io.checkpoint_read import verify_files
    from forge_dist.io.forge_format import is_forge_checkpoint, read_config
    from forge_dist.io.sharded_read import DCP_DIR
    from forge_dist.io.slice_read import open_slices

    found = ckpt.find_training_checkpoint(path)
    if found is not None:
        ckpt.verify_checkpoint(found, shards=False)  # each rank hashes the shards it reads (below)
    src_path = path if found is None else os.path.join(found, ckpt.MODEL_DIR)
    if is_forge_checkpoint(src_path):
        src_cfg, _ = read_config(src_path)
        verify = None
        if found is not None:
            def verify(files):
                verify_files(found, [os.path.join(ckpt.MODEL_DIR, DCP_DIR, f) for f in files])
        reader = open_slices(src_path, verify)
    else:
        src_cfg, reader = open_slices_any(src_path)
    cfg = src_cfg.replace(**explicit_model) if explicit_model else src_cfg
    _check_prev_run(cfg, reader, path, notes)
    notes.append(f"initialised from {path} (iteration reset to 0)")
    return cfg, reader


def _check_prev_run(cfg: ModelConfig, reader, source: str, notes: list) -> None:
    """Tensors present in both are copied by name (tied ones by their first name); none shared, or a
    shape clash, means an incompatible model."""
    import torch

    from forge_dist.io.slice_read import tied_aliases
    from forge_dist.model.gpt import GPT

    with torch.device("meta"):
        own = GPT(cfg).state_dict(keep_vars=True)
    reader.aliases.update({a: n for a, n in tied_aliases(own).items() if reader.stored(a) is None})
    shared = [k for k in own if reader.stored(k) is not None]
    if not shared:
        raise CheckpointError(f"{source} shares no parameter names with this model; it is from an "
                              f"incompatible model family")
    for k in shared:
        if reader.shape(k) != tuple(own[k].shape):
            raise CheckpointError(f"{source} is from an incompatible model: {k} has shape "
                                  f"{reader.shape(k)}, this model needs {tuple(own[k].shape)}; "
                                  f"keep the size options (n_layer, n_embd, n_head, ...) of that run")
    fresh = len(own) - len(shared)
    if fresh:
        notes.append(f"{fresh} tensors not in {source} keep their fresh initialisation")


def _resolve_values(parsed: ParsedOptions, groups: Sequence[OptionGroup], notes: list):
    """(values, checkpoint to resume or None, its trainer state or None); what a resume changes
    goes to ``notes``."""
    values = dict(parsed.values)
    if values["init_from"] != "resume":
        return values, None, None
    from forge_dist.train.recovery import resume_checkpoint

    path = resume_checkpoint(values["out_dir"], lambda: _resume_checkpoint(values), bool(values.get("init_from_ckpt")),
                             notes)  # verified; falls back past a corrupt latest, and says so
    saved = ckpt.load_trainer_state(path)
    known = _known(saved["config"], groups)
    pinned, changes = resume_overrides(known, parsed.explicit)
    notes += changes
    return {**values, **known, **pinned, **parsed.explicit}, path, saved


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


def resolve_run(parsed: ParsedOptions, groups: Sequence[OptionGroup]) -> Resolved:
    """Every option value, the dataset's metadata and the checkpoint to resume, checked; raises
    ConfigError/CheckpointError. Builds nothing and communicates with no other rank."""
    model_group, train_group = _group(groups, ModelConfig), _group(groups, TrainConfig)
    notes: list = []
    values, resume_path, saved = _resolve_values(parsed, groups, notes)
    train_cfg = TrainConfig(**parsed.group_kwargs(train_group, values))
    data_dirs, meta = open_data(train_cfg, parsed.explicit)
    data_dir = data_dirs[0]
    model_cfg, prev_state = _model_config(parsed, model_group, values, train_cfg, meta.vocab_size, data_dir,
                                          resume_path, notes)
    resolved = {**values, **{model_group.prefix + k: v for k, v in _model_values(model_cfg).items()},
                **{train_group.prefix + k: v for k, v in train_cfg.to_dict().items()}}
    return Resolved(resolved, train_cfg, model_cfg, data_dir, meta, resume_path, saved, prev_state, notes,
                    data_dirs)


def check_data(resolved: "Resolved", dp_size: int) -> None:
    """The loader checks (a dataset too small for block_size; on resume, a changed global batch)
    for a launch of ``dp_size`` data-parallel replicas, before any process group exists."""
    loader = open_loader(resolved.data_dirs, resolved.model_cfg, resolved.train_cfg, 0, dp_size)
    if resolved.saved is not None:
        loader.load_state_dict(resolved.saved["loader"])


def _model_values(cfg: ModelConfig) -> dict:
    return {name: getattr(cfg, name) for name in cfg.field_names()}

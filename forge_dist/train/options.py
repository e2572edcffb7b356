"""TrainConfig: the training options of forge-train, under ReaLLM-Forge's train_args.py names.

Defaults are upstream's command-line defaults except where those cannot run on a machine without a
GPU (``device``/``dtype`` default to ``auto``) or where upstream's option is dead code (the
warm-up + cosine schedule is really applied here); see docs/divergences.md. The embedded preset
(forge_dist/presets/tiny.yaml) overrides many of these for the no-argument run.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import List, Optional

from forge_dist.config.device import check_device, resolve_device, resolve_dtype  # noqa: F401
from forge_dist.config.validate import _type_ok, type_name
from forge_dist.errors import ConfigError

DEFAULT_DATASET = "default"  # the corpus shipped with the package (forge_dist.data)

CHOICES = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "init_from": ("scratch", "resume", "prev_run"),
    "checkpoint_format": ("auto", "sharded", "gathered"),
    "lr_scheduler": ("none", "cosine", "step", "exponential"),
}


@dataclass
class TrainConfig:
    # --- I/O ------------------------------------------------------------------------------------
    out_dir: str = "out"
    dataset: str = DEFAULT_DATASET
    # several prepared datasets trained together (upstream's multidataset mode): one is drawn per
    # iteration from (seed, iteration); replaces --dataset. Weights: uniform unless given
    dataset_list: Optional[List[str]] = None
    dataset_sampling_probs: Optional[List[float]] = None
    init_from: str = "scratch"
    prev_run_ckpt: Optional[str] = None  # a checkpoint for --init_from prev_run
    init_from_ckpt: Optional[str] = None  # resume from this checkpoint (name or path); None -> latest
    always_save_checkpoint: bool = False
    never_save_checkpoint: bool = False
    keep_checkpoints: int = 2  # forge_dist extra: most recent checkpoints kept (plus the best)
    # forge_dist extras (docs/checkpoints.md): sharded = every rank writes its own shards (DCP);
    # gathered = one consolidated model.safetensors; auto = sharded for a run of several ranks
    checkpoint_format: str = "auto"
    async_checkpoint: bool = False  # write (sharded) checkpoints in the background while training goes on
    tensorboard_log: bool = True
    progress: bool = True  # forge_dist extra: the live progress bar (rank 0, when stderr is a tty)

    # --- loop -----------------------------------------------------------------------------------
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    max_iters: int = 3500
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    patience: Optional[int] = None  # stop after this many evaluations without improvement
    seed: int = 1337

    # --- optimizer (AdamW, one parameter group unless weight_decay_split) ------------------------
    learning_rate: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    adamw_eps: float = 1e-8
    adamw_weight_decay: float = 0.01
    weight_decay_split: bool = False  # nanoGPT split: decay only tensors of 2+ dims
    grad_clip: float = 1.0  # 0 disables clipping

    # --- learning-rate schedule -----------------------------------------------------------------
    lr_scheduler: str = "none"
    warmup_iters: int = 100  # linear warm-up of every schedule except none
    lr_decay_iters: Optional[int] = None  # cosine reaches min_lr here; None -> max_iters
    min_lr: float = 1e-4
    step_lr_size: int = 1000
    step_lr_gamma: float = 0.1
    exponential_gamma: float = 0.9

    # --- system ---------------------------------------------------------------------------------
    device: str = "auto"  # auto -> cuda if available, else cpu
    dtype: str = "auto"  # auto -> bfloat16 on a GPU that supports it, else float32
    compile: bool = False
    peak_flops: Optional[float] = None  # device peak FLOP/s for MFU when the device is not in the table

    # --- sample printed at the end of training --------------------------------------------------
    max_sample_tokens: Optional[int] = 100
    sample_start_tokens: str = "\n"

    def __post_init__(self):
        validate_train_config(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # --- resolved values (read these, never re-derive them elsewhere) ---------------------------
    @property
    def resolved_device(self) -> str:
        return resolve_device(self.device)

    @property
    def resolved_dtype(self) -> str:
        return resolve_dtype(self.dtype, self.resolved_device)

    @property
    def resolved_lr_decay_iters(self) -> int:
        return self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters


@dataclass
class EngineOptions:
    """Which engine trains: forge_dist's own (one process, or tensor + data parallel under a
    launcher) unless a DeepSpeed JSON config is given. A launch option: --init_from resume takes
    it from the command line, never from the checkpoint."""

    deepspeed_config: Optional[str] = None  # DeepSpeed JSON config: train with the DeepSpeed engine
    preflight: bool = False  # run forge_dist.dist.preflight before training
    zero_stage: int = 0  # native engine: 1 shards the AdamW state over data-parallel replicas (ZeRO-1)

    def __post_init__(self):
        if self.deepspeed_config is not None and not isinstance(self.deepspeed_config, str):
            raise ConfigError(f"deepspeed_config={self.deepspeed_config!r} must be a file path")
        if self.zero_stage not in ZERO_STAGES or isinstance(self.zero_stage, bool):
            raise ConfigError(f"zero_stage={self.zero_stage!r}: the native engine runs ZeRO stage 0 (replicated "
                              f"optimizer state) or 1 (optimizer state sharded over the data-parallel replicas); "
                              f"for ZeRO-2/3 use --deepspeed_config with zero_optimization.stage")
        if self.zero_stage and self.deepspeed_config is not None:
            raise ConfigError(f"zero_stage={self.zero_stage} with --deepspeed_config: DeepSpeed's ZeRO stage is "
                              f"its config's zero_optimization.stage; drop --zero_stage")


ZERO_STAGES = (0, 1)


def _validate_dataset_list(cfg: TrainConfig) -> None:
    datasets, probs = cfg.dataset_list, cfg.dataset_sampling_probs
    if datasets is not None and not datasets:
        raise ConfigError("dataset_list is empty; name the prepared datasets to train on (or use --dataset)")
    if probs is None:
        return
    if datasets is None:
        raise ConfigError("dataset_sampling_probs is given without dataset_list; they weight the datasets of "
                          "--dataset_list")
    if len(probs) != len(datasets):
        raise ConfigError(f"dataset_sampling_probs has {len(probs)} values but dataset_list has {len(datasets)} "
                          f"datasets; give one weight per dataset")
    if any(not math.isfinite(p) or p < 0 for p in probs) or sum(probs) <= 0:
        raise ConfigError(f"dataset_sampling_probs={probs} must be non-negative weights with a positive sum")


@functools.lru_cache(maxsize=None)
def _hints() -> dict:
    return typing.get_type_hints(TrainConfig)


def validate_train_config(cfg: TrainConfig) -> None:
    for name, tp in _hints().items():
        value = getattr(cfg, name)
        if not _type_ok(value, tp):
            raise ConfigError(f"{name}={value!r} has the wrong type; expected {type_name(tp)}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is not valid; valid values: {', '.join(choices)}")
    for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                 "log_interval", "step_lr_size", "keep_checkpoints"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be positive")
    for name in ("max_iters", "warmup_iters", "learning_rate", "min_lr", "grad_clip", "adamw_weight_decay"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must not be negative")
    if cfg.patience is not None and cfg.patience < 0:
        raise ConfigError(f"patience={cfg.patience} must not be negative (or none to disable)")
    _validate_dataset_list(cfg)
    if cfg.init_from == "prev_run" and not cfg.prev_run_ckpt:
        raise ConfigError("init_from=prev_run needs --prev_run_ckpt PATH (a checkpoint directory or ckpt.pt)")
    check_device(cfg.resolved_device, cfg.resolved_dtype)

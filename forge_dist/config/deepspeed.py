"""DeepSpeed JSON configs: load, validate, and resolve "auto" values from forge-train's options.

    raw = load_deepspeed_config("configs/deepspeed/zero2_bf16.json")
    ds = resolve_deepspeed_config(raw, train_cfg, dp_size=2, model_config=cfg)
    deepspeed.initialize(..., config=ds.config)

"auto" is resolved the way HF Trainer users know it; a key that is missing is filled in the same
way, so a config never silently disagrees with the command line:

  train_micro_batch_size_per_gpu   --batch_size
  gradient_accumulation_steps      --gradient_accumulation_steps
  train_batch_size                 batch_size x gradient_accumulation_steps x data-parallel size
  gradient_clipping                --grad_clip
  optimizer.params lr/betas/eps/weight_decay    --learning_rate, (--beta1, --beta2), --adamw_eps,
                                   --adamw_weight_decay (only when the config names an optimizer)
  bf16.enabled / fp16.enabled      --dtype (bfloat16 / float16; "auto" dtype: float32 on CPU)
  zero_optimization.reduce_bucket_size            n_embd^2 (as HF Trainer: hidden size squared)
  zero_optimization.stage3_prefetch_bucket_size   0.9 n_embd^2
  zero_optimization.stage3_param_persistence_threshold   10 n_embd
  zero_optimization.sub_group_size, stage3_max_live_parameters   2 n_embd^2 (stage 3)
  zero_optimization.stage3_max_reuse_distance     n_embd^2 (stage 3; DeepSpeed's 1e9 defaults for
                                   these three keep a rank's memory near the whole model's)

A value given in the JSON that contradicts our option is refused with both named. Everything
this DeepSpeed or this device cannot do is refused here, before any process group exists, with
one line naming the key and the fix: unknown top-level keys, fp16 without device support, ZeRO-3
with an MoE model, batch sizes that do not divide, pipeline parallelism with ZeRO-2/3, a
learning-rate scheduler (ours drives the rate), parameter offload below stage 3.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from forge_dist.errors import ConfigError

AUTO = "auto"

# Top-level keys DeepSpeed 0.19.8 reads (traced from deepspeed.runtime.config.DeepSpeedConfig).
KNOWN_KEYS = (
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint", "comet",
    "comms_logger", "communication_data_type", "compile", "compression_training", "csv_monitor",
    "curriculum_learning", "data_efficiency", "data_types", "dataloader_drop_last", "datastates_ckpt",
    "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel",
    "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level",
    "managed_gradient_accumulation", "memory_breakdown", "nebula", "optimizer", "pipeline",
    "prescale_gradients", "progressive_layer_drop", "quantize_training", "scheduler",
    "seq_parallel_communication_data_type", "sequence_parallel_size", "sparse_attention",
    "sparse_gradients", "steps_per_print", "tensor_parallel", "tensorboard", "timers", "torch_autocast",
    "train_batch_size", "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism",
    "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization",
)
ADAM_TYPES = ("adam", "adamw")
# ZeRO-3 keys whose DeepSpeed default (1e9 elements) lets one rank hold about the whole model: the
# fp32 sub-group the optimizer steps at once (its flattened gradient copy and AdamW's temporaries
# are that size), the parameters gathered at once, and how far ahead a gathered parameter is kept
# for its next use (with 1e9 every parameter stays gathered from the forward to the backward).
# Bounded to about one weight matrix, n_embd^2 (docs/BENCHMARKS.md, "ZeRO-3 under DeepSpeed").
ZERO3_BOUNDS = {"sub_group_size": lambda h: 2 * h * h, "stage3_max_live_parameters": lambda h: 2 * h * h,
                "stage3_max_reuse_distance": lambda h: h * h}


@dataclass
class ResolvedDeepSpeed:
    config: dict  # what deepspeed.initialize receives: no "auto" left
    zero_stage: int
    precision: str  # fp32 | bf16 | fp16
    ds_optimizer: bool  # the config names an optimizer: DeepSpeed builds it (CPU Adam with offload)
    offload_optimizer: bool
    offload_param: bool
    source: str = "deepspeed config"

    @property
    def model_dtype(self) -> str:
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.precision]


def load_deepspeed_config(path: str) -> dict:
    """The JSON object in ``path`` (ConfigError naming the file, line and column otherwise)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config {path}: no such file (ready configs: configs/deepspeed/)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON at line {e.lineno} column {e.colno}: "
                          f"{e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--deepspeed_config {path}: the file must hold a JSON object ({{...}}), "
                          f"not a {type(raw).__name__}")
    return raw


def _fail(source: str, message: str) -> None:
    raise ConfigError(f"{source}: {message}")


def _check_unknown(raw: dict, source: str) -> None:
    for key in raw:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            _fail(source, f"unknown top-level key {key!r}: {hint}remove it; DeepSpeed reads "
                          f"{', '.join(KNOWN_KEYS)}")


def _resolve(section: dict, key: str, ours: Any, option: str, source: str, where: str = "") -> None:
    """Fill ``section[key]`` from our option when missing or "auto"; refuse a contradicting value."""
    value = section.get(key, AUTO)
    if value == AUTO:
        section[key] = ours
        return
    same = (list(value) == list(ours)) if isinstance(ours, (list, tuple)) and isinstance(value, (list, tuple)) \
        else value == ours
    if not same:
        _fail(source, f"{where}{key}={json.dumps(value)} contradicts {option} {_show(ours)}; set it to "
                      f"\"auto\" (or to {_show(ours)}), or change {option}")


def _show(v: Any) -> str:
    return " ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def _batch_sizes(cfg: dict, train_cfg, dp_size: int, source: str) -> None:
    micro, accum = train_cfg.batch_size, train_cfg.gradient_accumulation_steps
    _resolve(cfg, "train_micro_batch_size_per_gpu", micro, "--batch_size", source)
    _resolve(cfg, "gradient_accumulation_steps", accum, "--gradient_accumulation_steps", source)
    total = micro * accum * dp_size
    given = cfg.get("train_batch_size", AUTO)
    if given != AUTO:
        if not isinstance(given, int) or given % (micro * dp_size):
            _fail(source, f"train_batch_size={json.dumps(given)} does not divide into --batch_size {micro} x "
                          f"{dp_size} data-parallel ranks; use \"auto\" or a multiple of {micro * dp_size} "
                          f"together with --gradient_accumulation_steps = train_batch_size / {micro * dp_size}")
        if given != total:
            _fail(source, f"train_batch_size={given} contradicts --batch_size {micro} x "
                          f"--gradient_accumulation_steps {accum} x {dp_size} data-parallel ranks = {total}; "
                          f"set it to \"auto\" or pass --gradient_accumulation_steps {given // (micro * dp_size)}")
    cfg["train_batch_size"] = total


def _precision(cfg: dict, train_cfg, fp16_supported: bool, device: str, source: str) -> str:
    if "bfloat16" in cfg:  # DeepSpeed's alias
        if "bf16" in cfg:
            _fail(source, "both \"bf16\" and its alias \"bfloat16\" are given; keep only \"bf16\"")
        cfg["bf16"] = cfg.pop("bfloat16")
    if cfg.get("amp", {}).get("enabled", False):
        _fail(source, "amp.enabled=true needs NVIDIA apex, which forge_dist does not use; remove \"amp\" and "
                      "use \"bf16\": {\"enabled\": true}")
    explicit = train_cfg.dtype != "auto"
    dtype = train_cfg.resolved_dtype
    enabled = {}
    for key, ours in (("bf16", "bfloat16"), ("fp16", "float16")):
        section = cfg.setdefault(key, {})
        if not isinstance(section, dict):
            _fail(source, f"{key} must be an object like {{\"enabled\": true}}, not {json.dumps(section)}")
        value = section.get("enabled", False)  # DeepSpeed's default
        if value == AUTO:
            value = dtype == ours
        elif not isinstance(value, bool):
            _fail(source, f"{key}.enabled={json.dumps(value)} must be true, false or \"auto\"")
        elif explicit and value != (dtype == ours):
            _fail(source, f"{key}.enabled={json.dumps(value)} contradicts --dtype {train_cfg.dtype}; set "
                          f"{key}.enabled to \"auto\", or pass the --dtype the config asks for")
        section["enabled"] = value
        enabled[key] = value
    if enabled["bf16"] and enabled["fp16"]:
        _fail(source, "bf16.enabled and fp16.enabled are both true; enable one of them")
    if enabled["fp16"] and not fp16_supported:
        _fail(source, f"fp16.enabled=true, but DeepSpeed has no float16 support on this device ({device}); "
                      f"use bf16 instead: \"bf16\": {{\"enabled\": true}} (configs/deepspeed/zero*_bf16.json)")
    return "bf16" if enabled["bf16"] else "fp16" if enabled["fp16"] else "fp32"


def _zero(cfg: dict, model_config, pipeline_size: int, source: str) -> dict:
    zero = cfg.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        _fail(source, f"zero_optimization must be an object like {{\"stage\": 2}}, not {json.dumps(zero)}")
    hidden = getattr(model_config, "n_embd", None)
    autos = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
             "stage3_param_persistence_threshold": lambda h: 10 * h}
    for key, rule in autos.items():
        if zero.get(key) == AUTO:
            if hidden is None:
                _fail(source, f"zero_optimization.{key}=\"auto\" needs the model's n_embd; give a number")
            zero[key] = rule(hidden)
    stage = zero.get("stage", 0)
    for key, rule in ZERO3_BOUNDS.items() if stage == 3 else ():  # missing or "auto": bounded by the model
        if zero.get(key) == AUTO and hidden is None:
            _fail(source, f"zero_optimization.{key}=\"auto\" needs the model's n_embd; give a number")
        if zero.get(key, AUTO) == AUTO and hidden is not None:
            zero[key] = rule(hidden)
    if stage not in (0, 1, 2, 3):
        _fail(source, f"zero_optimization.stage={json.dumps(stage)}; valid stages: 0, 1, 2, 3")
    _validate_with_deepspeed(zero, source)
    if zero.get("offload_param") and zero["offload_param"].get("device", "none") != "none" and stage != 3:
        _fail(source, f"zero_optimization.offload_param needs stage 3 (this config has stage {stage}); "
                      f"remove offload_param or use \"stage\": 3")
    if stage == 3 and model_config is not None and getattr(model_config, "use_moe", False):
        _fail(source, "zero_optimization.stage=3 with an MoE model (use_moe): DeepSpeed does not support "
                      "mixture-of-experts layers under ZeRO stage 3; use stage 1 or 2")
    if stage >= 2 and pipeline_size > 1:
        _fail(source, f"zero_optimization.stage={stage} with pipeline_parallel_size={pipeline_size}: DeepSpeed's "
                      f"pipeline engine supports ZeRO stage 0 or 1 only; use \"stage\": 1")
    return zero


def _validate_with_deepspeed(zero: dict, source: str) -> None:
    """DeepSpeed's own schema for the zero_optimization section, its error cut to one line."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:  # validated again by deepspeed.initialize; only the message is worse
        return
    try:
        DeepSpeedZeroConfig(**zero)
    except Exception as e:  # pydantic.ValidationError or DeepSpeed's removed-key errors
        errors = getattr(e, "errors", None)
        if callable(errors):
            first = errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ()))
            _fail(source, f"zero_optimization.{loc}: {first.get('msg')} (see DeepSpeed's ZeRO config docs)")
        _fail(source, f"zero_optimization: {' '.join(str(e).split())}")


def _optimizer(cfg: dict, train_cfg, offload_optimizer: bool, source: str) -> bool:
    if "scheduler" in cfg:
        _fail(source, "scheduler: the learning rate follows forge-train's schedule (--lr_scheduler, "
                      "--warmup_iters, --learning_rate, ...); remove the \"scheduler\" section")
    opt = cfg.get("optimizer")
    if opt is None:  # our torch AdamW is passed to deepspeed.initialize
        force = cfg.get("zero_force_ds_cpu_optimizer")
        if offload_optimizer and force:
            _fail(source, "zero_force_ds_cpu_optimizer=true asks for DeepSpeed's CPU Adam, but the config names no "
                          "optimizer; add \"optimizer\": {\"type\": \"AdamW\", \"params\": {\"lr\": \"auto\"}} "
                          "(one-time JIT build of cpu_adam) or remove the key")
        if offload_optimizer:
            cfg["zero_force_ds_cpu_optimizer"] = False  # torch AdamW steps the offloaded fp32 partition
        return False
    if not isinstance(opt, dict) or str(opt.get("type", "")).lower() not in ADAM_TYPES:
        kind = opt.get("type") if isinstance(opt, dict) else opt
        _fail(source, f"optimizer.type={json.dumps(kind)}: forge-train trains with AdamW; use \"AdamW\" "
                      f"(DeepSpeed's CPU Adam under offload) or remove the section to use torch AdamW")
    params = opt.setdefault("params", {})
    _resolve(params, "lr", train_cfg.learning_rate, "--learning_rate", source, "optimizer.params.")
    _resolve(params, "betas", [train_cfg.beta1, train_cfg.beta2], "--beta1/--beta2", source, "optimizer.params.")
    _resolve(params, "eps", train_cfg.adamw_eps, "--adamw_eps", source, "optimizer.params.")
    _resolve(params, "weight_decay", train_cfg.adamw_weight_decay, "--adamw_weight_decay", source,
             "optimizer.params.")
    if str(opt["type"]).lower() == "adam" and params.get("adam_w_mode") is False:
        _fail(source, "optimizer.params.adam_w_mode=false is Adam with L2 regularisation; forge-train's optimizer "
                      "is AdamW: remove adam_w_mode")
    return True


def _leftover_auto(obj: Any, path: str, source: str) -> None:
    if obj == AUTO:
        _fail(source, f"{path}=\"auto\" has no forge-train option to take its value from; give a value")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _leftover_auto(v, f"{path}.{k}" if path else k, source)


def resolve_deepspeed_config(raw: dict, train_cfg, dp_size: int, model_config=None, pipeline_parallel_size: int = 1,
                             fp16_supported: Optional[bool] = None, source: str = "deepspeed config") -> ResolvedDeepSpeed:
    """Validate ``raw`` and fill every "auto" (see the module doc). ``fp16_supported`` defaults to
    the DeepSpeed accelerator's answer for this machine."""
    cfg = copy.deepcopy(raw)
    _check_unknown(cfg, source)
    if fp16_supported is None:
        fp16_supported = _accelerator_fp16()
    _batch_sizes(cfg, train_cfg, dp_size, source)
    _resolve(cfg, "gradient_clipping", float(train_cfg.grad_clip), "--grad_clip", source)
    precision = _precision(cfg, train_cfg, fp16_supported, train_cfg.resolved_device, source)
    zero = _zero(cfg, model_config, pipeline_parallel_size, source)
    offload_opt = _offloaded(zero, "offload_optimizer")
    ds_optimizer = _optimizer(cfg, train_cfg, offload_opt, source)
    _leftover_auto(cfg, "", source)
    return ResolvedDeepSpeed(cfg, int(zero.get("stage", 0)), precision, ds_optimizer, offload_opt,
                             _offloaded(zero, "offload_param"), source)


def _offloaded(zero: dict, key: str) -> bool:
    section = zero.get(key)
    return isinstance(section, dict) and section.get("device", "none") not in ("none", None)


def _accelerator_fp16() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())

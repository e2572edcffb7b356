"""The DeepSpeed internals the DeepSpeed engine reaches into, checked in one place.

The engine uses DeepSpeed's public API (initialize, backward, step, save/load_checkpoint, the
safe_*_full_* tensor-fragment functions, zero_to_fp32) and a few internals that DeepSpeed may move
in any release: the CPU shm-op builder it skips, the fp16/bf16 wrappers' master-weight groups, the
ZeRO fragment mappings (``_hp_mapping``) and ZeRO-3's flat fp32 partitions it reads to rebuild
Adam's state on another layout, and ZeRO's coalesced gradient reduction it uses for the
tensor-parallel partial-gradient sums, and the pipeline engine's instruction table and
PipelineModule's partitioning hook (deepspeed_pipeline.py). The project pins the versions it tested
(``deepspeed>=0.19.8,<0.20``: requirements-cpu.txt, the ``deepspeed`` extra); ``check_deepspeed``
runs before ``deepspeed.initialize`` and refuses, naming what moved, rather than failing later in
the middle of a step or a checkpoint.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable, List, Tuple

from forge_dist.errors import ConfigError

SUPPORTED = ">=0.19.8,<0.20"


def _has(module: str, *names: str) -> Callable[[], bool]:
    def check() -> bool:
        mod = importlib.import_module(module)
        return all(hasattr(mod, n) for n in names)
    return check


def _class_has(module: str, cls: str, *names: str) -> Callable[[], bool]:
    def check() -> bool:
        c = getattr(importlib.import_module(module), cls)
        return all(hasattr(c, n) for n in names)
    return check


@functools.lru_cache(maxsize=None)
def _class_source(module: str, cls: str) -> str:
    """A class's source, read once per process: inspect tokenizes the whole module file (about a
    second of CPU per DeepSpeed engine built, every build checking these classes again)."""
    return inspect.getsource(getattr(importlib.import_module(module), cls))


def _source_mentions(module: str, cls: str, *names: str) -> Callable[[], bool]:
    """Instance attributes set in __init__ (no instance exists before initialize)."""
    def check() -> bool:
        text = _class_source(module, cls)
        return all(f"self.{n}" in text for n in names)
    return check


# (what the engine uses it for, check)
INTERNALS: List[Tuple[str, Callable[[], bool]]] = [
    ("deepspeed.comm.torch.build_shm_op (skipped: a 35 s JIT build training never uses)",
     _has("deepspeed.comm.torch", "build_shm_op")),
    ("deepspeed.runtime.compiler.compile / dummy_decorator (Muon's module imported without Inductor)",
     _has("deepspeed.runtime.compiler", "compile", "dummy_decorator")),
    ("coalesced_collectives._torch_reduce_scatter_fn, partition_parameters._dist_allgather_fn (ZeRO's gloo "
     "collectives in place, train/deepspeed_gloo.py)",
     lambda: _has("deepspeed.runtime.comm.coalesced_collectives", "_torch_reduce_scatter_fn")()
     and _has("deepspeed.runtime.zero.partition_parameters", "_dist_allgather_fn")()),
    ("deepspeed.utils.safe_{get,set}_full_{fp32_param,optimizer_state} (logical optimizer state)",
     _has("deepspeed.utils", "safe_get_full_fp32_param", "safe_get_full_optimizer_state",
          "safe_set_full_fp32_param", "safe_set_full_optimizer_state")),
    ("deepspeed.utils.tensor_fragment.tensor_fragment.set_optim_state_fragment (Adam state on a new layout)",
     _class_has("deepspeed.utils.tensor_fragment", "tensor_fragment", "set_optim_state_fragment")),
    ("deepspeed.utils.safe_{get,set}_local_{fp32_param,optimizer_state}, tensor_fragment's lp_fragment_address / "
     "hp_fragment / optim_fragment (sharded checkpoints: each rank's ZeRO partition, train/deepspeed_sharded.py)",
     lambda: _has("deepspeed.utils", "safe_get_local_fp32_param", "safe_get_local_optimizer_state",
                  "safe_set_local_fp32_param", "safe_set_local_optimizer_state")()
     and all(f in getattr(importlib.import_module("deepspeed.utils.tensor_fragment").tensor_fragment,
                          "__dataclass_fields__", {})
             for f in ("lp_fragment_address", "hp_fragment", "optim_fragment"))),
    ("DeepSpeedZeroOptimizer / BF16_Optimizer.update_lp_params, ZeRO-3's _reassign_or_swap_out_partitioned_parameters "
     "/ persistent_parameters / invalidate_secondary_tensor (the forward's parameters after a sharded load)",
     lambda: _class_has("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "update_lp_params")()
     and _class_has("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", "update_lp_params")()
     and _class_has("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3",
                    "_reassign_or_swap_out_partitioned_parameters", "invalidate_secondary_tensor")()
     and _source_mentions("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3",
                          "persistent_parameters", "fp16_groups")()),
    ("FP16_Optimizer.fp16_groups / fp32_groups_flat (stage-0 fp16/bf16 master weights)",
     _source_mentions("deepspeed.runtime.fp16.fused_optimizer", "FP16_Optimizer", "fp16_groups", "fp32_groups_flat")),
    ("FP16_UnfusedOptimizer.fp16_groups / fp32_groups (stage-0 fp16/bf16 master weights)",
     _source_mentions("deepspeed.runtime.fp16.unfused_optimizer", "FP16_UnfusedOptimizer", "fp16_groups",
                      "fp32_groups")),
    ("DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat (ZeRO-3 Adam state on a new layout)",
     _source_mentions("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3",
                      "fp32_partitioned_groups_flat")),
    ("DeepSpeedZeroOptimizer_Stage3.swap_optimizer / _swappable_optimizer_subgroup / "
     "_optimizer_states_and_gradient_swap_{in,out} (NVMe offload: sharded loads through the swapper)",
     lambda: _class_has("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3",
                        "_swappable_optimizer_subgroup", "_optimizer_states_and_gradient_swap_in",
                        "_optimizer_states_and_gradient_swap_out")()
     and _source_mentions("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "swap_optimizer")()),
    ("FusedAdam.multi_tensor_adam / _dummy_overflow_buf / adam_w_mode, DeepSpeedCPUAdam.ds_opt_adam / opt_id "
     "(the CPU Adam kernel's beta^t product replayed on resume, train/deepspeed_adam.py)",
     lambda: _source_mentions("deepspeed.ops.adam.fused_adam", "FusedAdam", "multi_tensor_adam",
                              "_dummy_overflow_buf", "adam_w_mode")()
     and _source_mentions("deepspeed.ops.adam.cpu_adam", "DeepSpeedCPUAdam", "ds_opt_adam", "opt_id")()),
    ("DeepSpeedEngine.coalesce_grad_reduction / no_sync / allreduce_gradients (TP partial-gradient sums)",
     _class_has("deepspeed.runtime.engine", "DeepSpeedEngine", "coalesce_grad_reduction", "no_sync",
                "allreduce_gradients", "get_global_grad_norm", "set_gradient_accumulation_boundary")),
    ("ZeRO-1/2 and ZeRO-3 optimizers' _coalesce_grad_reduction flag",
     lambda: _source_mentions("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer",
                              "_coalesce_grad_reduction")()
     and _source_mentions("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3",
                          "_coalesce_grad_reduction")()),
    ("DeepSpeedEngine.checkpoint_engine (wrapped: forge_dist.io.deepspeed_safe loads without pickle)",
     _source_mentions("deepspeed.runtime.engine", "DeepSpeedEngine", "checkpoint_engine")),
    ("deepspeed.zero.Init._convert_to_zero_parameters / _convert_to_deepspeed_param / rank / dp_world_size / "
     "zero_param_process_group (ZeRO-3 parameters partitioned as they are drawn, each rank its own range: "
     "train/deepspeed_init.py)",
     lambda: _class_has("deepspeed.runtime.zero.partition_parameters", "Init", "_convert_to_zero_parameters",
                        "_convert_to_deepspeed_param")()
     and _source_mentions("deepspeed.runtime.zero.partition_parameters", "Init", "rank", "dp_world_size",
                          "zero_param_process_group")()),
    ("deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint (forge-convert)",
     _has("deepspeed.utils.zero_to_fp32", "get_fp32_state_dict_from_zero_checkpoint")),
    ("PipelineEngine._INSTRUCTION_MAP / _exec_optimizer_step / reset_activation_shape (pipeline: the "
     "optimizer step held for our schedule)",
     _class_has("deepspeed.runtime.pipe.engine", "PipelineEngine", "_INSTRUCTION_MAP", "_exec_optimizer_step",
                "reset_activation_shape", "train_batch", "eval_batch")),
    ("PipelineModule._partition_layers / _set_bounds / get_tied_weights_and_groups (pipeline: our split, "
     "the tied table's norm count)",
     lambda: _class_has("deepspeed.runtime.pipe.module", "PipelineModule", "_partition_layers", "_set_bounds",
                        "get_tied_weights_and_groups")()
     and _source_mentions("deepspeed.runtime.pipe.module", "PipelineModule", "forward_funcs", "tied_comms",
                          "_grid")()),
    ("deepspeed.runtime.zero.config.DeepSpeedZeroConfig (config validation)",
     _has("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig")),
    ("deepspeed.utils.groups._EXPERT_{,DATA_}PARALLEL_GROUP{,_RANKS} (expert parallelism: our expert groups "
     "registered as DeepSpeed's)",
     _has("deepspeed.utils.groups", "_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS",
          "_EXPERT_DATA_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP_RANKS")),
    ("deepspeed.moe.layer.MoE, split_params_into_different_moe_groups_for_optimizer, the engine's has_moe_layers "
     "(expert parallelism: how DeepSpeed learns a model's MoE layers and their optimizer groups)",
     lambda: _has("deepspeed.moe.layer", "MoE")()
     and _has("deepspeed.moe.utils", "split_params_into_different_moe_groups_for_optimizer")()
     and _source_mentions("deepspeed.runtime.engine", "DeepSpeedEngine", "has_moe_layers")()),
]


def missing_internals() -> List[str]:
    """The internals of INTERNALS this DeepSpeed lacks (an import error counts as missing)."""
    missing = []
    for what, check in INTERNALS:
        try:
            ok = check()
        except (ImportError, AttributeError, OSError, TypeError):
            ok = False
        if not ok:
            missing.append(what)
    return missing


def check_deepspeed() -> None:
    """Refuse a DeepSpeed whose internals moved (ConfigError naming them and the tested range)."""
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(f"--deepspeed_config needs DeepSpeed: pip install 'deepspeed{SUPPORTED}' "
                          f"(or pip install -e .[deepspeed])") from None
    missing = missing_internals()
    if missing:
        raise ConfigError(f"deepspeed {deepspeed.__version__} lacks internals forge_dist's DeepSpeed engine uses: "
                          + "; ".join(missing) + f". Install a tested version: pip install 'deepspeed{SUPPORTED}'")

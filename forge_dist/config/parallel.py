"""ParallelConfig: how a run is split over processes, validated before any process group exists.

``validate(model_config, world_size)`` checks everything that arithmetic can decide (sizes
dividing the world, heads and hidden features dividing over tensor-parallel ranks in every layer,
experts over expert-parallel ranks, tokens over ranks for sequence parallelism, layers over
pipeline stages), each failure a ConfigError naming the numbers and what to change. Whether every
module of the model has a tensor-parallel rule is checked by
forge_dist.parallel.parallelize.check_parallelizable, also without processes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

from forge_dist.errors import ConfigError

BACKENDS = (None, "gloo", "nccl")


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1  # pipeline stages (forge_dist.parallel.pipeline)
    pipeline_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | interleaved_zero_bubble | zbv | dualpipev
    virtual_pipeline_size: Optional[int] = None  # model chunks per rank; None: the schedule's default
    pipeline_layers: Optional[str] = None  # layers per stage, e.g. "3,4,4,3"; None: balanced split
    expert_parallel_size: int = 1  # experts of each MoE layer split over this many data-parallel replicas
    expert_tensor_parallel_size: Optional[int] = None  # None: tensor_parallel_size; 1: experts whole
    sequence_parallel: bool = False  # split the residual stream along the sequence over TP ranks
    make_vocab_size_divisible_by: int = 128  # vocab padded to a multiple of this x TP (Megatron)
    dist_timeout_minutes: float = 30.0  # collective timeout: a hung rank fails instead of waiting forever
    dist_backend: Optional[str] = None  # None: nccl with CUDA, gloo on CPU

    def __post_init__(self):
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size",
                     "make_vocab_size_divisible_by"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}={v!r} must be a positive integer")
        etp = self.expert_tensor_parallel_size
        if etp is not None and (not isinstance(etp, int) or isinstance(etp, bool) or etp < 1):
            raise ConfigError(f"expert_tensor_parallel_size={etp!r} must be a positive integer (1 or "
                              f"tensor_parallel_size) or unset")
        if not isinstance(self.sequence_parallel, bool):
            raise ConfigError(f"sequence_parallel={self.sequence_parallel!r} must be true or false")
        if not (isinstance(self.dist_timeout_minutes, (int, float)) and self.dist_timeout_minutes > 0):
            raise ConfigError(f"dist_timeout_minutes={self.dist_timeout_minutes!r} must be a positive number")
        from forge_dist.parallel.pipeline.split import check_schedule, chunks_per_rank

        check_schedule(self.pipeline_schedule)
        chunks_per_rank(self.pipeline_schedule, self.virtual_pipeline_size)
        if self.dist_backend not in BACKENDS:
            raise ConfigError(f"dist_backend={self.dist_backend!r}; choose gloo, nccl or None (automatic)")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def topology(self, world_size: int):
        """The Topology of a world of ``world_size`` (raises ConfigError when the sizes do not fit)."""
        from forge_dist.parallel.topology import Topology

        return Topology(world_size, tp=self.tensor_parallel_size, pp=self.pipeline_parallel_size,
                        ep=self.expert_parallel_size)

    def pipeline_plan(self, model_config, n_microbatches: Optional[int] = None):
        """The stage split and placement (forge_dist.parallel.pipeline.split.PipelinePlan)."""
        from forge_dist.parallel.pipeline.split import plan_pipeline

        return plan_pipeline(model_config, self.pipeline_parallel_size, self.pipeline_schedule,
                             self.virtual_pipeline_size, self.pipeline_layers, n_microbatches)

    def validate(self, model_config, world_size: int) -> None:
        self.topology(world_size)  # world = tp x pp x dp, ep divides dp
        tp, pp, ep = self.tensor_parallel_size, self.pipeline_parallel_size, self.expert_parallel_size
        if pp > model_config.n_layer:
            raise ConfigError(f"pipeline_parallel_size={pp} exceeds n_layer={model_config.n_layer}: every "
                              f"stage needs at least one layer; use at most {model_config.n_layer} stages")
        if pp > 1:
            self.pipeline_plan(model_config)
        if model_config.use_moe and model_config.n_experts % ep:
            raise ConfigError(f"n_experts={model_config.n_experts} is not divisible by expert_parallel_size={ep}; "
                              f"choose ep among {_divisors(model_config.n_experts)} or change n_experts")
        from forge_dist.parallel.expert.placement import check_expert_parallel

        check_expert_parallel(model_config, self)
        if self.sequence_parallel and tp > 1 and model_config.block_size % tp:
            raise ConfigError(f"sequence_parallel splits block_size={model_config.block_size} tokens over "
                              f"tensor_parallel_size={tp}; use a block_size divisible by {tp} or disable it")
        if tp > 1:
            for i in range(model_config.n_layer):
                _check_layer(model_config.for_layer(i), i, tp)


def _check_layer(cfg, layer: int, tp: int) -> None:
    where = f"layer {layer}: " if layer else ""
    choose = "choose tensor_parallel_size among {}"
    if cfg.n_head % tp:
        raise ConfigError(f"{where}n_head={cfg.n_head} is not divisible by tensor_parallel_size={tp}: each "
                          f"rank holds whole attention heads; " + choose.format(_divisors(cfg.n_head)))
    n_kv = cfg.kv_groups
    if n_kv % tp and tp % n_kv:
        raise ConfigError(f"{where}n_kv_group={n_kv} and tensor_parallel_size={tp}: one must divide the other "
                          f"(KV heads split over ranks, or each replicated on tp/n_kv_group ranks)")
    if cfg.mlp_hidden % tp:
        size = "mlp_size" if cfg.mlp_size is not None else "mlp_expansion_factor x n_embd"
        raise ConfigError(f"{where}MLP hidden size {cfg.mlp_hidden} ({size}) is not divisible by "
                          f"tensor_parallel_size={tp}; " + choose.format(_divisors(cfg.mlp_hidden)))


def parallel_config_from_dict(d: dict) -> ParallelConfig:
    known = {f.name for f in dataclasses.fields(ParallelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown parallel option(s) {unknown}; valid: {sorted(known)}")
    return ParallelConfig(**d)

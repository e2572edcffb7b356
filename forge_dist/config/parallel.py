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
from typing import Dict, List, Optional, Tuple

from forge_dist.errors import ConfigError

BACKENDS = (None, "gloo", "nccl")


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# schedule name -> (torch.distributed.pipelining class, placement, model chunks per rank: None = any)
SCHEDULES: Dict[str, Tuple[str, str, Optional[int]]] = {
    "gpipe": ("ScheduleGPipe", "loop", 1),
    "1f1b": ("Schedule1F1B", "loop", 1),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "loop", None),
    "interleaved_zero_bubble": ("ScheduleInterleavedZeroBubble", "loop", None),
    "zbv": ("ScheduleZBVZeroBubble", "v", 2),
    "dualpipev": ("ScheduleDualPipeV", "v", 2),
}
DEFAULT_SCHEDULE = "1f1b"
MULTI = {"interleaved_1f1b", "interleaved_zero_bubble", "zbv", "dualpipev"}  # PipelineScheduleMulti


def check_schedule(name: str) -> None:
    if name not in SCHEDULES:
        raise ConfigError(f"pipeline_schedule={name!r} is not a schedule; choose one of {', '.join(SCHEDULES)}")


def chunks_per_rank(schedule: str, virtual: Optional[int]) -> int:
    """V: model chunks per rank (--virtual_pipeline_size; None takes the schedule's default)."""
    check_schedule(schedule)
    fixed = SCHEDULES[schedule][2]
    if virtual is None:
        return fixed if fixed is not None else 2
    if not isinstance(virtual, int) or isinstance(virtual, bool) or virtual < 1:
        raise ConfigError(f"virtual_pipeline_size={virtual!r} must be a positive integer")
    if fixed is not None and virtual != fixed:
        raise ConfigError(f"virtual_pipeline_size={virtual} with pipeline_schedule={schedule}: that schedule runs "
                          f"{fixed} model chunk(s) per rank; use --virtual_pipeline_size {fixed}, or "
                          f"interleaved_1f1b / interleaved_zero_bubble for other counts")
    return virtual


def check_expert_parallel(model_config, parallel_config) -> None:
    """Refusals that need no process: raises ConfigError."""
    ep = parallel_config.expert_parallel_size
    etp = getattr(parallel_config, "expert_tensor_parallel_size", None)
    tp = parallel_config.tensor_parallel_size
    if not model_config.use_moe:
        for name, value, default in (("expert_parallel_size", ep, 1), ("expert_tensor_parallel_size", etp, None)):
            if value != default:
                raise ConfigError(f"{name}={value} needs a mixture-of-experts model: add --use_moe (with "
                                  f"--n_experts), or leave {name} unset")
        return
    if etp is not None and etp not in (1, tp):
        raise ConfigError(f"expert_tensor_parallel_size={etp}: experts are either whole on each rank (1) or "
                          f"split like the rest of the model (tensor_parallel_size={tp}); choose 1 or {tp}")
    if etp == 1 and tp > 1:  # the TP ranks split each MoE layer's tokens (parallel/tensor/rules/moe.py)
        if model_config.block_size % tp:
            raise ConfigError(f"expert_tensor_parallel_size=1 with tensor_parallel_size={tp}: each MoE layer's tokens "
                              f"split over the TP ranks; use a block_size divisible by {tp} "
                              f"(block_size={model_config.block_size})")
        if getattr(parallel_config, "sequence_parallel", False) and model_config.moe_capacity_factor is not None:
            raise ConfigError(f"moe_capacity_factor with expert_tensor_parallel_size=1 and sequence_parallel: capacity "
                              f"would be counted per sequence shard, which no one-process run reproduces; drop "
                              f"--moe_capacity_factor (dropless), sequence parallelism, or use "
                              f"expert_tensor_parallel_size={tp}")
    if ep > 1 and model_config.moe_router_scheme == "noisy_top_k":
        raise ConfigError(f"moe_router_scheme=noisy_top_k with expert_parallel_size={ep}: the gate noise is drawn "
                          f"from each data-parallel rank's own generator, so a token's routing would depend "
                          f"on the layout, and expert parallelism promises the one-process routing; use "
                          f"moe_router_scheme=softmax (noisy routing runs with expert_parallel_size=1)")



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

    def validate(self, model_config, world_size: int) -> None:
        self.topology(world_size)  # world = tp x pp x dp, ep divides dp
        tp, pp, ep = self.tensor_parallel_size, self.pipeline_parallel_size, self.expert_parallel_size
        if pp > model_config.n_layer:
            raise ConfigError(f"pipeline_parallel_size={pp} exceeds n_layer={model_config.n_layer}: every "
                              f"stage needs at least one layer; use at most {model_config.n_layer} stages")
        if model_config.use_moe and model_config.n_experts % ep:
            raise ConfigError(f"n_experts={model_config.n_experts} is not divisible by expert_parallel_size={ep}; "
                              f"choose ep among {_divisors(model_config.n_experts)} or change n_experts")
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

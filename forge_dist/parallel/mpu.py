"""DeepSpeed's ``mpu`` (Megatron's parallel-state names) answered from our ProcessGroups.

``deepspeed.initialize(..., mpu=DeepSpeedMPU.build(groups))`` tells DeepSpeed which ranks hold one
copy of the model (the model-parallel group, tp x pp) and which ranks are data-parallel replicas of
each other: ZeRO partitions parameters, gradients and optimizer states only over ``dp``, gradient
norms are summed over ``mp`` (see forge_dist.train.deepspeed_engine for the per-parameter
attributes that make a tensor-parallel shard count once), and checkpoint files are named by the
model-parallel rank.

DeepSpeed hands the group objects to torch.distributed, where ``None`` means the whole world, so a
dimension of size 1 in a world of several processes (DP=2 with TP=1: the model-parallel group of
each rank is that rank alone) needs a handle for "this rank alone". ``build`` creates exactly one,
this rank's own, with ``use_local_synchronization`` (only the member takes part): no rank calls
``new_group`` for the others' one-rank groups, which at W ranks would be W calls on every rank.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch.distributed as dist

from forge_dist.parallel.groups import ProcessGroups, RankGroup

KINDS_USED = ("tp", "dp", "pp", "mp")  # the groups DeepSpeed asks for
EXPERT_KINDS = ("ep", "expert_dp")  # handed to DeepSpeed's expert groups (train/deepspeed_moe.py)


class DeepSpeedMPU:
    """The methods DeepSpeed 0.19 calls on an ``mpu`` (model/tensor/pipe/data parallel rank,
    world size and group). Sequence-parallel methods are deliberately absent: DeepSpeed reads them
    as Ulysses sequence parallelism, while our sequence parallelism lives inside the TP group."""

    def __init__(self, groups: ProcessGroups, handles: Dict[str, object]):
        self.groups = groups
        self._handles = handles

    def __repr__(self) -> str:
        return f"DeepSpeedMPU({self.groups.topology}, rank={self.groups.global_rank})"

    @classmethod
    def build(cls, groups: ProcessGroups) -> "DeepSpeedMPU":
        """Local: a one-rank group is created by its member alone (see module doc)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        kinds = KINDS_USED + (EXPERT_KINDS if groups.ep.size > 1 else ())
        handles: Dict[str, object] = {}
        own: Optional[object] = None
        if world > 1 and any(groups.get(k).size == 1 for k in kinds):
            own = dist.new_group([groups.global_rank], use_local_synchronization=True)
        for kind in kinds:
            g = groups.get(kind)
            if g.size == world:
                handles[kind] = dist.group.WORLD if dist.is_initialized() else None
            elif g.size == 1:
                handles[kind] = own
            else:
                handles[kind] = g.handle
        return cls(groups, handles)

    def handle(self, kind: str):
        """The torch group handle of ``kind`` as DeepSpeed takes it (WORLD, this rank alone, or ours)."""
        return self._handles[kind]

    def _group(self, kind: str) -> RankGroup:
        return self.groups.get(kind)

    # --- model parallel: tp x pp ranks holding one copy of the model ----------------------------
    def get_model_parallel_group(self):
        return self._handles["mp"]

    def get_model_parallel_rank(self) -> int:
        return self._group("mp").rank

    def get_model_parallel_world_size(self) -> int:
        return self._group("mp").size

    # --- tensor parallel (Megatron also calls it the slice group) ------------------------------
    def get_tensor_model_parallel_group(self):
        return self._handles["tp"]

    def get_tensor_model_parallel_rank(self) -> int:
        return self._group("tp").rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._group("tp").size

    def get_tensor_model_parallel_src_rank(self) -> int:
        """The global rank of TP rank 0 of this rank's TP group."""
        return self._group("tp").ranks[0]

    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size

    # --- pipeline parallel ---------------------------------------------------------------------
    def get_pipe_parallel_group(self):
        return self._handles["pp"]

    def get_pipe_parallel_rank(self) -> int:
        return self._group("pp").rank

    def get_pipe_parallel_world_size(self) -> int:
        return self._group("pp").size

    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size

    # --- data parallel: the replicas ZeRO partitions over -------------------------------------
    def get_data_parallel_group(self):
        return self._handles["dp"]

    def get_data_parallel_rank(self) -> int:
        return self._group("dp").rank

    def get_data_parallel_world_size(self) -> int:
        return self._group("dp").size

    def get_data_parallel_group_ranks(self) -> List[int]:
        return list(self._group("dp").ranks)

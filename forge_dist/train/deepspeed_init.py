"""ZeRO-3 without the whole model on any rank: the model comes from ``GPT(cfg, defer_init=True)``
(meta device, tensor-parallel plan applied), and each parameter is drawn in full from its own
seeded stream (forge_dist.model.deferred), cut to this rank's TP shard, and at once handed to
DeepSpeed's partitioned initialisation (``deepspeed.zero.Init``), which keeps 1/DP of it and frees
the rest. The peak is one full parameter plus this rank's partitions; the values are those of a
single-process ``GPT(cfg)`` (DeepSpeed broadcasts data-parallel rank 0's copy, which every rank
drew alike anyway). ``deepspeed.initialize`` then finds every parameter already partitioned.

    wants_meta_model(values)            # build.build_run: leave the model on meta for the engine
    partitioned_materialize(model, ...) # the DeepSpeed engine factory, before deepspeed.initialize
"""
from __future__ import annotations

import torch.distributed

from forge_dist.parallel.groups import ProcessGroups


def _stage(raw: dict):
    zero = raw.get("zero_optimization") if isinstance(raw, dict) else None
    return zero.get("stage") if isinstance(zero, dict) else None


def wants_meta_model(values: dict) -> bool:
    """Whether a run with these options builds its model under ZeRO-3's partitioned initialisation
    (``--deepspeed_config`` naming stage 3, and no ``--init_from prev_run``, which copies weights
    by name into a full model)."""
    from forge_dist.config.deepspeed import load_deepspeed_config

    source = values.get("deepspeed_config")
    if not source or values.get("init_from") == "prev_run":
        return False
    return _stage(source if isinstance(source, dict) else load_deepspeed_config(source)) == 3


def has_meta_parameters(model) -> bool:
    return any(p.is_meta for p in model.parameters())


def partitioned_materialize(model, config: dict, groups: ProcessGroups, mpu) -> int:
    """Draw ``model``'s meta parameters one by one into ZeRO-3 partitions over ``mpu``'s
    data-parallel group (see the module doc); the constructor-valued ones (norm gains, scalars)
    are partitioned after. Collective over the data-parallel group (DeepSpeed broadcasts each
    parameter from its rank 0, then keeps this rank's part); returns how many were drawn."""
    import deepspeed

    from forge_dist.parallel.materialize import shard_local

    # deepspeed.comm over our (already initialised) default group: zero.Init reads sizes from it
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    init = deepspeed.zero.Init(config_dict_or_path=config, mpu=mpu, data_parallel_group=mpu.get_data_parallel_group(),
                               remote_device="cpu" if _offloads_params(config) else None)

    def partition(name, p) -> None:  # what zero.Init does to each parameter a module creates
        if hasattr(p, "ds_id"):
            return
        if p.is_floating_point() and p.dtype != init.dtype:  # DeepSpeed casts no zero.Init parameter later
            p.data = p.data.to(init.dtype)
        init._convert_to_zero_parameters([p])

    local = shard_local(groups) if groups.topology.tp > 1 else None
    drawn = model.materialize(local=local, after=partition)
    for name, p in model.named_parameters():  # the constructor-valued ones
        partition(name, p)
    return drawn


def _offloads_params(config: dict) -> bool:
    offload = (config.get("zero_optimization") or {}).get("offload_param") or {}
    return offload.get("device") == "cpu"

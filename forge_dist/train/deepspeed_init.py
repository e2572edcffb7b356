"""ZeRO-3 without the whole model on any rank: the model comes from ``GPT(cfg, defer_init=True)``
(meta device, tensor-parallel plan applied), and of each parameter this rank draws only the flat
range of its TP shard that DeepSpeed's partition keeps (forge_dist.parallel.kept: the full value
streamed piece by piece from the parameter's own seeded stream, forge_dist.model.deferred), into a
shard-shaped tensor of which nothing else is ever written (so never resident), then hands it to
DeepSpeed's partitioned initialisation (``deepspeed.zero.Init``), which copies that range into the
partition and frees the tensor. The peak is this rank's partitions plus one piece and one
partition in flight; the values are those of a single-process ``GPT(cfg)``. Every data-parallel
rank draws the same stream, so zero.Init's broadcast from data-parallel rank 0 is skipped for
drawn parameters (kept for the constructor-valued ones, and for hpZ, whose secondary partition
reads other ranges: there the whole shard is drawn). ``deepspeed.initialize`` then finds every
parameter already partitioned. With ``--init_from prev_run`` the same ranges are read instead from
the checkpoint (io/slice_read.py ``read_kept``: only the boxes of this rank's partition), what it
lacks drawn; the constructor-valued parameters and buffers it holds are read whole (they are small).

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
    (``--deepspeed_config`` naming stage 3; ``--init_from prev_run``'s weights are read into the
    partitions)."""
    from forge_dist.config.deepspeed import load_deepspeed_config

    source = values.get("deepspeed_config")
    if not source:
        return False
    return _stage(source if isinstance(source, dict) else load_deepspeed_config(source)) == 3


def has_meta_parameters(model) -> bool:
    return any(p.is_meta for p in model.parameters())


def partitioned_materialize(model, config: dict, groups: ProcessGroups, mpu, weights=None) -> int:
    """Draw ``model``'s meta parameters one by one into ZeRO-3 partitions over ``mpu``'s
    data-parallel group (see the module doc), or read them from ``weights`` (a SliceReader: the
    prev_run checkpoint; what it lacks is drawn); the constructor-valued ones (norm gains, scalars)
    are partitioned after. Collective over the data-parallel group; returns how many were drawn."""
    import deepspeed

    from forge_dist.io.slice_read import load_slices, read_kept
    from forge_dist.model.deferred import drawn, materialize
    from forge_dist.parallel.materialize import shard_keep

    # deepspeed.comm over our (already initialised) default group: zero.Init reads sizes from it
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    init = deepspeed.zero.Init(config_dict_or_path=config, mpu=mpu, data_parallel_group=mpu.get_data_parallel_group(),
                               remote_device="cpu" if _offloads_params(config) else None)
    tp_groups = groups if groups.topology.tp > 1 else None
    tp_shard = shard_keep(tp_groups)
    # hpZ (a secondary partition over a sub-group) copies other ranges: draw the whole shard there
    own_range = getattr(init, "zero_param_process_group", None) is None
    for p in model.parameters():  # allocated in DeepSpeed's dtype from the start (a cast reads it all)
        if p.is_meta and p.is_floating_point() and p.dtype != init.dtype:
            p.data = p.data.to(init.dtype)

    def keep(name, p):  # this rank's DeepSpeed partition of its TP shard: [r * ceil(n / W), +ceil(n / W))
        kept = tp_shard(name, p)
        if not own_range:
            return kept
        size = -(-p.numel() // init.dp_world_size)
        start = min(size * init.rank, p.numel())
        return kept.partition(start, min(start + size, p.numel()))

    def drawn_partition(name, p) -> None:
        if not own_range:
            return _partition(init, p)
        # every data-parallel rank drew the same stream, so DeepSpeed's broadcast from its rank 0
        # (zero.Init's _zero_init_param) would copy what each already has in its range
        init._convert_to_deepspeed_param(p)
        if (p.ds_zero_partition_rank, p.ds_zero_partition_world_size) != (init.rank, init.dp_world_size):
            raise RuntimeError(f"DeepSpeed partitions {name} over rank {p.ds_zero_partition_rank} of "
                               f"{p.ds_zero_partition_world_size}, not {init.rank} of {init.dp_world_size}")
        p.partition()

    fresh = drawn(model.init_rules, model.config, model.init_seed)
    value = fresh
    if weights is not None:  # names and shapes checked; the constructor-valued tensors read in place
        load_slices(model, weights, tp_groups, partial=True, fresh_ok=True, meta=False)

        def value(name, shape, kept, dtype):
            if weights.stored(name) is None:  # prev_run: what the checkpoint lacks keeps its fresh value
                return fresh(name, shape, kept, dtype)
            return read_kept(weights, name, kept, dtype, tp_groups)

    count = materialize(model, value, keep=keep, after=drawn_partition)
    for p in model.parameters():  # the constructor-valued ones
        _partition(init, p)
    return count


def _partition(init, p) -> None:
    """What zero.Init does to each parameter a module creates (broadcast from DP rank 0, keep this
    rank's part); DeepSpeed casts no zero.Init parameter later."""
    if hasattr(p, "ds_id"):
        return
    if p.is_floating_point() and p.dtype != init.dtype:
        p.data = p.data.to(init.dtype)
    init._convert_to_zero_parameters([p])


def _offloads_params(config: dict) -> bool:
    offload = (config.get("zero_optimization") or {}).get("offload_param") or {}
    return offload.get("device") == "cpu"

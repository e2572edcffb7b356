"""ZeRO-3's parameter all-gathers and gradient reduce-scatters over gloo without gloo's full-size
temporaries, bit for bit the same results.

Gloo has no in-place form of either collective (torch's ProcessGroupGloo):

- ``reduce_scatter_tensor`` clones its whole input, all-reduces the clone and copies this rank's
  chunk out of it (``reduce_scatter_tensor_coalesced``): one full-size temporary;
- ``all_gather_into_tensor`` gathers into a new flat tensor and copies it into the output
  (``AsyncAllgatherWork``): one full-size temporary.

For a ZeRO-3 rank the largest of these is the whole tied embedding table (25 MB at vocab 8192 x
768), and it sits on top of the gathered table and its full gradient: measured in
docs/BENCHMARKS.md ("ZeRO-3 under DeepSpeed at DP=2"), they make the peak of every step after the
first. ``install()`` routes the two calls ZeRO-3 makes for them through one in-place
``all_reduce`` when the group is gloo (measured in a 2-rank gloo world, 25 MB: the all-gather's
peak +24 MB -> +1.6 MB and 115 -> 25 ms, the reduce-scatter's +36 -> +1.6 MB and 300 -> 130 ms):

- reduce-scatter (``coalesced_collectives._torch_reduce_scatter_fn``, whose one caller,
  ``reduce_scatter_coalesced``, hands it a scratch buffer it has already divided in place, with the
  output a chunk of it): the all-reduce gloo would run on the clone, run on the buffer itself; the
  chunk is the same sum of the same operands in the same order (DeepSpeed's own contiguous-bucket
  path, ``__avg_scatter_contiguous_grads``, reduces this way too);
- all-gather (``partition_parameters._dist_allgather_fn``, into a fresh flat buffer): every other
  rank's chunk is filled with -0.0 and the buffer all-reduced. ``x + (-0.0) == x`` exactly for
  every float x (signed zeros, infinities and NaN included), so each element is the value of the
  one rank that holds it, whatever the order of the sum.

Other backends (NCCL: in place already), dtypes gloo cannot sum exactly this way, and shapes
that are not one flat buffer take DeepSpeed's calls unchanged. An all-reduce moves twice the bytes
of an all-gather over a ring; gloo is a CPU, few-rank backend, where the copy it saves costs more.

    install()   # once per process, before deepspeed.initialize (deepspeed_engine_factory)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_REDUCE_SCATTER = ("deepspeed.runtime.comm.coalesced_collectives", "_torch_reduce_scatter_fn")
_ALL_GATHER = ("deepspeed.runtime.zero.partition_parameters", "_dist_allgather_fn")
_SUMMABLE = {torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8,
             torch.int8}


def _gloo(group) -> bool:
    try:
        return dist.get_backend(group) == "gloo"
    except (RuntimeError, ValueError):
        return False


def _flat(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() and t.dtype in _SUMMABLE for t in tensors)


def _chunk(buffer: torch.Tensor, part: torch.Tensor, group):
    """This rank's chunk of ``buffer`` if ``buffer`` is world size x ``part``, else None."""
    world = dist.get_world_size(group)
    if buffer.numel() != part.numel() * world or buffer.dtype != part.dtype:
        return None
    return buffer.view(-1).narrow(0, dist.get_rank(group) * part.numel(), part.numel())


def _aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel()


def reduce_scatter_in_place(real):
    """``_torch_reduce_scatter_fn(input_tensor, output_tensor, group, ...)`` as one in-place
    all-reduce of ``input_tensor`` over gloo (see the module doc); ``input_tensor`` is overwritten."""
    def reduce_scatter(input_tensor, output_tensor, group=None, async_op=False, prof=False):
        mine = _chunk(input_tensor, output_tensor, group) if _gloo(group) and _flat(input_tensor, output_tensor) \
            else None
        if mine is None:
            return real(input_tensor, output_tensor, group=group, async_op=async_op, prof=prof)
        dist.all_reduce(input_tensor, group=group)
        if not _aliases(mine, output_tensor):
            output_tensor.view(-1).copy_(mine)
        return None
    reduce_scatter.forge_in_place = True
    return reduce_scatter


def all_gather_in_place(real):
    """``_dist_allgather_fn(input_tensor, output_tensor, group)`` (asynchronous) as an all-reduce
    of ``output_tensor`` holding ``input_tensor`` in this rank's chunk and -0.0 elsewhere."""
    def all_gather(input_tensor, output_tensor, group=None):
        mine = _chunk(output_tensor, input_tensor, group) if _gloo(group) and _flat(input_tensor, output_tensor) \
            else None
        if mine is None:
            return real(input_tensor, output_tensor, group=group)
        flat = output_tensor.view(-1)
        start, n = mine.storage_offset() - flat.storage_offset(), mine.numel()
        zero = -0.0 if output_tensor.is_floating_point() else 0
        flat.narrow(0, 0, start).fill_(zero)
        flat.narrow(0, start + n, flat.numel() - start - n).fill_(zero)
        if not _aliases(mine, input_tensor):
            mine.copy_(input_tensor.view(-1))
        return dist.all_reduce(output_tensor, group=group, async_op=True)
    all_gather.forge_in_place = True
    return all_gather


def install() -> bool:
    """Route ZeRO-3's two gloo collectives through the in-place forms (idempotent; returns
    whether anything was installed now)."""
    import importlib

    installed = False
    for (module, name), wrap in ((_REDUCE_SCATTER, reduce_scatter_in_place), (_ALL_GATHER, all_gather_in_place)):
        mod = importlib.import_module(module)
        real = getattr(mod, name)
        if not getattr(real, "forge_in_place", False):
            setattr(mod, name, wrap(real))
            installed = True
    return installed

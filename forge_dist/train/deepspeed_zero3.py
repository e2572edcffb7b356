"""Per-rank memory of DeepSpeed's ZeRO-3 kept to its partitions (measured in docs/BENCHMARKS.md,
"ZeRO-3 under DeepSpeed at DP=2"; the config defaults that bound its buffers are in
config/deepspeed.py).

    share_fp32_master(ds_engine.optimizer)   # after deepspeed.initialize: fp32 runs keep one copy
    with memory_efficient_linear(enabled):   # around the forward: no gathered weight kept alive

``share_fp32_master``: in an fp32 run the partition the forward gathers from is already fp32, and
DeepSpeed means to step it in place ("we don't need another copy of the weights",
stage3.py::_create_fp32_partitions), but its test compares a torch.device with the accelerator's
device *name* (a str), which is never equal on this torch, so it clones the partition: one extra
4 bytes per parameter / N on every rank. We make the master the partition itself, before the
first step (no optimizer state refers to the clone yet).

``memory_efficient_linear``: ``F.linear`` saves ``weight.t()``, a view of the gathered weight, for
its backward, so every weight ZeRO-3 gathers in the forward stays resident until the backward
(the whole model by the end of the forward), whatever DeepSpeed releases. DeepSpeed's own
``zero3_linear_wrap`` saves the parameter instead (re-gathered for the backward); DeepSpeed puts
it in place of ``F.linear`` for good when a model is built inside ``zero.Init``. We build outside
it (deepspeed_init.py), so we put it in place only around this engine's forward passes.
"""
from __future__ import annotations

import contextlib

import torch


def share_fp32_master(optimizer) -> int:
    """Point ZeRO-3's fp32 master sub-groups at the parameter partitions where they have the same
    dtype and device (fp32, no offload); returns how many were shared."""
    lows = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    highs = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if lows is None or highs is None or getattr(optimizer, "offload_optimizer", False) \
            or getattr(optimizer, "swap_optimizer", False):
        return 0
    shared = 0
    for i, (low, high) in enumerate(zip(lows, highs)):
        if low is None or low is high or low.dtype != high.dtype or low.device != high.device:
            continue
        if high in optimizer.optimizer.state:  # stepped already: leave it
            continue
        low.ds_id = high.ds_id
        low.requires_grad = True  # as DeepSpeed sets it on its own shared copy
        highs[i] = low
        shared += 1
    return shared


@contextlib.contextmanager
def memory_efficient_linear(enabled: bool = True):
    """``F.linear`` replaced by DeepSpeed's ZeRO-3 linear inside the block (same product
    ``input @ weight.t()``; its backward re-gathers a partitioned weight)."""
    if not enabled:
        yield
        return
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    functional = torch.nn.functional
    saved = functional.linear
    functional.linear = zero3_linear_wrap
    try:
        yield
    finally:
        functional.linear = saved

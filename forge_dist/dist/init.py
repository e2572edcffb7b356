"""Process-group initialisation from the launcher's environment, returning a DistContext.

    ctx = init_distributed(parallel_config, model_config)   # validates, then init_process_group
    model = parallelize(GPT(model_config), ctx.groups, parallel_config)
    ...
    ctx.destroy()

Everything that can be refused is refused before a process group exists: the parallel sizes
against the world size and the model (ParallelConfig.validate), and a module without a
tensor-parallel rule (check_parallelizable, on the meta device). The backend is nccl when CUDA is
available and gloo otherwise, with a collective timeout (dist_timeout_minutes) so a lost rank fails
the run instead of hanging it. Rendezvous: env:// from the launcher's variables (exported, so
DeepSpeed finds all five and never falls back to MPI discovery), or an explicit init_method such
as file:///shared/path. A single process without a launcher gets a one-rank group on an in-memory
store.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from forge_dist.dist.env import LaunchEnv, detect_launch_env


@dataclass
class DistContext:
    env: LaunchEnv
    backend: str
    device: torch.device
    timeout: timedelta
    topology: Optional[object] = None  # forge_dist.parallel.Topology when a ParallelConfig was given
    groups: Optional[object] = None  # forge_dist.parallel.ProcessGroups likewise

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def destroy(self) -> None:
        """Barrier, then tear the process groups down (a clean exit on every rank)."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def __enter__(self) -> "DistContext":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.destroy()
        elif dist.is_initialized():  # no barrier: the other ranks may never reach it
            dist.destroy_process_group()


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(parallel_config=None, model_config=None, *, backend: Optional[str] = None,
                     init_method: Optional[str] = None, timeout_minutes: Optional[float] = None,
                     environ: Optional[Mapping[str, str]] = None, export_env: bool = True) -> DistContext:
    """Initialise torch.distributed for this process; build Topology and ProcessGroups when
    ``parallel_config`` is given (validated against ``model_config`` first, if given)."""
    env = detect_launch_env(environ)
    if parallel_config is not None:
        parallel_config.topology(env.world_size)  # world = tp x pp x dp before anything else
        if model_config is not None:
            from forge_dist.parallel.parallelize import check_parallelizable

            parallel_config.validate(model_config, env.world_size)
            check_parallelizable(model_config, parallel_config)
        backend = backend or parallel_config.dist_backend
        if timeout_minutes is None:
            timeout_minutes = parallel_config.dist_timeout_minutes
    backend = backend or default_backend()
    timeout = timedelta(minutes=timeout_minutes if timeout_minutes is not None else 30.0)
    if export_env and env.launcher != "single":
        for key, value in env.exports().items():  # env:// and DeepSpeed read these from os.environ
            os.environ.setdefault(key, value)
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised; call init_distributed once per process")
    if env.launcher == "single" and init_method is None:
        store = dist.HashStore()  # a world of one needs no network
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=init_method or "env://", rank=env.rank,
                                world_size=env.world_size, timeout=timeout)
    ctx = DistContext(env, backend, device, timeout)
    if parallel_config is not None:
        from forge_dist.parallel.groups import ProcessGroups

        ctx.topology = parallel_config.topology(env.world_size)
        ctx.groups = ProcessGroups.build(ctx.topology, timeout=timeout)
    return ctx

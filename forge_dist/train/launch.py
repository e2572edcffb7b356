"""How forge-train starts: one process, or a parallel world under torchrun, the deepspeed launcher,
mpirun or srun (forge_dist.dist.env detects which).

``plan_launch`` decides everything that needs no other process, so bad input is refused with one
line before any process group exists (a rendezvous with a rank that already left would hang):

  * pipeline parallelism: schedule, chunks, stage split and micro-batch count
    (ParallelConfig.pipeline_plan), float16 and --compile refused;
  * expert parallelism: experts dividing over the expert-parallel size, which divides the
    data-parallel size; MoE options only with --use_moe; no noisy routing (ParallelConfig.validate);
  * world size = tensor x pipeline x data-parallel sizes, heads / MLP width / KV groups divisible
    by tp in every layer, block_size divisible by tp under sequence parallelism
    (ParallelConfig.validate), and a tensor-parallel rule for every module of the model
    (check_parallelizable, on the meta device);
  * backend against device (nccl needs CUDA and a GPU per local rank);
  * the engine: --deepspeed_config selects forge_dist.train.deepspeed_engine, imported only then.

``Launch.start()`` then initialises torch.distributed (world > 1) and yields the RunContext the
engine factory and the trainer read (ranks, data-parallel slice, ProcessGroups, ParallelConfig).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import torch

from forge_dist.config.parallel import ParallelConfig
from forge_dist.errors import ConfigError
from forge_dist.train.context import RunContext

DEEPSPEED_MODULE = "forge_dist.train.deepspeed_engine"
DEEPSPEED_FACTORY = "deepspeed_engine_factory"


@dataclass
class Launch:
    env: object  # forge_dist.dist.env.LaunchEnv
    parallel_config: ParallelConfig
    engine_factory: Callable
    backend: str

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.parallel_config.model_parallel_size

    @contextlib.contextmanager
    def start(self) -> Iterator[RunContext]:
        """The RunContext of this process; for a world of several, torch.distributed is initialised
        here and torn down at exit (with a barrier after success, without one after an error, since
        the other ranks may never reach it). glibc's mmap threshold is pinned first, so that freed
        large tensors leave the process (forge_dist.dist.malloc)."""
        from forge_dist.dist.malloc import pin_mmap_threshold

        pin_mmap_threshold()
        if self.world_size == 1:
            yield RunContext(launcher=self.env.launcher)
            return
        from forge_dist.dist.init import init_distributed

        dist_ctx = init_distributed(self.parallel_config, backend=self.backend)  # validated by plan_launch
        ctx = RunContext.from_dist(dist_ctx, self.parallel_config)
        ok = False
        try:
            yield ctx
            ok = True
        finally:
            if ok:
                dist_ctx.destroy()
            else:
                dist_ctx.__exit__(RuntimeError, None, None)
            # Free the process-group handles now, while the interpreter is whole: the model's
            # parallel layers and hooks form reference cycles that hold them, and a gloo group
            # destroyed during interpreter teardown can abort ("terminate called without an
            # active exception") after a run that succeeded.
            ctx.groups = dist_ctx.groups = None
            gc.collect()


def parallel_config_from(values: Mapping) -> ParallelConfig:
    from dataclasses import fields

    return ParallelConfig(**{f.name: values[f.name] for f in fields(ParallelConfig) if f.name in values})


def detect_env(environ: Optional[Mapping[str, str]] = None):
    from forge_dist.dist.env import LaunchEnvError, detect_launch_env

    try:
        return detect_launch_env(environ)
    except LaunchEnvError as e:
        raise ConfigError(f"launch environment: {e}") from None


def _single_hint(env, pcfg: ParallelConfig) -> str:
    if env.launcher != "single":
        return ""
    n = pcfg.model_parallel_size
    return (f"; forge-train runs as a single process here: launch {n} with "
            f"`torchrun --nproc_per_node {n} -m forge_dist.train ...` or `mpirun -np {n} forge-train ...`")


def check_parallel(pcfg: ParallelConfig, model_config, env) -> None:
    """Every refusal that arithmetic and the meta device can decide, in the order a user fixes them."""
    try:
        pcfg.validate(model_config, env.world_size)
    except ConfigError as e:
        raise ConfigError(f"{e}{_single_hint(env, pcfg)}") from None
    from forge_dist.parallel.parallelize import check_parallelizable

    check_parallelizable(model_config, pcfg)


def check_pipeline(pcfg: ParallelConfig, model_config, train_config, values: Mapping) -> None:
    from forge_dist.parallel.pipeline.split import pipeline_plan

    pipeline_plan(pcfg, model_config, train_config.gradient_accumulation_steps)
    if train_config.resolved_dtype == "float16":
        raise ConfigError("dtype=float16 with pipeline_parallel_size > 1: the loss scale cannot reach the "
                          "pipeline schedule's backward; use --dtype bfloat16 or float32")
    if train_config.compile:
        raise ConfigError("--compile with pipeline_parallel_size > 1 is not supported (the zero-bubble "
                          "schedules split the backward, which torch.compile cannot); drop --compile")


def choose_backend(pcfg: ParallelConfig, device: str, env) -> str:
    backend = pcfg.dist_backend or ("nccl" if device.startswith("cuda") else "gloo")
    if backend == "nccl":
        if not device.startswith("cuda"):
            raise ConfigError(f"dist_backend=nccl needs CUDA tensors but the device is {device}; "
                              f"use --dist_backend gloo (or none) on CPU")
        if env.world_size > 1 and torch.cuda.device_count() < env.local_world_size:
            raise ConfigError(f"{env.local_world_size} processes on this node but {torch.cuda.device_count()} "
                              f"visible GPU(s): nccl needs one GPU per process; launch at most "
                              f"{torch.cuda.device_count()} per node")
    return backend


def engine_factory(values: Mapping) -> Callable:
    """The engine factory the options ask for: DeepSpeed's for --deepspeed_config (imported only
    then), else forge_dist's own (LocalEngine, or ParallelEngine under a launcher)."""
    path = values.get("deepspeed_config")
    if not path:
        from forge_dist.train.parallel_engine import parallel_engine_factory

        return parallel_engine_factory
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed_config {path}: no such file; give a DeepSpeed JSON config "
                          f"(configs/deepspeed/ has examples, docs/deepspeed.md explains them)")
    try:
        module = importlib.import_module(DEEPSPEED_MODULE)
    except ModuleNotFoundError as e:
        if e.name == DEEPSPEED_MODULE:
            raise ConfigError(f"--deepspeed_config: this forge_dist has no DeepSpeed engine yet "
                              f"({DEEPSPEED_MODULE} is missing; issue 6 brings it); train without "
                              f"--deepspeed_config") from None
        if e.name == "deepspeed" or (e.name or "").startswith("deepspeed."):
            raise ConfigError("--deepspeed_config needs DeepSpeed, which is not installed: "
                              "pip install 'forge_dist[deepspeed]' (see docs/deepspeed.md)") from None
        raise
    factory = getattr(module, DEEPSPEED_FACTORY, None)
    if factory is None:
        raise ConfigError(f"{DEEPSPEED_MODULE} defines no {DEEPSPEED_FACTORY}; this forge_dist is incomplete")
    return factory


def plan_launch(values: Mapping, model_config, train_config, env=None,
                environ: Optional[Mapping[str, str]] = None) -> Launch:
    """Every check before a process group; raises ConfigError. ``values``: the resolved options
    (flat names), ``model_config``/``train_config`` the resolved ModelConfig and TrainConfig;
    ``env``: the detected LaunchEnv (else detected from ``environ`` or os.environ)."""
    env = env if env is not None else detect_env(environ)
    pcfg = parallel_config_from(values)
    check_parallel(pcfg, model_config, env)
    from dataclasses import fields

    from forge_dist.train.options import EngineOptions

    EngineOptions(**{f.name: values[f.name] for f in fields(EngineOptions) if f.name in values})  # its refusals
    if values.get("zero_stage", 0) and pcfg.expert_parallel_size > 1 and pcfg.pipeline_parallel_size > 1:
        raise ConfigError(f"zero_stage={values['zero_stage']} with expert_parallel_size={pcfg.expert_parallel_size} "
                          f"and pipeline_parallel_size={pcfg.pipeline_parallel_size}: the pipeline engine's ZeRO-1 "
                          f"has no expert-data-parallel partition yet; use --zero_stage 0 with experts in pipeline "
                          f"stages, or pipeline_parallel_size=1 (ZeRO-1 with expert parallelism)")
    if pcfg.pipeline_parallel_size > 1:
        check_pipeline(pcfg, model_config, train_config, values)
    backend = choose_backend(pcfg, train_config.resolved_device, env)
    factory = engine_factory(values)
    preflight = getattr(importlib.import_module(factory.__module__), "preflight", None)
    if preflight is not None:  # an engine's own checks of its config, still before any process group
        preflight(values, train_config, model_config, pcfg, env.world_size)
    return Launch(env, pcfg, factory, backend)

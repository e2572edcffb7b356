"""forge-train runs inside a spawned test world (forge_dist.testing.spawn), for the failure drills.

    ctx = parallel_context(rank, world_size, tp=2)      # ProcessGroups on the spawned world
    result = fit(argv, ctx)                              # Trainer(build_run(...)).fit()

The run is built exactly as forge-train builds it under a launcher (options parsed with the
embedded preset, the model sharded over ctx.groups, the default engine factory), so one spawned
world can run several trainings in a row without paying a launcher start-up per run.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence


def parallel_context(rank: int, world_size: int, tp: int = 1, ep: int = 1, pp: int = 1, **parallel):
    """The RunContext a launch of ``world_size`` ranks at ``tensor_parallel_size=tp`` (and
    ``expert_parallel_size=ep``, ``pipeline_parallel_size=pp``, other ParallelConfig options such as
    ``pipeline_schedule``) would give this rank (torch.distributed is already initialised by the
    spawn harness)."""
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.train.context import RunContext

    pcfg = ParallelConfig(tensor_parallel_size=tp, expert_parallel_size=ep, pipeline_parallel_size=pp, **parallel)
    topology = pcfg.topology(world_size)
    groups = ProcessGroups.build(topology)
    coord = topology.coord(rank)
    return RunContext(rank=rank, world_size=world_size, dp_rank=coord.dp, dp_size=topology.dp,
                      groups=groups, parallel_config=pcfg, launcher="env")


def parse(argv: Sequence[str]):
    from forge_dist.presets import read_preset
    from forge_dist.train.arguments import parse_options
    from forge_dist.train.cli import option_groups

    return parse_options(list(argv), "forge-train", option_groups(), read_preset())


def build_parsed(parsed, ctx):
    """The engine forge-train picks: DeepSpeed's for --deepspeed_config, else forge_dist's own."""
    from forge_dist.train.build import build_run
    from forge_dist.train.cli import option_groups
    from forge_dist.train.launch import engine_factory

    return build_run(parsed, option_groups(), ctx, engine_factory(parsed.values))


def build(argv: Sequence[str], ctx):
    """The Run forge-train would build from ``argv`` on this rank."""
    return build_parsed(parse(argv), ctx)


def fit(argv: Sequence[str], ctx, hook: Optional[Callable] = None):
    """Train as forge-train would on this rank; the TrainResult. ``hook(run)`` may change the built
    run first (a drill's fault injection: see ``in_step``)."""
    from forge_dist.train.rollback import train

    def built(parsed):
        run = build_parsed(parsed, ctx)
        if hook is not None:
            hook(run)
        return run

    return train(built, parse(argv), ctx)[0]


def in_step(call: int, action: Callable) -> Callable:
    """A ``fit`` hook that runs ``action()`` inside the engine's forward-backward call number
    ``call`` (1-based: the middle of iteration ``call - 1`` of a fresh run), before the pass."""
    def hook(run):
        original, calls = run.engine.forward_backward, []

        def forward_backward(micro_batches):
            calls.append(1)
            if len(calls) == call:
                action()
            return original(micro_batches)

        run.engine.forward_backward = forward_backward
    return hook


def train_exit_code(base: Sequence[str], dataset: str, out_dir, *args: str) -> int:
    """forge-train's main in this process on ``dataset`` into ``out_dir``; its exit status (0, or
    the code of the SystemExit a refusal or a stop raised)."""
    from forge_dist.train.cli import main

    try:
        return main(list(base) + ["--dataset", dataset, "--out_dir", str(out_dir), *args])
    except SystemExit as e:
        return e.code


def logged_losses(out_dir) -> dict:
    """{iteration: loss} from out_dir/metrics.jsonl."""
    from forge_dist.train.metrics import read_metrics

    return {r["iter"]: r["loss"] for r in read_metrics(str(out_dir)) if "loss" in r}

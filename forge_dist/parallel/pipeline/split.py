"""Where each layer runs in a pipeline: schedules, the stage split and the stage -> rank placement.

Pure arithmetic (no processes, no model), so forge-train refuses bad input before any process
group exists and tests can check any size.

  stages     S = P x V contiguous blocks of layers (V model chunks per rank); stage 0 also holds
             the token/position embeddings, stage S-1 the final norm, head and loss
  placement  "loop" (gpipe, 1f1b, the interleaved schedules): stage s on pp rank s % P, so rank r
             holds r, r+P, ... (Megatron's virtual pipeline); "v" (zbv, dualpipev): rank r holds
             stages r and 2P-1-r, so the first and the last stage share rank 0
  split      the default minimises the largest stage cost, a stage's cost being the parameters it
             holds (a block's parameters track its flops per token, 2N; the embedding table and
             the head count on the first and the last stage, as Megatron's
             account_for_embedding/loss_in_pipeline_split do with one layer each);
             ``--pipeline_layers 3,4,4,3`` gives the layers of every stage instead
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from forge_dist.errors import ConfigError

# the schedule table and its option checks are configuration: config/parallel.py holds them
from forge_dist.config.parallel import (DEFAULT_SCHEDULE, MULTI, SCHEDULES, check_schedule,  # noqa: E402,F401
                                        chunks_per_rank)


def stage_ranks(schedule: str, pp: int, virtual: int) -> List[int]:
    """Stage index -> pipeline rank."""
    n = pp * virtual
    if SCHEDULES[schedule][1] == "v":
        return [s if s < pp else n - 1 - s for s in range(n)]
    return [s % pp for s in range(n)]


def min_microbatches(schedule: str, pp: int, n_micro: int) -> Optional[str]:
    """Why ``n_micro`` micro-batches are too few (or do not fit) for the schedule, or None."""
    if schedule == "gpipe" or pp == 1:
        return None
    if schedule == "1f1b" and n_micro < pp:
        return f"1f1b needs at least pipeline_parallel_size={pp} micro-batches"
    if schedule in ("zbv", "dualpipev") and n_micro < 2 * pp:
        return f"{schedule} needs at least 2 x pipeline_parallel_size = {2 * pp} micro-batches"
    if schedule.startswith("interleaved"):
        rounds = max(1, n_micro // pp)
        if n_micro % rounds:
            good = [m for m in range(1, 4 * pp + 1) if m % max(1, m // pp) == 0]
            return (f"{schedule} runs micro-batches in rounds of pipeline_parallel_size={pp}: "
                    f"{n_micro} is not a multiple of {rounds} rounds (e.g. {', '.join(map(str, good[:8]))})")
    return None


def parse_layers(spec) -> Optional[List[int]]:
    """--pipeline_layers "3,4,4,3" (or a list) -> [3, 4, 4, 3]; None/"" -> None."""
    if spec is None or spec == "" or spec == []:
        return None
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        layers = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise ConfigError(f"pipeline_layers={spec!r}: give the layers of each stage as integers, e.g. 3,4,4,3") from None
    return layers


def balanced_split(costs: Sequence[float], n_stages: int, first_extra: float = 0.0,
                   last_extra: float = 0.0) -> List[int]:
    """Layers per stage for contiguous stages of at least one layer minimising the largest stage
    cost (dynamic programming over split points; ties go to the earliest split)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, i: int, j: int) -> float:  # stage s holding layers [i, j)
        return prefix[j] - prefix[i] + (first_extra if s == 0 else 0.0) + (last_extra if s == n_stages - 1 else 0.0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]  # best[s][j]: first s stages hold layers [0, j)
    arg = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for j in range(s, n - (n_stages - s) + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], cost(s - 1, i, j))
                if v < best[s][j] - 1e-9 * max(1.0, abs(v)):
                    best[s][j], arg[s][j] = v, i
    sizes, j = [], n
    for s in range(n_stages, 0, -1):
        i = arg[s][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]


@dataclass(frozen=True)
class PipelinePlan:
    """The whole pipeline's layout: ``layers[s]`` is the (start, stop) layer range of stage s and
    ``ranks[s]`` the pipeline rank running it."""

    schedule: str
    pp: int
    virtual: int
    layers: Tuple[Tuple[int, int], ...]
    ranks: Tuple[int, ...]

    @property
    def n_stages(self) -> int:
        return len(self.layers)

    def stages_of(self, pp_rank: int) -> List[int]:
        """The stages this pipeline rank runs, in increasing order."""
        return [s for s, r in enumerate(self.ranks) if r == pp_rank]

    def stage_of_layer(self, layer: int) -> int:
        return next(s for s, (a, b) in enumerate(self.layers) if a <= layer < b)

    def describe(self) -> str:
        return "; ".join(f"stage {s} (rank {r}): layers {a}-{b - 1}" for s, ((a, b), r)
                         in enumerate(zip(self.layers, self.ranks)))


def stage_costs(model_config) -> Tuple[List[float], float, float]:
    """(cost of each layer, embedding cost, head cost) in parameters, from the model built on the
    meta device (no memory). A layer's modules shared with other layers count in each."""
    import torch

    from forge_dist.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(model_config)
    layers = [float(sum(p.numel() for p in block.parameters())) for block in model.transformer.h]
    t = model.transformer
    embed = sum(p.numel() for name in ("wte", "wpe", "scale_up") if name in t for p in t[name].parameters())
    head = model.lm_head.weight.numel() + sum(p.numel() for p in t.ln_f.parameters())
    return layers, float(embed), float(head)


def plan_pipeline(model_config, pp: int, schedule: str = DEFAULT_SCHEDULE, virtual: Optional[int] = None,
                  layers=None, n_microbatches: Optional[int] = None) -> PipelinePlan:
    """The PipelinePlan, or ConfigError naming the option to change."""
    check_schedule(schedule)
    v = chunks_per_rank(schedule, virtual)
    n_stages, n_layer = pp * v, model_config.n_layer
    sizes = parse_layers(layers)
    if n_layer < n_stages:
        raise ConfigError(f"n_layer={n_layer} is fewer than pipeline_parallel_size={pp} x virtual_pipeline_size={v} "
                          f"= {n_stages} stages: every stage needs a layer; use fewer stages or chunks")
    if n_microbatches is not None:
        why = min_microbatches(schedule, pp, n_microbatches)
        if why:
            raise ConfigError(f"gradient_accumulation_steps={n_microbatches} (the micro-batches per step): {why}; "
                              f"raise --gradient_accumulation_steps or pick another --pipeline_schedule")
    if sizes is None:
        costs, embed, head = stage_costs(model_config)
        sizes = balanced_split(costs, n_stages, embed, head)
    elif len(sizes) != n_stages or any(k < 1 for k in sizes) or sum(sizes) != n_layer:
        raise ConfigError(f"pipeline_layers={','.join(map(str, sizes))}: give {n_stages} positive layer counts "
                          f"(pipeline_parallel_size={pp} x virtual_pipeline_size={v} stages) summing to "
                          f"n_layer={n_layer}")
    bounds, start = [], 0
    for k in sizes:
        bounds.append((start, start + k))
        start += k
    return PipelinePlan(schedule, pp, v, tuple(bounds), tuple(stage_ranks(schedule, pp, v)))


def pipeline_plan(parallel_config, model_config, n_microbatches: Optional[int] = None) -> PipelinePlan:
    """The stage split and placement of a ParallelConfig (ConfigError naming the option to change)."""
    return plan_pipeline(model_config, parallel_config.pipeline_parallel_size, parallel_config.pipeline_schedule,
                         parallel_config.virtual_pipeline_size, parallel_config.pipeline_layers, n_microbatches)

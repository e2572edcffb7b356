"""How many micro-batches a pipeline stage keeps in flight: the bytes it holds saved for backward,
counted with saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks).

Every tensor the stage's forward saves is wrapped on the way in; the wrapper is released when the
backward frees that graph, so the live total follows the activations held across the schedule.
The peak divided by one micro-batch's bytes is the number of micro-batches in flight: at most P
on the first stage under 1F1B (its warm-up), all m under GPipe (every forward before any backward).
"""
from __future__ import annotations

import torch


class _Held:
    def __init__(self, t: torch.Tensor, meter: "SavedBytes"):
        self.t, self.meter, self.nbytes = t, meter, t.numel() * t.element_size()
        meter.add(self.nbytes)

    def __del__(self):
        self.meter.add(-self.nbytes)


class SavedBytes:
    """``with meter: ...`` counts the bytes saved for backward inside, live and peak."""

    def __init__(self):
        self.live = self.peak = self.total = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: _Held(t, self), lambda h: h.t)

    def add(self, n: int) -> None:
        self.live += n
        self.total += max(n, 0)
        self.peak = max(self.peak, self.live)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def micro_batches_in_flight(rank: int, world_size: int, schedules=("gpipe", "1f1b"), n_micro: int = 8) -> dict:
    """On every rank of a world of P = world_size pipeline stages: {schedule: peak saved bytes on
    this rank / bytes one micro-batch saves}."""
    import copy

    from forge_dist.config.model_config import ModelConfig
    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.pipeline import build_pipeline
    from forge_dist.parallel.topology import Topology
    from forge_dist.testing.pp_cases import PP_BASE
    from forge_dist.testing.pp_parity import B, _batches

    groups = ProcessGroups.build(Topology(world_size, pp=world_size))
    torch.manual_seed(0)
    base = GPT(ModelConfig(**PP_BASE)).train()
    batches = _batches(base.config, n_micro, 1)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    out = {}
    for schedule in schedules:
        pcfg = ParallelConfig(pipeline_parallel_size=world_size, pipeline_schedule=schedule)
        layout, runner = build_pipeline(copy.deepcopy(base), groups, pcfg, n_micro, "cpu", B)
        with SavedBytes() as meter:
            runner.step(x, y)
        assert meter.live == 0, f"{meter.live} bytes still saved after the step"
        out[schedule] = meter.peak / (meter.total / n_micro)
    return out

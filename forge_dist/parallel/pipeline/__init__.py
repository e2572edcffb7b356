"""Pipeline parallelism for the plain GPT, applied from outside on torch.distributed.pipelining.

    plan = pipeline_plan(parallel_config, model.config, n_microbatches)   # split.py: pure arithmetic
    layout, runner = build_pipeline(model, groups, parallel_config, n_microbatches, device, micro_batch)
    losses = runner.step(x, y)        # schedule.py: torch's schedule over this rank's stages
    ... grads.py: scale once, sum pipeline copies (tied table/head, shared modules), global norm

split.py     schedules, stage split (balanced or --pipeline_layers), stage -> rank placement
stage.py     GPTChunk: one stage's modules under the GPT's own names; logical parameter identity
tensor_rule.py  the TP rule of a GPTChunk (TP and SP inside every stage)
schedule.py  PipelineStage + schedule; evaluation forward
grads.py     gradient steps after the schedule's backward
materialize.py  values for this rank's stages only, from a GPT built on the meta device
"""
from __future__ import annotations


def build_pipeline(model, groups, parallel_config, n_microbatches: int, device, micro_batch_size: int,
                   load=None):
    """Cut ``model`` (the plain GPT, alike on every rank) into this rank's stages, shard them over
    ``groups.tp`` when tensor_parallel_size > 1, and wrap them in the schedule. A model built with
    ``defer_init=True`` gets values for this rank's stages only, after the sharding (drawn, or by
    ``load(chunk)``: materialize.py); the other stages' layers stay on the meta device.
    Returns (StageLayout, PipelineRunner)."""
    from forge_dist.parallel.pipeline import tensor_rule  # noqa: F401  (registers the GPTChunk rule)
    from forge_dist.parallel.pipeline.materialize import has_meta, materialize_stages
    from forge_dist.parallel.pipeline.schedule import PipelineRunner
    from forge_dist.parallel.pipeline.split import pipeline_plan
    from forge_dist.parallel.pipeline.stage import LocalStages, build_stages

    plan = pipeline_plan(parallel_config, model.config, n_microbatches)
    if plan.pp != groups.pp.size:
        raise ValueError(f"pipeline_parallel_size={plan.pp} but the pipeline group has {groups.pp.size} ranks")
    layout = build_stages(model, plan, groups.coord.pp)
    if groups.tp.size > 1:
        from forge_dist.parallel.parallelize import parallelize

        local = LocalStages(model.config, layout)
        before = {s: [n for n, _ in c.named_parameters(remove_duplicate=False)] for s, c in layout.chunks.items()}
        parallelize(local, groups, parallel_config)
        after = {s: [n for n, _ in c.named_parameters(remove_duplicate=False)] for s, c in layout.chunks.items()}
        if after != before:
            raise RuntimeError("parallelize changed a pipeline stage's parameter names")
        from forge_dist.parallel.expert import declare_expert_params

        declare_expert_params(local)  # TP-split experts are new tensors: mark them expert parameters again
    if has_meta(layout):
        materialize_stages(model, layout, groups, load)
        for chunk in layout.chunks.values():
            chunk.to(device)
    sp = bool(parallel_config.sequence_parallel) and groups.tp.size > 1
    return layout, PipelineRunner(layout, groups, n_microbatches, device, micro_batch_size, sp)

"""Training: options, the loop, the engine seam, optimizer and schedules, checkpoints, metrics.

    forge-train [--config FILE] [--OPTION VALUE ...]     (forge_dist.train.cli:main)
    torchrun --nproc_per_node 2 -m forge_dist.train --tensor_parallel_size 2 ...   (or mpirun, srun)

In code: ``resolve_run`` (resolve.py: every value, no process group), ``launch.plan_launch`` (every parallel
check, the engine factory), ``Launch.start()`` (process groups, RunContext), ``build_run(parsed,
groups, ctx, engine_factory, resolved)`` then ``Trainer(run).fit()``. Engines plug in through
``engine_factory(model, train_cfg, values, ctx)`` (see engine.py): LocalEngine, ParallelEngine
(tensor + data parallel, parallel_engine.py) and the DeepSpeed engine (deepspeed_engine.py).
"""

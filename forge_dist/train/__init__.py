"""Training: options, the loop, the engine seam, optimizer and schedules, checkpoints, metrics.

    forge-train [--config FILE] [--OPTION VALUE ...]     (forge_dist.train.cli:main)

In code: ``build_run(parsed_options, groups, ctx, engine_factory)`` then ``Trainer(run).fit()``;
a parallel or DeepSpeed engine plugs in through ``engine_factory`` (see engine.py).
"""

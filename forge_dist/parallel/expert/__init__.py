"""Expert parallelism: MoE experts placed over the expert-parallel group, tokens dispatched by
all-to-all, expert gradients reduced over the expert-data-parallel group.

    apply_expert_parallel(model, groups, parallel_config)   placement.py (before tensor parallelism)
    ExpertParallelExperts                                   dispatch.py (the all-to-all exchange)
    reduce_expert_gradients, grad_norm                      grads.py (experts over expert_dp; dense: DDP)
"""
from forge_dist.parallel.expert.dispatch import ExpertParallelExperts, all_to_all  # noqa: F401
from forge_dist.parallel.expert.placement import (apply_expert_parallel, check_expert_parallel,  # noqa: F401
                                                  declare_expert_params,
                                                  is_expert_param, moe_layers, split_expert_params)

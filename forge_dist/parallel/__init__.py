"""Parallelism: topology and process groups, tensor/sequence parallelism applied from outside.

    topo = Topology(world_size, tp=2)                 # pure coordinates
    groups = ProcessGroups.build(topo)                # once, after init_distributed
    parallelize(model, groups, parallel_config)       # forge_dist.parallel.parallelize
    ... loss.backward(); tp_grad_sync(model, groups)  # forge_dist.parallel.tensor.metadata
"""
from forge_dist.parallel.groups import ProcessGroups, RankGroup  # noqa: F401
from forge_dist.parallel.topology import Topology  # noqa: F401

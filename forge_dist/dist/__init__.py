"""Process-group initialisation from torchrun / deepspeed / mpirun / SLURM environments."""
from forge_dist.dist.env import LaunchEnv, detect_launch_env, expand_nodelist  # noqa: F401
from forge_dist.dist.init import DistContext, init_distributed  # noqa: F401

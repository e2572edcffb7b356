"""The single-device model family. Importing this package registers every variant."""
from forge_dist.model import activation, attention, init, kan, linear, mlp, norm, softmax  # noqa: F401
from forge_dist.model import moe, quantize  # noqa: F401
from forge_dist.model import sharing, steering  # noqa: F401

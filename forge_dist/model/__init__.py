"""The single-device model family. Importing this package registers every variant."""
from forge_dist.model import activation, attention, init, linear, mlp, norm, softmax  # noqa: F401

"""The one switch between fused kernels (csrc/) and the pure-PyTorch references.

Model modules call the functions here, never a kernel directly, so every parity test runs with
and without the kernels (FORGE_OPS=reference forces the references).
"""
from forge_dist.ops.reference.norms import (  # noqa: F401
    hypersphere_norm, k_rms_norm, layer_norm, partial_rms_norm, rms, rms_norm,
)

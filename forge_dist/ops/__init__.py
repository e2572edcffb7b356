"""The one switch between fused kernels (csrc/) and the pure-PyTorch references.

Model modules call the functions here, never a kernel directly, so every parity test runs with
and without the kernels. Each function uses its kernel when the library is loaded (prebuilt, or
built just in time on first use: forge_dist.ops.builder) and has an implementation for the input's
device and dtype, else the reference in forge_dist.ops.reference, which defines the numerics.
FORGE_OPS=reference forces the references everywhere; ``forge-ops-report`` says what is used.
"""
from forge_dist.ops.norms import (  # noqa: F401
    add_rms_norm, hypersphere_norm, k_rms_norm, layer_norm, partial_rms_norm, rms, rms_norm,
)
from forge_dist.ops.quant import fake_quantize, int8_linear  # noqa: F401
from forge_dist.ops.scores import (  # noqa: F401
    consmax, exppolymax, polymax, relu2max, relumax, saturating_consmax, sigmoidmax, sigsoftmax, softermax,
    softmax, softplus, squareplus, strongermax, vpolymax,
)

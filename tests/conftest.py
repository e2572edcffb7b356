"""Test-wide settings: CPU only, loopback networking for every launcher, one thread per worker."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
os.environ.setdefault("OMPI_MCA_oob_tcp_if_include", "lo")
os.environ.setdefault("OMPI_MCA_btl_tcp_if_include", "lo")
os.environ.setdefault("OMPI_MCA_btl", "self,vader,tcp")
_EXTENSIONS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".torch_extensions"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", _EXTENSIONS)  # install.sh --test builds DeepSpeed's ops there

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Without a GPU, Triton kernels (forge_dist/ops/triton_kernels.py) run through Triton's CPU interpreter;
# it must be on before anything imports triton (torch._dynamo does), so it is set here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny_config():
    """A model small enough for a forward+backward in milliseconds."""
    from forge_dist import ModelConfig

    return ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64)

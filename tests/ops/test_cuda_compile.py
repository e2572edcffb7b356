"""The CUDA kernels compile with nvcc wherever it is installed, even without a GPU or a CUDA torch:
their device code (csrc/cuda/*.cu) needs neither torch nor its CUDA headers (the torch binding is
csrc/cuda/binding.cpp). Compile only; running them is bench/gpu_check.sh's job on a GPU."""
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC = shutil.which("nvcc")
# the flags torch.utils.cpp_extension gives nvcc, so the kernels compile here as they will there
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
ARCHS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]  # A100, H100/H200
THREADS = ["--threads", "2"]  # the two architectures compiled side by side (the suite runs one test at a time)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (compile-only check)")]


@pytest.mark.parametrize("source", sorted(p.name for p in (CSRC / "cuda").glob("*.cu")))
def test_nvcc_compiles(source, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-O3", "-Werror", "all-warnings", *TORCH_NVCC_FLAGS, *ARCHS, *THREADS,
           f"-I{CSRC / 'include'}", str(CSRC / "cuda" / source), "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "k.o").stat().st_size > 0

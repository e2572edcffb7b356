#!/usr/bin/env bash
# Installs forge_dist for CPU work on a fresh Debian/Ubuntu machine: OpenMPI, SLURM and libaio from apt, a .venv
# with the pinned CPU torch and the project's requirements, then the package itself (editable).
# GPU users: see README ("Installing on a GPU machine").
set -euo pipefail
cd "$(dirname "$0")"

# OpenMPI (mpirun, mpi4py), SLURM with munge (tools/local_slurm.sh runs a one-node cluster for
# the sbatch/srun path and its tests): only what is missing.
apt_packages=()
command -v mpirun >/dev/null 2>&1 || apt_packages+=(openmpi-bin libopenmpi-dev)
command -v slurmd >/dev/null 2>&1 || apt_packages+=(slurm-wlm)
# libaio: DeepSpeed's async_io op (NVMe offload), JIT-built on first use
[ -f /usr/include/libaio.h ] || apt_packages+=(libaio-dev)
if [ "${#apt_packages[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
pip install -q torch==2.13.0                      # first, so nothing else can pull a CUDA build
DS_BUILD_OPS=0 pip install -q -r requirements-cpu.txt
pip install -q --no-build-isolation -e .
if [ "${1:-}" = "--test" ]; then
  # the DeepSpeed CPU ops the tests load, built once here rather than inside a test (tests/conftest.py
  # points TORCH_EXTENSIONS_DIR at the same .torch_extensions/)
  TORCH_EXTENSIONS_DIR="$(pwd)/.torch_extensions" DS_ACCELERATOR=cpu python tools/build_deepspeed_ops.py
fi
echo "forge_dist installed in $(pwd)/.venv"

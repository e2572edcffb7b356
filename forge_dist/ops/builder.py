"""Builds csrc/ into one shared library that registers the ``forge_ops`` operators.

Three ways to get it, tried in this order by forge_dist.ops.registry:
  prebuilt  ``FORGE_BUILD_OPS=1 pip install --no-build-isolation -e .`` compiled it into the package
            (``aot_extensions`` below, called by setup.py);
  JIT       compiled on first use into a versioned cache, ``<cache>/<key>/``, where the key hashes the
            torch and CUDA versions, the sources, the flags and the machine (CPU model, GPU
            architectures), so a source edit or another torch gets a fresh build and old ones stay
            valid. One process per node builds under a file lock; the other local ranks wait for it and
            load the result. A failed build is recorded there too, so they do not each retry it;
  neither   the op falls back to its reference (the registry says why, once).

CUDA sources are compiled only where torch itself was built with CUDA and nvcc is found.
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # forge_dist/
CSRC = PACKAGE_DIR.parent / "csrc"
LIB_NAME = "forge_ops"
PREBUILT_MODULE = "forge_dist._forge_ops"
KEY_MARKER = re.compile(rb"FORGE_OPS_KEY:([0-9a-zA-Z_.+-]+);")


class BuildError(RuntimeError):
    """The kernels cannot be built or loaded here; the message says why."""


# --- what is built ---------------------------------------------------------------------------------
def cuda_toolkit() -> Optional[str]:
    """CUDA_HOME when torch was built with CUDA and a toolkit is installed, else None (CPU torch
    never sets it: torch.utils.cpp_extension cannot build CUDA code against it)."""
    import torch

    if torch.version.cuda is None:
        return None
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def sources(with_cuda: bool) -> List[Path]:
    if not (CSRC / "ops.cpp").is_file():
        raise BuildError(f"the C++ sources are not installed ({CSRC} is missing): install from a source checkout")
    files = [CSRC / "ops.cpp", *sorted((CSRC / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += [*sorted((CSRC / "cuda").glob("*.cu")), *sorted((CSRC / "cuda").glob("*.cpp"))]
    return files


def _headers() -> List[Path]:
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh"))


def cpu_arch_flags(native: bool) -> List[str]:
    """``-march=native`` for a build on the machine that runs it (JIT); the portable default ISA for
    a prebuilt library unless FORGE_OPS_CPU_ARCH names one (e.g. ``native`` or ``x86-64-v3``)."""
    arch = os.environ.get("FORGE_OPS_CPU_ARCH", "native" if native else "")
    return [f"-march={arch}"] if arch else []


def compile_flags(native: bool, key: str) -> Tuple[List[str], List[str], List[str]]:
    """(C++ flags, nvcc flags, link flags)."""
    include = f"-I{CSRC / 'include'}"
    # no FP traps are ever enabled and errno is never read: these let GCC vectorise branch-free
    # selects and sqrt (with errno, sqrtf is a checked call in every loop that uses it)
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", include, f"-DFORGE_OPS_KEY={key}",
           *cpu_arch_flags(native)]
    nvcc = ["-O3", include, "-lineinfo"]
    return cxx, nvcc, ["-fopenmp"]


def machine_id(with_cuda: bool) -> str:
    """CPU model (and GPU architectures): a JIT build with -march=native is only valid on such a machine."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = re.search(r"model name\s*:\s*(.*)", info)
        flags = re.search(r"flags\s*:\s*(.*)", info)
        cpu += (model.group(1) if model else "") + (flags.group(1) if flags else "")
    except OSError:
        cpu += platform.processor()
    if with_cuda:
        import torch

        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or ",".join(
            f"{a}.{b}" for a, b in sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))
        cpu += f"|cuda:{archs}"
    return cpu


def source_hash(with_cuda: bool) -> str:
    h = hashlib.sha256()
    for p in sources(with_cuda) + _headers():
        h.update(str(p.relative_to(CSRC)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def build_key(with_cuda: bool, jit: bool = True) -> str:
    """16 hex digits naming one build: torch, CUDA, Python, sources, and for a JIT build also the
    flags and the machine (a prebuilt library is portable: only the architecture counts)."""
    import torch

    parts = [torch.__version__, str(torch.version.cuda), sys.version.split()[0], source_hash(with_cuda)]
    parts += [" ".join(cpu_arch_flags(True)), machine_id(with_cuda)] if jit else [platform.machine()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# --- the versioned cache ---------------------------------------------------------------------------
def cache_root() -> Path:
    """FORGE_OPS_CACHE; else TORCH_EXTENSIONS_DIR/forge_ops; else .torch_extensions/ of the source
    checkout (ignored by git); else ~/.cache/forge_dist/ops."""
    if os.environ.get("FORGE_OPS_CACHE"):
        return Path(os.environ["FORGE_OPS_CACHE"]).resolve()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).resolve() / LIB_NAME
    if (PACKAGE_DIR.parent / "setup.py").is_file():
        return PACKAGE_DIR.parent / ".torch_extensions" / LIB_NAME
    return Path.home() / ".cache" / "forge_dist" / "ops"


def build_once(build_dir: Path, build_fn: Callable[[Path], Path], log: Callable[[str], None] = print,
               timeout_s: float = 1800.0) -> Path:
    """The library in ``build_dir``, built by ``build_fn(build_dir) -> path`` by exactly one process.

    ``build_dir/BUILT`` holds the path of a finished build and ``build_dir/FAILED`` the error of a
    failed one; both are written under ``build_dir.lock``, so a process that waited on the lock finds
    the other's result instead of building again. FORGE_OPS_REBUILD=1 discards a recorded failure.
    """
    from filelock import FileLock, Timeout

    build_dir.mkdir(parents=True, exist_ok=True)
    built, failed = build_dir / "BUILT", build_dir / "FAILED"

    def recorded() -> Optional[Path]:
        if built.is_file():
            path = Path(built.read_text().strip())
            if path.is_file():
                return path
        if failed.is_file() and os.environ.get("FORGE_OPS_REBUILD") != "1":
            raise BuildError(f"an earlier build failed (FORGE_OPS_REBUILD=1 retries): {failed.read_text().strip()}")
        return None

    path = recorded()
    if path is not None:
        return path
    lock = FileLock(str(build_dir) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"forge_ops: another process is building {build_dir.name}; waiting")
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            raise BuildError(f"gave up after {timeout_s:.0f} s waiting for the build lock {lock.lock_file}") from None
    try:
        path = recorded()
        if path is not None:
            return path
        failed.unlink(missing_ok=True)
        start = time.perf_counter()
        try:
            path = build_fn(build_dir)
        except Exception as e:  # noqa: BLE001 - any compiler failure becomes a recorded fallback
            cause = f" ({e.__cause__})" if e.__cause__ is not None else ""
            message = f"{type(e).__name__}: {_first_error(str(e))}{cause}"
            failed.write_text(message + "\n")
            raise BuildError(message) from e
        tmp = built.with_suffix(".tmp")
        tmp.write_text(str(path) + "\n")
        tmp.replace(built)  # atomic: a reader sees no file or the whole path
        log(f"forge_ops: built {path.name} in {time.perf_counter() - start:.0f} s")
        return path
    finally:
        lock.release()


def _first_error(text: str) -> str:
    """The first compiler error line of a build log (the last line says only that ninja stopped)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    diagnostics = [ln for ln in lines if "error:" in ln]  # gcc / nvcc / ld: "<where>: error: <what>"
    return (diagnostics or lines or [""])[0][:400]


def jit_build(with_cuda: bool, log: Callable[[str], None] = print) -> Tuple[Path, str]:
    """(path of the built library, key), compiling it if this machine has no build of these sources."""
    key = build_key(with_cuda)
    cxx, nvcc, ld = compile_flags(native=True, key=key)
    srcs = [str(p) for p in sources(with_cuda)]

    def compile_into(build_dir: Path) -> Path:
        from torch.utils.cpp_extension import load

        name = f"{LIB_NAME}_{key}"
        log(f"forge_ops: compiling {len(srcs)} sources ({'CPU + CUDA' if with_cuda else 'CPU'}) into {build_dir}")
        load(name=name, sources=srcs, extra_cflags=cxx, extra_cuda_cflags=nvcc, extra_ldflags=ld,
             build_directory=str(build_dir), with_cuda=with_cuda, is_python_module=False, verbose=False)
        return build_dir / f"{name}.so"

    return build_once(cache_root() / key, compile_into, log), key


# --- prebuilt (ahead of time) ----------------------------------------------------------------------
def library_key(path: Path) -> Optional[str]:
    """The build key compiled into a library (csrc/ops.cpp forge_ops_key_marker), read without loading it."""
    found = KEY_MARKER.search(Path(path).read_bytes())
    return found.group(1).decode() if found else None


def find_prebuilt() -> Tuple[Optional[Path], str]:
    """(path, "") of an installed library built from these sources for this torch, else (None, why)."""
    import importlib.util

    spec = importlib.util.find_spec(PREBUILT_MODULE)
    if spec is None or spec.origin is None:
        return None, "not prebuilt (FORGE_BUILD_OPS=1 pip install --no-build-isolation -e . builds it)"
    path = Path(spec.origin)
    have = library_key(path)
    try:
        want = {build_key(False, jit=False), build_key(True, jit=False)}
    except BuildError:  # sources not shipped with the package: nothing to compare against
        return path, ""
    if have not in want:
        return None, f"the prebuilt library {path.name} is stale (built from other sources or another torch)"
    return path, ""


def aot_extensions():
    """(ext_modules, cmdclass) for setup.py: one extension, CUDA sources included where possible."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = cuda_toolkit() is not None
    key = build_key(with_cuda, jit=False)
    cxx, nvcc, ld = compile_flags(native=False, key=key)
    srcs = [str(p.relative_to(PACKAGE_DIR.parent)) for p in sources(with_cuda)]
    if with_cuda:
        ext = CUDAExtension(PREBUILT_MODULE, srcs, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=ld)
    else:
        ext = CppExtension(PREBUILT_MODULE, srcs, extra_compile_args={"cxx": cxx}, extra_link_args=ld)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}

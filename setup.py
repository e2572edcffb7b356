"""forge_dist installs with no compiler step.

`FORGE_BUILD_OPS=1 pip install --no-build-isolation -e .` also builds the fused kernels in csrc/
ahead of time (see forge_dist/ops/builder.py); without it they are built just in time on first
use, or the pure-PyTorch references are used.
"""
import os

from setuptools import find_namespace_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("FORGE_BUILD_OPS", "0") == "1":
    from forge_dist.ops.builder import aot_extensions  # needs torch in the build environment

    ext_modules, cmdclass = aot_extensions()

setup(
    name="forge_dist",
    version="0.1.0",
    description="Distributed scaling (TP/PP/EP, ZeRO, fused kernels) for the ReaLLM-Forge GPT family",
    python_requires=">=3.10",
    # namespace packages too, so data folders (data/corpus) are packages and setuptools stays quiet
    packages=find_namespace_packages(include=["forge_dist", "forge_dist.*"], exclude=["*.__pycache__"]),
    package_data={"forge_dist": ["data/corpus/*.txt", "presets/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",  # pin torch==2.13.0 via requirements-cpu.txt on CPU machines
        "numpy",
        "safetensors",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "data": ["sentencepiece", "pyarrow"],
        "deepspeed": ["deepspeed>=0.19.8,<0.20"],  # the engine uses internals: train/deepspeed_internals.py checks them
        "mpi": ["mpi4py"],
        "logging": ["tensorboard", "matplotlib"],
        "hf": ["transformers>=5.23,<6"],  # only for loading exports in transformers; import/export need none
        "test": ["pytest", "pytest-timeout"],
        # the fused attention's GPU kernels (forge_dist/ops/triton_kernels.py); CUDA torch wheels bring
        # their own matching triton; on CPU its interpreter runs the kernels' tests
        "triton": ["triton>=3.9,<3.10"],
    },
    entry_points={
        "console_scripts": [
            "forge-train=forge_dist.train.cli:main",
            "forge-preflight=forge_dist.train.preflight:main",
            "forge-sample=forge_dist.inference.sample:main",
            "forge-eval=forge_dist.inference.evaluate:main",
            "forge-prepare=forge_dist.data.prepare:main",
            "forge-convert=forge_dist.io.convert:main",
            "forge-quant-export=forge_dist.io.quant_export:main",
            "forge-ops-report=forge_dist.ops.report:main",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

"""Builds the native kernels: plain C (no Python or PyTorch headers), loaded with ctypes at run time.
CPU features are chosen at run time, so one build runs on any x86-64 (and the portable path elsewhere)."""

import sys

from setuptools import Extension, setup

openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
setup(ext_modules=[Extension(
    "pocketquant.runtime._kernels",
    sources=[f"src/pocketquant/runtime/{name}.c" for name in ("kernels", "gemm", "gemm_x86", "attention")],
    depends=["src/pocketquant/runtime/kernels.h"],
    # no contraction into FMAs the code does not write: every kernel path performs the same float operations
    extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", *openmp], extra_link_args=openmp,
    libraries=["m"])])

"""Builds the native kernels: plain C (no Python or PyTorch headers), loaded with ctypes at run time.
CPU features are chosen at run time, so one build runs on any x86-64 (and the portable path elsewhere)."""

import sys

from setuptools import Extension, setup

openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
setup(ext_modules=[Extension(
    "pocketquant.runtime._kernels", sources=["src/pocketquant/runtime/kernels.c"],
    extra_compile_args=["-O3", "-std=c11", *openmp], extra_link_args=openmp)])

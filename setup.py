"""Builds the native kernels: plain C (no Python or PyTorch headers), loaded with ctypes at run time.
CPU features are chosen at run time, so one build runs on any x86-64 or AArch64 CPU (and the portable path
elsewhere). Where they cannot be built (no C compiler), the install still succeeds and pocketquant runs on its
reference runtime, saying so once."""

import glob
import sys

from setuptools import Extension, setup

openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
setup(ext_modules=[Extension(
    "pocketquant.runtime._kernels",
    sources=sorted(glob.glob("src/pocketquant/runtime/*.c")),
    depends=sorted(glob.glob("src/pocketquant/runtime/*.h")),
    # no contraction into FMAs the code does not write: every kernel path performs the same float operations
    extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", *openmp], extra_link_args=openmp,
    libraries=["m"], optional=True)])

"""The Arm kernels, cross-compiled for aarch64 and run under qemu-user, against this (x86) build bit for bit:
activation quantization and the int4 / int8 linear layers on odd shapes, on every Arm path each emulated CPU
runs (cortex-a53: ARMv8.0, no dot product instructions; neoverse-n1: dotprod; max: everything qemu knows).
Needs Debian's gcc-aarch64-linux-gnu and qemu-user; skipped with the reason when they are missing. Also: the
optional extension is built wherever a compiler is."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketquant.layers import QuantLinear
from pocketquant.runtime import kernels
from pocketquant.runtime.engine import FastLinear, SharedActivations
from pocketquant.scheme import ActSpec, LinearSpec, WeightSpec

GCC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
needs_cross_tools = pytest.mark.skipif(not (GCC and QEMU and kernels.available()),
                                       reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt install "
                                              "gcc-aarch64-linux-gnu qemu-user) and this build's kernels")
SOURCES = Path(kernels.__file__).parent
# (CPU, the Arm paths it must run, the paths it must refuse)
CPUS = [("cortex-a53", ["neon", "portable"], ["dotprod"]), ("neoverse-n1", ["dotprod", "neon", "portable"], []),
        ("max", ["dotprod", "neon", "portable"], [])]
G = torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    out = tmp_path_factory.mktemp("arm") / "driver"
    subprocess.run([GCC, "-O2", "-std=gnu11", "-ffp-contract=off", "-fopenmp", "-static",
                    str(Path(__file__).parent / "arm" / "driver.c"),
                    *map(str, sorted(SOURCES.glob("*.c"))),
                    "-o", str(out), "-lm"], check=True, capture_output=True)
    return out


def _bytes(*tensors) -> bytes:
    return b"".join(t.contiguous().numpy().tobytes() for t in tensors)


def _cases():
    """(input bytes, this build's output bytes) for every case."""
    cases = []
    for M, K in [(1, 64), (3, 100), (7, 576), (2, 4)]:
        x = torch.randn(M, K, generator=G) * torch.logspace(-3, 3, M)[:, None] + 0.2
        x[0, : K // 2] = 0
        qa, scale, zp = kernels.quantize_rows(x)
        cases.append((_bytes(torch.tensor([0, M, K, 0, 0]), x), _bytes(qa, scale, zp)))
    shapes = [(bits, K, N, M) for bits in (4, 8) for K, N in ((32, 17), (576, 53), (2048, 37), (8192, 37))
              for M in (1, 7, 8, 9)] + [(4, 576, 33, 64), (8, 576, 33, 64), (4, 96, 19, 513)]
    for bits, K, N, M in shapes:
        spec = LinearSpec(WeightSpec(bits, 32 if bits == 4 else 0), ActSpec())
        f = FastLinear(QuantLinear.from_float(torch.randn(N, K, generator=G) * 0.05, spec), SharedActivations())
        x = torch.randn(M, K, generator=G)
        x[min(3, M - 1)] *= 1000  # one token of a very different scale
        acts = kernels.quantize_rows(x)
        head = torch.tensor([bits, M, K, N, f.group if bits == 4 else 0])
        if bits == 4:
            y = kernels.linear_w4(acts, f.packed, f.scales, f.rowcorr, f.group, N, 2)
            cases.append((_bytes(head, *acts, f.packed, f.scales, f.rowcorr), _bytes(y)))
        else:
            y = kernels.linear_w8(acts, f.packed, f.scales, f.wsum, N, 2)
            cases.append((_bytes(head, *acts, f.packed, f.scales, f.wsum), _bytes(y)))
    return cases


def test_the_kernels_are_built_wherever_a_compiler_is():
    """The extension is optional (an install without a C compiler still works, on the reference runtime), so a
    build that fails must not pass unnoticed as a suite of skipped kernel tests."""
    if shutil.which("gcc") or shutil.which("cc"):
        assert kernels.available()


@needs_cross_tools
@pytest.mark.parametrize("cpu, runs, refuses", CPUS)
def test_every_arm_path_gives_this_builds_bits(driver, cpu, runs, refuses):
    cases = _cases()
    given = b"".join(c for c, _ in cases)
    for path in refuses:
        run = subprocess.run([QEMU, "-cpu", cpu, str(driver), path], input=b"", capture_output=True)
        assert run.returncode == 3, f"{cpu} should not run {path}"
    for path in runs:
        run = subprocess.run([QEMU, "-cpu", cpu, str(driver), path], input=given, capture_output=True, timeout=600)
        assert run.returncode == 0, run.stderr.decode()
        out, at = run.stdout, 0
        for i, (_, want) in enumerate(cases):
            got = out[at:at + len(want)]
            at += len(want)
            if got != want:
                diff = np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8)
                pytest.fail(f"{cpu}/{path}: case {i} differs in {int(diff.sum())} of {len(want)} bytes")
        assert at == len(out)

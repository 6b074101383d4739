"""Instructions each kernel path executes per token per block of 16 rows x 32 inputs (512 multiply-adds), counted
under qemu-user: the Arm paths on `qemu-aarch64 -cpu max`, and the x86 paths qemu runs (AVX2, portable) on
`qemu-x86_64 -cpu max`. qemu says nothing about time; this is the cost model in place of an Arm machine.

    python benchmarks/arm_instruction_counts.py            # needs gcc, gcc-aarch64-linux-gnu, qemu-user

It builds tests/arm/driver.c with the kernels (-O3, as the package is built), feeds it one int4 and one int8
layer (K = 4096, 16 rows for Arm, 256 for x86) at 1, 4 and 8 tokens, logs every translated block and every
execution of one (`-d in_asm,exec,nochain`), and counts the instructions inside the path's micro-kernel.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from pocketquant.layers import QuantLinear
from pocketquant.runtime import kernels
from pocketquant.runtime.engine import FastLinear, SharedActivations
from pocketquant.scheme import ActSpec, LinearSpec, WeightSpec

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "src/pocketquant/runtime").glob("*.c"))
K = 4096
TARGETS = {"arm": ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-nm", "qemu-aarch64", 16,
                   ["portable", "neon", "dotprod", "i8mm"]),
           "x86": ("gcc", "nm", "qemu-x86_64", 256, ["portable", "avx2"])}


def case(bits: int, M: int, N: int) -> bytes:
    """One linear layer's input to the driver (its format is at the top of tests/arm/driver.c)."""
    g = torch.Generator().manual_seed(0)
    spec = LinearSpec(WeightSpec(bits, 32 if bits == 4 else 0), ActSpec())
    f = FastLinear(QuantLinear.from_float(torch.randn(N, K, generator=g) * 0.05, spec), SharedActivations())
    acts = kernels.quantize_rows(torch.randn(M, K, generator=g))
    head = torch.tensor([bits, M, K, N, f.group if bits == 4 else 0])
    tail = [f.packed, f.scales, f.rowcorr] if bits == 4 else [f.packed, f.scales, f.wsum]
    return b"".join(t.contiguous().numpy().tobytes() for t in [head, *acts, *tail])


def executed(qemu: str, driver: Path, path: str, given: bytes, ranges, log: Path) -> int:
    """Instructions executed inside `ranges` of the driver's addresses."""
    subprocess.run([qemu, "-cpu", "max", "-d", "in_asm,exec,nochain", "-D", str(log), str(driver), path],
                   input=given, stdout=subprocess.DEVNULL, check=True, env={**os.environ, "PQ_THREADS": "1"})
    blocks, start, runs = {}, None, collections.Counter()
    for line in log.open(errors="replace"):
        if line.startswith("IN:"):
            start = None
        elif m := re.match(r"0x([0-9a-f]+):\s", line):
            address = int(m.group(1), 16)
            start = address if start is None else start
            blocks.setdefault(start, []).append(address)
        elif m := re.search(r"Trace \d+: 0x[0-9a-f]+ \[[0-9a-f]+/([0-9a-f]+)/", line):
            runs[int(m.group(1), 16)] += 1
    return sum(n * sum(any(lo <= a < hi for lo, hi in ranges) for a in blocks.get(s, [])) for s, n in runs.items())


def main():
    tmp = Path(tempfile.mkdtemp())
    for target, (cc, nm, qemu, N, paths) in TARGETS.items():
        driver = tmp / f"driver-{target}"
        subprocess.run([cc, "-O3", "-std=gnu11", "-ffp-contract=off", "-fopenmp", "-static",
                        str(ROOT / "tests/arm/driver.c"), *map(str, SOURCES), "-o", str(driver), "-lm"],
                       check=True, capture_output=True)
        symbols = [line.split() for line in subprocess.run([nm, "-S", str(driver)], capture_output=True,
                                                             text=True).stdout.splitlines()]
        for bits in (4, 8):
            for M in (1, 4, 8):
                given, row = case(bits, M, N), []
                for path in paths:
                    # one token on i8mm runs udot's kernel (a pair would waste half of each usmmla)
                    name = f"w{bits}_{'dotprod' if path == 'i8mm' and M == 1 else path}"
                    ranges = [(int(s[0], 16), int(s[0], 16) + int(s[1], 16)) for s in symbols
                              if len(s) == 4 and (s[3] == name or s[3].startswith(name + "."))]
                    n = executed(qemu, driver, path, given, ranges, tmp / "qemu.log")
                    row.append(f"{path} {n / (N // 16 * K // 32 * M):.0f}")
                print(f"{target} int{bits} x int8, {M} token(s): " + ", ".join(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())

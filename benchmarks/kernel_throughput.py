"""The int4 GEMM's own throughput on a Llama 3.2 1B prefill: every block linear of all 16 layers (distinct
weights, so nothing stays in the caches between layers), 512 tokens, 2 threads. Prints GOP/s (one
multiply-add = 2 operations) for the kernel path in use; POCKETQUANT_KERNELS picks another.

    python benchmarks/kernel_throughput.py [tokens] [threads]
"""

import sys
import time

import torch

from pocketquant.layers import QuantLinear
from pocketquant.runtime import kernels
from pocketquant.runtime.engine import FastLinear, SharedActivations
from pocketquant.scheme import ActSpec, LinearSpec, WeightSpec

DIM, FFN, KV, LAYERS = 2048, 8192, 512, 16
SHAPES = [(DIM, DIM), (KV, DIM), (KV, DIM), (DIM, DIM), (FFN, DIM), (FFN, DIM), (DIM, FFN)]  # (out, in)


def main(tokens: int = 512, threads: int = 2):
    torch.set_num_threads(threads)
    spec = LinearSpec(WeightSpec(4, 32), ActSpec())
    g = torch.Generator().manual_seed(0)
    layers = [[FastLinear(QuantLinear.from_float(torch.randn(n, k, generator=g) * 0.05, spec), SharedActivations())
               for n, k in SHAPES] for _ in range(LAYERS)]
    acts = {k: kernels.quantize_rows(torch.randn(tokens, k, generator=g)) for k in (DIM, FFN)}

    def run():
        for layer in layers:
            for f in layer:
                kernels.linear_w4(acts[f.in_features], f.packed, f.scales, f.rowcorr, f.group, f.out_features,
                                  threads)

    run()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    ops = 2 * tokens * LAYERS * sum(n * k for n, k in SHAPES)
    best = min(times)
    print(f"{kernels.path()}, {threads} threads, {tokens} tokens: block linears of the 1B shape in {best:.2f} s "
          f"(best of 3) = {ops / best / 1e9:.0f} GOP/s; {tokens / best:.1f} tok/s if nothing else ran")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))

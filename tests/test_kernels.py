"""Native kernels against the reference numerics, on every code path this CPU can run."""

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocketquant.hadamard import hadamard_transform
from pocketquant.layers import QuantLinear
from pocketquant.numerics import quantize_per_token
from pocketquant.runtime import kernels
from pocketquant.runtime.engine import FastLinear, SharedActivations
from pocketquant.scheme import ActSpec, LinearSpec, WeightSpec

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels not built")
PATHS = kernels.supported() if kernels.available() else []
G = torch.Generator().manual_seed(0)


@pytest.fixture(params=PATHS)
def path(request):
    kernels.select(request.param)
    yield request.param
    kernels.select(None)


@pytest.mark.parametrize("M, K", [(1, 64), (3, 100), (7, 576), (2, 1)])
def test_activation_quantization_is_bit_exact(M, K):
    x = torch.randn(M, K, generator=G) * torch.logspace(-3, 3, M)[:, None] + 0.2
    x[0, : K // 2] = 0
    qa, scale, zp = kernels.quantize_rows(x)
    q, s, z = quantize_per_token(x)
    assert torch.equal(qa.int() - 128, q.int()) and torch.equal(scale, s[:, 0]) and torch.equal(zp.float(), z[:, 0])


SHAPES = [(1, 64, 8, 32), (1, 576, 192, 32), (5, 1536, 576, 32), (9, 96, 17, 32), (4, 160, 33, 32),
          (3, 256, 40, 128), (2, 192, 24, 64), (19, 576, 9, 32), (8, 2048, 16, 32), (1, 32, 5, 32)]


def _fast(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return FastLinear(q, SharedActivations())(x)


@pytest.mark.parametrize("M, K, N, group", SHAPES)
def test_int4_linear_matches_reference(path, M, K, N, group):
    q = QuantLinear.from_float(torch.randn(N, K, generator=G) * 0.05, LinearSpec(WeightSpec(4, group), ActSpec()))
    x = torch.randn(M, K, generator=G)
    ref, out = q(x), _fast(q, x)
    torch.testing.assert_close(out, ref, atol=3e-6 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("M, K, N", [(1, 576, 100), (6, 64, 7), (3, 96, 1000), (9, 32, 17), (2, 36, 17), (3, 20, 5),
                                     (1, 52, 9)])  # K a multiple of 4 but not of 16
def test_int8_linear_matches_reference(path, M, K, N):
    q = QuantLinear.from_float(torch.randn(N, K, generator=G), LinearSpec(WeightSpec(8, 0), ActSpec()))
    x = torch.randn(M, K, generator=G)
    ref, out = q(x), _fast(q, x)
    torch.testing.assert_close(out, ref, atol=3e-6 * ref.abs().max().item(), rtol=0)


TOKENS = [1, 7, 8, 9, 64, 513]


def _same_bits_on_every_path(paths: list[str], bits: int, K: int, N: int, tokens: list[int]):
    spec = LinearSpec(WeightSpec(bits, 32 if bits == 4 else 0), ActSpec())
    q = QuantLinear.from_float(torch.randn(N, K, generator=G) * 0.05, spec)
    x = torch.randn(max(tokens), K, generator=G)
    x[min(3, len(x) - 1)] *= 1000  # one token of a very different scale
    f, outs = FastLinear(q, SharedActivations()), {}  # one packed layout serves every path
    for p in paths:
        kernels.select(p)
        try:
            outs[p] = [f(x[:m]) for m in tokens]
        finally:
            kernels.select(None)
    first = outs[paths[0]]
    for p in paths[1:]:
        for m, a, b in zip(tokens, first, outs[p]):
            assert torch.equal(a, b), f"{paths[0]} and {p} differ with {m} tokens"
    ref = q(x)
    torch.testing.assert_close(first[-1], ref, atol=3e-6 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("K", [32, 576, 2048, 8192])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_path_gives_the_same_bits(bits, K):
    """Every path performs the same float operations in the same order (kernels.h), so on the same
    inputs they agree bit for bit, whatever the token count (tiles and their remainders) or row count
    (a partial last panel)."""
    _same_bits_on_every_path(PATHS, bits, K, 37 if K > 2048 else 53, TOKENS)


SIMDE = Path("/usr/include/simde/x86/avx512.h")


@pytest.mark.skipif(not SIMDE.exists() or not shutil.which("gcc") or "avx2" not in PATHS,
                    reason="needs gcc, SIMDe (apt libsimde-dev) and an AVX2 CPU")
def test_paths_this_cpu_lacks_give_the_same_bits_emulated(tmp_path, monkeypatch):
    """The x86 kernels built on SIMDe's intrinsics run on an AVX2 CPU whatever else it has, so the AVX-512
    path is checked on an AVX2-only machine too (with the CPU's own FMA: SIMDe's fallback is unfused)."""
    src = Path(kernels.__file__).parent
    out = tmp_path / "emulated.so"
    subprocess.run(["gcc", "-O1", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off",
                    "-fopenmp", "-DPQ_EMULATE",
                    *map(str, sorted(src.glob("*.c"))), "-o", str(out), "-lm"],
                   check=True)
    monkeypatch.setattr(kernels, "_lib", kernels._bind(ctypes.CDLL(str(out))))
    assert kernels.supported() == kernels.paths() == ["avx512", "avxvnni", "avx2", "portable"]
    for bits in (4, 8):
        for K, N in ((32, 17), (576, 33), (2048, 16)) + (((36, 9),) if bits == 8 else ()):
            _same_bits_on_every_path(kernels.paths(), bits, K, N, [1, 7, 8, 9, 20])
    test_native_attention_equals_sdpa(4, 2, 19, 3, 64)  # its portable C loops (the build has no x86 path)


@pytest.mark.parametrize("bits", [4, 8])
def test_integer_accumulation_is_exact(path, bits):
    """With unit scales and integer activations spanning [-128, 127] (scale 1, zero point 0), every float
    step is exact, so the kernel must return the integer matrix product itself."""
    K, N, M = 192, 24, 3
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    w = torch.randint(lo, hi, (N, K), generator=G).float()
    w[:, ::32] = lo  # a -8 (-128) in every group makes the signed-max scale exactly 1
    spec = LinearSpec(WeightSpec(bits, 32 if bits == 4 else 0, "signed-max"), ActSpec())
    q = QuantLinear.from_float(w, spec)
    assert torch.all(q.scales.float() == 1.0)
    x = torch.randint(-128, 128, (M, K), generator=G).float()
    x[:, 0], x[:, 1] = -128, 127
    out = FastLinear(q, SharedActivations())(x)
    assert torch.equal(out, x @ w.T)


def test_projections_share_one_quantized_activation():
    spec = LinearSpec(WeightSpec(4, 32), ActSpec())
    shared = SharedActivations(users=2)
    a = FastLinear(QuantLinear.from_float(torch.randn(8, 64, generator=G), spec), shared)
    b = FastLinear(QuantLinear.from_float(torch.randn(16, 64, generator=G), spec), shared)
    x = torch.randn(2, 64, generator=G)
    calls = []
    quantize = kernels.quantize_rows
    kernels.quantize_rows = lambda t: calls.append(t) or quantize(t)
    try:
        ya, yb = a(x), b(x)  # b reuses a's quantized activation...
        assert len(calls) == 1 and shared.source is None and shared.value is None  # ...then both forget it
        a(x)
        assert len(calls) == 2
    finally:
        kernels.quantize_rows = quantize
    torch.testing.assert_close(yb, b.forward(x))


def test_hadamard_equals_the_matrix():
    n = 64
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    x = torch.randn(3, n, generator=G)
    torch.testing.assert_close(kernels.hadamard_(x.clone()), x @ H.T / n ** 0.5, atol=1e-5, rtol=1e-5)
    for n in (192, 1536):  # Paley (x) Sylvester widths, as pocketquant.hadamard builds them
        x = torch.randn(3, n, generator=G)
        torch.testing.assert_close(kernels.hadamard_(x.clone()), hadamard_transform(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(kernels.PocketQuantError, match="width 112"):
        kernels.hadamard_(torch.zeros(2, 112))


def test_environment_variable_forces_a_path():
    code = "from pocketquant.runtime import kernels; print(kernels.path())"
    run = lambda value: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       env={**os.environ, kernels.ENV: value})
    assert run("portable").stdout.strip() == "portable"
    bad = run("avx9")
    assert bad.returncode != 0 and "POCKETQUANT_KERNELS='avx9' is not a kernel path" in bad.stderr
    missing = [p for p in kernels.paths() if p not in PATHS]
    if missing:
        out = run(missing[0])
        assert out.returncode != 0 and "this CPU cannot run that path" in out.stderr


@pytest.mark.parametrize("H, KV, T, start, D", [(9, 3, 130, 0, 64), (4, 2, 7, 5, 64), (8, 8, 33, 100, 128),
                                                (2, 1, 1, 9, 64), (6, 2, 17, 0, 192)])
def test_native_attention_equals_sdpa(H, KV, T, start, D):
    """Causal attention of queries at positions start.. over a longer cache, from strided query views."""
    from torch.nn import functional as F

    g = torch.Generator().manual_seed(T)
    q = torch.randn(1, T, H, D, generator=g).transpose(1, 2)  # [1, H, T, D], as the model makes it
    k, v = (torch.randn(1, KV, start + T + 3, D, generator=g) for _ in range(2))  # a cache with room to spare
    S = start + T
    mask = torch.arange(S)[None, :] <= torch.arange(start, S)[:, None]
    ref = F.scaled_dot_product_attention(q, k[:, :, :S], v[:, :, :S], attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(kernels.attention(q, k, v, start), ref.transpose(1, 2).reshape(1, T, H * D),
                               atol=2e-6, rtol=1e-5)


def test_the_fast_runtime_attends_natively_and_the_reference_through_pytorch(tiny_text_dir):
    from pocketquant.checkpoints import load_model
    from pocketquant.quant import rtn
    from pocketquant.runtime import load
    from pocketquant.runtime.engine import use_fast_kernels

    assert all(layer.self_attn.native_attention is None
               for layer in load(tiny_text_dir[0], runtime="reference").model.layers)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    quantized = rtn.apply(load_model(tiny_text_dir[0]).model, rtn.RTNConfig())
    with torch.no_grad():
        ref = quantized(tokens)
        fast = use_fast_kernels(quantized)
        assert all(layer.self_attn.native_attention is not None for layer in fast.layers)
        torch.testing.assert_close(fast(tokens), ref, atol=1e-3, rtol=1e-3)

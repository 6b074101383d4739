"""Native kernels against the reference numerics, on every code path this CPU can run."""

import pytest
import torch

from pocketquant.hadamard import hadamard_transform
from pocketquant.layers import QuantLinear
from pocketquant.numerics import quantize_per_token
from pocketquant.runtime import kernels
from pocketquant.runtime.engine import FastLinear, SharedActivations
from pocketquant.scheme import ActSpec, LinearSpec, WeightSpec

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels not built")
LEVELS = [lv for lv in (2, 1, 0) if kernels.set_level(lv) == kernels.LEVELS[lv]]
kernels.set_level(-1)
G = torch.Generator().manual_seed(0)


@pytest.fixture(params=LEVELS, ids=lambda lv: kernels.LEVELS[lv])
def level(request):
    kernels.set_level(request.param)
    yield request.param
    kernels.set_level(-1)


@pytest.mark.parametrize("M, K", [(1, 64), (3, 100), (7, 576), (2, 1)])
def test_activation_quantization_is_bit_exact(M, K):
    x = torch.randn(M, K, generator=G) * torch.logspace(-3, 3, M)[:, None] + 0.2
    x[0, : K // 2] = 0
    qa, scale, zp = kernels.quantize_rows(x)
    q, s, z = quantize_per_token(x)
    assert torch.equal(qa.int() - 128, q.int()) and torch.equal(scale, s[:, 0]) and torch.equal(zp.float(), z[:, 0])


@pytest.mark.parametrize("K", [32, 64, 96, 128, 576, 1536])
def test_int4_layout_reorders_the_same_bytes(K):
    """Each unit of four 32-blocks holds the first halves of its blocks, then their second halves."""
    x = torch.randn(3, K, generator=G)
    natural = kernels.quantize_rows(x)
    qa, scale, zp = kernels.quantize_rows(x, int4_layout=True)
    assert torch.equal(scale, natural[1]) and torch.equal(zp, natural[2])
    order = []
    for u0 in range(0, K // 32, 4):
        blocks = range(u0, min(u0 + 4, K // 32))
        order += [32 * b + j for half in (0, 16) for b in blocks for j in range(half, half + 16)]
    assert torch.equal(qa, natural[0][:, order])


SHAPES = [(1, 64, 8, 32), (1, 576, 192, 32), (5, 1536, 576, 32), (9, 96, 17, 32), (4, 160, 33, 32),
          (3, 256, 40, 128), (2, 192, 24, 64), (19, 576, 9, 32), (8, 2048, 16, 32), (1, 32, 5, 32)]


@pytest.mark.parametrize("M, K, N, group", SHAPES)
def test_int4_linear_matches_reference(level, M, K, N, group):
    q = QuantLinear.from_float(torch.randn(N, K, generator=G) * 0.05, LinearSpec(WeightSpec(4, group), ActSpec()))
    x = torch.randn(M, K, generator=G)
    ref, out = q(x), FastLinear(q, SharedActivations())(x)
    torch.testing.assert_close(out, ref, atol=3e-6 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("M, K, N", [(1, 576, 100), (6, 64, 7), (3, 96, 1000)])
def test_int8_linear_matches_reference(level, M, K, N):
    q = QuantLinear.from_float(torch.randn(N, K, generator=G), LinearSpec(WeightSpec(8, 0), ActSpec()))
    x = torch.randn(M, K, generator=G)
    ref, out = q(x), FastLinear(q, SharedActivations())(x)
    torch.testing.assert_close(out, ref, atol=3e-6 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_integer_accumulation_is_exact(level, bits):
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
    kernels.quantize_rows = lambda t, *layout: calls.append(t) or quantize(t, *layout)
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

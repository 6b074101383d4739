"""The numeric definition: int4/int8 weights, per-token int8 activations, packing, straight-through."""

import pytest
import torch

from pocketquant.errors import PocketQuantError
from pocketquant.numerics import (dequantize_weight, fake_quant_per_token, fake_quant_weight, group_scales,
                                  quantize_per_token, quantize_weight)
from pocketquant.packing import pack_int4, unpack_int4
from pocketquant.scheme import ActSpec, WeightSpec

G = torch.Generator().manual_seed(0)
W = torch.randn(24, 128, generator=G)


def test_pack_unpack_round_trip_and_layout():
    q = torch.randint(-8, 8, (5, 96), generator=G, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 48)
    assert torch.equal(unpack_int4(packed), q)
    # Q4_0 layout: byte j of a block = value j (low nibble) and value j + 16 (high), stored as q + 8.
    assert int(packed[0, 3]) == (int(q[0, 3]) + 8) | ((int(q[0, 19]) + 8) << 4)


def test_pack_refuses_a_width_not_divisible_by_32():
    with pytest.raises(PocketQuantError, match="divisible by 32"):
        pack_int4(torch.zeros(2, 48, dtype=torch.int8))


@pytest.mark.parametrize("rule", ["absmax", "signed-max"])
def test_int4_group_quantization(rule):
    spec = WeightSpec(4, 32, rule, "float32")
    q, scales = quantize_weight(W, spec)
    assert q.dtype == torch.int8 and scales.shape == (24, 4)
    assert q.min() >= -8 and q.max() <= 7
    err = (dequantize_weight(q, scales) - W).reshape(24, 4, 32).abs()
    # absmax clips nothing (error <= half a step); signed-max may clip the other sign's tail at +7
    # (error <= one step).
    bound = scales.abs()[..., None] * (0.5 if rule == "absmax" else 1.0)
    assert (err <= bound + 1e-6).all()
    groups = W.reshape(24, 4, 32)
    if rule == "absmax":  # torchao: max|w| / 7.5
        torch.testing.assert_close(scales, groups.abs().amax(-1) / 7.5)
    else:  # llama.cpp Q4_0: the largest-magnitude weight lands exactly on -8
        extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
        torch.testing.assert_close(scales, extreme / -8)
        assert (q.reshape(24, 4, 32).min(-1).values == -8).all()


def test_float16_scales_are_what_quantization_used():
    q, scales = quantize_weight(W, WeightSpec(4, 32))
    assert torch.equal(scales, scales.half().float())
    q2 = torch.clamp(torch.round(W.reshape(24, 4, 32) / scales[..., None]), -8, 7).reshape(24, 128)
    assert torch.equal(q.float(), q2)


def test_clip_search_never_increases_the_weight_error():
    spec = WeightSpec(4, 32, "absmax")
    plain = (dequantize_weight(*quantize_weight(W, spec)) - W).pow(2).reshape(24, 4, 32).sum(-1)
    searched = (dequantize_weight(*quantize_weight(W, spec, search_clip=True)) - W).pow(2).reshape(24, 4, 32).sum(-1)
    assert (searched <= plain + 1e-7).all() and searched.sum() < plain.sum()


def test_search_rule_keeps_scales_positive_and_picks_the_least_error():
    """Every scale positive (ExecuTorch's kernels need it); each group's error no larger than with max|w| / 7 or
    with max|w| / 8 (the largest negative weight on -8, as signed-max puts it, the largest positive clipped)."""
    spec = WeightSpec(4, 32, "search", "float32")
    q, scales = quantize_weight(W, spec)
    assert (scales > 0).all() and q.min() >= -8 and q.max() <= 7
    groups = W.reshape(24, 4, 32)

    def residual(s):
        return groups - torch.clamp(torch.round(groups / s[..., None]), -8, 7) * s[..., None]

    def error(s):
        return residual(s).pow(2).sum(-1)
    searched, top = error(scales), groups.abs().amax(-1)
    assert (searched <= error(top / 7) + 1e-7).all() and (searched <= error(top / 8) + 1e-7).all()
    assert searched.sum() < error(top / 7).sum()
    # the importance of each column weighs the error: one heavy column's weight comes out (almost) exact
    importance = torch.ones(4, 32)
    importance[:, 5] = 1e4
    weighted = group_scales(groups, spec, importance)
    assert residual(weighted)[..., 5].abs().sum() < residual(scales)[..., 5].abs().sum()


def test_int8_per_channel():
    q, scales = quantize_weight(W, WeightSpec(8, 0))
    assert scales.shape == (24, 1) and q.min() >= -128 and q.max() <= 127
    assert (dequantize_weight(q, scales) - W).abs().max() <= scales.abs().max() / 2 + 1e-6


def test_zero_group_and_non_finite_weights():
    w = W.clone()
    w[3, 32:64] = 0
    q, scales = quantize_weight(w, WeightSpec(4, 32))
    assert torch.isfinite(scales).all() and (dequantize_weight(q, scales)[3, 32:64] == 0).all()
    from pocketquant.layers import QuantLinear
    from pocketquant.scheme import LinearSpec

    w[5, 7] = float("nan")
    with pytest.raises(PocketQuantError, match=r"layers.2.mlp.up_proj: 1 NaN/inf weights \(first in row 5\)"):
        QuantLinear.from_float(w, LinearSpec(WeightSpec()), "layers.2.mlp.up_proj")


def test_group_size_must_divide_the_width():
    with pytest.raises(PocketQuantError, match="group size 48 does not divide the input width 128"):
        quantize_weight(W, WeightSpec(4, 48))


def test_per_token_asymmetric_int8():
    x = torch.randn(3, 7, 64, generator=G) * torch.tensor([0.01, 1.0, 50.0])[:, None, None] + 0.3
    x[0, 0] = 0  # an all-zero token
    q, scale, zp = quantize_per_token(x)
    assert q.min() >= -128 and q.max() <= 127 and torch.equal(q, q.round()) and torch.equal(zp, zp.round())
    assert scale.shape == (3, 7, 1)
    err = ((q - zp) * scale - x).abs()
    assert (err <= scale / 2 + 1e-6).all()
    assert ((q - zp) * scale)[0, 0].abs().max() == 0  # zero stays exactly zero


def test_straight_through_gradients():
    x = torch.randn(4, 64, generator=G, requires_grad=True)
    fake_quant_per_token(x, ActSpec()).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    w = W.clone().requires_grad_(True)
    out = fake_quant_weight(w, WeightSpec())
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    torch.testing.assert_close(out, dequantize_weight(*quantize_weight(W, WeightSpec())))

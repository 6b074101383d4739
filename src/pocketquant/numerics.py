"""The numeric definition of the scheme: group-wise symmetric integer weights, per-token dynamic int8
activations, and their fake-quantized (straight-through) forms. Every runtime path must agree with this.

Rounding is round-half-to-even (torch.round) and scaling divides by the scale (never multiplies by a
reciprocal), so an integer kernel can reproduce the integers bit for bit."""

from __future__ import annotations

import torch

from pocketquant.errors import PocketQuantError
from pocketquant.scheme import ActSpec, WeightSpec

CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(17))  # 1.0 down to 0.6
SEARCH_RATIOS = CLIP_RATIOS[:13]  # the "search" rule's scales: max|w| / qmax times 1.0 down to 0.7


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def check_finite(w: torch.Tensor, name: str, refusal: str = "refusing to quantize"):
    """Refuse weights that hold NaN or infinite values, saying how many and where the first is."""
    bad = ~torch.isfinite(w)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise PocketQuantError(f"{name}: {int(bad.sum())} NaN/inf weights (first in row {row}); {refusal}")


def _base_scales(wg: torch.Tensor, spec: WeightSpec, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Scale per group from grouped weights [out, n_groups, group]."""
    qmin, qmax = qrange(spec.bits)
    if spec.scale_rule == "search":
        return _searched_scales(wg, spec, importance)
    if spec.scale_rule == "absmax":  # torchao: max|w| / 7.5, clamped to [-8, 7]
        return wg.abs().amax(-1) / ((qmax - qmin) / 2)
    # signed-max (llama.cpp Q4_0): the largest-magnitude weight maps exactly to qmin
    idx = wg.abs().argmax(-1, keepdim=True)
    return wg.gather(-1, idx).squeeze(-1) / qmin


def _round_scales(scales: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Scales as stored (float16 or float32), back in float32; a zero scale (all-zero group) becomes 1."""
    stored = scales.to(getattr(torch, spec.scale_dtype))
    if torch.isinf(stored).any():
        raise PocketQuantError("weights too large for float16 scales; use scale_dtype float32")
    stored = stored.float()
    return torch.where(stored == 0, torch.ones_like(stored), stored)


def _quantize_grouped(wg: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(wg / scales[..., None]), qmin, qmax)


def group_scales(wg: torch.Tensor, spec: WeightSpec, importance: torch.Tensor | None = None) -> torch.Tensor:
    """The scheme's stored scale (in float32) of each group of grouped weights [out, n_groups, group].
    `importance` [n_groups, group] (e.g. the mean squared input of each column) weighs the "search" rule's error."""
    return _round_scales(_base_scales(wg, spec, importance), spec)


def _searched_scales(wg: torch.Tensor, spec: WeightSpec, importance: torch.Tensor | None) -> torch.Tensor:
    """Positive scales: each group's the one of max|w| / qmax * SEARCH_RATIOS with the least error (weighted by
    `importance` per column). A ratio below 1 clips the largest weights; 7/8 for int4 puts a group's largest
    negative weight on -8, as signed-max does, but keeps the scale positive."""
    top = wg.abs().amax(-1) / qrange(spec.bits)[1]
    return _least_error(wg, spec, [top * ratio for ratio in SEARCH_RATIOS], importance)


def _least_error(wg: torch.Tensor, spec: WeightSpec, candidates: list, importance: torch.Tensor | None = None):
    """Of the candidate scales [out, n_groups] (as stored), each group's with the least squared weight error
    (weighted by `importance` [n_groups, group]); the first on a tie."""
    best = best_err = None
    for candidate in candidates:
        s = _round_scales(candidate, spec)
        err = (wg - _quantize_grouped(wg, s, spec.bits) * s[..., None]).pow(2)
        err = (err if importance is None else err * importance).sum(-1)
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def quantize_with_scales(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers (as float32) of w [...] for scales broadcastable to it."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(w / scales), qmin, qmax)


def quantize_weight(w: torch.Tensor, spec: WeightSpec, search_clip: bool = False):
    """Quantize w [out, in] -> (q int8 [out, in], scales float32 [out, in // group]).

    With `search_clip`, each group's scale is shrunk by the ratio in CLIP_RATIOS that minimizes the
    squared weight error of that group."""
    out_f, in_f = w.shape
    g = spec.group_for(in_f)
    if in_f % g:
        raise PocketQuantError(f"group size {g} does not divide the input width {in_f}")
    wg = w.detach().float().reshape(out_f, in_f // g, g)
    base = _base_scales(wg, spec)
    if search_clip:
        scales = _least_error(wg, spec, [base * ratio for ratio in CLIP_RATIOS])
    else:
        scales = _round_scales(base, spec)  # = group_scales(wg, spec)
    q = _quantize_grouped(wg, scales, spec.bits)
    return q.reshape(out_f, in_f).to(torch.int8), scales


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q [out, in] integers and scales [out, n_groups] -> float32 weights [out, in]."""
    out_f, in_f = q.shape
    n_groups = scales.shape[1]
    wg = q.float().reshape(out_f, n_groups, in_f // n_groups) * scales.float()[..., None]
    return wg.reshape(out_f, in_f)


def quantize_per_token(x: torch.Tensor, spec: ActSpec = ActSpec()):
    """x [..., K] -> (q [..., K] int8 values as float32, scale [..., 1], zero_point [..., 1]).

    Asymmetric: the range [min(x, 0), max(x, 0)] maps onto [-128, 127] with an integer zero point."""
    qmin, qmax = qrange(spec.bits)
    x = x.float()
    if spec.symmetric:
        scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp(min=torch.finfo(torch.float32).eps)
        return torch.clamp(torch.round(x / scale), -qmax, qmax), scale, torch.zeros_like(scale)
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=torch.finfo(torch.float32).eps)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return q, scale, zero_point


def fake_quant_per_token(x: torch.Tensor, spec: ActSpec = ActSpec()) -> torch.Tensor:
    """Quantize-dequantize activations per token (float32 result); gradients pass straight through."""
    q, scale, zero_point = quantize_per_token(x, spec)
    xq = (q - zero_point) * scale
    return x.float() + (xq - x.float()).detach()


def fake_quant_weight(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Quantize-dequantize weights with the scheme's scales; gradients pass straight through."""
    q, scales = quantize_weight(w, spec)
    wq = dequantize_weight(q, scales)
    return w.float() + (wq - w.float()).detach()

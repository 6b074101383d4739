"""Nibble packing of int4 values, in llama.cpp's Q4_0 block layout: within each block of 32 values,
byte j holds value j (low nibble) and value j + 16 (high nibble), each stored as q + 8 in [0, 15]."""

from __future__ import annotations

import torch

from pocketquant.errors import PocketQuantError

BLOCK = 32


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values [rows, K] (K a multiple of 32, values in [-8, 7]) -> uint8 [rows, K // 2]."""
    rows, k = q.shape
    if k % BLOCK:
        raise PocketQuantError(f"int4 packing needs a width divisible by {BLOCK}, got {k}")
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(rows, k // BLOCK, 2, BLOCK // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(rows, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 [rows, K // 2] -> int8 [rows, K]."""
    rows, half = packed.shape
    p = packed.reshape(rows, half * 2 // BLOCK, BLOCK // 2)
    lo, hi = (p & 0x0F), (p >> 4)
    return (torch.stack((lo, hi), dim=2).to(torch.int8) - 8).reshape(rows, half * 2)

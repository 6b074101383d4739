"""ctypes binding of the native kernels (kernels.c): raw pointers in, no PyTorch headers involved."""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

import torch

from pocketquant.errors import PocketQuantError

LEVELS = {0: "portable C", 1: "AVX2", 2: "AVX-512 VNNI"}
_lib = None
P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def lib():
    """The loaded kernel library (built when the package is installed)."""
    global _lib
    if _lib is None:
        here = Path(__file__).parent
        found = [here / f"_kernels{s}" for s in importlib.machinery.EXTENSION_SUFFIXES
                 if (here / f"_kernels{s}").exists()]
        if not found:
            raise PocketQuantError("the native kernels are not built: reinstall pocketquant with a C compiler "
                                   "present (pip install .), or use the reference runtime")
        _lib = ctypes.CDLL(str(found[0]))
        _lib.pq_quantize_rows.argtypes = [P, I64, I64, P, P, P, INT]
        _lib.pq_linear_w4.argtypes = [P, P, P, I64, I64, P, P, P, I64, P, I64, INT]
        _lib.pq_linear_w8.argtypes = [P, P, P, I64, I64, P, P, P, P, I64, INT]
        _lib.pq_hadamard.argtypes = [P, I64, I64, I64, P]
        _lib.pq_set_level.argtypes = [INT]
    return _lib


def available() -> bool:
    try:
        lib()
    except PocketQuantError:
        return False
    return True


def level() -> str:
    return LEVELS[lib().pq_level()]


def set_level(wanted: int) -> str:
    """Use a lower kernel path than the CPU allows (tests compare every path); -1 restores the best."""
    return LEVELS[lib().pq_set_level(wanted)]


def _p(t: torch.Tensor) -> int:
    return t.data_ptr()


def quantize_rows(x: torch.Tensor, int4_layout: bool = False):
    """float32 [M, K] -> (u8 = q + 128 [M, K], scale float32 [M], zero point int32 [M]). With `int4_layout`
    (K a multiple of 32) each row's bytes are ordered for `linear_w4` (see kernels.c)."""
    M, K = x.shape
    if int4_layout and K % 32:
        raise PocketQuantError(f"the int4 layout needs a width that is a multiple of 32, got {K}")
    x = x.contiguous()
    qa = torch.empty(M, K, dtype=torch.uint8)
    scale, zp = torch.empty(M, dtype=torch.float32), torch.empty(M, dtype=torch.int32)
    lib().pq_quantize_rows(_p(x), M, K, _p(qa), _p(scale), _p(zp), int(int4_layout))
    return qa, scale, zp


def linear_w4(acts, qweight: torch.Tensor, scales_f16: torch.Tensor, rowcorr: torch.Tensor, group: int,
              threads: int) -> torch.Tensor:
    qa, scale, zp = acts
    M, K = qa.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    lib().pq_linear_w4(_p(qa), _p(scale), _p(zp), M, K, _p(qweight), _p(scales_f16), _p(rowcorr), group,
                       _p(y), N, threads)
    return y


def linear_w8(acts, qweight: torch.Tensor, scales: torch.Tensor, wsum: torch.Tensor, threads: int) -> torch.Tensor:
    qa, scale, zp = acts
    M, K = qa.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    lib().pq_linear_w8(_p(qa), _p(scale), _p(zp), M, K, _p(qweight), _p(scales), _p(wsum), _p(y), N, threads)
    return y


def hadamard_(x: torch.Tensor) -> torch.Tensor:
    """In place: each row of float32 x [M, n] -> x @ H.T / sqrt(n), H = pocketquant.hadamard.hadamard_matrix(n)."""
    M, n = x.shape
    if not x.is_contiguous() or x.dtype != torch.float32:
        raise PocketQuantError("hadamard needs contiguous float32 rows")
    m, hm = hadamard_factor(n)
    lib().pq_hadamard(_p(x), M, n, m, 0 if hm is None else _p(hm))
    return x


def hadamard_factor(n: int):
    """(m, H_m float32 or None) for the kernels' Hadamard transform of width n."""
    from pocketquant.hadamard import factor, paley

    f = factor(n)
    if f is None or f[0] > 256:
        raise PocketQuantError(f"no Hadamard transform of width {n} in the kernels")
    m = f[0]
    return m, None if m == 1 else paley(m - 1).float().contiguous()


class LayerParams(ctypes.Structure):
    """Mirror of `pq_layer` in kernels.c."""

    _fields_ = [(n, I64) for n in ("dim", "n_heads", "n_kv", "head_dim", "ffn")] + [
        ("eps", ctypes.c_float), ("attn_norm", P), ("ffn_norm", P),
        ("w", P * 7), ("s", P * 7), ("c", P * 7), ("g", I64 * 7),  # q, k, v, o, gate, up, down
        ("had_down_m", I64), ("had_qk", I64), ("had_down", P)]


class CacheParams(ctypes.Structure):
    """Mirror of `pq_cache` in kernels.c."""

    _fields_ = [(n, P) for n in ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero")] + [
        ("max_t", I64), ("bits", I64)]


def decode_layers(layers, caches, x: torch.Tensor, pos: int, inv_freq: torch.Tensor, scratch: torch.Tensor,
                  qa: torch.Tensor, threads: int):
    """One token through every layer (ctypes arrays of LayerParams and CacheParams), in place on x [dim]."""
    f = lib().pq_decode_layers
    if f.argtypes is None:
        f.argtypes = [P, P, I64, P, I64, P, P, P, INT]
    f(ctypes.addressof(layers), ctypes.addressof(caches), len(layers), _p(x), pos, _p(inv_freq), _p(scratch),
      _p(qa), threads)


def return_freed_memory_promptly():
    """Ask glibc to hand large freed blocks back to the system at once. Its default threshold grows
    with each large free, so preparing a model's kernels (many transient tensors) would otherwise keep
    about as much memory again as the model itself."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)

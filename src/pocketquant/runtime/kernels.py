"""ctypes binding of the native kernels (kernels.c): raw pointers in, no PyTorch headers involved."""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

import torch

from pocketquant.errors import PocketQuantError

ENV = "POCKETQUANT_KERNELS"
_lib = None
P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
PANEL = 16  # weight rows packed together (kernels.h)


class NotBuilt(PocketQuantError):
    pass


def _bind(cdll: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the argument types of the library's entry points."""
    cdll.pq_quantize_rows.argtypes = [P, I64, I64, P, P, P, INT]
    cdll.pq_linear_w4.argtypes = [P, P, P, I64, I64, P, P, P, I64, P, I64, INT]
    cdll.pq_linear_w8.argtypes = [P, P, P, I64, I64, P, P, P, P, I64, INT]
    cdll.pq_pack_w4.argtypes = [P, P, I64, I64, I64, P, P]
    cdll.pq_pack_w8.argtypes = [P, I64, I64, P]
    cdll.pq_gather_w8.argtypes = [P, P, I64, P, I64, P]
    cdll.pq_hadamard.argtypes = [P, I64, I64, I64, P]
    cdll.pq_path_name.restype = ctypes.c_char_p
    cdll.pq_path_name.argtypes = cdll.pq_path_supported.argtypes = cdll.pq_select.argtypes = [INT]
    cdll.pq_decode_layers.argtypes = [P, P, I64, I64, P, P, I64, P, P, INT]
    cdll.pq_decode_scratch.argtypes = [P, I64, I64]
    cdll.pq_decode_scratch.restype = I64
    cdll.pq_prefill_attention.argtypes = [P, I64, I64, P, I64, I64, P, I64, I64, P, I64, I64, I64, I64, I64, INT]
    return cdll


def lib():
    """The loaded kernel library (built when the package is installed), on the path POCKETQUANT_KERNELS
    names or else the best one this CPU runs."""
    global _lib
    if _lib is None:
        here = Path(__file__).parent
        found = [here / f"_kernels{s}" for s in importlib.machinery.EXTENSION_SUFFIXES
                 if (here / f"_kernels{s}").exists()]
        if not found:
            raise NotBuilt("the native kernels are not built: reinstall pocketquant with a C compiler "
                           "present (pip install .), or use the reference runtime")
        cdll = _bind(ctypes.CDLL(str(found[0])))
        if os.environ.get(ENV):
            _select(cdll, os.environ[ENV])
        _lib = cdll
    return _lib


def available() -> bool:
    """Whether the kernels are built (a POCKETQUANT_KERNELS this CPU cannot run is an error, not absence)."""
    try:
        lib()
    except NotBuilt:
        return False
    return True


def paths() -> list[str]:
    """Every kernel path, best first."""
    return [lib().pq_path_name(i).decode() for i in range(lib().pq_path_count())]


def supported() -> list[str]:
    """The kernel paths this CPU runs, best first."""
    return [name for i, name in enumerate(paths()) if lib().pq_path_supported(i)]


def path() -> str:
    """The kernel path in use."""
    return paths()[lib().pq_selected()]


def select(name: str | None) -> str:
    """Use the kernel path `name` (None: the best this CPU runs) from now on; returns it."""
    _select(lib(), name)
    return path()


def _select(cdll: ctypes.CDLL, name: str | None):
    names = [cdll.pq_path_name(i).decode() for i in range(cdll.pq_path_count())]
    if name is not None and name not in names:
        raise PocketQuantError(f"{ENV}={name!r} is not a kernel path; expected one of {', '.join(names)}")
    if cdll.pq_select(-1 if name is None else names.index(name)) < 0:
        runs = [n for i, n in enumerate(names) if cdll.pq_path_supported(i)]
        raise PocketQuantError(f"{ENV}={name!r}: this CPU cannot run that path; it runs {', '.join(runs)}")


def _p(t: torch.Tensor) -> int:
    return t.data_ptr()


def quantize_rows(x: torch.Tensor):
    """float32 [M, K] -> (u8 = q + 128 [M, K], scale float32 [M], zero point int32 [M])."""
    M, K = x.shape
    x = x.contiguous()
    qa = torch.empty(M, K, dtype=torch.uint8)
    scale, zp = torch.empty(M, dtype=torch.float32), torch.empty(M, dtype=torch.int32)
    lib().pq_quantize_rows(_p(x), M, K, _p(qa), _p(scale), _p(zp), torch.get_num_threads())
    return qa, scale, zp


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention, float32, batch 1: q [1, H, T, D] (queries at positions start..start+T-1), k and v
    [1, KV, >= start + T, D] (positions from 0), each with its last dimension contiguous; head_dim a multiple
    of 64. Returns [1, T, H * D], the layout o_proj reads."""
    _, H, T, D = q.shape
    KV = k.shape[1]
    out = torch.empty(1, T, H * D, dtype=torch.float32)
    if lib().pq_prefill_attention(_p(q), q.stride(2), q.stride(1), _p(k), k.stride(1), k.stride(2), _p(v), v.stride(1),
                                  v.stride(2), _p(out), T, start, H, KV, D, torch.get_num_threads()):
        raise MemoryError("cannot allocate the attention's scratch memory")
    return out


def panels(rows: int) -> int:
    return -(-rows // PANEL)


def pack_w4(qweight: torch.Tensor, scales_f16: torch.Tensor, group: int, out: tuple):
    """int4 rows [N, K / 2] (Q4_0 nibbles) and float16 scales [N, K / group] -> the panel layout of
    kernels.h, written into out = (weights uint8 [panels, K * 8], scales int16 [panels, K / group * 16])."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    w, s = out
    lib().pq_pack_w4(_p(qweight.contiguous()), _p(scales_f16.contiguous().view(torch.int16)), N, K, group,
                     _p(w), _p(s))
    return w, s


def pack_w8(qweight: torch.Tensor, out: torch.Tensor):
    """int8 rows [N, K] -> the panel layout of kernels.h, written into out (int8 [panels, K * 16])."""
    N, K = qweight.shape
    lib().pq_pack_w8(_p(qweight.contiguous()), N, K, _p(out))


def gather_w8(packed: torch.Tensor, scales: torch.Tensor, tokens: torch.Tensor, rows: int) -> torch.Tensor:
    """Rows `tokens` (each in [0, rows)) of a packed int8 table times their float32 scales -> float32
    [*tokens.shape, K]."""
    K = packed.shape[1] // PANEL
    flat = tokens.reshape(-1).to(torch.int64).contiguous()
    if flat.numel() and not 0 <= int(flat.min()) <= int(flat.max()) < rows:
        raise PocketQuantError(f"token ids must be in [0, {rows}), got {int(flat.min())}..{int(flat.max())}")
    out = torch.empty(flat.numel(), K, dtype=torch.float32)
    lib().pq_gather_w8(_p(packed), _p(scales), K, _p(flat), flat.numel(), _p(out))
    return out.view(*tokens.shape, K)


def linear_w4(acts, qweight: torch.Tensor, scales_f16: torch.Tensor, rowcorr: torch.Tensor, group: int,
              N: int, threads: int) -> torch.Tensor:
    """float32 [M, N] from quantized activations and int4 panels (pack_w4); rowcorr padded to whole panels."""
    qa, scale, zp = acts
    M, K = qa.shape
    y = torch.empty(M, N, dtype=torch.float32)
    lib().pq_linear_w4(_p(qa), _p(scale), _p(zp), M, K, _p(qweight), _p(scales_f16), _p(rowcorr), group,
                       _p(y), N, threads)
    return y


def linear_w8(acts, qweight: torch.Tensor, scales: torch.Tensor, wsum: torch.Tensor, N: int,
              threads: int) -> torch.Tensor:
    """float32 [M, N] from quantized activations and int8 panels (pack_w8); scales, wsum padded likewise."""
    qa, scale, zp = acts
    M, K = qa.shape
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


def decode_scratch(layers, batch: int, max_t: int) -> int:
    """Floats of scratch that decode_layers needs for `batch` sequences in caches of max_t positions."""
    return lib().pq_decode_scratch(ctypes.addressof(layers), batch, max_t)


def decode_layers(layers, caches, x: torch.Tensor, pos: torch.Tensor, max_t: int, inv_freq: torch.Tensor,
                  scratch: torch.Tensor, threads: int):
    """One token for each of B sequences through every layer (a ctypes array of LayerParams), in place on
    x [B, dim]: sequence b is at position pos[b] (int64) and in layer i uses the CacheParams at address
    caches[i * B + b] (a ctypes array of pointers)."""
    lib().pq_decode_layers(ctypes.addressof(layers), ctypes.addressof(caches), len(layers), x.shape[0], _p(x),
                           _p(pos), max_t, _p(inv_freq), _p(scratch), threads)


def return_freed_memory():
    """Hand the memory freed while preparing a model's kernels (many transient tensors) back to the
    system, once; glibc would otherwise keep about as much again as the model itself. (Lowering malloc's
    mmap threshold instead would make every later large temporary fault in fresh pages.)"""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc

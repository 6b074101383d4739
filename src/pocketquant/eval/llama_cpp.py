"""llama.cpp's own quantizations of the reference model, scored beside ours on the same windows: the float
reference is written as an F32 GGUF, quantized by llama.cpp's quantizer (`llama_model_quantize` of
llama-cpp-python) to each type asked for, and each file is run by llama.cpp itself. No importance matrix is
used: the bindings cannot compute one (llama.cpp's `llama-imatrix` tool does)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pocketquant.errors import PocketQuantError


def _bindings():
    try:
        import llama_cpp
    except ImportError as e:
        raise PocketQuantError("--llama-cpp needs llama-cpp-python (pip install 'pocketquant[llama-cpp]')") from e
    return llama_cpp


def check_types(types: list[str]) -> list[str]:
    """The llama.cpp file types named (Q4_0, Q4_K_M, IQ4_XS, Q8_0, ...), refused by name before any work."""
    llama_cpp = _bindings()
    known = sorted(n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_"))
    bad = [t for t in types if t.upper() not in known]
    if bad:
        raise PocketQuantError(f"unknown llama.cpp type(s) {', '.join(bad)}; known: {', '.join(known)}")
    return [t.upper() for t in types]


def quantize(float_gguf: Path, qtype: str, out: Path, threads: int | None = None) -> Path:
    """llama.cpp's quantizer: the F32 GGUF `float_gguf` to `qtype` in `out`."""
    llama_cpp = _bindings()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads or 0
    with _quiet_stderr():  # its log of every tensor
        failed = llama_cpp.llama_model_quantize(str(float_gguf).encode(), str(out).encode(), ctypes.byref(params))
    if failed:
        raise PocketQuantError(f"llama.cpp could not quantize {float_gguf} to {qtype}")
    return out


@contextlib.contextmanager
def _quiet_stderr():
    """Standard error (file descriptor 2, where C code writes too) goes to /dev/null inside the block."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class LlamaCppModel:
    """A GGUF file run by llama.cpp, called as our models are: logits [1, T, V] of token ids [1, T]."""

    def __init__(self, path: Path, context: int, threads: int | None = None):
        llama_cpp = _bindings()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context,
                                   logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(vocab_size=self.llm.n_vocab(), max_seq_len=context)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = ids[0].tolist()
        self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(np.array(self.llm.scores[:len(tokens)], dtype=np.float32))[None]


def peers(reference, types: list[str], directory: Path, context: int, threads: int | None = None,
          note=lambda message: None) -> list[tuple[str, LlamaCppModel, int]]:
    """(name, model, file bytes) of the reference quantized by llama.cpp to each of `types`, files in `directory`."""
    from pocketquant.export.gguf import export_gguf

    float_gguf = directory / "reference-F32.gguf"
    note(f"llama.cpp: writing the reference as {float_gguf.name}, then quantizing it to {', '.join(types)}")
    export_gguf(reference, None, float_gguf, "F32")  # token ids only: llama.cpp reads our ids, never text
    out = []
    for qtype in types:
        path = quantize(float_gguf, qtype, directory / f"reference-{qtype}.gguf", threads)
        out.append((f"llama.cpp {qtype}", LlamaCppModel(path, context, threads), path.stat().st_size))
    return out

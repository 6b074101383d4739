"""Running models: the fast kernels, generation and chat. Imports nothing from `pocketquant.quant`."""

from __future__ import annotations

RUNTIMES = ("fast", "reference")


def load(source, dtype="float32", runtime: str = "fast"):
    """`checkpoints.load_model`, then (for packed files) the native kernels unless runtime="reference"."""
    from pocketquant.checkpoints import load_model
    from pocketquant.errors import PocketQuantError

    if runtime not in RUNTIMES:
        raise PocketQuantError(f"unknown runtime {runtime!r}; expected one of {RUNTIMES}")
    loaded = load_model(source, dtype)
    if runtime == "fast":
        from pocketquant.runtime import kernels
        from pocketquant.runtime.engine import use_fast_kernels

        if kernels.available():
            use_fast_kernels(loaded.model)
            kernels.return_freed_memory()
    return loaded

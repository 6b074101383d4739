"""Running models: the fast kernels, generation and chat. Imports nothing from `pocketquant.quant`."""

from __future__ import annotations

RUNTIMES = ("fast", "reference")


def load(source, dtype="float32", runtime: str = "fast", verify: bool = True):
    """`checkpoints.load_model`, then (for packed files) the native kernels unless runtime="reference"."""
    from pocketquant.checkpoints import load_model
    from pocketquant.errors import PocketQuantError

    if runtime not in RUNTIMES:
        raise PocketQuantError(f"unknown runtime {runtime!r}; expected one of {RUNTIMES}")
    loaded = load_model(source, dtype, verify)
    if runtime == "fast":
        from pocketquant.layers import QuantLinear
        from pocketquant.runtime import kernels
        from pocketquant.runtime.engine import use_fast_kernels

        if kernels.available():
            use_fast_kernels(loaded.model)
            kernels.return_freed_memory()
        elif any(isinstance(m, QuantLinear) for m in loaded.model.modules()):
            import warnings

            warnings.warn("the native kernels are not built: this packed model runs on the slow reference "
                          "runtime (reinstall pocketquant with a C compiler present)", stacklevel=2)
    return loaded

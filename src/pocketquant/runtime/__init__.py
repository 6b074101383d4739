"""Running models: generation (and, later, fast kernels). Imports nothing from `pocketquant.quant`."""

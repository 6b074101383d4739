"""Quantization algorithms as recipe steps: each config has `apply(model, ctx) -> model`, and every
recipe ends in the same QuantLinear modules (quant/recipe.py runs them)."""

"""Quantization algorithms: each is `apply(model, config) -> model` and ends in the same QuantLinear."""

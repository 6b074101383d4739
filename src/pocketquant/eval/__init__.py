"""Evaluation: perplexity, KL-divergence, task accuracy."""

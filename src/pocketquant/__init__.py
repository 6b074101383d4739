"""pocketquant: make small Llama-family models small and fast on a CPU, and prove they stay accurate."""

__version__ = "0.1.0"

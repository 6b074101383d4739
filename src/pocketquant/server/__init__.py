"""The OpenAI-compatible HTTP server (`pocketquant serve`); imports nothing from `pocketquant.quant`."""

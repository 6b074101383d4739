"""Token-level perplexity over fixed windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.inference_mode()
def perplexity(model, tokens: list[int], context: int = 512, stride: int | None = None,
               limit: int | None = None) -> float:
    """exp(mean next-token NLL) over windows of `context` tokens moved by `stride` (default: context);
    each token is scored once, with at least context - stride tokens of history after the first window."""
    stride = stride or context
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, stride):
        window = tokens[start:start + context + 1]
        if len(window) < 2:
            break
        scored_from = 0 if start == 0 else context - stride
        x = torch.tensor([window[:-1]], device=model.device)
        y = torch.tensor(window[1:], device=model.device)
        logits = model(x)[0].float()
        losses = F.cross_entropy(logits, y, reduction="none")[scored_from:]
        nll, count = nll + float(losses.sum()), count + losses.numel()
        if limit and count >= limit or start + context + 1 >= len(tokens):
            break
    return math.exp(nll / count)

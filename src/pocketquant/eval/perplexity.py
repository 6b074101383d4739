"""One streaming pass over a text for several models: perplexity of each, and KL-divergence and top-1
agreement of each model's next-token distribution against the first (the reference). Nothing is dumped:
each window's logits are compared and dropped."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class TextScores:
    nll: float = 0.0  # summed over scored tokens, nats
    tokens: int = 0
    top1_agree: int = 0
    kl: list[torch.Tensor] = field(default_factory=list)  # per-token KL(reference || model), nats

    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    def word_perplexity(self, words: int) -> float:
        return math.exp(self.nll / words)

    def kl_stats(self) -> dict[str, float]:
        kl = torch.cat(self.kl).double() if self.kl else torch.zeros(1, dtype=torch.float64)
        return {"kl_mean": float(kl.mean()), "kl_median": float(kl.median()),
                "kl_p99": float(torch.quantile(kl, 0.99)), "top1_agreement": self.top1_agree / self.tokens}


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position) per window over n_tokens; each target is scored exactly once and,
    after the first window, with at least context - stride tokens before it."""
    out, scored_until = [], 0
    for start in range(0, max(n_tokens - 1, 0), stride):
        end = min(start + context, n_tokens - 1)  # targets start+1 .. end
        out.append((start, max(scored_until - start, 0)))
        scored_until = end
        if end == n_tokens - 1:
            break
    return out


@torch.inference_mode()
def score_text(models: list, tokens: list[int], context: int = 1024, stride: int | None = None,
               progress=None, reference=None) -> list[TextScores]:
    """Score `tokens` with every model on identical windows; KL and agreement are against models[0].
    With `reference` (eval.reference.Reference), models[0]'s pass is read from it when it is cached (the model
    is not run), or recorded into it; KL is then over its top k (see reference.py) for every model."""
    stride = stride or context
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in 1..context ({context}), got {stride}")
    scores = [TextScores() for _ in models]
    plan = windows(len(tokens), context, stride)
    cached = reference is not None and reference.cached
    if cached and len(reference.windows) != len(plan):
        raise ValueError(f"{reference.path}: {len(reference.windows)} windows cached, {len(plan)} to score")
    device = models[-1].device
    for w, (start, first) in enumerate(progress(plan, desc="scoring text", unit="window") if progress else plan):
        window = tokens[start:start + context + 1]
        x = torch.tensor([window[:-1]], device=device)
        y = torch.tensor(window[1:], device=device)[first:]
        ref = None
        if cached:
            ref = reference.windows[w]
            scores[0].nll -= float(ref.target.double().sum())
            scores[0].tokens += len(y)
            scores[0].kl.append(torch.zeros(len(y)))
            scores[0].top1_agree += len(y)
        for model, s in zip(models[1:] if cached else models, scores[1:] if cached else scores):
            logp = F.log_softmax(model(x)[0, first:].float(), dim=-1)
            s.nll -= float(logp.gather(-1, y[:, None]).double().sum())  # as a cached reference sums its own
            s.tokens += len(y)
            if ref is None:
                ref = reference.add(logp, y) if reference is not None else logp
                kl, agree = torch.zeros(len(y)), len(y)
            else:
                kl, agree = ref.compare(logp) if reference is not None else compare(ref, logp)
            s.kl.append(kl)
            s.top1_agree += agree
    return scores


def compare(ref: torch.Tensor, logp: torch.Tensor, rows: int = 64) -> tuple[torch.Tensor, int]:
    """KL(ref || logp) per position [T] and the count of positions with the same top-1 token, from log
    probabilities [T, V]; a few rows at a time, so no temporary is as large as the logits."""
    kl, agree = [], 0
    for r in range(0, len(ref), rows):
        a, b = ref[r:r + rows], logp[r:r + rows]
        kl.append((a.exp() * (a - b)).sum(-1).clamp(min=0).cpu())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    return torch.cat(kl), agree


def perplexity(model, tokens: list[int], context: int = 1024, stride: int | None = None,
               limit: int | None = None) -> float:
    """Token-level perplexity of one model over the first `limit` + 1 tokens."""
    if limit:
        tokens = tokens[:limit + 1]
    return score_text([model], tokens, context, stride)[0].perplexity()

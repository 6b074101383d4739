"""One streaming generator: every consumer (generate, chat, bench, server) reads tokens from it."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pocketquant.errors import PocketQuantError
from pocketquant.model import Transformer
from pocketquant.tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature is 0; otherwise temperature, then top-k (0 = off), then top-p. Every setting in
    range works: a temperature or top_p too small to tell the tokens apart keeps only the likeliest."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        def number(value, integer=False):
            kinds = (int,) if integer else (int, float)
            return isinstance(value, kinds) and not isinstance(value, bool)
        if not (number(self.temperature) and 0 <= self.temperature < math.inf):  # also refuses NaN
            raise PocketQuantError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (number(self.top_k, integer=True) and self.top_k >= 0):
            raise PocketQuantError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            raise PocketQuantError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (number(self.seed, integer=True) and 0 <= self.seed < 2 ** 64):
            raise PocketQuantError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]. In float64, with the likeliest token's logit at 0 before the
    temperature divides, so that no setting in range gives NaN: a tiny temperature sends every other logit to
    -inf (greedy, ties drawn among), and the likeliest token always survives top-p."""
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits.double()
    logits = (logits - logits.amax(-1, keepdim=True)) / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= s.top_p  # keep the smallest prefix reaching top_p ...
        drop[:, 0] = False  # ... which holds the likeliest token, however small top_p is
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    if not torch.isfinite(probs).all():  # the logits themselves were NaN: a broken model, not a setting
        raise PocketQuantError("the model produced non-finite logits; cannot sample")
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.inference_mode()
def stream_tokens(model: Transformer, prompt: list[int], max_new_tokens: int,
                  sampling: Sampling = Sampling(), stop_ids=frozenset(), caches=None,
                  start_pos: int = 0) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt`, stopping after a stop id.
    With `caches`, the prompt continues a sequence whose first `start_pos` tokens are already cached."""
    if not prompt:
        raise PocketQuantError("the prompt is empty")
    total = start_pos + len(prompt) + max_new_tokens
    if total > model.config.max_seq_len:
        raise PocketQuantError(f"prompt ({start_pos + len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                               f"exceeds the model's context of {model.config.max_seq_len} tokens")
    device = model.device
    gen = None
    if sampling.seed is not None:
        gen = torch.Generator(device=device).manual_seed(sampling.seed)
    caches = caches or model.new_caches(1, total)
    logits = model(torch.tensor([prompt], device=device), caches, start_pos, last_only=True)[:, -1]
    pos = start_pos + len(prompt)
    for i in range(max_new_tokens):
        token = sample(logits, sampling, gen)
        yield int(token)
        if int(token) in stop_ids or i + 1 == max_new_tokens:
            return
        logits = model(token[:, None], caches, pos, last_only=True)[:, -1]
        pos += 1


class TextStream:
    """Turns token ids into printable text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def stream_text(model: Transformer, tokenizer: Tokenizer, prompt: list[int], max_new_tokens: int,
                sampling: Sampling = Sampling()) -> Iterator[str]:
    """Yield the generated text piece by piece; the stop token itself is not shown."""
    text = TextStream(tokenizer)
    for token in stream_tokens(model, prompt, max_new_tokens, sampling, tokenizer.stop_ids):
        if token in tokenizer.stop_ids:
            return
        if piece := text.push(token):
            yield piece


@dataclass(frozen=True)
class Response:
    """One token of `stream_generate`: its text piece and the counts and speeds so far. The last one has a
    `finish_reason`: "stop" (a stop token, whose text is not shown) or "length" (max_tokens reached)."""

    text: str
    token: int
    prompt_tokens: int
    generation_tokens: int
    time_to_first_token: float  # seconds from the call to the first token (the prompt's prefill)
    prompt_tps: float  # prompt tokens per second of that time
    generation_tps: float  # tokens per second after the first (one-token decode steps)
    finish_reason: str | None = None


def stream_generate(model: Transformer, tokenizer: Tokenizer | None, prompt: list[int], max_tokens: int,
                    sampling: Sampling = Sampling(), stop: bool = True, caches=None) -> Iterator[Response]:
    """`stream_tokens` with text and timings: one Response per generated token. stop=False runs to
    max_tokens past stop tokens (benchmarks); without a tokenizer the text is empty."""
    stop_ids = tokenizer.stop_ids if stop and tokenizer is not None else frozenset()
    text = TextStream(tokenizer) if tokenizer is not None else None
    t0, first, n = time.perf_counter(), None, 0
    for token in stream_tokens(model, prompt, max_tokens, sampling, stop_ids, caches):
        now, n = time.perf_counter(), n + 1
        first = first or now
        finish = "stop" if token in stop_ids else "length" if n == max_tokens else None
        piece = "" if text is None or finish == "stop" else text.push(token)
        yield Response(piece, token, len(prompt), n, first - t0, len(prompt) / (first - t0),
                       (n - 1) / (now - first) if n > 1 else 0.0, finish)

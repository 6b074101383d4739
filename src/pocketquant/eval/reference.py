"""A cached reference: the reference model's pass over a text, reduced to what the scores need, so that
evaluating another model against the same reference skips that pass.

Per scored position it keeps the reference's log-probability of the target (its perplexity, exactly), its `k`
likeliest tokens with their log-probabilities (top-1 agreement, exactly), the probability r left outside them,
and `m` tokens drawn from that remainder in proportion to their probability, with their log-probabilities.
KL(p || q) is the sum over the top k, exact, plus the remainder's share, estimated without bias from the draws:

    KL ~ sum_top-k p log(p / q) + r * mean_draws(log p - log q)

A real model's remainder is heavy (on SmolLM2 the top 512 tokens still miss 4% of RTN's KL), so it is estimated
rather than dropped; over a text of many thousand tokens the estimate's noise averages out (see the README for
the measured difference from the exact mean). The median and p99 of per-token KL carry that noise per token.
Every model of an evaluation that uses the cache, the one that writes it included, is scored this way, so runs
against the same cache compare exactly.

A cache file is named by a SHA-256 of everything that decides its numbers: the reference's weights, the
tokens, context, stride, dtype and runtime, k, and the task files; any change is a new file, never a stale one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pocketquant.errors import PocketQuantError

TOP_K = 64
TAIL_DRAWS = 16
FORMAT, VERSION = "pocketquant.reference", 1


@dataclass
class TopK:
    """The reference at the scored positions of one window: log-probabilities of its k likeliest tokens
    [T, k] (descending) and their ids, the probability outside them [T], tokens drawn from there [T, m] with
    their log-probabilities, and the log-probability of each target [T]."""

    values: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor
    tail_values: torch.Tensor
    tail_indices: torch.Tensor
    target: torch.Tensor

    @classmethod
    def of(cls, logp: torch.Tensor, y: torch.Tensor, k: int, draws: int = TAIL_DRAWS, seed: int = 0) -> "TopK":
        values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tail = logp.double().exp().scatter(-1, indices, 0)
        rest = tail.sum(-1)
        tail[rest <= 0, 0] = 1  # (a row without a remainder draws anything: its share is 0)
        generator = torch.Generator(tail.device).manual_seed(seed)
        drawn = torch.multinomial(tail, draws, replacement=True, generator=generator)
        return cls(values.float().cpu(), indices.to(torch.int32).cpu(), rest.float().cpu(),
                   logp.gather(-1, drawn).float().cpu(), drawn.to(torch.int32).cpu(),
                   logp.gather(-1, y[:, None])[:, 0].float().cpu())

    def compare(self, logp: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Estimated KL(reference || model) per position [T] and the count of positions with the same top-1
        token, from the model's log-probabilities [T, V]."""
        idx = self.indices.long().to(logp.device)
        lq = logp.gather(-1, idx).float().cpu()
        head = (self.values.exp() * (self.values - lq)).sum(-1)
        tail_lq = logp.gather(-1, self.tail_indices.long().to(logp.device)).float().cpu()
        tail = self.rest * (self.tail_values - tail_lq).mean(-1)
        agree = int((idx[:, 0] == logp.argmax(-1)).sum())
        return head + tail, agree

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class Reference:
    """The cached windows of one reference pass: read from `path` when it exists, or filled by `add` and
    written by `save`."""

    def __init__(self, path: Path, key: dict, k: int = TOP_K):
        self.path, self.key, self.k = Path(path), key, k
        self.windows: list[TopK] = []
        self.tasks: dict = {}
        self.cached = self._load()

    def add(self, logp: torch.Tensor, y: torch.Tensor) -> TopK:
        self.windows.append(TopK.of(logp, y, self.k, seed=len(self.windows)))
        return self.windows[-1]

    def _load(self) -> bool:
        from safetensors import SafetensorError, safe_open

        if not self.path.is_file():
            return False
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or json.loads(meta.get("key", "null")) != self.key:
                    raise ValueError("not this reference")
                lengths = json.loads(meta["lengths"])
                columns = {c.name: f.get_tensor(c.name) for c in dataclasses.fields(TopK)}
                self.tasks = json.loads(meta["tasks"])
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
            raise PocketQuantError(f"{self.path}: damaged reference cache ({e}); delete it to score the reference "
                                   "again") from e
        if any(len(c) != sum(lengths) for c in columns.values()) or \
                columns["values"].shape != columns["indices"].shape or \
                columns["tail_values"].shape != columns["tail_indices"].shape:
            raise PocketQuantError(f"{self.path}: damaged reference cache (inconsistent lengths); delete it")
        split = {name: c.split(lengths) for name, c in columns.items()}
        self.windows = [TopK(**{name: split[name][w] for name in columns}) for w in range(len(lengths))]
        return True

    def save(self):
        from safetensors.torch import save_file

        from pocketquant.files import atomic_write

        tensors = {f.name: torch.cat([getattr(w, f.name) for w in self.windows]) for f in dataclasses.fields(TopK)}
        meta = {"format": FORMAT, "version": str(VERSION), "key": json.dumps(self.key),
                "lengths": json.dumps([len(w.target) for w in self.windows]), "tasks": json.dumps(self.tasks)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def reference_for(directory: str | Path, model, tokens: list[int], settings: dict, task_files: dict,
                  k: int | None = None) -> Reference:
    """The cache in `directory` for this reference model, tokens and settings (read if it exists); k: TOP_K."""
    from pocketquant.files import tensors_digest

    k = k or TOP_K
    h = hashlib.sha256()
    for path in task_files.values():
        h.update(Path(path).read_bytes())
    weights = dict(model.state_dict())  # and the native kernels' repacked weights, plain attributes
    weights.update({f"{name}.{attr}": v for name, m in model.named_modules() for attr, v in vars(m).items()
                    if isinstance(v, torch.Tensor)})
    key = {"format": FORMAT, "version": VERSION, "k": k, "draws": TAIL_DRAWS, "model": tensors_digest(weights),
           "tokens": hashlib.sha256(json.dumps(tokens).encode()).hexdigest(), "tasks": h.hexdigest(), **settings}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Reference(Path(directory) / f"reference-{name}.safetensors", key, k)

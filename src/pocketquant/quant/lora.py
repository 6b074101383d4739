"""LoRA adapters on the block linears of a fake-quantized model: attach, list, merge."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from pocketquant.errors import PocketQuantError
from pocketquant.layers import BLOCK_LINEARS, FakeQuantLinear, LoRA


def add_lora(model: nn.Module, rank: int = 16, scale: float = 2.0, targets: tuple[str, ...] = ("*",),
             dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> list[str]:
    """Give every block linear matching one of `targets` (fnmatch patterns on the full name, e.g.
    'layers.0.mlp.down_proj', on its name in the layer, e.g. 'mlp.*', or on its last part, e.g. 'q_proj')
    a new adapter (float32 parameters, computed in `dtype`); returns the names. B starts at zero, so the
    model's function is unchanged."""
    if rank < 1:
        raise PocketQuantError(f"LoRA rank must be at least 1, got {rank}")
    names = [f"layers.{i}.{s}" for i in range(len(model.layers)) for s in BLOCK_LINEARS]

    def matches(name, pattern):  # layers.0.mlp.up_proj, mlp.up_proj or up_proj
        short = name.split(".", 2)[2]
        return any(fnmatch.fnmatchcase(n, pattern) for n in (name, short, short.rsplit(".", 1)[1]))

    chosen = [n for n in names if any(matches(n, p) for p in targets)]
    unmatched = [p for p in targets if not any(matches(n, p) for n in names)]
    if unmatched:
        raise PocketQuantError(f"LoRA target(s) {', '.join(map(repr, unmatched))} match no block linear "
                               "(names look like 'layers.0.self_attn.q_proj'; 'q_proj' or 'mlp.*' also work)")
    narrowest = min(min(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in chosen)
    if rank > narrowest:
        raise PocketQuantError(f"LoRA rank {rank} is more than the narrowest adapted linear's {narrowest} features")
    if not all(isinstance(model.get_submodule(n), FakeQuantLinear) for n in chosen):
        raise PocketQuantError("LoRA adapters go on fake-quantized linears: prepare the model for QAT first")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in chosen:
            m = model.get_submodule(name)
            m.lora = LoRA(m.in_features, m.out_features, rank, scale, dtype).to(m.weight.device)
    return chosen


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LoRA) for p in m.parameters()]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its (float, fake-quantized) linear's weight and drop it; quantizing the
    model afterwards re-quantizes the merged weights."""
    for m in model.modules():
        if getattr(m, "lora", None) is not None:
            m.weight += m.lora.delta_weight().to(m.weight.dtype)
            m.lora = None
    return model

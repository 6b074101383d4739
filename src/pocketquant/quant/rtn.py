"""Round-to-nearest: quantize every weight on its own, no data needed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from pocketquant.layers import (QuantEmbedding, QuantLinear, check_plan, linear_plan, set_module,
                                share_embedding_output)
from pocketquant.model import Transformer
from pocketquant.quant.context import config_dict, config_from_dict
from pocketquant.scheme import PRESETS, QuantScheme


@dataclass(frozen=True)
class RTNConfig:
    scheme: QuantScheme = field(default_factory=lambda: PRESETS["int4-eo8"])
    search_clip: bool = False  # per-group clipping search minimizing the weight error
    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict:
        return config_dict(self, "rtn")

    @classmethod
    def from_dict(cls, d: dict) -> "RTNConfig":
        return config_from_dict(cls, d, "rtn")

    def apply(self, model: Transformer, ctx) -> Transformer:
        return apply(model, self, ctx.progress)


@torch.no_grad()
def apply(model: Transformer, config: RTNConfig, progress=None) -> Transformer:
    """Replace the model's linears and embedding by quantized ones, as `config.scheme` says."""
    scheme = config.scheme
    check_plan(model, scheme)
    plan = [(name, spec) for name, spec in linear_plan(model, scheme).items() if spec is not None]
    for name, spec in (progress(plan, desc="rtn", unit="layer") if progress else plan):
        linear = model.get_submodule(name)
        set_module(model, name, QuantLinear.from_float(linear.weight, spec, name, config.search_clip))
    return quantize_embedding(model, scheme)


def quantize_embedding(model: Transformer, scheme: QuantScheme) -> Transformer:
    """The embedding by RTN (and the shared table, the KV-cache precision), after the linears are done."""
    if scheme.embedding is not None:
        model.embed_tokens = QuantEmbedding.from_float(model.embed_tokens.weight, scheme.embedding)
    if scheme.share_embedding_output:
        share_embedding_output(model)
    model.set_kv_cache_bits(scheme.kv_cache_bits)
    return model

"""Quantization-aware model preparation: swap modules for fake-quantized twins (`prepare`), and turn
them into the packed modules the runtime uses (`convert`), or packed modules back into float ones holding
their dequantized weights (`dequantize`: a quantized starting point). Training is in `quant/train.py`."""

from __future__ import annotations

import torch
from torch import nn

from pocketquant.layers import (FakeQuantEmbedding, FakeQuantLinear, QuantEmbedding, QuantLinear, check_plan,
                                linear_plan, set_module, share_embedding_output)
from pocketquant.model import Transformer
from pocketquant.numerics import dequantize_weight
from pocketquant.scheme import QuantScheme


def prepare(model: Transformer, scheme: QuantScheme) -> Transformer:
    """Fake-quantize every module the scheme quantizes; weights stay float and trainable."""
    check_plan(model, scheme)
    for name, spec in linear_plan(model, scheme).items():
        if spec is None:
            continue
        old = model.get_submodule(name)
        new = FakeQuantLinear(old.in_features, old.out_features, spec).to(old.weight.dtype)
        new.weight = old.weight  # shared with the embedding when tied
        set_module(model, name, new)
    if scheme.embedding is not None:
        old = model.embed_tokens
        new = FakeQuantEmbedding(old.num_embeddings, old.embedding_dim, scheme.embedding).to(old.weight.dtype)
        new.weight = old.weight
        model.embed_tokens = new
    model.set_kv_cache_bits(scheme.kv_cache_bits)
    return model


@torch.no_grad()
def convert(model: Transformer, scheme: QuantScheme) -> Transformer:
    """Replace fake-quant modules by packed ones holding the same integers and scales."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            packed = QuantLinear.from_float(module.weight, module.spec, name)
            packed.lora = module.lora  # an adapter stays beside its linear, in its own precision
            set_module(model, name, packed)
        elif isinstance(module, FakeQuantEmbedding):
            model.embed_tokens = QuantEmbedding.from_float(module.weight, module.spec)
    if scheme.share_embedding_output:
        share_embedding_output(model)
    return model


@torch.no_grad()
def dequantize(model: Transformer) -> Transformer:
    """Replace packed modules by float ones whose weights are the dequantized integers (adapters dropped)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=False, device=module.qweight.device)
            linear.weight.copy_(module.dequantized_weight())
            set_module(model, name, linear)
        elif isinstance(module, QuantEmbedding):
            table = dequantize_weight(module.qweight, module.scales)  # one scale per row
            model.embed_tokens = nn.Embedding(*table.shape, _weight=table)
    return model

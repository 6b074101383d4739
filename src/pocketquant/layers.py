"""Quantized modules that replace the model's float ones, and the plan saying which goes where.

`QuantLinear.forward` is the reference definition: quantize activations per token, dequantize the
weights, multiply in float32. Fast kernels and fake-quant training must agree with it."""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

from pocketquant.errors import PocketQuantError
from pocketquant.numerics import (check_finite, dequantize_weight, fake_quant_per_token, fake_quant_weight,
                                  quantize_weight)
from pocketquant.packing import BLOCK, pack_int4, unpack_int4
from pocketquant.scheme import LinearSpec, QuantScheme, WeightSpec

BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class QuantLinear(nn.Module):
    """Integer weights (int4 nibble-packed or int8) with one scale per group, optional int8 activations."""

    def __init__(self, in_features: int, out_features: int, spec: LinearSpec):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        w = spec.weight
        n_groups = in_features // w.group_for(in_features)
        if w.bits == 4:
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=getattr(torch, w.scale_dtype)))
        self.lora: LoRA | None = None  # a 16-bit adapter added to the output (QAT + LoRA)

    @classmethod
    def from_float(cls, weight: torch.Tensor, spec: LinearSpec, name: str = "weight",
                   search_clip: bool = False) -> "QuantLinear":
        check_finite(weight, name)
        q, scales = quantize_weight(weight, spec.weight, search_clip)
        return cls.from_int(q, scales, spec)

    @classmethod
    def from_int(cls, q: torch.Tensor, scales: torch.Tensor, spec: LinearSpec) -> "QuantLinear":
        """From integer weights [out, in] and float32 scales [out, n_groups] (e.g. from GPTQ)."""
        out_f, in_f = q.shape
        with torch.device("meta"):
            m = cls(in_f, out_f, spec)
        m.qweight = pack_int4(q) if spec.weight.bits == 4 else q.to(torch.int8)
        m.scales = scales.to(getattr(torch, spec.weight.scale_dtype))
        return m

    def int_weight(self) -> torch.Tensor:
        return unpack_int4(self.qweight) if self.spec.weight.bits == 4 else self.qweight

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self.int_weight(), self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = fake_quant_per_token(x, self.spec.act) if self.spec.act else x.float()
        return with_lora(self, x, F.linear(xf, self._weight_for_inference()).to(x.dtype))

    def _weight_for_inference(self) -> torch.Tensor:
        # The integer weights never change after packing, so the dequantized copy is kept once computed
        # (this reference path trades memory for speed; the fast kernels read the packed bytes).
        cached = getattr(self, "_dequantized", None)
        if cached is None or cached[0] is not self.qweight:
            cached = (self.qweight, self.dequantized_weight())
            self._dequantized = cached
        return cached[1]

    def extra_repr(self) -> str:
        w, a = self.spec.weight, self.spec.act
        return (f"in={self.in_features}, out={self.out_features}, w{w.bits} g{w.group_for(self.in_features)}"
                + (f", a{a.bits}" if a else ", float activations"))


class QuantEmbedding(nn.Module):
    """int8 embedding table with one scale per row (token)."""

    def __init__(self, num_embeddings: int, dim: int, spec: WeightSpec, out_dtype=torch.float32):
        super().__init__()
        self.spec, self.out_dtype = spec, out_dtype
        self.register_buffer("qweight", torch.zeros(num_embeddings, dim, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(num_embeddings, 1, dtype=getattr(torch, spec.scale_dtype)))

    @classmethod
    def from_float(cls, weight: torch.Tensor, spec: WeightSpec) -> "QuantEmbedding":
        check_finite(weight, "embed_tokens.weight")
        q, scales = quantize_weight(weight, spec)
        with torch.device("meta"):
            m = cls(*weight.shape, spec, weight.dtype)
        m.qweight, m.scales = q, scales.to(getattr(torch, spec.scale_dtype))
        return m

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return (self.qweight[tokens].float() * self.scales[tokens].float()).to(self.out_dtype)


class FakeQuantLinear(nn.Linear):
    """A float linear whose forward fake-quantizes weights and activations exactly as the scheme says
    (straight-through gradients): the training-time twin of `QuantLinear`."""

    def __init__(self, in_features: int, out_features: int, spec: LinearSpec):
        super().__init__(in_features, out_features, bias=False)
        self.spec = spec
        self.lora: LoRA | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = fake_quant_per_token(x, self.spec.act) if self.spec.act else x.float()
        return with_lora(self, x, F.linear(xf, fake_quant_weight(self.weight, self.spec.weight)).to(x.dtype))


class LoRA(nn.Module):
    """A low-rank adapter beside a quantized linear: scale * B(A(x)), with weights in `dtype` (Meta's QLoRA
    checkpoints: rank 16, scale 2.0, bf16) and the products in float32 on the unquantized input, as
    ExecuTorch runs Meta's adaptors. B starts at zero, so a new adapter changes nothing. Its parameters may be
    kept in float32 while training; the forward always rounds them to `dtype`, so the trained and the saved
    adapter compute the same numbers."""

    def __init__(self, in_features: int, out_features: int, rank: int = 16, scale: float = 2.0,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.rank, self.scale, self.dtype = rank, scale, dtype
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        if self.A.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = (w.to(self.dtype).float() for w in (self.A.weight, self.B.weight))
        return (F.linear(F.linear(x.float(), a), b) * self.scale).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in float32: the adapter as a change of the base weight (for merging)."""
        return self.scale * (self.B.weight.to(self.dtype).float() @ self.A.weight.to(self.dtype).float())


def with_lora(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    lora = getattr(module, "lora", None)
    return y if lora is None else y + lora(x)


class FakeQuantEmbedding(nn.Embedding):
    """A float embedding whose lookup returns the scheme's fake-quantized rows."""

    def __init__(self, num_embeddings: int, dim: int, spec: WeightSpec):
        super().__init__(num_embeddings, dim)
        self.spec = spec

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(self.weight, self.spec)[tokens].to(self.weight.dtype)


def linear_plan(model: nn.Module, scheme: QuantScheme) -> dict[str, LinearSpec | None]:
    """The spec of every linear (block linears and `lm_head`); None means it stays float."""
    plan = {}
    for i in range(len(model.layers)):
        for suffix in BLOCK_LINEARS:
            name = f"layers.{i}.{suffix}"
            plan[name] = scheme.spec_for(name)
    plan["lm_head"] = scheme.output
    return plan


def check_plan(model: nn.Module, scheme: QuantScheme) -> None:
    """Refuse a scheme that cannot apply, naming every offending layer (on one line) before any work starts."""
    problems = []
    names = [f"layers.{i}.{s}" for i in range(len(model.layers)) for s in BLOCK_LINEARS]
    for pattern, _ in scheme.overrides:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            problems.append(f"override {pattern!r} matches no module (block linears are named like "
                            f"'layers.0.mlp.down_proj')")
    offending = {}  # (module name within its layer, what is wrong) -> layer numbers
    for name, spec in linear_plan(model, scheme).items():
        if spec is None:
            continue
        in_f = model.get_submodule(name).in_features
        g = spec.weight.group_for(in_f)
        if in_f % g:
            reason = f"group size {g} does not divide its input width {in_f}"
        elif spec.weight.bits == 4 and in_f % BLOCK:
            reason = f"int4 packing needs an input width divisible by {BLOCK}, got {in_f}"
        else:
            continue
        _, layer, short = name.split(".", 2) if name.startswith("layers.") else ("", None, name)
        offending.setdefault((short, reason), []).append(layer)
    problems += [f"{short}{_in_layers(layers)}: {reason}" for (short, reason), layers in offending.items()]
    if scheme.share_embedding_output and not (
            model.config.tie_embeddings and scheme.embedding is not None and scheme.output is not None
            and scheme.output.weight == scheme.embedding):
        problems.append("share_embedding_output needs a tied model and the same int8 per-channel weights "
                        "for embedding and output")
    if problems:
        raise PocketQuantError(f"scheme {scheme.name!r} cannot apply to this model: " + "; ".join(problems))


def _in_layers(layers: list) -> str:
    """' in layers 0-15' (consecutive), ' in layers 1, 4', or '' for a module outside the layers."""
    numbers = [int(n) for n in layers if n is not None]
    if not numbers:
        return ""
    if numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) > 1:
        return f" in layers {numbers[0]}-{numbers[-1]}"
    return f" in layer{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"


def quantized_skeleton(model: nn.Module, scheme: QuantScheme, dtype=torch.float32) -> nn.Module:
    """Swap the modules of a (meta-device) model for empty quantized ones, as the scheme says."""
    check_plan(model, scheme)
    for name, spec in linear_plan(model, scheme).items():
        if spec is not None:
            old = model.get_submodule(name)
            set_module(model, name, QuantLinear(old.in_features, old.out_features, spec))
    if scheme.embedding is not None:
        old = model.embed_tokens
        model.embed_tokens = QuantEmbedding(old.num_embeddings, old.embedding_dim, scheme.embedding, dtype)
    if scheme.share_embedding_output:
        share_embedding_output(model)
    model.set_kv_cache_bits(scheme.kv_cache_bits)
    return model


def share_embedding_output(model: nn.Module):
    """Point the int8 output layer at the int8 embedding table (one table for both)."""
    model.shares_embedding_output = True
    model.lm_head.qweight = model.embed_tokens.qweight
    model.lm_head.scales = model.embed_tokens.scales


def set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def family_of(name: str) -> str:
    """The module family a state name belongs to (embedding, attention, mlp, norms, output)."""
    if name.startswith("embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "output"
    if name.endswith("norm.weight"):
        return "norms"
    return "attention" if ".self_attn." in name else "mlp"

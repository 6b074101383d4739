"""The fast runtime: swap a packed model's reference QuantLinear modules for ones that call the native
kernels. Each activation is quantized once and reused by every projection that reads it (q/k/v, gate/up)."""

from __future__ import annotations

import torch
from torch import nn

from pocketquant.layers import QuantLinear, set_module
from pocketquant.runtime import kernels


class SharedActivations:
    """Remembers the last quantized activation; a projection fed the same tensor object reuses it.
    (The model never writes into a projection's input in place, so the object identifies the values;
    holding it keeps its id from being reused.)"""

    def __init__(self):
        self.source, self.value = None, None

    def get(self, x: torch.Tensor):
        if self.source is not x:
            self.source = x
            self.value = kernels.quantize_rows(x.reshape(-1, x.shape[-1]).float())
        return self.value


class FastLinear(nn.Module):
    """Same numbers as `QuantLinear` (integers bit-exact), computed by the native kernels."""

    def __init__(self, q: QuantLinear, shared: SharedActivations):
        super().__init__()
        self.in_features, self.out_features, self.spec, self.shared = q.in_features, q.out_features, q.spec, shared
        w = q.int_weight().to(torch.int32)
        self.bits = q.spec.weight.bits
        self.group = q.spec.weight.group_for(q.in_features)
        self.qweight = q.qweight
        if self.bits == 4:
            self.scales = q.scales.to(torch.float16).contiguous().view(torch.int16)
            sums = w.reshape(q.out_features, -1, self.group).sum(-1).double()
            self.rowcorr = (sums * q.scales.double()).sum(-1).float()
        else:
            self.scales = q.scales.float().reshape(-1).contiguous()
            self.wsum = w.sum(-1).to(torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.shared.get(x)
        threads = torch.get_num_threads()
        if self.bits == 4:
            y = kernels.linear_w4(acts, self.qweight, self.scales, self.rowcorr, self.group, threads)
        else:
            y = kernels.linear_w8(acts, self.qweight, self.scales, self.wsum, threads)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def runs_fast(q: QuantLinear) -> bool:
    """The kernels cover int8 asymmetric per-token activations with int4 (groups of 32k) or int8 weights."""
    a, w = q.spec.act, q.spec.weight
    return (a is not None and not a.symmetric and q.in_features % 32 == 0
            and (w.bits == 8 and w.group_size == 0 or w.bits == 4 and w.group_for(q.in_features) % 32 == 0))


def use_fast_kernels(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear the kernels cover (the rest keep the reference forward)."""
    for layer in model.layers:
        shared = {"attn": SharedActivations(), "mlp": SharedActivations(), "o": SharedActivations(),
                  "down": SharedActivations()}
        for name, key in (("self_attn.q_proj", "attn"), ("self_attn.k_proj", "attn"), ("self_attn.v_proj", "attn"),
                          ("self_attn.o_proj", "o"), ("mlp.gate_proj", "mlp"), ("mlp.up_proj", "mlp"),
                          ("mlp.down_proj", "down")):
            module = layer.get_submodule(name)
            if isinstance(module, QuantLinear) and runs_fast(module):
                set_module(layer, name, FastLinear(module, shared[key]))
    if isinstance(model.lm_head, QuantLinear) and runs_fast(model.lm_head):
        model.lm_head = FastLinear(model.lm_head, SharedActivations())
    return model

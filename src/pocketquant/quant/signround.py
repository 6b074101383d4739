"""Block-wise rounding optimisation by signed gradient descent (SignRound, Cheng et al., 2023; the method
behind auto-round): for each decoder layer in turn, learn for every weight an offset in [-0.5, 0.5] added
before rounding, and for every group a factor in [min_scale, 1] on its scale, so that the quantized layer's
output on calibration inputs matches the float layer's.

The quantized layer reads what the quantized layers before it wrote (their errors included) and must match
what the float layer writes from the float model's own inputs, so each layer also corrects some of the error
of the layers before it. The int8 per-token activation quantization is in the forward, as deployed; the
rounding and the activation quantization pass gradients straight through. Peak memory is one decoder layer
plus two streams of calibration activations. Each finished layer is checkpointed, and a killed run resumes
after it, computing what an uninterrupted run computes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pocketquant.errors import PocketQuantError
from pocketquant.files import StateDir
from pocketquant.layers import QuantLinear, set_module
from pocketquant.model import Transformer
from pocketquant.numerics import _base_scales, _round_scales, check_finite, fake_quant_per_token, qrange
from pocketquant.quant.context import MAX_SAMPLES, MAX_SEQ_LEN, MAX_STEPS, config_dict, config_from_dict, in_range
from pocketquant.quant.gptq import LayerRun
from pocketquant.scheme import PRESETS, LinearSpec, QuantScheme


@dataclass(frozen=True)
class SignRoundConfig:
    scheme: QuantScheme = field(default_factory=lambda: PRESETS["int4-eo8"])
    samples: int = 64  # calibration blocks
    seq_len: int = 512  # tokens per block
    iterations: int = 100  # signed-gradient steps per layer
    batch: int = 1  # blocks per step
    lr: float = 0.0  # step size of the signed update, decayed linearly to 0 (0: 1 / iterations)
    min_scale: float = 0.5  # lowest factor a group's scale may be shrunk to (1: scales stay the scheme's)
    seed: int = 0  # the order in which blocks are drawn
    text: str | None = None  # the calibration text (a file; None: the shipped calibration text)
    VERSION: ClassVar[int] = 1

    def __post_init__(self):
        in_range("signround", samples=(self.samples, 1, MAX_SAMPLES), seq_len=(self.seq_len, 2, MAX_SEQ_LEN),
                 iterations=(self.iterations, 1, MAX_STEPS), batch=(self.batch, 1, MAX_SAMPLES),
                 seed=(self.seed, 0, 2 ** 31 - 1))
        if not 0 <= self.lr <= 1:  # also refuses NaN
            raise PocketQuantError(f"signround lr must be in [0, 1] (0: 1 / iterations), got {self.lr}")
        if not 0 < self.min_scale <= 1:
            raise PocketQuantError(f"signround min_scale must be in (0, 1], got {self.min_scale}")

    def to_dict(self) -> dict:
        return config_dict(self, "signround")

    @classmethod
    def from_dict(cls, d: dict) -> "SignRoundConfig":
        return config_from_dict(cls, d, "signround")

    def check(self, model: Transformer, ctx):
        from pocketquant.checkpoints import check_length

        check_length(model.config, self.seq_len, "--calib-len")
        ctx.blocks(self.text, self.samples, self.seq_len, at_most=True)

    def apply(self, model: Transformer, ctx) -> Transformer:
        return apply(model, self, ctx.blocks(self.text, self.samples, self.seq_len, at_most=True), ctx.progress,
                     state_dir=ctx.beside_out(".signround-state"), note=ctx.note)


class RoundingLinear(nn.Module):
    """A linear being quantized: frozen float weights, a learned rounding offset per weight and a learned
    factor per group scale; its forward is the quantized linear's (int8 activations, int4 weights)."""

    def __init__(self, weight: torch.Tensor, spec: LinearSpec, min_scale: float):
        super().__init__()
        self.spec, self.min_scale = spec, min_scale
        out_f, in_f = weight.shape
        g = spec.weight.group_for(in_f)
        self.register_buffer("w", weight.detach().float().reshape(out_f, in_f // g, g))
        base = _base_scales(self.w, spec.weight)
        self.register_buffer("base", torch.where(base == 0, torch.ones_like(base), base))
        self.offset = nn.Parameter(torch.zeros_like(self.w))
        self.factor = nn.Parameter(torch.ones_like(base))

    def _integers(self, scales: torch.Tensor, straight_through: bool) -> torch.Tensor:
        z = self.w / scales[..., None] + self.offset
        rounded = z + (torch.round(z) - z).detach() if straight_through else torch.round(z)
        return torch.clamp(rounded, *qrange(self.spec.weight.bits))

    def scales(self) -> torch.Tensor:
        """The group scales as stored (float16 for int4-eo8); gradients pass straight through the rounding."""
        scales = self.base * self.factor
        return scales + (_round_scales(scales.detach(), self.spec.weight) - scales).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.scales()
        w = (self._integers(scales, True) * scales[..., None]).reshape(self.w.shape[0], -1)
        return F.linear(fake_quant_per_token(x, self.spec.act) if self.spec.act else x, w)

    @torch.no_grad()
    def step(self, lr: float):
        """One signed-gradient step, then back into range."""
        for p, lo, hi in ((self.offset, -0.5, 0.5), (self.factor, self.min_scale, 1.0)):
            p -= lr * torch.sign(p.grad)
            p.clamp_(lo, hi)
            p.grad = None

    @torch.no_grad()
    def quantized(self) -> QuantLinear:
        scales = self.scales()
        q = self._integers(scales, False).reshape(self.w.shape[0], -1)
        return QuantLinear.from_int(q.to(torch.int8), scales, self.spec)


def apply(model: Transformer, config: SignRoundConfig, tokens: torch.Tensor, progress=None,
          state_dir: str | Path | None = None, note=lambda message: None) -> Transformer:
    """Quantize `model` in place by SignRound on calibration `tokens` [n, T]; embedding and output by RTN.
    With `state_dir`, each finished layer is checkpointed there and a rerun resumes after it; the caller
    removes it once the result is written. Runs on the model's device."""
    run = LayerRun(model, config, tokens, state_dir, "signround", note)
    state, start, n_layers, cos, sin, mask = run.state, run.start, run.n_layers, run.cos, run.sin, run.mask
    x_float, x_quant = (run.streams["float"], run.streams["quant"]) if start else (run.embedded(tokens),) * 2
    note(f"signround: {n_layers - start} layers, {config.iterations} steps each on {tokens.shape[0]} blocks of "
         f"{tokens.shape[1]} tokens")
    layers = range(start, n_layers)
    losses = []
    for i in (progress(layers, desc="signround", unit="layer", initial=start, total=n_layers) if progress else layers):
        layer = model.layers[i]
        with torch.no_grad():
            x_float = _run(layer, x_float, cos, sin, mask)  # the float layer's output: the target, and next input
        before, after = _tune_layer(layer, run.plan_of(i), x_quant, x_float, cos, sin, mask, config,
                                    torch.Generator().manual_seed(config.seed << 16 | i))
        losses.append((before, after))
        with torch.no_grad():
            x_quant = _run(layer, x_quant, cos, sin, mask)
        if state:
            state.save(i, layer, float=x_float, quant=x_quant)
    if losses:
        note("signround: layer output error (mean squared) from round-to-nearest to tuned, first / last layer: "
             f"{losses[0][0]:.3g} -> {losses[0][1]:.3g}, {losses[-1][0]:.3g} -> {losses[-1][1]:.3g}")
    return run.finish()


def signround_state(state_dir: str | Path) -> StateDir:
    """The checkpoint directory `apply` keeps (whatever its key): `.remove()` it once the result is saved."""
    return StateDir(state_dir, "signround", {})


def _run(layer, x: torch.Tensor, cos, sin, mask, batch: int = 8) -> torch.Tensor:
    return torch.cat([layer(xb, cos, sin, mask, None, 0) for xb in x.split(batch)])


def _tune_layer(layer, layer_plan: dict, x: torch.Tensor, target: torch.Tensor, cos, sin, mask,
                config: SignRoundConfig, generator: torch.Generator) -> tuple[float, float]:
    """Replace the layer's planned linears by tuned QuantLinears; returns the mean squared output error on the
    first batch before (round-to-nearest) and after."""
    tuned = {}
    for name, spec in layer_plan.items():
        weight = layer.get_submodule(name).weight
        check_finite(weight, name)
        tuned[name] = RoundingLinear(weight, spec, config.min_scale).to(weight.device)
        set_module(layer, name, tuned[name])
    frozen = [p for p in layer.parameters() if all(p is not q for m in tuned.values() for q in m.parameters())]
    for p in frozen:
        p.requires_grad_(False)
    n, b = len(x), min(config.batch, len(x))
    lr = config.lr or 1.0 / config.iterations
    probe = torch.arange(b)

    def error(idx) -> torch.Tensor:
        return F.mse_loss(layer(x[idx], cos, sin, mask, None, 0), target[idx])
    with torch.no_grad():
        first = float(error(probe))
    for step in range(config.iterations):  # the step size decays to 0: the last values are the result
        idx = torch.randperm(n, generator=generator)[:b]
        with torch.enable_grad():  # (also under a caller's no_grad)
            error(idx).backward()
        for m in tuned.values():
            m.step(lr * (1 - step / config.iterations))
    with torch.no_grad():
        last = float(error(probe))
    for name, m in tuned.items():
        set_module(layer, name, m.quantized())
    for p in frozen:
        p.requires_grad_(True)
    return first, last



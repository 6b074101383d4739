"""Sensitivity and budgeted mixed precision.

`linear_kl` measures, for every quantized block linear, the KL from the float model that this linear adds
when it alone is quantized by round-to-nearest (the rest of the model float): one float pass keeps each
layer's input and the float log-probs, then each linear costs a pass through its own layer and the layers
after it (on SmolLM2-135M, 210 linears: about 30 minutes for 2,048 tokens on 2 cores). `estimated_kl` gives
the same figures to second order for all linears at once, from one forward and a few backward passes (under
2 minutes there). `BudgetConfig` is the recipe step that spends a byte budget on the most sensitive linears: they
get int8 per-channel weights (the same activations) instead of the scheme's int4, chosen greedily by KL
per extra byte, and the steps after it quantize with that mixed scheme."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from pocketquant.errors import PocketQuantError
from pocketquant.layers import QuantLinear, check_plan, linear_plan, set_module
from pocketquant.model import Transformer
from pocketquant.quant.context import MAX_SAMPLES, MAX_SEQ_LEN, config_dict, config_from_dict, in_range
from pocketquant.scheme import PRESETS, LinearSpec, QuantScheme, WeightSpec

_BUDGET = re.compile(r"^\s*(?:\+(?P<pct>[0-9.]+)\s*%|(?P<ratio>[0-9.]+)\s*x?|"
                     r"(?P<num>[0-9.]+)\s*(?P<unit>B|KB|MB|GB))\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def upgrade_spec(scheme: QuantScheme) -> LinearSpec:
    """What a sensitive linear gets: int8 weights, one scale per output channel, the scheme's activations."""
    return LinearSpec(WeightSpec(8, 0, scheme.linear.weight.scale_rule, scheme.linear.weight.scale_dtype),
                      scheme.linear.act)


def parse_budget(budget: str) -> tuple[str, float]:
    """'+10%' or '1.1' -> ('ratio', 1.1) of the file's tensors with the scheme as it is; '120MB' or '120000000B'
    -> ('bytes', 1.2e8) of tensors (the file's header adds a little: the tokenizer, 2.9 MB for SmolLM2)."""
    m = _BUDGET.match(budget) if isinstance(budget, str) else None
    try:
        if m and m["pct"] is not None:
            kind, value = "ratio", 1 + float(m["pct"]) / 100
        elif m and m["ratio"] is not None:
            kind, value = "ratio", float(m["ratio"])
        elif m:
            kind, value = "bytes", float(m["num"]) * _UNITS[m["unit"].lower()]
        else:
            raise ValueError
    except ValueError:
        raise PocketQuantError(f"budget {budget!r:.60}: give extra bytes as a percentage (+10%), a ratio of the "
                               "file with the scheme as it is (1.1), or the size of the file's tensors (120MB)"
                               ) from None
    if kind == "ratio" and not 1 <= value <= 4:
        raise PocketQuantError(f"budget {budget!r}: a ratio from 1 (no extra bytes) to 4, got {value:g}")
    return kind, value


@dataclass(frozen=True)
class BudgetConfig:
    """Keep the block linears whose quantization costs the most KL at int8 per channel, within `budget` (see
    `parse_budget`). Sensitivity is measured on the first `samples` calibration blocks, after the steps before
    this one (the rotations). The packed file records the linears chosen (`upgraded`), so a replay of the
    recipe makes the same file without measuring again."""

    scheme: QuantScheme = field(default_factory=lambda: PRESETS["int4-eo8"])
    budget: str = "+10%"
    samples: int = 4
    seq_len: int = 512
    text: str | None = None
    upgraded: tuple = ()  # the linears chosen (module names); set by the run, read by a replay
    VERSION: ClassVar[int] = 1

    def __post_init__(self):
        parse_budget(self.budget)
        in_range("budget", samples=(self.samples, 1, MAX_SAMPLES), seq_len=(self.seq_len, 2, MAX_SEQ_LEN))
        if not all(isinstance(n, str) for n in self.upgraded):
            raise PocketQuantError("budget: upgraded must be a list of module names")

    def to_dict(self) -> dict:
        return config_dict(self, "budget")

    @classmethod
    def from_dict(cls, d: dict) -> "BudgetConfig":
        return config_from_dict(cls, d, "budget")

    def check(self, model: Transformer, ctx):
        from pocketquant.checkpoints import check_length

        plan = linear_plan(model, self.scheme)
        if unknown := [n for n in self.upgraded if plan.get(n) is None or n == "lm_head"]:
            raise PocketQuantError(f"budget: {unknown[0]!r} is not a quantized block linear of this model")
        if not self.upgraded:
            check_length(model.config, self.seq_len, "--budget-len")
            ctx.blocks(self.text, self.samples, self.seq_len, at_most=True)

    def mixed(self, names) -> QuantScheme:
        """The scheme with the linears `names` at int8 per channel (ahead of the scheme's own overrides)."""
        up = upgrade_spec(self.scheme)
        return self.scheme.replace(overrides=(*((n, up) for n in names), *self.scheme.overrides))

    def apply(self, model: Transformer, ctx) -> Transformer:
        """Choose the linears (unless recorded), and hand the steps after this one the mixed scheme."""
        names = self.upgraded
        if not names:
            tokens = ctx.blocks(self.text, self.samples, self.seq_len, at_most=True)
            ctx.note(f"budget: sensitivity of every block linear on {len(tokens)} blocks of {tokens.shape[1]} tokens")
            kl = estimated_kl(model, tokens, self.scheme, progress=ctx.progress)
            names = choose(model, self.scheme, kl, self.budget)
            ctx.report["sensitivity"] = kl
        ctx.scheme = self.mixed(names)
        base, mixed = file_bytes(model, self.scheme), file_bytes(model, ctx.scheme)
        ctx.note(f"budget: {len(names)} linears at int8 per channel; {base:,} -> {mixed:,} bytes "
                 f"({mixed / base - 1:+.1%})")
        ctx.record = dataclasses.replace(self, upgraded=tuple(names))
        return model


def file_bytes(model: Transformer, scheme: QuantScheme) -> int:
    """The tensor bytes of the packed file that `scheme` makes of `model` (its header aside)."""
    from pocketquant.checkpoints.packed import packed_tensors
    from pocketquant.layers import quantized_skeleton

    with torch.device("meta"):
        skeleton = Transformer(model.config)
    quantized_skeleton(skeleton, scheme)
    return sum(t.numel() * t.element_size() for t in packed_tensors(skeleton).values())


def choose(model: Transformer, scheme: QuantScheme, kl: dict[str, float], budget: str) -> list[str]:
    """The linears to keep at int8: by KL saved per extra byte, most first, while the budget allows."""
    kind, value = parse_budget(budget)
    base = file_bytes(model, scheme)
    room = base * (value - 1) if kind == "ratio" else value - base
    if room < 0:
        raise PocketQuantError(f"budget {budget}: the file with scheme {scheme.name!r} alone takes {base:,} bytes")
    up = upgrade_spec(scheme)
    plan = linear_plan(model, scheme)

    def extra(name: str) -> int:  # the weights, and the file header naming the linear (at most twice the JSON)
        linear = model.get_submodule(name)
        header = 2 * len(json.dumps([name, dataclasses.asdict(up)]))
        return _bytes(linear, up.weight) - _bytes(linear, plan[name].weight) + header
    costs = {n: extra(n) for n in kl}
    chosen = []
    for name in sorted(kl, key=lambda n: kl[n] / max(costs[n], 1), reverse=True):
        if 0 < costs[name] <= room:
            chosen.append(name)
            room -= costs[name]
    return sorted(chosen, key=list(kl).index)


def _bytes(linear, spec: WeightSpec) -> int:
    n_scales = linear.out_features * (linear.in_features // spec.group_for(linear.in_features))
    scale_size = 2 if spec.scale_dtype == "float16" else 4
    return linear.out_features * linear.in_features * spec.bits // 8 + n_scales * scale_size


def _setup(model: Transformer, tokens: torch.Tensor, scheme: QuantScheme):
    """The block linears the scheme quantizes (name -> spec), the tokens on the model's device, RoPE and mask."""
    check_plan(model, scheme)
    plan = {n: s for n, s in linear_plan(model, scheme).items() if s is not None and n != "lm_head"}
    tokens = tokens.to(model.device)
    cos, sin = model.rope(0, tokens.shape[1], torch.float32)
    return plan, tokens, cos, sin, model.attention_mask(0, tokens.shape[1], False, tokens.device)


@torch.no_grad()
def linear_kl(model: Transformer, tokens: torch.Tensor, scheme: QuantScheme, progress=None,
              batch: int = 4) -> dict[str, float]:
    """For every block linear the scheme quantizes: mean KL(float || model with only that linear quantized by
    round-to-nearest) over the tokens [n, T], in nats. The model is left as it was."""
    plan, tokens, cos, sin, mask = _setup(model, tokens, scheme)

    def through(first: int, x: torch.Tensor) -> torch.Tensor:
        """Log-probs after layers first..end of the hidden states x."""
        for layer in model.layers[first:]:
            x = torch.cat([layer(xb, cos, sin, mask, None, 0) for xb in x.split(batch)])
        return F.log_softmax(model.lm_head(model.norm(x)).float(), -1)

    x = torch.cat([model.embed_tokens(t).float() for t in tokens.split(batch)])
    inputs = []
    for layer in model.layers:
        inputs.append(x)
        x = torch.cat([layer(xb, cos, sin, mask, None, 0) for xb in x.split(batch)])
    reference = F.log_softmax(model.lm_head(model.norm(x)).float(), -1)
    del x
    kl = {}
    names = list(plan)
    for name in (progress(names, desc="sensitivity", unit="linear") if progress else names):
        _, i, short = name.split(".", 2)
        layer = model.layers[int(i)]
        original = layer.get_submodule(short)
        set_module(layer, short, QuantLinear.from_float(original.weight, plan[name], name))
        try:
            logp = through(int(i), inputs[int(i)])
        finally:
            set_module(layer, short, original)
        kl[name] = float(F.kl_div(logp, reference, log_target=True, reduction="sum")) / reference[..., 0].numel()
    return kl


@torch.enable_grad()  # (also under a caller's no_grad)
def estimated_kl(model: Transformer, tokens: torch.Tensor, scheme: QuantScheme, draws: int = 4, seed: int = 0,
                 progress=None) -> dict[str, float]:
    """The same figures as `linear_kl`, estimated to second order for every linear at once: KL(p || p') is about
    1/2 d^T F d for a small change d of a linear's outputs, F the Fisher information of the float model's output
    distribution p, and d^T F d = E[(g . d)^2] with g the gradient of log p(y) in that linear's outputs for y
    drawn from p. Per block of tokens: one forward pass and `draws` backward passes (cross terms between blocks
    are dropped: they average to 0)."""
    plan, tokens, cos, sin, mask = _setup(model, tokens, scheme)
    quantized = {n: QuantLinear.from_float(model.get_submodule(n).weight, s, n) for n, s in plan.items()}
    sums = dict.fromkeys(plan, 0.0)
    change, hooks = {}, []

    def hook(name):
        def record(module, args, out):
            with torch.no_grad():
                change[name] = quantized[name](args[0]).float() - out.float()
            out.register_hook(lambda g: sums.__setitem__(name, sums[name] + float((g * change[name]).sum()) ** 2))
        return record
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for name in plan:
        hooks.append(model.get_submodule(name).register_forward_hook(hook(name)))
    generator = torch.Generator().manual_seed(seed)
    try:
        for block in (progress(tokens, desc="sensitivity", unit="block") if progress else tokens):
            x = model.embed_tokens(block[None]).float().requires_grad_()
            for layer in model.layers:
                x = layer(x, cos, sin, mask, None, 0)
            logp = F.log_softmax(model.lm_head(model.norm(x)).float(), -1)[0]
            with torch.no_grad():
                probs = logp.exp()
            for d in range(draws):
                y = torch.multinomial(probs.cpu(), 1, generator=generator).to(logp.device)
                logp.gather(-1, y).sum().backward(retain_graph=d + 1 < draws)
            change.clear()
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
    return {n: v / (2 * draws * tokens.numel()) for n, v in sums.items()}

"""SpinQuant (Liu et al., 2024): learn the rotations R1 (residual stream) and R2 (per layer, between
v_proj and o_proj) that make a model easy to quantize, then merge them and quantize (GPTQ or RTN).

The search runs on the norm-folded float model with the rotations applied on the fly (weight
parametrizations), R4 merged and applied online, int8 activations fake-quantized at every linear's input
(optionally int4 weights too), and a loss on calibration text: next-token cross-entropy, or the KL
divergence from the float model's next-token distribution ("kl", distillation; the teacher is the same
model with quantization switched off, since the rotations do not change the float function). R1 and R2
stay orthogonal through Cayley SGD on the Stiefel manifold, in float64:
    W = R G^T - G R^T (skew),  R <- (I - a/2 W)^-1 (I + a/2 W) R,  a = min(lr_t, 1 / |W|_F),
a descent step along the Riemannian gradient with a cosine-decayed learning rate. Under torchrun (an
initialized torch.distributed group) each process takes its own calibration blocks and the gradients
of R1 and R2 are averaged before every step, so all processes hold the same rotations."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from pocketquant.errors import PocketQuantError
from pocketquant.files import atomic_write
from pocketquant.hadamard import hadamard_transform
from pocketquant.model import Transformer
from pocketquant.numerics import fake_quant_per_token, fake_quant_weight
from pocketquant.quant import rotation
from pocketquant.quant.context import (MAX_SAMPLES, MAX_SEQ_LEN, MAX_STEPS, config_dict, config_from_dict,
                                       distillation_kl, in_range)
from pocketquant.quant.distributed import world_and_rank
from pocketquant.scheme import PRESETS, QuantScheme


@dataclass(frozen=True)
class SpinQuantConfig:
    scheme: QuantScheme = field(default_factory=lambda: PRESETS["int4-eo8"])
    iterations: int = 40  # Cayley SGD steps (Meta: 100)
    samples: int = 40  # calibration blocks, one per step in turn (Meta: 800)
    seq_len: int = 256  # tokens per block (Meta: 2048)
    batch: int = 1  # blocks per step
    lr: float = 1.5
    seed: int = 0
    learn: bool = True  # False: random Hadamard rotations only (QuaRot-style)
    fake_quant_weights: bool = False  # int4 weights in the loop too (Meta, and the default: 16-bit weights)
    loss: str = "ce"  # "ce": next-token cross-entropy (Meta); "kl": distill the float model's outputs
    rotations: str | None = None  # a rotations file saved by an earlier run: merged instead of searching
    text: str | None = None  # the calibration text of the search (a file; None: the shipped one)
    VERSION: ClassVar[int] = 1

    def __post_init__(self):
        for name in ("iterations", "samples", "batch"):
            if getattr(self, name) < 1:
                raise PocketQuantError(f"SpinQuant {name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise PocketQuantError(f"SpinQuant blocks need at least 2 tokens, got {self.seq_len}")
        in_range("SpinQuant", iterations=(self.iterations, 1, MAX_STEPS), samples=(self.samples, 1, MAX_SAMPLES),
                 batch=(self.batch, 1, self.samples), seq_len=(self.seq_len, 2, MAX_SEQ_LEN))
        if not 0 < self.lr < math.inf:  # also refuses NaN
            raise PocketQuantError(f"the SpinQuant learning rate must be a finite number > 0, got {self.lr}")
        if self.loss not in ("ce", "kl"):
            raise PocketQuantError(f"the SpinQuant loss is ce or kl, got {self.loss!r}")
        if not 0 <= self.seed < 2 ** 63:
            raise PocketQuantError(f"the SpinQuant seed must be in [0, 2**63), got {self.seed}")

    @property
    def searches(self) -> bool:
        return self.learn and not self.rotations

    def to_dict(self) -> dict:
        return config_dict(self, "spinquant")

    @classmethod
    def from_dict(cls, d: dict) -> "SpinQuantConfig":
        return config_from_dict(cls, d, "spinquant")

    def check(self, model: Transformer, ctx):
        """Refuse, before any work, what would fail later: a context too short, too little text."""
        from pocketquant.checkpoints import check_length

        rotation.check_rotatable(model, self.scheme.kv_cache_bits == 8)
        if self.searches:
            check_length(model.config, self.seq_len, "--spin-len")
            ctx.blocks(self.text, self.samples, self.seq_len)

    def apply(self, model: Transformer, ctx) -> Transformer:
        """Search (or load) the rotations and merge them; a search saves them to OUT.rotations.safetensors and
        the recipe then records that file, so a replay merges the same rotations."""
        from pocketquant.data import token_blocks

        tokens = heldout = None
        if self.searches:
            tokens = ctx.blocks(self.text, self.samples, self.seq_len)
            calibration = ctx.tokens(self.text) if not (self.text or "").endswith(".jsonl") else []
            if len(calibration) >= (self.samples + 2) * self.seq_len:  # the text's last two blocks
                heldout = token_blocks(calibration[-2 * self.seq_len:], 2, self.seq_len)
        saved = ctx.out.with_name(ctx.out.stem + ".rotations.safetensors") if self.searches and ctx.out else None
        model, losses, held = prepare(model, self, tokens, ctx.progress if not ctx.rank else None,
                                      rotations=self.rotations, save_to=None if ctx.rank else saved, heldout=heldout)
        ctx.report.update(rotation_losses=losses, rotation_heldout=held,
                          rotations=Path(self.rotations) if self.rotations else saved)
        if saved:  # what the packed file's recipe says: merge these rotations
            ctx.record = dataclasses.replace(self, rotations=saved.name)
        return model


def cayley_step(R: torch.Tensor, G: torch.Tensor, lr: float) -> torch.Tensor:
    """One descent step on the Stiefel manifold; R stays orthogonal (to float64 rounding)."""
    R, G = R.double(), G.double()
    W = R @ G.T - G @ R.T
    a = min(lr, 1.0 / (W.norm().item() + 1e-12))
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return torch.linalg.solve(eye - a / 2 * W, (eye + a / 2 * W) @ R)


class _Right(nn.Module):
    """W -> W @ R (a linear reading the rotated stream, or the embedding table)."""

    def __init__(self, R):
        super().__init__()
        self.R = R

    def forward(self, w):
        return w @ self.R.to(w.dtype)


class _Left(nn.Module):
    """W -> R^T @ W (a linear writing to the rotated stream)."""

    def __init__(self, R):
        super().__init__()
        self.R = R

    def forward(self, w):
        return self.R.to(w.dtype).T @ w


class _Heads(nn.Module):
    """Per head of head_dim D: v_proj rows -> R2^T @ rows (out_side) or o_proj columns -> cols @ R2."""

    def __init__(self, R, D: int, out_side: bool):
        super().__init__()
        self.R, self.D, self.out_side = R, D, out_side

    def forward(self, w):
        rotate = rotation.rotate_head_rows if self.out_side else rotation.rotate_head_columns
        return rotate(w, self.R.to(w.dtype), self.D)


class _Switch:
    """Whether the search's fake quantization is on (off while the float teacher of the KL loss runs)."""
    on = True


class _FakeQuantWeight(nn.Module):
    def __init__(self, spec, switch: _Switch):
        super().__init__()
        self.spec, self.switch = spec, switch

    def forward(self, w):
        return fake_quant_weight(w, self.spec).to(w.dtype) if self.switch.on else w


def _loss(model, batch, kind: str, switch: _Switch) -> torch.Tensor:
    """The search loss of one batch of blocks (`switch` turns the fake quantization off for the teacher)."""
    logits = model(batch[:, :-1]).float()
    if kind == "ce":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    switch.on, kv = False, model.kv_cache_bits
    model.set_kv_cache_bits(None)
    try:
        with torch.no_grad(), parametrize.cached():
            teacher = model(batch[:, :-1])
    finally:
        switch.on = True
        model.set_kv_cache_bits(kv)
    return distillation_kl(logits, teacher)


def learn_rotations(model: Transformer, config: SpinQuantConfig, tokens: torch.Tensor, progress=None,
                    log=None, heldout: torch.Tensor | None = None):
    """Learn R1 and the R2s on a norm-folded float model whose down_proj already carries R4 (the model
    is left as it was). Returns (R1, [R2 per layer], loss per step, (before, after)): the last is the mean
    loss on the `heldout` blocks before the first and after the last step (None without them)."""
    if config.loss not in ("ce", "kl"):
        raise PocketQuantError(f"unknown SpinQuant loss {config.loss!r}; use ce or kl")
    cfg = model.config
    R1_0, R2_0 = rotation.random_rotations(model, config.seed)
    if not config.learn:
        return R1_0, R2_0, [], None
    dev = model.device
    R1 = nn.Parameter(R1_0.float().to(dev))
    R2 = [nn.Parameter(r.float().to(dev)) for r in R2_0]
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    scheme, hooks, registered, switch = config.scheme, [], [], _Switch()

    def reg(module, param_name, p):
        parametrize.register_parametrization(module, param_name, p)
        registered.append((module, param_name))

    reg(model.embed_tokens, "weight", _Right(R1))
    reg(model.lm_head, "weight", _Right(R1))
    for layer, r2 in zip(model.layers, R2):
        for name in rotation.READS_RESIDUAL:
            reg(layer.get_submodule(name), "weight", _Right(R1))
        for name in rotation.WRITES_RESIDUAL:
            reg(layer.get_submodule(name), "weight", _Left(R1))
        reg(layer.self_attn.v_proj, "weight", _Heads(r2, cfg.head_dim, out_side=True))
        reg(layer.self_attn.o_proj, "weight", _Heads(r2, cfg.head_dim, out_side=False))
    linears = {f"layers.{i}.{n}": layer.get_submodule(n) for i, layer in enumerate(model.layers)
               for n in (*rotation.READS_RESIDUAL, *rotation.WRITES_RESIDUAL)}
    linears["lm_head"] = model.lm_head
    for name, lin in linears.items():
        spec = scheme.spec_for(name) if name != "lm_head" else scheme.output
        if spec is None:
            continue
        if spec.act is not None:  # returning None leaves the input as it is (quantization switched off)
            hooks.append(lin.register_forward_pre_hook(
                lambda m, args, a=spec.act: (fake_quant_per_token(args[0], a).to(args[0].dtype),) if switch.on
                else None))
        if config.fake_quant_weights:
            reg(lin, "weight", _FakeQuantWeight(spec.weight, switch))
    kv_before = model.kv_cache_bits
    model.set_kv_cache_bits(scheme.kv_cache_bits)
    world, rank = world_and_rank()
    losses = []

    def heldout_loss():
        with torch.no_grad():
            return sum(_loss(model, heldout[i:i + 1].to(dev), config.loss, switch).item()
                       for i in range(len(heldout))) / len(heldout)

    try:
        before = heldout_loss() if heldout is not None else None
        steps = range(config.iterations)
        for step in (progress(steps, desc="spinquant", unit="step") if progress and rank == 0 else steps):
            first = ((step * world + rank) * config.batch) % tokens.shape[0]
            batch = tokens[first:first + config.batch].to(dev)
            loss = _loss(model, batch, config.loss, switch)
            loss.backward()
            lr = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.iterations))
            with torch.no_grad():
                for R in (R1, *R2):
                    if world > 1:
                        torch.distributed.all_reduce(R.grad)
                        R.grad /= world
                    R.copy_(cayley_step(R, R.grad, lr).float())
                    R.grad = None
            losses.append(loss.item())
            if log:
                log(step, loss.item())
        after = heldout_loss() if heldout is not None else None
    finally:
        for h in hooks:
            h.remove()
        for module, name in registered:
            if parametrize.is_parametrized(module, name):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        for n, p in model.named_parameters():
            p.requires_grad_(requires.get(n, False))
        model.set_kv_cache_bits(kv_before)
    return (R1.detach().double().cpu(), [r.detach().double().cpu() for r in R2], losses,
            None if heldout is None else (before, after))


def save_rotations(path: str | Path, R1: torch.Tensor, R2: list[torch.Tensor], config: SpinQuantConfig):
    tensors = {"R1": R1.double().contiguous(), **{f"R2.{i}": r.double().contiguous() for i, r in enumerate(R2)}}
    meta = {"format": "pocketquant.rotations", "config": str(config.to_dict())}
    atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata=meta))


def load_rotations(path: str | Path, model: Transformer) -> tuple[torch.Tensor, list[torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise PocketQuantError(f"no such rotations file: {path}")
    try:
        t = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise PocketQuantError(f"{path}: not a readable rotations file (truncated or corrupt?): {e}") from e
    cfg = model.config
    R2 = [t.get(f"R2.{i}") for i in range(cfg.n_layers)]
    if "R1" not in t or t["R1"].shape != (cfg.dim, cfg.dim) or any(
            r is None or r.shape != (cfg.head_dim, cfg.head_dim) for r in R2):
        raise PocketQuantError(f"{path}: rotations do not fit this model (dim {cfg.dim}, head_dim {cfg.head_dim}, "
                               f"{cfg.n_layers} layers)")
    return t["R1"], R2


def prepare(model: Transformer, config: SpinQuantConfig, tokens: torch.Tensor | None, progress=None,
            rotations: str | Path | None = None, save_to: str | Path | None = None, log=None,
            heldout: torch.Tensor | None = None):
    """The whole offline part: fold norms, merge R4, learn (or load) R1/R2, merge them. Returns the
    rotated float model (quantize it next), the loss curve of the search and its held-out loss before
    and after (see learn_rotations)."""
    r3 = config.scheme.kv_cache_bits == 8
    rotation.check_rotatable(model, r3)
    rotation.fold_norms(model)
    losses, held = [], None
    if rotations:
        R1, R2 = load_rotations(rotations, model)
    else:
        downs = [layer.mlp.down_proj for layer in model.layers]
        originals = [d.weight.detach().clone() for d in downs]
        with torch.no_grad():  # R4 is fixed: merged for the search, which then sees it online
            for d in downs:
                d.weight.copy_(hadamard_transform(d.weight.double()).to(d.weight.dtype))
        model.set_online_hadamards(down=True, qk=r3)
        try:
            R1, R2, losses, held = learn_rotations(model, config, tokens, progress, log, heldout)
        finally:  # back to the folded model: rotate() merges every rotation at once
            with torch.no_grad():
                for d, w in zip(downs, originals):
                    d.weight.copy_(w)
            model.set_online_hadamards(down=False, qk=False)
    if save_to:
        save_rotations(save_to, R1, R2, config)
    rotation.rotate(model, R1, R2, r4=True, r3=r3)
    return model, losses, held

"""GPTQ (Frantar et al., 2022): quantize each block linear's columns in turn, pushing every column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

Layer by layer, as a deployed model computes: the calibration inputs of layer i are the outputs of the
already-quantized layers before it, and each linear's Hessian comes from its inputs after the scheme's
int8 activation quantization. Peak memory is one decoder layer plus the calibration activations.
After each layer the state is checkpointed, so a killed run resumes from the last finished layer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file

from pocketquant.errors import PocketQuantError
from pocketquant.files import StateDir, tensors_digest
from pocketquant.layers import QuantLinear, check_plan, linear_plan, set_module
from pocketquant.model import Transformer
from pocketquant.numerics import check_finite, fake_quant_per_token, group_scales, quantize_with_scales
from pocketquant.quant.context import MAX_SAMPLES, MAX_SEQ_LEN, config_dict, config_from_dict, in_range
from pocketquant.quant.rtn import quantize_embedding
from pocketquant.scheme import PRESETS, QuantScheme, WeightSpec

MAX_BLOCK = 1 << 14  # columns updated together, at most
# GPTAQ's pull, the default (random Hadamard + GPTQ on SmolLM2-135M, first 16k evaluation tokens: perplexity
# 11.045 at 0.25 against 11.257 at 0, RTN 13.404, float 10.595)
ASYMMETRY = 0.25

# Linears that read the same input share one Hessian.
INPUTS = {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn",
          "self_attn.o_proj": "o", "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "down"}


@dataclass(frozen=True)
class GPTQConfig:
    scheme: QuantScheme = field(default_factory=lambda: PRESETS["int4-eo8"])
    samples: int = 128  # calibration blocks
    seq_len: int = 512  # tokens per block
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    # quantize columns by decreasing Hessian diagonal, group scales fixed up front from the original weights
    # (SmolLM2-135M, 32 x 512 calibration tokens, first 16k evaluation tokens: perplexity 12.21 vs 13.64
    # without it, RTN 13.41, float 10.60)
    act_order: bool = True
    block: int = 128  # columns updated together (a multiple of the group size)
    text: str | None = None  # the calibration text (a file; None: the shipped calibration text)
    # GPTAQ (Li et al., 2025): how far each linear is pulled toward the float model's output on the float
    # model's own inputs, correcting the error the quantized layers before it left (0: plain GPTQ)
    asymmetry: float = ASYMMETRY
    VERSION: ClassVar[int] = 2  # 1: plain GPTQ only (no asymmetry)

    def __post_init__(self):
        if not 0 <= self.damp < math.inf:  # also refuses NaN
            raise PocketQuantError(f"GPTQ damping must be a finite number >= 0, got {self.damp}")
        if not 0 <= self.asymmetry <= 1:  # also refuses NaN
            raise PocketQuantError(f"GPTQ asymmetry must be between 0 and 1, got {self.asymmetry}")
        if min(self.samples, self.seq_len, self.block) < 1:
            raise PocketQuantError(f"GPTQ needs samples, seq_len and block >= 1, got {self.samples}, "
                                   f"{self.seq_len} and {self.block}")
        in_range("GPTQ", samples=(self.samples, 1, MAX_SAMPLES), seq_len=(self.seq_len, 2, MAX_SEQ_LEN),
                 block=(self.block, 1, MAX_BLOCK))
        groups = {s.weight.group_size for s in (self.scheme.linear, *(o for _, o in self.scheme.overrides)) if s}
        if any(g and self.block % g for g in groups):
            raise PocketQuantError(f"the GPTQ block ({self.block} columns) must be a multiple of the scheme's group "
                                   f"size{'s' if len(groups) > 1 else ''} ({', '.join(map(str, sorted(groups)))})")

    def to_dict(self) -> dict:
        return config_dict(self, "gptq")

    @classmethod
    def from_dict(cls, d: dict) -> "GPTQConfig":
        if isinstance(d, dict) and d.get("version", 1) == 1:  # made before GPTAQ: replayed as it was made
            d = {**d, "asymmetry": 0.0}
        return config_from_dict(cls, d, "gptq")

    def check(self, model: Transformer, ctx):
        from pocketquant.checkpoints import check_length

        check_length(model.config, self.seq_len, "--calib-len")
        ctx.blocks(self.text, self.samples, self.seq_len, at_most=True)

    def apply(self, model: Transformer, ctx) -> Transformer:
        """GPTQ on the first `samples` blocks of `text`, checkpointed in OUT.gptq-state/ (kept until the
        packed file is written)."""
        return apply(model, self, ctx.blocks(self.text, self.samples, self.seq_len, at_most=True), ctx.progress,
                     state_dir=ctx.beside_out(".gptq-state"), note=ctx.note)


def gptq_weight(w: torch.Tensor, H: torch.Tensor, spec: WeightSpec, damp: float = 0.01, act_order: bool = True,
                block: int = 128, cross: torch.Tensor | None = None, asymmetry: float = 0.0):
    """Quantize w [out, in] against the Hessian H [in, in] of its inputs -> (q int8, scales float32), the
    same form as `numerics.quantize_weight`. Each group's scale is set, by the scheme's rule, from the
    group's weights as updated when quantization reaches it (with act_order: from the original weights); the
    search rule weighs each column's error by the Hessian's diagonal (its input's mean square).
    GPTAQ: with `cross` = 2/n sum((x - x~) x~^T), x the float model's inputs and x~ the quantized model's,
    each column also pushes `asymmetry` times its share of w (x - x~) x~^T H^-1 onto the columns after it, so
    that the quantized linear on x~ comes closer to the float one on x."""
    W = w.detach().float().clone()
    out_f, in_f = W.shape
    g = spec.group_for(in_f)
    if not act_order:  # each group's scale comes from its weights as updated: the whole group in one block
        block = max(g, block // g * g)
    H = H.double().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: any value works, 0 is simplest
    H[dead, dead] = 1
    W[:, dead] = 0
    C = None if cross is None or asymmetry == 0 else cross.double().clone()
    if C is not None:
        C[:, dead] = 0
    mean_square = torch.diag(H).float()  # of each input: what the search rule weighs a column's error by
    dev = W.device
    scales = torch.zeros(out_f, in_f // g, device=dev)
    perm = torch.arange(in_f, device=dev)
    if act_order:
        scales = group_scales(W.reshape(out_f, -1, g), spec, mean_square.reshape(-1, g))
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        C = None if C is None else C[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(in_f, dtype=H.dtype, device=dev)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as e:
        raise PocketQuantError(f"GPTQ: the Hessian is not positive definite even with damping {damp}; "
                               "raise --damp or use more calibration samples") from e
    # column i's pull onto each later column j (P[i, i] = 0): C H^-1 split along GPTQ's order of columns
    P = None if C is None else (asymmetry * torch.triu(C @ U.T, 1) @ U).float()
    U = U.float()
    Q = torch.zeros_like(W)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1, err = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1, device=dev)
        before = None if P is None else W1.clone()  # each column as quantization reaches it (what it pulls with)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if not act_order and col % g == 0:  # first column of a group: its scale from the current weights
                importance = mean_square[col:col + g][None]
                scales[:, col // g] = group_scales(W1[:, i:i + g].reshape(out_f, 1, g), spec, importance)[:, 0]
            s = scales[:, col // g]
            q = quantize_with_scales(W1[:, i], s, spec.bits)
            Q[:, i1 + i] = q
            e = (W1[:, i] - q * s) / U[i1 + i, i1 + i]
            if P is not None:
                before[:, i] = W1[:, i]
                W1[:, i:] += before[:, i, None] * P[i1 + i, i1 + i:i2][None, :]  # P[i, i] = 0: column i kept
            W1[:, i:] -= e[:, None] * U[i1 + i, i1 + i:i2][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
        if P is not None:
            W[:, i2:] += before @ P[i1:i2, i2:]
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.int8), scales


class LayerState:
    """The checkpoint of a layer-by-layer run (a `StateDir`): the quantized layers so far and the next layer's
    inputs (one or more named streams)."""

    def __init__(self, path: Path, key: dict, what: str = "GPTQ"):
        self.dir, self.what = StateDir(path, what, key), what

    def done(self, n_layers: int) -> int:
        """Layers already quantized by an earlier run with the same settings and model (0 if none)."""
        info = self.dir.open() or {"done": 0}
        done = info.get("done")
        if not (isinstance(done, int) and 0 <= done <= n_layers):
            raise PocketQuantError(f"{self.dir.path}: damaged {self.what} state (done={done!r}); delete it to start "
                                   "over")
        return done

    def save(self, i: int, layer: torch.nn.Module, **streams: torch.Tensor):
        tensors = {k: v.cpu().contiguous() for k, v in layer.state_dict().items()
                   if k.endswith(("qweight", "scales"))}
        inputs = {k: v.cpu().contiguous() for k, v in streams.items()}
        self.dir.commit({"done": i + 1}, {f"layer-{i}.safetensors": lambda p: save_file(tensors, str(p)),
                                          f"inputs-{i}.safetensors": lambda p: save_file(inputs, str(p))},
                        drop=[f"inputs-{i - 1}.safetensors"])  # the previous layer's inputs

    def restore(self, i: int, layer: torch.nn.Module, plan: dict):
        tensors = load_file(str(self.dir.file(f"layer-{i}.safetensors")),
                            device=str(layer.input_layernorm.weight.device))
        for name, spec in plan.items():
            q = QuantLinear(*_shape(layer.get_submodule(name)), spec)
            q.qweight, q.scales = tensors[f"{name}.qweight"], tensors[f"{name}.scales"]
            set_module(layer, name, q)

    def streams(self, device) -> dict[str, torch.Tensor]:
        done = self.dir.info["done"]
        return load_file(str(self.dir.file(f"inputs-{done - 1}.safetensors")), device=str(device))


def _shape(linear) -> tuple[int, int]:
    return linear.in_features, linear.out_features


@torch.no_grad()
def apply(model: Transformer, config: GPTQConfig, tokens: torch.Tensor, progress=None,
          state_dir: str | Path | None = None, batch: int = 8, note=lambda message: None) -> Transformer:
    """Quantize `model` in place with GPTQ on calibration `tokens` [n, T]; embedding and output by RTN.
    With `state_dir`, each finished layer is checkpointed there and a rerun resumes after it (saying so to
    `note`); the caller removes it (`gptq_state(state_dir).remove()`) once the result is safely written. Runs on
    the model's device (CPU, or CUDA when the model is there)."""
    run = LayerRun(model, config, tokens, state_dir, "gptq", note)
    state, start, n_layers, cos, sin, mask = run.state, run.start, run.n_layers, run.cos, run.sin, run.mask
    x = run.streams["x"] if start else run.embedded(tokens)
    # GPTAQ also follows the float model's own stream of inputs
    x_float = (run.streams["float"] if start else x) if config.asymmetry else None
    note(f"gptq: {n_layers - start} layers on {tokens.shape[0]} blocks of {tokens.shape[1]} tokens")
    layers = range(start, n_layers)
    try:
        for i in (progress(layers, desc="gptq", unit="layer", initial=start, total=n_layers) if progress else layers):
            layer = model.layers[i]
            layer_plan = run.plan_of(i)
            hessians, crosses, x_float = _hessians(layer, layer_plan, x, cos, sin, mask, batch, x_float)
            for name, spec in layer_plan.items():
                linear = layer.get_submodule(name)
                check_finite(linear.weight, f"layers.{i}.{name}")
                q, scales = gptq_weight(linear.weight, hessians[INPUTS[name]], spec.weight, config.damp,
                                        config.act_order, config.block, crosses.get(INPUTS[name]),
                                        config.asymmetry)
                set_module(layer, name, QuantLinear.from_int(q, scales, spec))
            x = torch.cat([layer(xb, cos, sin, mask, None, 0) for xb in x.split(batch)])
            if state:
                state.save(i, layer, x=x, **({} if x_float is None else {"float": x_float}))
    except PocketQuantError:
        if state:  # a refused run (e.g. a Hessian GPTQ cannot invert) leaves nothing behind
            state.dir.remove(only_if_uncommitted=True)
        raise
    return run.finish()


class LayerRun:
    """What a layer-by-layer quantizer (GPTQ, SignRound) sets up before its first layer and does after its last:
    the scheme's plan, the checkpoint keyed by the settings, tokens and weights (layers an earlier run finished are
    restored, and the next layer's input streams read back), RoPE and mask; at the end, output layer and
    embedding by RTN."""

    def __init__(self, model: Transformer, config, tokens: torch.Tensor, state_dir, what: str, note):
        self.model, self.scheme = model, config.scheme
        check_plan(model, self.scheme)
        model.set_kv_cache_bits(self.scheme.kv_cache_bits)  # attention sees keys/values as deployed
        self.plan, self.n_layers, T = linear_plan(model, self.scheme), len(model.layers), tokens.shape[1]
        self.state = None
        if state_dir:  # the key: the settings, the calibration tokens and the weights it starts from
            self.state = LayerState(Path(state_dir), {**config.to_dict(), "tokens": tensors_digest({"tokens": tokens}),
                                                      "model": tensors_digest(model.state_dict())},
                                    "GPTQ" if what == "gptq" else what)
        self.start = self.state.done(self.n_layers) if self.state else 0
        self.cos, self.sin = model.rope(0, T, torch.float32)
        self.mask = model.attention_mask(0, T, False, model.device)
        for i in range(self.start):
            self.state.restore(i, model.layers[i], self.plan_of(i))
        self.streams = self.state.streams(model.device) if self.start else None
        if self.start:
            note(f"{what}: resuming from {state_dir}: layers 0 to {self.start - 1} of {self.n_layers} were done by an "
                 "earlier run")

    def plan_of(self, i: int) -> dict:
        """The quantized linears of layer i, by their names within the layer."""
        return {s: self.plan[f"layers.{i}.{s}"] for s in INPUTS if self.plan[f"layers.{i}.{s}"] is not None}

    @torch.no_grad()
    def embedded(self, tokens: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """The first layer's input: the float embedding of the calibration tokens."""
        tokens = tokens.to(self.model.device)
        return torch.cat([self.model.embed_tokens(t).float() for t in tokens.split(batch)])

    def finish(self) -> Transformer:
        model = self.model
        if self.plan["lm_head"] is not None:
            model.lm_head = QuantLinear.from_float(model.lm_head.weight, self.plan["lm_head"], "lm_head")
        quantize_embedding(model, self.scheme)
        return model


def gptq_state(state_dir: str | Path) -> StateDir:
    """The checkpoint directory `apply` keeps (whatever its key): `.remove()` it once the result is saved."""
    return StateDir(state_dir, "GPTQ", {})


def _hessians(layer, layer_plan: dict, x, cos, sin, mask, batch: int, x_float=None):
    """H = 2 / n * sum(x x^T) over every calibration token, for each distinct input of the layer's
    quantized linears (after their int8 activation quantization, as they will see it) -> (hessians, crosses,
    the float layer's output). With `x_float`, the float model's inputs to the layer, also GPTAQ's cross term
    2 / n * sum((x - x~) x~^T) for each of them, x the float model's input to the linear (no activation
    quantization) and x~ the quantized model's; else no crosses and no output."""
    sums, crosses, count, hooks, floats = {}, {}, {}, [], {}
    float_pass = False

    def hook(name):
        def record(module, args):
            key, a = INPUTS[name], args[0].reshape(-1, args[0].shape[-1]).float()
            if float_pass:
                floats[key] = a
                return
            spec = layer_plan[name]
            a = fake_quant_per_token(a, spec.act) if spec.act else a
            sums[key] = sums.get(key, 0) + (a.T @ a).double()  # float32 per batch, float64 across batches
            if x_float is not None:
                crosses[key] = crosses.get(key, 0) + ((floats[key] - a).T @ a).double()
            count[key] = count.get(key, 0) + a.shape[0]
        return record

    first = {}
    for name in layer_plan:  # one hook per distinct input
        first.setdefault(INPUTS[name], name)
    for name in first.values():
        hooks.append(layer.get_submodule(name).register_forward_pre_hook(hook(name)))
    out = []
    try:
        for b, xb in enumerate(x.split(batch)):
            if x_float is not None:  # the float model's pass first: keep its inputs
                float_pass = True
                out.append(layer(x_float[b * batch:(b + 1) * batch], cos, sin, mask, None, 0))
                float_pass = False
            layer(xb, cos, sin, mask, None, 0)
    finally:
        for h in hooks:
            h.remove()
    scale = {k: 2.0 / n for k, n in count.items()}
    return ({k: (scale[k] * v).float() for k, v in sums.items()},
            {k: (scale[k] * v).float() for k, v in crosses.items()}, torch.cat(out) if out else None)

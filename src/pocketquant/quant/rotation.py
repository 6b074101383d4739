"""Function-preserving transforms of a float model (SpinQuant's offline part).

`fold_norms` moves every RMSNorm weight into the linears that read the normalized stream, so the
residual stream is rotation-invariant; `rotate` merges R1 (residual stream), per-layer R2 (between
v_proj and o_proj), R4 (down_proj's input, paired with an online Hadamard) and R3 (queries and keys,
online only) into the weights. Products are computed in float64. The model computes the same function
afterwards, up to float rounding."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from pocketquant.errors import PocketQuantError
from pocketquant.hadamard import hadamard_transform, has_hadamard, random_hadamard
from pocketquant.model import Transformer

READS_RESIDUAL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITES_RESIDUAL = ("self_attn.o_proj", "mlp.down_proj")


def rotate_head_rows(w: torch.Tensor, R: torch.Tensor, D: int) -> torch.Tensor:
    """v_proj: each head's D output rows r -> R^T @ r, so its output is v @ R."""
    return (R.T @ w.reshape(-1, D, w.shape[1])).reshape(w.shape)


def rotate_head_columns(w: torch.Tensor, R: torch.Tensor, D: int) -> torch.Tensor:
    """o_proj: each head's D input columns c -> c @ R, undoing the rotation of the head's values."""
    return (w.reshape(w.shape[0], -1, D) @ R).reshape(w.shape)


def _set(linear: nn.Module, w: torch.Tensor):
    linear.weight = nn.Parameter(w.to(linear.weight.dtype), requires_grad=linear.weight.requires_grad)


@torch.no_grad()
def fold_norms(model: Transformer) -> Transformer:
    """RMSNorm(x) * g feeding W  ==  RMSNorm(x) feeding W diag(g); every norm weight becomes 1.
    A tied output layer is untied first (the embedding must not take the final norm)."""
    if model.lm_head.weight is model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.embed_tokens.weight.detach().clone())
        model.config = dataclasses.replace(model.config, tie_embeddings=False)
    pairs = [(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
             for layer in model.layers]
    pairs += [(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in model.layers]
    pairs.append((model.norm, [model.lm_head]))
    for norm, linears in pairs:
        g = norm.weight.double()
        for lin in linears:
            _set(lin, lin.weight.double() * g[None, :])
        norm.weight.fill_(1.0)
    return model


def random_rotations(model: Transformer, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """R1 [dim, dim] and one R2 [head_dim, head_dim] per layer: random Hadamard matrices (random
    orthogonal, with a warning, for a width no Hadamard construction here covers)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config

    def one(n):
        if has_hadamard(n):
            return random_hadamard(n, gen)
        warnings.warn(f"no Hadamard matrix of order {n}: using a random orthogonal matrix", stacklevel=3)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]

    return one(cfg.dim), [one(cfg.head_dim) for _ in range(cfg.n_layers)]


def check_rotatable(model: Transformer, r3: bool = False):
    cfg, problems = model.config, []
    if not has_hadamard(cfg.ffn_dim):
        problems.append(f"R4 needs a Hadamard matrix of order ffn_dim={cfg.ffn_dim}")
    if r3 and not has_hadamard(cfg.head_dim):
        problems.append(f"R3 needs a Hadamard matrix of order head_dim={cfg.head_dim}")
    if cfg.hadamard_down or cfg.hadamard_qk:
        problems.append("the model is already rotated")
    if problems:
        raise PocketQuantError("cannot rotate this model: " + "; ".join(problems))


@torch.no_grad()
def rotate(model: Transformer, R1: torch.Tensor, R2: list[torch.Tensor], r4: bool = True, r3: bool = False
           ) -> Transformer:
    """Merge the rotations into a norm-folded float model (in place), and turn on the online Hadamard
    transforms R4 (down_proj input) and, for an int8 KV cache, R3 (queries and keys)."""
    check_rotatable(model, r3)
    cfg = model.config
    R1 = R1.double().to(model.device)
    emb = model.embed_tokens
    emb.weight = nn.Parameter((emb.weight.double() @ R1).to(emb.weight.dtype), requires_grad=False)
    for layer, r2 in zip(model.layers, R2):
        for name in READS_RESIDUAL:
            lin = layer.get_submodule(name)
            _set(lin, lin.weight.double() @ R1)
        for name in WRITES_RESIDUAL:
            lin = layer.get_submodule(name)
            _set(lin, R1.T @ lin.weight.double())
        r2, D = r2.double().to(model.device), cfg.head_dim
        v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
        _set(v, rotate_head_rows(v.weight.double(), r2, D))
        _set(o, rotate_head_columns(o.weight.double(), r2, D))
        if r4:
            down = layer.mlp.down_proj
            _set(down, hadamard_transform(down.weight.double()))
    _set(model.lm_head, model.lm_head.weight.double() @ R1)
    model.set_online_hadamards(down=r4, qk=r3)
    return model

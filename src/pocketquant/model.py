"""The one Llama definition: RMSNorm, RoPE (with Llama 3 scaling), GQA attention, SwiGLU MLP,
a static preallocated KV cache. Parameter names follow Hugging Face (without the `model.` prefix)."""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from pocketquant.config import ModelConfig, RopeScaling
from pocketquant.errors import PocketQuantError
from pocketquant.hadamard import hadamard_transform
from pocketquant.numerics import fake_quant_per_token, quantize_per_token


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, Llama 3 scaling applied when given."""
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv_freq = 1.0 / (theta ** (steps / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache(nn.Module):
    """Static per-layer cache [B, n_kv_heads, max_seq_len, head_dim], written in place. With bits=8 it
    holds int8 values with a float32 scale and zero point per token and head (asymmetric, the numerics
    of activations) and `update` returns the dequantized keys and values."""

    def __init__(self, batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None, bits: int | None = None):
        super().__init__()
        self.bits, self.dtype = bits, dtype
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        store = torch.int8 if bits == 8 else dtype
        for name in ("k", "v"):
            self.register_buffer(name, torch.zeros(shape, dtype=store, device=device), persistent=False)
            if bits == 8:  # [B, n_kv_heads, max_seq_len]
                for part in ("scale", "zero"):
                    self.register_buffer(f"{name}_{part}", torch.zeros(shape[:3], device=device), persistent=False)

    def row(self, b: int) -> "KVCache":
        """Sequence b of this cache as a cache of its own (views: what one writes, the other sees)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.bits, view.dtype = self.bits, self.dtype
        for name, t in self.named_buffers():
            view.register_buffer(name, t[b:b + 1], persistent=False)
        return view

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        end = start_pos + k.shape[2]
        if self.bits != 8:
            self.k[:, :, start_pos:end] = k
            self.v[:, :, start_pos:end] = v
            return self.k[:, :, :end], self.v[:, :, :end]
        out = []
        for name, x in (("k", k), ("v", v)):
            q, scale, zero = quantize_per_token(x)
            getattr(self, name)[:, :, start_pos:end] = q.to(torch.int8)
            getattr(self, f"{name}_scale")[:, :, start_pos:end] = scale[..., 0]
            getattr(self, f"{name}_zero")[:, :, start_pos:end] = zero[..., 0]
            q = getattr(self, name)[:, :, :end].float()
            zero, scale = (getattr(self, f"{name}_{p}")[:, :, :end, None] for p in ("zero", "scale"))
            out.append(((q - zero) * scale).to(self.dtype))
        return tuple(out)



class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_bits: int | None = None  # 8: keys and values pass through int8 (the cache's numerics)
        self.hadamard = cfg.hadamard_qk  # R3: rotate queries and keys (after RoPE) by a Hadamard transform
        # the fast runtime's causal attention (q, k, v, first query position) -> [B, T, H * D], or None where
        # it does not apply; None: PyTorch's SDPA
        self.native_attention = None

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start_pos: int):
        B, T, _ = x.shape
        # [B, T, H*D] -> [B, H, T, D]
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.hadamard:  # q.k is unchanged; keys spread their outliers before an int8 cache
            q, k = hadamard_transform(q), hadamard_transform(k)
        if isinstance(start_pos, torch.Tensor):  # one token per sequence, each in its own cache row
            out = self._attend_rows(q, k, v, cache, start_pos.tolist())
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        elif self.kv_bits == 8:
            k, v = fake_quant_per_token(k).to(q.dtype), fake_quant_per_token(v).to(q.dtype)
        if self.native_attention is not None and not isinstance(start_pos, torch.Tensor):
            out = self.native_attention(q, k, v, start_pos if cache is not None else 0)
            if out is not None:
                return self.o_proj(out)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


    def _attend_rows(self, q, k, v, caches: list[KVCache], positions: list[int]) -> torch.Tensor:
        """Each sequence attends over its own cache (one per sequence) only, exactly as it would alone:
        [B, H, 1, D]."""
        rows = []
        for b, p in enumerate(positions):
            keys, values = caches[b].update(p, k[b:b + 1], v[b:b + 1])
            rows.append(F.scaled_dot_product_attention(q[b:b + 1], keys, values,
                                                       enable_gqa=self.n_heads != self.n_kv_heads))
        return torch.cat(rows)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.hadamard = cfg.hadamard_down  # R4: down_proj reads its input Hadamard-transformed

    def forward(self, x):
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(hadamard_transform(h) if self.hadamard else h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, start_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


def physical_memory() -> int:
    """Bytes of RAM (no limit where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


class Transformer(nn.Module):
    """A Llama-architecture decoder. `forward(tokens [B, T], caches, start_pos) -> logits [B, T, V]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        self.reset_rope()
        self.kv_cache_bits: int | None = None
        # A runtime may install a native one-token step through every layer: fused_decode(x, caches,
        # start_pos) -> x, or None where it does not apply.
        self.fused_decode = None
        self.gradient_checkpointing = False  # training: recompute each layer in the backward pass

    def set_online_hadamards(self, down: bool, qk: bool):
        """Turn on R4 (down_proj input) / R3 (queries and keys) for a model whose weights were rotated to match."""
        self.config = dataclasses.replace(self.config, hadamard_down=down, hadamard_qk=qk)
        for layer in self.layers:
            layer.mlp.hadamard, layer.self_attn.hadamard = down, qk

    def set_kv_cache_bits(self, bits: int | None):
        """None: float KV cache; 8: int8 per token and head (new caches, and attention without a cache)."""
        self.kv_cache_bits = bits
        for layer in self.layers:
            layer.self_attn.kv_bits = bits

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device  # the final norm stays float in every scheme

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def reset_rope(self):
        """(Re)compute the RoPE frequencies, e.g. after building the model on the meta device."""
        cfg, device = self.config, self.device
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.inv_freq = inv_freq.to("cpu" if device.type == "meta" else device)

    def new_caches(self, batch: int = 1, max_seq_len: int | None = None,
                   dtype: torch.dtype | None = None) -> list[KVCache]:
        """One preallocated KV cache per layer."""
        cfg = self.config
        length = max_seq_len or cfg.max_seq_len
        per_value = 1 if self.kv_cache_bits == 8 else (dtype or self.dtype).itemsize
        need = 2 * cfg.n_layers * batch * cfg.n_kv_heads * length * cfg.head_dim * per_value
        if self.device.type == "cpu" and need > physical_memory():
            raise PocketQuantError(f"a KV cache of {batch} x {length:,} tokens needs {need / 2**30:,.1f} GiB, more "
                                   "than this machine's memory: ask for fewer tokens")
        return [KVCache(batch, max_seq_len or cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim,
                        dtype or self.dtype, self.device, self.kv_cache_bits) for _ in range(cfg.n_layers)]

    def rope(self, start_pos: int | torch.Tensor, length: int, dtype: torch.dtype):
        """cos, sin [T, D] from start_pos; for positions [B] (one token each), [B, 1, 1, D]."""
        if isinstance(start_pos, torch.Tensor):
            pos = start_pos.to(self.inv_freq.device, torch.float32)
        else:
            pos = torch.arange(start_pos, start_pos + length, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        if isinstance(start_pos, torch.Tensor):
            emb = emb[:, None, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, tokens: torch.Tensor, caches: list[KVCache] | None = None,
                start_pos: int | torch.Tensor = 0, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V], or [B, 1, V] for the last position only (what generation needs). `start_pos` may be
        positions [B] instead: one token per sequence (T = 1), each at its own place in a cache of its own
        (caches[layer] is then a list of B caches): batched decoding of sequences of different lengths."""
        T = tokens.shape[1]
        x = self.embed_tokens(tokens)
        fused = None
        if T == 1 and caches is not None and self.fused_decode is not None:
            fused = self.fused_decode(x, caches, start_pos)
        if fused is not None:
            x = fused
        else:
            cos, sin = self.rope(start_pos, T, x.dtype)
            mask = self.attention_mask(start_pos, T, caches is not None, x.device)
            for i, layer in enumerate(self.layers):
                cache = None if caches is None else caches[i]
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, start_pos,
                                                          use_reentrant=False)
                else:
                    x = layer(x, cos, sin, mask, cache, start_pos)
        return self.lm_head(self.norm(x[:, -1:] if last_only else x))

    @staticmethod
    def attention_mask(start_pos: int | torch.Tensor, T: int, cached: bool, device) -> torch.Tensor | None:
        """Boolean causal mask [T, S] over the keys seen so far; None when a single token needs none (and for
        one token per sequence at positions [B], which attend row by row)."""
        if T == 1:
            return None
        S = start_pos + T if cached else T
        q_pos = torch.arange(start_pos if cached else 0, S, device=device)
        return torch.arange(S, device=device)[None, :] <= q_pos[:, None]

"""Meta's prequantized INT4_EO8 layout for tests, written and run independently of pocketquant's own code.

`write_checkpoint` makes what Meta's SpinQuant / QLoRA exporters write (layout from Meta's and ExecuTorch's
loaders): int4 values in int8 tensors [out, in] with float32 scales [out, in / 32] (torchao's absmax / 7.5),
int8 embedding and output rows with float32 scales [rows, 1], bf16 norms, q/k rows in Meta's interleaved RoPE
order, bf16 `adaptor.A/B` for QLoRA. `reference_logits` runs such a checkpoint straight from its state dict
the way Meta's reference code does (complex-number RoPE on interleaved pairs, torchao's per-token
asymmetric int8 activations, R4 as the normalized Sylvester Hadamard, adaptors in float32)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

LINEARS = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
           "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
           "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3"}


def to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's half-split q/k rows -> Meta's interleaved pairs (what convert_llama_weights_to_hf undoes)."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_checkpoint(model, folder: Path, lora_rank: int = 0, spinquant: bool = False, seed: int = 0) -> dict:
    """Quantize the float pocketquant `model` into Meta's layout in `folder`; returns the state dict."""
    c, g = model.config, torch.Generator().manual_seed(seed)
    state = {}
    for i, layer in enumerate(model.layers):
        for ours, theirs in LINEARS.items():
            w = layer.get_submodule(ours).weight.detach().float()
            heads = c.n_heads if "q_proj" in ours else c.n_kv_heads if "k_proj" in ours else 0
            w = to_interleaved(w, heads) if heads else w
            wg = w.reshape(w.shape[0], -1, 32)
            scales = (wg.abs().amax(-1) / 7.5).clamp(min=1e-6)
            key = f"layers.{i}.{theirs}"
            q = torch.clamp(torch.round(wg / scales[..., None]), -8, 7)
            state[f"{key}.weight"] = q.to(torch.int8).reshape(w.shape)
            state[f"{key}.scales"] = scales
            if lora_rank:
                state[f"{key}.adaptor.A.weight"] = (torch.randn(lora_rank, w.shape[1], generator=g) * 0.05).bfloat16()
                state[f"{key}.adaptor.B.weight"] = (torch.randn(w.shape[0], lora_rank, generator=g) * 0.05).bfloat16()
        state[f"layers.{i}.attention_norm.weight"] = layer.input_layernorm.weight.detach().bfloat16()
        state[f"layers.{i}.ffn_norm.weight"] = layer.post_attention_layernorm.weight.detach().bfloat16()
    state["norm.weight"] = model.norm.weight.detach().bfloat16()
    for key, w in (("tok_embeddings", model.embed_tokens.weight), ("output", model.lm_head.weight)):
        scales = (w.detach().float().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-6)
        state[f"{key}.weight"] = torch.round(w.detach().float() / scales).clamp(-128, 127).to(torch.int8)
        state[f"{key}.scales"] = scales
    assert 256 * math.ceil(int(8 * c.dim / 3) / 256) == c.ffn_dim, "a shape whose FFN width Meta's formula gives"
    params = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
              "vocab_size": c.vocab_size, "multiple_of": 256, "ffn_dim_multiplier": None,
              "norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "use_scaled_rope": False,
              "quantization_args": {"group_size": 32, "scheme": "int4_weight_int8_dynamic_activation",
                                    **({"spinquant": True} if spinquant else {})}}
    if lora_rank:
        params["lora_args"] = {"rank": lora_rank, "scale": 2.0}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params))
    return state


def _act_quant(x: torch.Tensor) -> torch.Tensor:
    """torchao's per_token_dynamic_quant: int8 per token, asymmetric, then back to float."""
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zero = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    q = (torch.round(x / scale) + zero).clamp(-128, 127)
    return (q - zero) * scale


def _linear(state: dict, key: str, x: torch.Tensor, lora_scale: float) -> torch.Tensor:
    q, s = state[f"{key}.weight"].float(), state[f"{key}.scales"].float()
    w = (q.reshape(q.shape[0], s.shape[1], -1) * s[..., None]).reshape(q.shape)
    y = F.linear(_act_quant(x), w)
    if f"{key}.adaptor.A.weight" in state:
        a, b = state[f"{key}.adaptor.A.weight"].float(), state[f"{key}.adaptor.B.weight"].float()
        y = y + lora_scale * F.linear(F.linear(x, a), b)
    return y


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] with (even, odd) pairs rotated as complex numbers by freqs [T, D/2]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(freqs), freqs)[:, None, :]).flatten(-2)


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def reference_logits(folder: Path, tokens: list[int]) -> torch.Tensor:
    """Logits [T, V] of the checkpoint in `folder` for one sequence (causal, from position 0)."""
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    p = json.loads((folder / "params.json").read_text())
    dim, H, KV = p["dim"], p["n_heads"], p["n_kv_heads"]
    D, T, eps = dim // H, len(tokens), p["norm_eps"]
    lora = (p.get("lora_args") or {}).get("scale", 0.0)
    inv = 1.0 / p["rope_theta"] ** (torch.arange(0, D, 2).float() / D)
    freqs = torch.outer(torch.arange(T).float(), inv)
    ids = torch.tensor(tokens)
    h = state["tok_embeddings.weight"][ids].float() * state["tok_embeddings.scales"][ids].float()
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(p["n_layers"]):
        k_ = f"layers.{i}."
        x = _rms(h, state[k_ + "attention_norm.weight"], eps)
        q = _rope(_linear(state, k_ + "attention.wq", x, lora).reshape(T, H, D), freqs)
        k = _rope(_linear(state, k_ + "attention.wk", x, lora).reshape(T, KV, D), freqs)
        v = _linear(state, k_ + "attention.wv", x, lora).reshape(T, KV, D)
        k, v = (t.repeat_interleave(H // KV, dim=1) for t in (k, v))
        att = torch.softmax(torch.einsum("thd,shd->hts", q, k) / math.sqrt(D) + mask, -1)
        h = h + _linear(state, k_ + "attention.wo", torch.einsum("hts,shd->thd", att, v).reshape(T, -1), lora)
        x = _rms(h, state[k_ + "ffn_norm.weight"], eps)
        a = F.silu(_linear(state, k_ + "feed_forward.w1", x, lora)) * _linear(state, k_ + "feed_forward.w3", x, lora)
        if p["quantization_args"].get("spinquant"):
            a = a @ _hadamard(a.shape[-1]).T
        h = h + _linear(state, k_ + "feed_forward.w2", a, lora)
    out = _rms(h, state["norm.weight"], eps)
    return _linear(state, "output", out, 0.0)

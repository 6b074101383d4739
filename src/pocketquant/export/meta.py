"""Export a packed model into Meta's prequantized layout (what Meta's `..._INT4_EO8` checkpoints use, and what
ExecuTorch's `export_llama --preq_mode 8da4w_output_8da8w` reads): a directory with `consolidated.00.pth`,
`params.json` and the tokenizer. The integers are written as they are (int4 values unpacked into int8, q/k
rows in Meta's interleaved RoPE order), scales as float32; `checkpoints.meta_int4` reads it back exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pocketquant.checkpoints.common import half_to_interleaved
from pocketquant.checkpoints.meta_int4 import SCHEME
from pocketquant.errors import PocketQuantError
from pocketquant.layers import QuantEmbedding, QuantLinear

_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
          "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
          "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
          "post_attention_layernorm": "ffn_norm"}


def export_meta(model, tokenizer, out: str | Path) -> tuple[Path, tuple[int, int]]:
    """Write the quantized `model` into the directory `out` (created; refused if it exists) -> (out, (groups
    requantized, groups)). Block linears must be int4 on int8 activations; the output layer and embedding int8
    per channel (or float). Every integer is kept, except in groups whose negative scale cannot be flipped
    (`positive_scales`): a model quantized with the search or absmax scale rule exports exactly."""
    from pocketquant.files import atomic_directory

    state, group, requantized = meta_state(model)
    params = meta_params(model.config, group, _lora_args(model))

    def write(folder: Path):
        torch.save(state, folder / "consolidated.00.pth")
        (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            write_tokenizer(tokenizer, folder)
    return atomic_directory(out, write), requantized


def meta_state(model) -> tuple[dict[str, torch.Tensor], int, tuple[int, int]]:
    """Meta's state dict of a quantized model, the group size of its block linears, and (groups requantized
    to make their scales positive, groups in all): see `positive_scales`."""
    # The final norm first: ExecuTorch takes the first tensor's dtype for the checkpoint's float dtype.
    c, state, groups = model.config, {"norm.weight": model.norm.weight.detach().float().clone()}, set()
    requantized = []  # (groups requantized, groups) of each quantized tensor
    if c.hadamard_qk:
        raise PocketQuantError("this model rotates queries and keys online (R3, for an int8 KV cache); Meta's "
                               "layout has no place for it")
    mixed = [n for n, m in model.layers.named_modules() if isinstance(m, QuantLinear) and m.spec.weight.bits == 8]
    if mixed:
        raise PocketQuantError(f"{len(mixed)} block linears are int8 (mixed precision, e.g. layers.{mixed[0]}); Meta's "
                               "layout and ExecuTorch's hold int4 block linears only (GGUF keeps them: --to gguf)")
    for i, layer in enumerate(model.layers):
        for ours, theirs in _NAMES.items():
            m, key = layer.get_submodule(ours), f"layers.{i}.{theirs}"
            heads = c.n_heads if ours.endswith("q_proj") else c.n_kv_heads if ours.endswith("k_proj") else None
            if not isinstance(m, QuantLinear):
                if ours.endswith("norm"):
                    state[f"{key}.weight"] = m.weight.detach().float().clone()
                    continue
                raise PocketQuantError(f"layers.{i}.{ours} is not quantized; Meta's layout has int4 block linears")
            spec = m.spec
            if spec.weight.bits != 4 or spec.act is None or spec.act.symmetric:
                raise PocketQuantError(f"layers.{i}.{ours}: Meta's layout holds int4 weights on int8 asymmetric "
                                       f"activations, not {m.extra_repr()}")
            groups.add(spec.weight.group_for(m.in_features))
            state |= _linear(m, key, heads, requantized)
    if len(groups) != 1:
        raise PocketQuantError(f"block linears with several group sizes ({sorted(groups)}); Meta's layout has one")
    state |= _table(model.embed_tokens, "tok_embeddings", requantized)
    state |= _table(model.lm_head, "output", requantized)
    return state, groups.pop(), (sum(r for r, _ in requantized), sum(n for _, n in requantized))


def positive_scales(q: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The same weights with every scale positive, as ExecuTorch's XNNPACK kernels require -> (q, scales, the
    number of groups that could not stay exact). A group with a negative scale (the signed-max rule gives
    them) is flipped, q -> -q: exact unless it holds the lowest value (-8 for int4; with signed-max, the
    group's largest weight), whose twin +8 does not exist and becomes +7. (Quantizing such a group again by
    the absmax rule instead measured worse on SmolLM2: KL 0.413 vs 0.397.)"""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    n, groups = scales.shape
    qg, s = q.to(torch.int16).reshape(n, groups, -1), scales.float()
    negative = s < 0
    stuck = int((negative & (qg == qmin).any(-1)).sum())
    qg = torch.where(negative[..., None], (-qg).clamp(qmin, qmax), qg)
    return qg.reshape(q.shape).to(torch.int8), s.abs(), stuck


def _linear(m: QuantLinear, key: str, heads: int | None, requantized: list) -> dict[str, torch.Tensor]:
    q, scales, stuck = positive_scales(m.int_weight(), m.scales, 4)
    requantized.append((stuck, scales.numel()))
    if heads:
        q, scales = half_to_interleaved(q, heads), half_to_interleaved(scales, heads)
    d = {f"{key}.weight": q.contiguous(), f"{key}.scales": scales.contiguous()}
    if m.lora is not None:
        b = m.lora.B.weight.detach().to(m.lora.dtype)
        d[f"{key}.adaptor.A.weight"] = m.lora.A.weight.detach().to(m.lora.dtype).clone()
        d[f"{key}.adaptor.B.weight"] = (half_to_interleaved(b, heads) if heads else b).contiguous().clone()
    return d


def _table(m, key: str, requantized: list) -> dict[str, torch.Tensor]:
    """The embedding or output layer: int8 rows with a float32 scale each, or float weights."""
    if isinstance(m, (QuantEmbedding, QuantLinear)):
        spec = m.spec if isinstance(m, QuantEmbedding) else m.spec.weight
        if spec.bits != 8 or spec.group_size != 0 or isinstance(m, QuantLinear) and m.spec.act is None:
            raise PocketQuantError(f"{key}: Meta's layout holds int8 per-channel weights here")
        if getattr(m, "lora", None) is not None:
            raise PocketQuantError(f"{key}: Meta's layout has LoRA adaptors on the block linears only")
        q, scales, stuck = positive_scales(m.qweight, m.scales.reshape(-1, 1), 8)
        requantized.append((stuck, scales.numel()))
        return {f"{key}.weight": q, f"{key}.scales": scales}
    return {f"{key}.weight": m.weight.detach().float().clone()}


def meta_params(config, group: int, lora: dict | None) -> dict:
    """params.json: the shape (FFN width as Meta derives it), RoPE, and the quantization arguments."""
    multiple_of, multiplier = _ffn_params(config.dim, config.ffn_dim)
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size, "multiple_of": multiple_of,
              "ffn_dim_multiplier": multiplier, "norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
              "use_scaled_rope": config.rope_scaling is not None,
              "quantization_args": {"group_size": group, "scheme": SCHEME, "spinquant": config.hadamard_down}}
    if config.head_dim != config.dim // config.n_heads:
        params["head_dim"] = config.head_dim
    if config.rope_scaling is not None:
        r = config.rope_scaling
        if (r.low_freq_factor, r.high_freq_factor, r.original_max_position_embeddings) != (1.0, 4.0, 8192):
            raise PocketQuantError("Meta's layout stores Llama 3 RoPE scaling with low/high frequency factors 1 and "
                                   f"4 over 8192 positions; this model's is {r}")
        params["rope_scale_factor"] = r.factor  # ExecuTorch's name; Meta's own params.json leave it out
    if lora:
        params["lora_args"] = lora
    return params


def _ffn_params(dim: int, ffn_dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) from which Meta's formula gives back `ffn_dim`."""
    base = int(2 * 4 * dim / 3)
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if ffn_dim % multiple_of:
            continue
        for multiplier in (None, *(round(ffn_dim / base, digits) for digits in (1, 2, 3, 6))):
            hidden = base if multiplier is None else int(multiplier * base)
            if multiple_of * math.ceil(hidden / multiple_of) == ffn_dim:
                return multiple_of, multiplier
    raise PocketQuantError(f"no multiple_of / ffn_dim_multiplier of Meta's formula gives an FFN width of {ffn_dim} "
                           f"for dim {dim}")


def _lora_args(model) -> dict | None:
    adapters = [m.lora for m in model.modules() if getattr(m, "lora", None) is not None]
    return {"rank": adapters[0].rank, "scale": adapters[0].scale} if adapters else None


def write_tokenizer(tokenizer, folder: Path):
    """tokenizer.model for a Llama 3 (tiktoken) tokenizer; tokenizer.json + tokenizer_config.json otherwise."""
    spec = tokenizer.to_spec()
    if spec["kind"] == "tiktoken-llama3":
        (folder / "tokenizer.model").write_text(spec["ranks"], encoding="utf-8")
        return
    (folder / "tokenizer.json").write_text(spec["tokenizer_json"], encoding="utf-8")
    config = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "add_bos_token": tokenizer.add_bos,
              "chat_template": tokenizer.chat_template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

"""GGUF export (llama architecture) that llama.cpp loads: F32, F16, Q8_0 or Q4_0 weights.

From a packed int4-eo8 file nothing is re-quantized: our int4 groups of 32 with float16 scales *are*
Q4_0 blocks (same nibble layout, value = (nibble - 8) * scale) and int8 per-channel rows are Q8_0 blocks
with the row's scale repeated, so llama.cpp reads exactly our numbers (its activations are Q8_0 blocks,
not our per-token int8, so outputs differ slightly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pocketquant.checkpoints.common import half_to_interleaved
from pocketquant.errors import PocketQuantError
from pocketquant.layers import QuantEmbedding, QuantLinear

TYPES = ("F32", "F16", "Q8_0", "Q4_0")
_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def q4_0_blocks(scales: torch.Tensor, packed: torch.Tensor) -> np.ndarray:
    """Our packed int4 rows [N, K/2] + scales [N, K/group] -> Q4_0 bytes [N, K/32 * 18]."""
    N = packed.shape[0]
    nb = packed.shape[1] // 16
    d = scales.to(torch.float16).repeat_interleave(nb // scales.shape[1], dim=1)  # a scale per 32-block
    blocks = np.empty((N, nb, 18), dtype=np.uint8)
    blocks[:, :, :2] = d.contiguous().view(torch.uint8).reshape(N, nb, 2).numpy()
    blocks[:, :, 2:] = packed.reshape(N, nb, 16).numpy()
    return blocks.reshape(N, nb * 18)


def q8_0_blocks(q: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """int8 rows [N, K] with one scale per row -> Q8_0 bytes [N, K/32 * 34]."""
    N, K = q.shape
    if K % 32:
        raise PocketQuantError(f"Q8_0 needs a width divisible by 32, got {K}")
    nb = K // 32
    d = scales.reshape(N, 1).to(torch.float16).expand(N, nb).contiguous()
    blocks = np.empty((N, nb, 34), dtype=np.uint8)
    blocks[:, :, :2] = d.view(torch.uint8).reshape(N, nb, 2).numpy()
    blocks[:, :, 2:] = q.to(torch.int8).reshape(N, nb, 32).view(torch.uint8).numpy()
    return blocks.reshape(N, nb * 34)


def _tensor(module_or_weight, qtype: str, permute_heads: int | None):
    """(array, gguf raw dtype or None) for one weight in the requested type."""
    import gguf

    G = gguf.GGMLQuantizationType
    if isinstance(module_or_weight, (QuantLinear, QuantEmbedding)):
        m = module_or_weight
        bits = m.spec.weight.bits if isinstance(m, QuantLinear) else 8
        q, scales = m.qweight, m.scales  # int4: packed bytes [N, K/2]; int8: values [N, K]
        if permute_heads:
            q, scales = half_to_interleaved(q, permute_heads), half_to_interleaved(scales, permute_heads)
        if bits == 4:
            group = 2 * q.shape[1] // scales.shape[1]
            if group % 32:
                raise PocketQuantError(f"int4 groups of {group} do not map to Q4_0 blocks of 32")
            return q4_0_blocks(scales, q), G.Q4_0
        if scales.shape[1] != 1:
            raise PocketQuantError("only per-channel int8 weights map to Q8_0")
        if q.shape[1] % 32:
            raise PocketQuantError(f"int8 rows of {q.shape[1]} weights do not map to Q8_0 blocks of 32")
        return q8_0_blocks(q, scales), G.Q8_0
    w = module_or_weight.detach().float()
    if permute_heads:
        w = half_to_interleaved(w, permute_heads)
    a = w.numpy()
    if qtype == "F32" or a.ndim == 1:
        return np.ascontiguousarray(a, dtype=np.float32), None
    if qtype == "F16":
        return a.astype(np.float16), None
    if a.shape[-1] % 32:
        raise PocketQuantError(f"rows of {a.shape[-1]} weights do not split into {qtype} blocks of 32; "
                               "export as F16 or F32 (--type)")
    return gguf.quants.quantize(a, G[qtype]), G[qtype]


def export_gguf(model, tokenizer, path: str | Path, qtype: str = "Q4_0") -> Path:
    """Write `model` as a GGUF file. Float weights are converted to `qtype`; packed ones keep their bytes."""
    import gguf

    from pocketquant.files import atomic_write

    if qtype not in TYPES:
        raise PocketQuantError(f"unknown GGUF type {qtype!r}; expected one of {', '.join(TYPES)}")
    if tokenizer is not None and tokenizer.to_spec()["kind"] != "hf":
        raise PocketQuantError("GGUF export writes BPE tokenizers (tokenizer.json or a GGUF's own); this model's "
                               "is not one")
    path = Path(path)
    c = model.config
    if c.hadamard_down or c.hadamard_qk:
        raise PocketQuantError("this model applies online Hadamard rotations (SpinQuant R3/R4), which llama.cpp "
                               "does not; GGUF export would compute another function")
    tensors = _rope_freqs(c)
    tensors |= {"token_embd.weight": model.embed_tokens if isinstance(model.embed_tokens, QuantEmbedding)
               else model.embed_tokens.weight, "output_norm.weight": model.norm.weight}
    if not (c.tie_embeddings and isinstance(model.lm_head, torch.nn.Linear)):
        tensors["output.weight"] = model.lm_head if isinstance(model.lm_head, QuantLinear) else model.lm_head.weight
    for i, layer in enumerate(model.layers):
        for hf, g in _NAMES.items():
            m = layer.get_submodule(hf)
            tensors[f"blk.{i}.{g}.weight"] = m if isinstance(m, QuantLinear) else m.weight

    def write(tmp: Path):
        w = gguf.GGUFWriter(str(tmp), "llama")
        _write_config(w, c)
        if tokenizer is None:  # e.g. a random-weight shape: llama.cpp runs it on token ids alone
            w.add_tokenizer_model("none")
        else:
            _write_tokenizer(w, tokenizer)
        for name, t in tensors.items():
            heads = c.n_heads if ".attn_q." in name else c.n_kv_heads if ".attn_k." in name else None
            array, raw = _tensor(t, qtype, heads)
            w.add_tensor(name, array, raw_dtype=raw) if raw is not None else w.add_tensor(name, array)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)
    return path


def _write_config(w, c):
    w.add_name(c.name or "pocketquant")
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    if c.rope_scaling is not None:
        w.add_rope_scaling_orig_ctx_len(c.rope_scaling.original_max_position_embeddings)


def _rope_freqs(c) -> dict:
    """Llama 3 RoPE scaling as llama.cpp keeps it: a divisor per frequency (`rope_freqs.weight`)."""
    if c.rope_scaling is None:
        return {}
    from pocketquant.model import rope_inv_freq

    plain = rope_inv_freq(c.head_dim, c.rope_theta, None)
    return {"rope_freqs.weight": plain / rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)}


def _write_tokenizer(w, tokenizer):
    import json

    spec = tokenizer.to_spec()
    model = json.loads(spec["tokenizer_json"])["model"]
    if model.get("type") != "BPE":
        raise PocketQuantError(f"GGUF export supports BPE tokenizers, not {model.get('type')}")
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    special = set(spec["special"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(spec.get("pre") or "default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    w.add_token_merges(merges)
    if tokenizer.bos_id is not None:
        w.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_token in tokenizer.special:
        w.add_eos_token_id(tokenizer.special[tokenizer.eos_token])
    w.add_add_bos_token(tokenizer.add_bos)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)

"""GGUF (llama architecture) through the `gguf` package; every tensor type it can dequantize."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from pocketquant.checkpoints.common import assemble, interleaved_to_half
from pocketquant.config import ModelConfig, RopeScaling
from pocketquant.errors import PocketQuantError
from pocketquant.model import rope_inv_freq

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}


def open_gguf(path: Path):
    """A `gguf.GGUFReader` over `path` (memory-mapped), or a clear error for a damaged file."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise PocketQuantError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from e


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_config(reader, path: Path) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise PocketQuantError(f"{path}: unsupported architecture {arch!r}; expected 'llama'")
    p = "llama."
    n_heads = field(reader, p + "attention.head_count")
    dim = field(reader, p + "embedding_length")
    vocab = field(reader, p + "vocab_size") or len(field(reader, "tokenizer.ggml.tokens", []))
    names = {t.name for t in reader.tensors}
    try:
        config = ModelConfig(
            dim=dim, n_layers=field(reader, p + "block_count"), n_heads=n_heads,
            n_kv_heads=field(reader, p + "attention.head_count_kv") or n_heads,
            ffn_dim=field(reader, p + "feed_forward_length"), vocab_size=vocab,
            head_dim=field(reader, p + "attention.key_length") or 0,  # 0: dim // n_heads
            norm_eps=field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=field(reader, p + "rope.freq_base", 10000.0),
            max_seq_len=field(reader, p + "context_length", 2048),
            tie_embeddings="output.weight" not in names, name=path.stem)
    except PocketQuantError as e:
        raise PocketQuantError(f"{path}: {e}") from e
    if "rope_freqs.weight" in names:
        config = _with_llama3_rope(config, reader, path)
    return config


def _with_llama3_rope(config: ModelConfig, reader, path: Path) -> ModelConfig:
    """GGUF stores Llama 3 RoPE scaling as per-frequency divisors; recover the llama3 parameters."""
    divisors = torch.from_numpy(_dequantize(_tensor(reader, "rope_freqs.weight")).copy()).float()
    scaling = RopeScaling(factor=float(divisors.max()),
                          original_max_position_embeddings=int(field(
                              reader, "llama.rope.scaling.original_context_length", 8192)))
    plain = rope_inv_freq(config.head_dim, config.rope_theta, None)
    scaled = rope_inv_freq(config.head_dim, config.rope_theta, scaling)
    if not torch.allclose(plain / divisors, scaled, rtol=1e-4):
        raise PocketQuantError(f"{path}: rope_freqs does not follow Llama 3 scaling; unsupported")
    return ModelConfig.from_dict({**config.to_dict(), "rope_scaling": scaling})


def _tensor(reader, name: str):
    return next(t for t in reader.tensors if t.name == name)


def _dequantize(t) -> np.ndarray:
    import gguf

    try:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise PocketQuantError(f"tensor {t.name}: GGUF type {t.tensor_type.name} cannot be dequantized") from e
    # GGUF lists dimensions innermost first.
    return values.reshape([int(d) for d in reversed(t.shape)])


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def named_tensors(reader, path: Path) -> dict:
    """{our name: GGUF tensor}; a tensor of no known name is refused (rope_freqs is read into the config)."""
    named = {t.name: hf_name(t.name) for t in reader.tensors}
    unknown = [gguf_name for gguf_name, ours in named.items() if ours is None and gguf_name != "rope_freqs.weight"]
    if unknown:
        raise PocketQuantError(f"{path}: unrecognized tensors {unknown[:5]}")
    return {named[t.name]: t for t in reader.tensors if named[t.name] is not None}


def load_gguf(path: Path, dtype, reader=None):
    reader = reader or open_gguf(path)
    config = read_config(reader, path)
    tensors = {name: _getter(t, name, config) for name, t in named_tensors(reader, path).items()}
    return assemble(config, tensors, dtype, str(path))


def _getter(t, name: str, config: ModelConfig):
    def get():
        w = torch.from_numpy(np.array(_dequantize(t), dtype=np.float32))  # a writable copy
        if name.endswith("q_proj.weight"):
            return interleaved_to_half(w, config.n_heads)
        if name.endswith("k_proj.weight"):
            return interleaved_to_half(w, config.n_kv_heads)
        return w
    return get


def import_gguf(path: Path, scheme, dtype=torch.float32, reader=None):
    """A quantized model straight from a GGUF file's blocks where the formats agree -> (model, requantized).

    Q4_0 tensors become int4 groups of 32 as they are (the same nibbles and float16 scales: our packing is
    Q4_0's), and Q8_0 tensors whose blocks in a row share one scale become int8 per-channel rows. Every other
    quantized tensor is dequantized and quantized again to `scheme` by round-to-nearest; `requantized` maps
    each such GGUF type to the tensor names it had, for the caller to report."""
    from pocketquant.checkpoints.common import assemble_quantized, tied_output_names
    from pocketquant.layers import QuantEmbedding, QuantLinear, quantized_skeleton
    from pocketquant.model import Transformer

    reader = reader or open_gguf(path)
    config = read_config(reader, path)
    with torch.device("meta"):
        skeleton = quantized_skeleton(Transformer(config), scheme, dtype)
    found = named_tensors(reader, path)
    if config.tie_embeddings and not tied_output_names(skeleton):  # the output gets a table of its own
        found["lm_head.weight"] = found.get("embed_tokens.weight")
    tensors, requantized = {}, {}
    for name, t in found.items():
        if t is None:
            continue
        if not np.any(t.data):  # every byte 0: no scale, no weight survives
            raise PocketQuantError(f"{path}: tensor {t.name} is all zeros (a damaged file?); refusing to import it")
        module = skeleton.get_submodule(name.removesuffix(".weight"))
        if not isinstance(module, (QuantLinear, QuantEmbedding)):
            tensors[name] = _getter(t, name, config)
            continue
        spec = module.spec.weight if isinstance(module, QuantLinear) else module.spec
        heads = config.n_heads if "q_proj" in name else config.n_kv_heads if "k_proj" in name else None
        pair = _integers_getter(t, spec, heads, lambda name=name, t=t: requantized.setdefault(
            t.tensor_type.name, []).append(name))
        base = name.removesuffix(".weight")
        tensors[f"{base}.qweight"], tensors[f"{base}.scales"] = (lambda p=pair: p()[0]), (lambda p=pair: p()[1])
    return assemble_quantized(config, scheme, tensors, dtype, str(path)), requantized


def _integers_getter(t, spec, heads: int | None, on_requantize):
    """A cached getter of (qweight, scales) for one GGUF tensor under `spec` (rows in HF order)."""
    import functools

    from pocketquant.numerics import quantize_weight
    from pocketquant.packing import pack_int4

    @functools.cache
    def get():
        pair = _blocks_as_integers(t, spec)
        if pair is None:
            on_requantize()
            q, scales = quantize_weight(torch.from_numpy(np.array(_dequantize(t), dtype=np.float32)), spec)
            pair = (pack_int4(q) if spec.bits == 4 else q, scales.to(getattr(torch, spec.scale_dtype)))
        if heads:
            pair = tuple(interleaved_to_half(x, heads) for x in pair)
        return pair
    return get


def _blocks_as_integers(t, spec):
    """(qweight, scales) read from the tensor's own blocks when they are exactly `spec`'s numbers, else None."""
    import gguf

    G = gguf.GGMLQuantizationType
    if len(t.shape) != 2:
        raise PocketQuantError(f"tensor {t.name} has {len(t.shape)} dimensions where a weight matrix goes")
    rows = int(t.shape[-1])
    if t.tensor_type == G.Q4_0 and spec.bits == 4 and spec.group_size == 32 and spec.scale_dtype == "float16":
        blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8)).reshape(rows, -1, 18)
        scales = blocks[:, :, :2].contiguous().view(torch.float16).reshape(rows, -1)
        return blocks[:, :, 2:].reshape(rows, -1).contiguous(), scales
    if t.tensor_type == G.Q8_0 and spec.bits == 8 and spec.group_size == 0:
        blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8)).reshape(rows, -1, 34)
        scales = blocks[:, :, :2].contiguous().view(torch.float16).reshape(rows, -1)
        if not bool((scales == scales[:, :1]).all()):
            return None  # a scale per block of 32, not per row
        q = blocks[:, :, 2:].contiguous().view(torch.int8).reshape(rows, -1)
        return q, scales[:, :1].to(getattr(torch, spec.scale_dtype))
    return None

"""Fixtures: tiny random Llama models built with transformers (the reference), and the real assets."""

from __future__ import annotations

import contextlib
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (the whole suite, as CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run the whole suite with --slow")
    hostile = "hostile" in (config.getoption("markexpr") or "")
    skip_hostile = pytest.mark.skip(reason="the hostile tier: run it with -m hostile, or the whole suite with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
        elif "hostile" in item.keywords and not hostile:
            item.add_marker(skip_hostile)


def hf_config(**overrides):
    """A tiny Llama 3 config with GQA and llama3 RoPE scaling (every scaling band is exercised)."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
              rope_theta=500000.0, tie_word_embeddings=False,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    kw.update(overrides)
    return LlamaConfig(**kw)


def hf_model(seed: int = 0, **overrides):
    """A transformers LlamaForCausalLM with random weights (norm weights randomized too)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """(directory, reference model) for a tiny HF checkpoint saved as safetensors."""
    model = hf_model()
    model.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", model


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from pocketquant.fetch import SMOLLM2_135M_GGUF, fetch

    return fetch(SMOLLM2_135M_GGUF)


@pytest.fixture(scope="session")
def llama_models_pkg():
    """Meta's `llama_models` package (tokenizer.model + reference tokenizer and chat format code),
    downloaded from PyPI without its dependencies and cached."""
    from pocketquant.fetch import LLAMA3_TOKENIZER, cache_dir, pip_download

    root = cache_dir() / f"{LLAMA3_TOKENIZER.package}-{LLAMA3_TOKENIZER.version}-src"
    if not (root / "llama_models" / "llama3" / "tokenizer.model").exists():
        root.mkdir(parents=True, exist_ok=True)
        wheel = pip_download(LLAMA3_TOKENIZER.package, LLAMA3_TOKENIZER.version, root)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(root, [n for n in zf.namelist() if n.startswith("llama_models/")])
    sys.path.insert(0, str(root))
    return root / "llama_models"


def write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2))


def interleaved_layers(model, names: dict[str, str]):
    """(layer index, new name, weight) for each HF layer module in `names`, q/k rows in the interleaved
    RoPE order that Meta and GGUF files keep."""
    from pocketquant.checkpoints.common import half_to_interleaved

    c = model.config
    heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}
    for i, layer in enumerate(model.model.layers):
        for hf, name in names.items():
            w = layer.get_submodule(hf).weight
            yield i, name, half_to_interleaved(w, heads[hf]) if hf in heads else w


def hf_to_meta(model, out: Path, multiple_of: int = 32):
    """Write a transformers Llama as Meta's params.json + consolidated.00.pth (q/k rows interleaved)."""
    c = model.config
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
             "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    state = {"tok_embeddings.weight": model.model.embed_tokens.weight, "norm.weight": model.model.norm.weight,
             "output.weight": model.lm_head.weight}
    for i, name, w in interleaved_layers(model, names):
        state[f"layers.{i}.{name}.weight"] = w
    out.mkdir(parents=True)
    torch.save({k: v.detach().clone() for k, v in state.items()}, out / "consolidated.00.pth")
    write_json(out / "params.json", {
        "dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "multiple_of": multiple_of,
        "norm_eps": c.rms_norm_eps, "rope_theta": c.rope_parameters["rope_theta"], "use_scaled_rope": True})


def hf_to_gguf(model, path: Path, qtype=None, rope_freqs: torch.Tensor | None = None, arch="llama"):
    """Write a transformers Llama as a llama-architecture GGUF the way llama.cpp's converter does
    (q/k rows interleaved, 2-D weights optionally quantized to `qtype`)."""
    import gguf
    import numpy as np

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    tensors = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    if not c.tie_word_embeddings:
        tensors["output.weight"] = model.lm_head.weight
    for i, name, t in interleaved_layers(model, names):
        tensors[f"blk.{i}.{name}.weight"] = t
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = rope_freqs
        w.add_rope_scaling_orig_ctx_len(c.rope_parameters["original_max_position_embeddings"])
    for name, t in tensors.items():
        a = t.detach().float().numpy()
        if qtype is not None and a.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def save_byte_tokenizer(directory: Path):
    """A real byte-level tokenizer.json with exactly 256 tokens (one per byte), for the tiny models."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))


@pytest.fixture
def tiny_text_dir(tmp_path):
    """(directory, reference model): a tiny HF checkpoint that also has a 256-token tokenizer."""
    model = hf_model(tie_word_embeddings=True, rope_scaling=None)
    model.save_pretrained(tmp_path / "tiny")
    save_byte_tokenizer(tmp_path / "tiny")
    return tmp_path / "tiny", model


@contextlib.contextmanager
def killed_at_write(monkeypatch, k: int, during: bool = False):
    """Inside the block, the file writes after the first `k` stop the process as a kill would: before the
    write (between two writes), or with `during` in the middle of it (its temporary file half written)."""
    from pocketquant import files

    real, count = files.atomic_write, []

    def killed(path, write):
        count.append(path)
        if len(count) <= k:
            return real(path, write)
        if not during:
            raise KeyboardInterrupt

        def half(tmp):
            write(tmp)
            tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
            raise KeyboardInterrupt
        return real(path, half)

    with monkeypatch.context() as m:
        m.setattr(files, "atomic_write", killed)
        yield count

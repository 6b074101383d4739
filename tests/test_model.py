"""The one model definition against transformers' LlamaForCausalLM, and its KV cache."""

import pytest
import torch

from conftest import hf_logits, hf_model
from pocketquant.checkpoints import load_model
from pocketquant.config import SHAPES, ModelConfig
from pocketquant.model import Transformer

TOKENS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))


def load_as_ours(model, tmp_path, dtype=torch.float32):
    model.save_pretrained(tmp_path / "m")
    return load_model(tmp_path / "m", dtype).model


@pytest.mark.parametrize("overrides", [
    {},  # Llama 3: GQA, llama3 RoPE scaling, untied output
    {"tie_word_embeddings": True, "num_key_value_heads": 4, "rope_scaling": None, "rope_theta": 10000.0},
    {"num_key_value_heads": 1, "head_dim": 32},  # MQA and a head_dim other than dim / heads
])
def test_logits_match_transformers_fp32(tmp_path, overrides):
    ref = hf_model(**overrides)
    ours = load_as_ours(ref, tmp_path)
    torch.testing.assert_close(ours(TOKENS), hf_logits(ref, TOKENS), atol=2e-5, rtol=1e-5)


def test_logits_match_transformers_bf16(tmp_path):
    ref = hf_model().to(torch.bfloat16)
    ours = load_as_ours(ref, tmp_path, torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    diff = (ours(TOKENS).float() - hf_logits(ref, TOKENS).float()).abs()
    # bf16 keeps 8 bits of mantissa: logits (scale ~1) agree to a few bf16 ulps.
    assert diff.max() < 0.1 and diff.mean() < 0.01


def test_tied_embeddings_share_one_tensor(tmp_path):
    ours = load_as_ours(hf_model(tie_word_embeddings=True), tmp_path)
    assert ours.lm_head.weight is ours.embed_tokens.weight


@pytest.mark.parametrize("kv_cache_bits", [None, 8])
def test_kv_cache_decode_equals_full_forward(tmp_path, kv_cache_bits):
    """An int8 cache quantizes each token's keys and values once, when written; the forward without a
    cache applies the same quantization, so both paths compute the same function."""
    model = load_as_ours(hf_model(), tmp_path)
    float_logits = model(TOKENS)
    model.set_kv_cache_bits(kv_cache_bits)
    full = model(TOKENS)
    if kv_cache_bits == 8:
        gap = (full - float_logits).abs().max().item()
        assert 1e-4 < gap < 0.1 * float_logits.abs().max().item()  # int8 keys/values: close, not equal
    caches = model.new_caches(batch=2, max_seq_len=64)
    steps = [model(TOKENS[:, :17], caches, 0)]  # prefill, then chunked prefill, then one token at a time
    steps.append(model(TOKENS[:, 17:30], caches, 17))
    steps += [model(TOKENS[:, i:i + 1], caches, i) for i in range(30, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-5)
    assert caches[0].k.dtype == (torch.int8 if kv_cache_bits == 8 else torch.float32)


def test_batch_rows_are_independent(tmp_path):
    model = load_as_ours(hf_model(), tmp_path)
    both = model(TOKENS)
    torch.testing.assert_close(both[1:], model(TOKENS[1:]), atol=2e-5, rtol=1e-5)


def test_named_shapes_have_the_published_parameter_counts():
    counts = {}
    for name in ("llama-3.2-1b", "llama-3.2-3b", "smollm2-135m"):
        with torch.device("meta"):
            model = Transformer(SHAPES[name])
        counts[name] = sum(p.numel() for p in model.parameters())
    # Llama 3.2 1B: 1,235,814,400; 3B: 3,212,749,824; SmolLM2-135M: 134,515,008 (tied embeddings).
    assert counts == {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824,
                      "smollm2-135m": 134_515_008}


def test_random_named_shape_loads_without_tokenizer():
    loaded = load_model("random:smollm2-135m", "bfloat16")
    assert loaded.tokenizer is None
    assert loaded.model.config == SHAPES["smollm2-135m"]
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16
    logits = loaded.model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 49152) and torch.isfinite(logits).all()


def test_config_round_trips_through_json():
    for cfg in SHAPES.values():
        assert ModelConfig.from_json(cfg.to_json()) == cfg

"""Every loader yields the model transformers computes, and every bad input a one-line error."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import hf_logits, hf_model, hf_to_gguf, hf_to_meta, write_json
from pocketquant.checkpoints import load_model
from pocketquant.config import ModelConfig, RopeScaling
from pocketquant.errors import PocketQuantError
from pocketquant.model import rope_inv_freq

TOKENS = torch.randint(0, 256, (1, 33), generator=torch.Generator().manual_seed(2))


def assert_same_logits(ours, ref, atol=2e-5):
    torch.testing.assert_close(ours(TOKENS), hf_logits(ref, TOKENS), atol=atol, rtol=1e-5)


def test_hf_sharded_checkpoint(tmp_path):
    ref = hf_model()
    ref.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert_same_logits(load_model(tmp_path / "m").model, ref)


def test_hf_config_in_transformers4_spelling():
    """A Llama 3.2 config.json as published (rope_scaling + top-level rope_theta)."""
    hf = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
          "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True,
          "head_dim": 64, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                           "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert (cfg.dim, cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (2048, 8, 500000.0, True)


def test_meta_checkpoint(tmp_path):
    # Meta's reference code fixes llama3 scaling at factor 8 over an original context of 8192.
    ref = hf_model(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    hf_to_meta(ref, tmp_path / "meta")
    assert_same_logits(load_model(tmp_path / "meta").model, ref)


def test_meta_params_give_llama_3_2_1b_shape():
    params = {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32, "n_kv_heads": 8,
              "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
              "vocab_size": 128256}
    cfg = ModelConfig.from_meta(params)
    assert (cfg.ffn_dim, cfg.head_dim, cfg.rope_scaling.factor) == (8192, 64, 32.0)  # as its HF config


def test_gguf_f32_matches_exactly(tmp_path):
    ref = hf_model(tie_word_embeddings=True, rope_scaling=None)
    path = hf_to_gguf(ref, tmp_path / "m.gguf")
    loaded = load_model(path)
    assert loaded.tokenizer is None
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_logits(loaded.model, ref)


def test_gguf_llama3_rope_freqs_are_recovered(tmp_path):
    ref = hf_model()
    scaling = RopeScaling(8.0, 1.0, 4.0, 64)
    divisors = rope_inv_freq(16, 500000.0, None) / rope_inv_freq(16, 500000.0, scaling)
    path = hf_to_gguf(ref, tmp_path / "m.gguf", rope_freqs=divisors)
    model = load_model(path).model
    assert model.config.rope_scaling == scaling
    assert_same_logits(model, ref)


@pytest.mark.parametrize("qtype_name", ["Q8_0", "Q4_0", "F16"])
def test_gguf_quantized_types_dequantize(tmp_path, qtype_name):
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    ref = hf_model(rope_scaling=None)
    path = hf_to_gguf(ref, tmp_path / "m.gguf", qtype=qtype)
    ours = load_model(path).model
    # Each weight equals the gguf package's own dequantization, in HF row order.
    w = ours.layers[1].mlp.down_proj.weight
    expected = ref.model.layers[1].mlp.down_proj.weight
    err = (w - expected).abs().max() / expected.abs().max()
    assert err < {"Q8_0": 0.01, "Q4_0": 0.15, "F16": 1e-3}[qtype_name]
    # q rows must come back in HF order: compare with the float weights, row by row.
    q_err = (ours.layers[0].self_attn.q_proj.weight - ref.model.layers[0].self_attn.q_proj.weight).abs()
    assert q_err.max() < {"Q8_0": 0.01, "Q4_0": 0.1, "F16": 1e-3}[qtype_name]


# ---- bad input ---------------------------------------------------------------------------------

def error_of(source) -> str:
    with pytest.raises(PocketQuantError) as e:
        load_model(source)
    return str(e.value)


def test_missing_path():
    assert "no such file or directory: /no/such/model" in error_of("/no/such/model")


def test_directory_without_weights(tmp_path, tiny_hf_dir):
    path, _ = tiny_hf_dir
    (path / "model.safetensors").unlink()
    assert "no model.safetensors" in error_of(path)
    (tmp_path / "empty").mkdir()
    assert "no model found" in error_of(tmp_path / "empty")


def test_unsupported_architecture(tiny_hf_dir):
    path, _ = tiny_hf_dir
    cfg = json.loads((path / "config.json").read_text())
    write_json(path / "config.json", {**cfg, "model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    assert "unsupported architecture: model_type='mistral'" in error_of(path)


def test_unsupported_gguf_architecture(tmp_path):
    path = hf_to_gguf(hf_model(), tmp_path / "m.gguf", arch="qwen2")
    assert "unsupported architecture 'qwen2'; expected 'llama'" in error_of(path)


def test_shape_mismatch_names_the_tensor(tiny_hf_dir):
    path, _ = tiny_hf_dir
    cfg = json.loads((path / "config.json").read_text())
    write_json(path / "config.json", {**cfg, "intermediate_size": 96})
    assert "tensor layers.0.mlp.gate_proj.weight has shape [192, 64], the config expects [96, 64]" \
        in error_of(path)


def test_missing_tensor_is_listed(tiny_hf_dir):
    path, _ = tiny_hf_dir
    cfg = json.loads((path / "config.json").read_text())
    write_json(path / "config.json", {**cfg, "num_hidden_layers": 3})
    assert "the config says 3 layers, but the weights hold 2" in error_of(path)
    (path / "model.safetensors").rename(path / "renamed.safetensors")
    write_json(path / "config.json", cfg)
    with safe_open(str(path / "renamed.safetensors"), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if "layers.1.mlp.up_proj" not in k}, path / "model.safetensors")
    (path / "renamed.safetensors").unlink()
    assert "missing layers.1.mlp.up_proj.weight" in error_of(path)


def test_truncated_safetensors(tiny_hf_dir):
    path, _ = tiny_hf_dir
    f = path / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    assert "not a readable safetensors file" in error_of(path)


@pytest.mark.parametrize("keep", [10, 1000, 0.5])
def test_truncated_gguf(tmp_path, keep):
    path = hf_to_gguf(hf_model(), tmp_path / "m.gguf")
    os.truncate(path, int(keep * path.stat().st_size) if keep < 1 else keep)
    assert "not a readable GGUF file" in error_of(path)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pth_whose_pickle_runs_code_is_refused(tmp_path):
    hf_to_meta(hf_model(), tmp_path / "meta")
    marker = tmp_path / "pwned"
    torch.save({"tok_embeddings.weight": RunsCode(marker)}, tmp_path / "meta" / "consolidated.00.pth")
    message = error_of(tmp_path / "meta")
    assert "refusing" in message and "would run code" in message
    assert not marker.exists()


def test_truncated_pth(tmp_path):
    hf_to_meta(hf_model(), tmp_path / "meta")
    f = tmp_path / "meta" / "consolidated.00.pth"
    os.truncate(f, f.stat().st_size // 2)
    assert "not a readable PyTorch checkpoint" in error_of(tmp_path / "meta")


def test_unknown_shape_and_dtype():
    assert "unknown shape 'llama-9b'" in error_of("random:llama-9b")
    with pytest.raises(PocketQuantError, match="unknown dtype 'int3'"):
        load_model("random:smollm2-135m", "int3")


def test_cli_reports_bad_input_in_one_line(tiny_hf_dir):
    path, _ = tiny_hf_dir
    os.truncate(path / "model.safetensors", 100)
    proc = subprocess.run([sys.executable, "-m", "pocketquant", "generate", str(path), "--prompt", "hi"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pocketquant generate: error:") \
        and "model.safetensors" in lines[0]


def test_cli_refuses_text_generation_without_a_tokenizer():
    proc = subprocess.run([sys.executable, "-m", "pocketquant", "chat", "random:smollm2-135m"],
                          capture_output=True, text=True, input="hi\n")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "pocketquant chat: error: random:smollm2-135m has no tokenizer, so it " \
        "cannot run on text"

"""The fast runtime inside a whole model, GGUF export, and the bench verb (on tiny models)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import hf_model, save_byte_tokenizer
from pocketquant.checkpoints import load_model
from pocketquant.export.gguf import export_gguf
from pocketquant.checkpoints.packed import save_packed
from pocketquant.quant import rtn
from pocketquant.runtime import kernels, load
from pocketquant.runtime.engine import FastLinear
from pocketquant.runtime.generate import stream_tokens
from pocketquant.scheme import PRESETS

TOKENS = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))


def _packed(tiny_text_dir, path, kv_cache_bits=None):
    loaded = load_model(tiny_text_dir[0])
    scheme = PRESETS["int4-eo8"].replace(kv_cache_bits=kv_cache_bits)
    model = rtn.apply(loaded.model, rtn.RTNConfig(scheme))
    return save_packed(path, model, scheme, [{"method": "rtn"}], loaded.tokenizer)


@pytest.fixture
def packed(tiny_text_dir, tmp_path):
    return _packed(tiny_text_dir, tmp_path / "q.safetensors")


@pytest.mark.skipif(not kernels.available(), reason="native kernels not built")
@pytest.mark.parametrize("kv_cache_bits", [None, 8])
@pytest.mark.parametrize("path", kernels.paths() if kernels.available() else [])  # this build's architecture
def test_fast_runtime_matches_the_reference_model(tiny_text_dir, tmp_path, kv_cache_bits, path):
    if path not in kernels.supported():
        pytest.skip(f"this CPU cannot run the {path} kernels")
    kernels.select(path)
    try:
        _fast_runtime_matches_the_reference_model(tiny_text_dir, tmp_path, kv_cache_bits)
    finally:
        kernels.select(None)


def test_a_packed_model_without_built_kernels_warns_that_it_runs_slowly(packed, monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)
    with pytest.warns(UserWarning, match="native kernels are not built"):
        model = load(packed).model
    assert not any(isinstance(m, FastLinear) for m in model.modules())


def _fast_runtime_matches_the_reference_model(tiny_text_dir, tmp_path, kv_cache_bits):
    packed = _packed(tiny_text_dir, tmp_path / "q.safetensors", kv_cache_bits)
    fast, ref = load(packed).model, load(packed, runtime="reference").model
    assert fast.kv_cache_bits == ref.kv_cache_bits == kv_cache_bits
    attn = fast.layers[0].self_attn
    assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared  # one quantized activation
    assert isinstance(fast.layers[0].mlp.down_proj, FastLinear) and isinstance(fast.lm_head, FastLinear)
    native_steps = []
    fused = fast.fused_decode  # one native call through every layer per decoded token
    fast.fused_decode = lambda *a: native_steps.append(1) or fused(*a)
    with torch.no_grad():
        a, b = fast(TOKENS), ref(TOKENS)
    torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=0)
    # decode: every step's logits through the native layer against the reference modules
    caches_f, caches_r = fast.new_caches(1, 64), ref.new_caches(1, 64)
    with torch.no_grad():
        fast(TOKENS[:, :20], caches_f, 0)
        ref(TOKENS[:, :20], caches_r, 0)
        for pos in range(20, 30):
            step = TOKENS[:, pos:pos + 1]
            a, b = fast(step, caches_f, pos), ref(step, caches_r, pos)
            torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=0)
    assert len(native_steps) == 10
    if kv_cache_bits == 8:  # the caches hold int8 (one scale and zero point per token and head)
        assert caches_f[0].k.dtype == caches_r[0].k.dtype == torch.int8
        torch.testing.assert_close(caches_f[1].v_scale[:, :, :30], caches_r[1].v_scale[:, :, :30])
    prompt = TOKENS[0, :8].tolist()
    assert list(stream_tokens(fast, prompt, 12)) == list(stream_tokens(ref, prompt, 12))


def test_gguf_export_of_a_packed_model_keeps_its_numbers(packed, tmp_path):
    q = load_model(packed)
    out = export_gguf(q.model, q.tokenizer, tmp_path / "m.gguf")
    g = load_model(out)
    for name in ("layers.0.self_attn.q_proj", "layers.1.self_attn.k_proj", "layers.1.mlp.down_proj", "lm_head"):
        assert torch.equal(g.model.get_submodule(name).weight, q.model.get_submodule(name).dequantized_weight())
    emb = q.model.embed_tokens
    assert torch.equal(g.model.embed_tokens.weight, emb.qweight.float() * emb.scales.float())
    assert g.tokenizer.encode("hello wörld") == q.tokenizer.encode("hello wörld")


@pytest.mark.parametrize("qtype, tol", [("F32", 0.0), ("F16", 1e-2), ("Q8_0", 0.1)])
def test_gguf_export_of_a_float_model(tiny_text_dir, tmp_path, qtype, tol):
    path, _ = tiny_text_dir
    f = load_model(path)
    g = load_model(export_gguf(f.model, f.tokenizer, tmp_path / "m.gguf", qtype))
    with torch.no_grad():
        diff = (g.model(TOKENS) - f.model(TOKENS)).abs().max().item()
    assert diff <= tol


def test_gguf_export_keeps_llama3_rope_scaling(tmp_path):
    ref = hf_model()  # llama3 scaling
    ref.save_pretrained(tmp_path / "m")
    f = load_model(tmp_path / "m")
    g = load_model(export_gguf(f.model, None, tmp_path / "m.gguf", "F32"))
    assert g.tokenizer is None and g.model.config.rope_scaling == f.model.config.rope_scaling
    with torch.no_grad():
        torch.testing.assert_close(g.model(TOKENS), f.model(TOKENS), atol=1e-5, rtol=1e-5)


def test_llama_cpp_reads_our_export_like_we_do(packed, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra")
    import numpy as np

    q = load_model(packed)
    out = export_gguf(q.model, None, tmp_path / "m.gguf")  # token ids only: llama.cpp wants merges in a BPE vocab
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_batch=64, n_threads=1, verbose=False)
    prompt = TOKENS[0, :16].tolist()
    llm.eval(prompt)
    with torch.no_grad():
        ours = q.model(torch.tensor([prompt]))[0, -1]
    from pocketquant.bench import llama_last_logits

    theirs = torch.from_numpy(np.array(llama_last_logits(llm)))
    # the same weights; activations are per-token int8 here and Q8_0 blocks there
    assert torch.corrcoef(torch.stack([ours, theirs]))[0, 1] > 0.99


@pytest.mark.slow
def test_bench_reports_every_figure(packed, tiny_text_dir, tmp_path):
    path, _ = tiny_text_dir
    kv8 = _packed(tiny_text_dir, tmp_path / "kv8.safetensors", kv_cache_bits=8)
    cmd = [sys.executable, "-m", "pocketquant", "bench", str(packed), "--float", str(path), "--threads", "1",
           "--also", str(kv8),
           "--prompt-tokens", "16", "--decode-tokens", "4", "--repeats", "1", "--json", str(tmp_path / "b.json"),
           "--plot", str(tmp_path / "b.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "decode (tok/s)" in proc.stdout and "roofline" in proc.stdout
    result = json.loads((tmp_path / "b.json").read_text())
    assert [c["label"] for c in result["configs"]] == ["pocketquant int4-eo8", "pocketquant kv8", "float32 eager",
                                                       "bfloat16 eager"]
    for c in result["configs"]:
        assert all(c[k] > 0 for k in ("file_bytes", "peak_rss_mb", "ttft_ms", "prefill_tok_s", "decode_tok_s"))
    assert result["bandwidth_gb_s"] > 0 and result["decode_roofline_tok_s"] > 0
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"

"""Scheme checks, fake-quant == packed reference, the packed file and its guarantees."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import hf_model
from pocketquant.checkpoints import load_model
from pocketquant.errors import PocketQuantError
from pocketquant.layers import QuantLinear, check_plan
from pocketquant.checkpoints.packed import load_packed, read_header, save_packed
from pocketquant.quant import qat, rtn
from pocketquant.scheme import PRESETS, LinearSpec, QuantScheme, WeightSpec

TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def float_model(tmp_path):
    hf_model(tie_word_embeddings=True, rope_scaling=None).save_pretrained(tmp_path / "f")
    return lambda: load_model(tmp_path / "f").model


def test_presets_round_trip_through_json():
    for scheme in PRESETS.values():
        assert QuantScheme.from_json(scheme.to_json()) == scheme
    eo8 = PRESETS["int4-eo8"]
    assert (eo8.linear.weight.bits, eo8.linear.weight.group_size, eo8.linear.act.symmetric) == (4, 32, False)
    assert (eo8.output.weight.bits, eo8.output.weight.group_size, eo8.embedding.bits) == (8, 0, 8)


def test_a_scheme_that_cannot_apply_lists_every_offending_layer(float_model):
    with pytest.raises(PocketQuantError) as e:
        check_plan(float_model(), PRESETS["int4-eo8-g128"])
    assert len(str(e.value).splitlines()) == 1  # one line, naming all 7 linears of both layers
    problems = str(e.value).split(": ", 1)[1].split("; ")
    assert len(problems) == 7  # widths 64 and 192 are not multiples of 128
    assert "mlp.down_proj in layers 0-1: group size 128 does not divide its input width 192" in problems
    bad = PRESETS["int4-eo8"].replace(overrides=(("layers.9.*", None), ("*.gate", None)))
    with pytest.raises(PocketQuantError) as e:
        check_plan(float_model(), bad)
    assert "'layers.9.*' matches no module" in str(e.value) and "'*.gate' matches no module" in str(e.value)


def test_overrides_keep_modules_in_float(float_model):
    scheme = PRESETS["int4-eo8"].replace(overrides=(("layers.0.mlp.*", None),
                                                    ("*.v_proj", LinearSpec(WeightSpec(8, 0), None))))
    model = rtn.apply(float_model(), rtn.RTNConfig(scheme))
    assert type(model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert isinstance(model.layers[1].mlp.up_proj, QuantLinear)
    v = model.layers[1].self_attn.v_proj
    assert v.spec.weight.bits == 8 and v.spec.act is None


@pytest.mark.parametrize("scheme", ["int4-eo8", "int8", "w4-g32"])
def test_fake_quant_equals_packed_reference(float_model, tmp_path, scheme):
    scheme = PRESETS[scheme]
    fake = qat.prepare(float_model(), scheme)
    with torch.no_grad():
        fake_logits = fake(TOKENS)
    packed = qat.convert(fake, scheme)
    save_packed(tmp_path / "q.safetensors", packed, scheme, [{"method": "test"}])
    loaded, _, _ = load_packed(tmp_path / "q.safetensors")
    with torch.no_grad():
        ref_logits, loaded_logits = packed(TOKENS), loaded(TOKENS)
    # Integer parts are the same function; w + (wq - w) in the straight-through form may differ from wq
    # by one float32 rounding, so logits agree to float tolerance.
    torch.testing.assert_close(fake_logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(ref_logits, loaded_logits)


def test_rtn_equals_fake_quant_integers(float_model):
    scheme = PRESETS["int4-eo8"]
    model = float_model()
    w = model.layers[1].mlp.down_proj.weight.detach().clone()
    q = rtn.apply(model, rtn.RTNConfig(scheme)).layers[1].mlp.down_proj
    from pocketquant.numerics import quantize_weight

    expected_q, expected_s = quantize_weight(w, scheme.linear.weight)
    assert torch.equal(q.int_weight(), expected_q) and torch.equal(q.scales.float(), expected_s)


def test_save_load_round_trips_exactly(float_model, tmp_path):
    model = rtn.apply(float_model(), rtn.RTNConfig())
    path = save_packed(tmp_path / "q.safetensors", model, PRESETS["int4-eo8"], [rtn.RTNConfig().to_dict()])
    loaded, tokenizer, header = load_packed(path)
    assert tokenizer is None and header.scheme == PRESETS["int4-eo8"] and header.recipe[0]["method"] == "rtn"
    assert header.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert not model.config.tie_embeddings or "lm_head.weight" not in a
    # the int8 output table is stored apart from the int8 embedding (Meta's EO8)...
    assert loaded.lm_head.qweight.data_ptr() != loaded.embed_tokens.qweight.data_ptr()


def test_shared_embedding_output_table(float_model, tmp_path):
    scheme = PRESETS["int4-eo8"].replace(share_embedding_output=True)
    separate = rtn.apply(float_model(), rtn.RTNConfig())
    shared = rtn.apply(float_model(), rtn.RTNConfig(scheme))
    p1 = save_packed(tmp_path / "a.safetensors", separate, PRESETS["int4-eo8"], [])
    p2 = save_packed(tmp_path / "b.safetensors", shared, scheme, [])
    table = 256 * 64 + 256 * 2  # int8 rows + fp16 scales
    assert abs(p1.stat().st_size - p2.stat().st_size - table) < 400  # headers differ a little (2 entries, 2 CRCs)
    loaded, _, _ = load_packed(p2)
    assert loaded.lm_head.qweight is loaded.embed_tokens.qweight
    # per-row int8 of one tied matrix: the shared table computes the same logits
    assert torch.equal(loaded(TOKENS), separate(TOKENS))
    from pocketquant.runtime import kernels, load
    from pocketquant.runtime.engine import PackedEmbedding

    if kernels.available():  # the fast runtime keeps one (packed) table, for the lookup too
        fast = load(p2).model
        assert isinstance(fast.embed_tokens, PackedEmbedding) and fast.embed_tokens.head is fast.lm_head
        assert torch.equal(fast.embed_tokens(TOKENS), loaded.embed_tokens(TOKENS))
        assert torch.equal(fast(TOKENS), load(p1).model(TOKENS))
        with pytest.raises(kernels.PocketQuantError, match=r"token ids must be in \[0, 256\), got 0..256"):
            fast(torch.tensor([[0, 256]]))


def test_packed_bf16(float_model, tmp_path):
    model = rtn.apply(float_model(), rtn.RTNConfig())
    path = save_packed(tmp_path / "q.safetensors", model, PRESETS["int4-eo8"], [])
    fp32 = load_model(path).model(TOKENS)
    bf16 = load_model(path, "bfloat16").model
    assert bf16.norm.weight.dtype == torch.bfloat16
    out = bf16(TOKENS)
    assert out.dtype == torch.bfloat16 and (out.float() - fp32).abs().mean() < 0.02


def test_file_cut_short_or_of_another_version_is_refused(float_model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = save_packed(tmp_path / "q.safetensors", rtn.apply(float_model(), rtn.RTNConfig()),
                       PRESETS["int4-eo8"], [])
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "v2.safetensors"), {**meta, "format_version": "2.0"})
    with pytest.raises(PocketQuantError, match=r"packed format version '2.0' is not supported; this "
                                                r"pocketquant reads version 1.x"):
        load_model(tmp_path / "v2.safetensors")
    os.truncate(path, path.stat().st_size - 1000)
    with pytest.raises(PocketQuantError, match="not a readable safetensors file"):
        load_model(path)


WRITER = """
import sys, torch
from pocketquant.checkpoints.common import random_model
from pocketquant.config import ModelConfig
from pocketquant.checkpoints.packed import save_packed
from pocketquant.quant import rtn
from pocketquant.scheme import PRESETS
cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=100000)
models = [rtn.apply(random_model(cfg, seed=s), rtn.RTNConfig()) for s in (1, 2)]
print("ready", flush=True)
i = 0
while True:
    save_packed(sys.argv[1], models[i % 2], PRESETS["int4-eo8"], [{"seed": 1 + i % 2}])
    i += 1
"""


def test_killing_the_writer_leaves_a_whole_file(tmp_path):
    path = tmp_path / "q.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    model, _, header = load_packed(path)  # whole: one of the two models, never a torn mix
    from pocketquant.checkpoints.common import random_model

    seed = header.recipe[0]["seed"]
    expected = rtn.apply(random_model(header.config, seed=seed), rtn.RTNConfig())
    assert torch.equal(model.layers[1].mlp.down_proj.qweight, expected.layers[1].mlp.down_proj.qweight)
    save_packed(path, expected, PRESETS["int4-eo8"], [])  # the next write sweeps the killed one's leftover
    assert [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]


@pytest.mark.slow
def test_llama_3_2_1b_int4_eo8_file_is_at_most_44_percent_of_bf16(tmp_path):
    from safetensors.torch import save_file

    from pocketquant.checkpoints.common import random_model
    from pocketquant.config import SHAPES
    from pocketquant.checkpoints.packed import packed_tensors

    model = random_model(SHAPES["llama-3.2-1b"], torch.bfloat16)
    save_file(packed_tensors(model), str(tmp_path / "bf16.safetensors"))  # tied: one embedding table
    rtn.apply(model, rtn.RTNConfig())
    save_packed(tmp_path / "q.safetensors", model, PRESETS["int4-eo8"], [])
    bf16, q = (tmp_path / "bf16.safetensors").stat().st_size, (tmp_path / "q.safetensors").stat().st_size
    print(f"\nllama-3.2-1b shape: bf16 safetensors {bf16:,} bytes, int4-eo8 packed {q:,} bytes "
          f"({q / bf16:.1%})")
    assert q <= 0.44 * bf16


def test_inspect_reports_families_and_bits(float_model, tmp_path):
    from pocketquant.inspect import report

    model = rtn.apply(float_model(), rtn.RTNConfig())
    text = report(save_packed(tmp_path / "q.safetensors", model, PRESETS["int4-eo8"], [{"method": "rtn"}]),
                  tensors=True)
    sizes = text.split("on this CPU's fast runtime:")[0]
    rows = {line.split()[0]: line.split() for line in sizes.splitlines() if line.split()}
    assert rows["mlp"][3] == "4.500"  # int4 + one fp16 scale per 32 weights
    assert rows["embedding"][3] == "8.250" and rows["output"][3] == "8.250"  # int8 + fp16 scale per 64
    assert rows["norms"][3] == "32.000"
    assert "\nrecipe: rtn\n" in text and "layers.0.self_attn.q_proj.qweight" in text


def test_inspect_names_each_familys_kernel_path_and_flags_slow_ones(float_model, tmp_path):
    from pocketquant.inspect import report
    from pocketquant.runtime import kernels

    if not kernels.available():
        pytest.skip("native kernels not built")
    fast = report(save_packed(tmp_path / "a.safetensors", rtn.apply(float_model(), rtn.RTNConfig()),
                              PRESETS["int4-eo8"], [{"method": "rtn"}]))
    lines = {line.split()[0]: line for line in fast.split("fast runtime:")[1].splitlines() if line.strip()}
    assert f"{kernels.path()} int8 x int4 GEMM" in lines["mlp"] and f"{kernels.path()} int8 x int8" in lines["output"]
    assert "int8 row lookup" in lines["embedding"] and "one native call" in lines["decode"] and "SLOW" not in fast
    scheme = PRESETS["w4-g32"]  # weight-only: float activations, which the kernels do not take
    slow = report(save_packed(tmp_path / "b.safetensors", rtn.apply(float_model(), rtn.RTNConfig(scheme)), scheme,
                              [{"method": "rtn"}]))
    assert "mlp          SLOW: reference (a dequantized float copy)" in slow and "decode step" not in slow


def test_cli_quantize_and_inspect(tmp_path, float_model):
    hf_model(tie_word_embeddings=True, rope_scaling=None).save_pretrained(tmp_path / "src")
    out = tmp_path / "q.safetensors"
    run = [sys.executable, "-m", "pocketquant"]
    proc = subprocess.run(run + ["quantize", str(tmp_path / "src"), "-o", str(out), "--method", "rtn"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "--share-embedding-output would write" in proc.stdout
    proc = subprocess.run(run + ["inspect", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0 and "pocketquant packed format 1.1" in proc.stdout
    bad = subprocess.run(run + ["quantize", str(tmp_path / "src"), "-o", str(tmp_path / "g.safetensors"),
                                "--scheme", "int4-eo8-g128"], capture_output=True, text=True)
    assert bad.returncode == 1 and "cannot apply" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "g.safetensors").exists()

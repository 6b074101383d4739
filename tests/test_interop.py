"""Interop: Meta's prequantized INT4_EO8 layout in and out, GGUF blocks in, ExecuTorch programs out."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import meta_layout
from pocketquant.checkpoints import import_quantized, load_model
from pocketquant.checkpoints.common import random_model
from pocketquant.config import ModelConfig
from pocketquant.errors import PocketQuantError
from pocketquant.export import executorch as et
from pocketquant.export.meta import export_meta
from pocketquant.layers import LoRA
from pocketquant.packing import unpack_int4
from pocketquant.quant.recipe import apply, from_options
from pocketquant.runtime import load

TOKENS = list(range(1, 40, 3))
LINEARS = meta_layout.LINEARS


def tiny(ffn: int = 512, seed: int = 0):
    """A float model whose FFN width Meta's params.json formula gives (dim 192 -> 512)."""
    cfg = ModelConfig(dim=192, n_layers=2, n_heads=3, n_kv_heads=1, ffn_dim=ffn, vocab_size=512, max_seq_len=256)
    model = random_model(cfg, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    return model


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0]


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor):
    """Equal but for float rounding, which may move an int8 activation by one step here and there (and through
    attention, the later positions' logits a little): a wrong weight, scale or order would move them all."""
    top = ref.abs().max().item()
    assert (ours - ref).abs().mean() < 0.005 * top and (ours - ref).abs().max() < 0.05 * top


@pytest.mark.parametrize("lora, spinquant", [(0, False), (16, True)])
def test_meta_checkpoint_imports_every_integer_and_scale_exactly(tmp_path, lora, spinquant):
    state = meta_layout.write_checkpoint(tiny(), tmp_path / "m", lora_rank=lora, spinquant=spinquant)
    loaded, scheme, requantized = import_quantized(tmp_path / "m")
    model, c = loaded.model, loaded.model.config
    assert requantized == {} and c.hadamard_down == spinquant and not c.tie_embeddings
    assert scheme.linear.weight.scale_dtype == "float32"  # Meta's scales are no float16 numbers
    for i, layer in enumerate(model.layers):
        for ours, theirs in LINEARS.items():
            m, key = layer.get_submodule(ours), f"layers.{i}.{theirs}"
            heads = c.n_heads if "q_proj" in ours else c.n_kv_heads if "k_proj" in ours else 0
            meta_order = (lambda t: meta_layout.to_interleaved(t, heads)) if heads else (lambda t: t)
            assert torch.equal(meta_order(unpack_int4(m.qweight)), state[f"{key}.weight"])
            assert m.scales.dtype == torch.float32 and torch.equal(meta_order(m.scales), state[f"{key}.scales"])
            if lora:
                assert m.lora.rank == lora and m.lora.scale == 2.0 and m.lora.dtype == torch.bfloat16
                assert torch.equal(m.lora.A.weight, state[f"{key}.adaptor.A.weight"])
                assert torch.equal(meta_order(m.lora.B.weight), state[f"{key}.adaptor.B.weight"])
        assert torch.equal(layer.input_layernorm.weight, state[f"layers.{i}.attention_norm.weight"].float())
    for ours, theirs in (("embed_tokens", "tok_embeddings"), ("lm_head", "output")):
        m = model.get_submodule(ours)
        assert torch.equal(m.qweight, state[f"{theirs}.weight"]) and torch.equal(m.scales, state[f"{theirs}.scales"])


@pytest.mark.parametrize("lora, spinquant", [(0, False), (16, True)])
def test_meta_checkpoint_computes_what_metas_reference_does(tmp_path, lora, spinquant):
    meta_layout.write_checkpoint(tiny(), tmp_path / "m", lora_rank=lora, spinquant=spinquant)
    ref = meta_layout.reference_logits(tmp_path / "m", TOKENS)
    assert_logits_close(logits(load(tmp_path / "m", runtime="reference").model), ref)
    fast = logits(load(tmp_path / "m", runtime="fast").model)  # its scales rounded to float16 (next test)
    assert (fast - ref).abs().mean() < 0.01 * ref.abs().max()


def test_a_pth_that_is_not_a_state_dict_is_refused(tmp_path):
    folder = _edit(tmp_path)
    torch.save({"model": {"layers.0.attention.wq.scales": torch.ones(2)}}, folder / "consolidated.00.pth")
    with pytest.raises(PocketQuantError, match="expected a state dict of named tensors"):
        load_model(folder)


def test_zero_points_that_are_all_zero_are_accepted(tmp_path):
    path = _edit(tmp_path, lambda s: s.update({f"layers.{i}.attention.wk.zeros": torch.zeros(64, 6) for i in (0, 1)}))
    ours = logits(load(path, runtime="reference").model)
    assert_logits_close(ours, meta_layout.reference_logits(path, TOKENS))  # the reference ignores .zeros keys


def test_fast_runtime_rounds_float32_scales_to_its_float16(tmp_path):
    """The kernels keep float16 scales: a float32-scale checkpoint runs as its scales rounded to float16."""
    state = meta_layout.write_checkpoint(tiny(), tmp_path / "a")
    rounded = {k: v.half().float() if k.startswith("layers.") and k.endswith(".scales") else v
               for k, v in state.items()}
    (tmp_path / "b").mkdir()
    torch.save(rounded, tmp_path / "b" / "consolidated.00.pth")
    (tmp_path / "b" / "params.json").write_text((tmp_path / "a" / "params.json").read_text())
    assert import_quantized(tmp_path / "b")[1].linear.weight.scale_dtype == "float16"
    assert torch.equal(logits(load(tmp_path / "a").model), logits(load(tmp_path / "b").model))


def _edit(tmp_path, state_change=None, params_change=None):
    state = meta_layout.write_checkpoint(tiny(), tmp_path / "m", lora_rank=4)
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    if state_change:
        state_change(state)
        torch.save(state, tmp_path / "m" / "consolidated.00.pth")
    if params_change:
        params_change(params)
        (tmp_path / "m" / "params.json").write_text(json.dumps(params))
    return tmp_path / "m"


@pytest.mark.parametrize("state_change, params_change, message", [
    (lambda s: s["layers.1.feed_forward.w2.weight"].__setitem__((0, 3), 9), None, r"values -8\.\.9 outside int4"),
    (None, lambda p: p["quantization_args"].update(group_size=64), "group_size 64 does not match the scales"),
    (None, lambda p: p["quantization_args"].update(scheme="int4_weight_only"), "'int4_weight_only' is not supported"),
    (None, lambda p: p.pop("lora_args"), "adaptors but no valid lora_args"),
    (lambda s: s.update({"layers.0.attention.wq.adaptor.C.weight": torch.zeros(2)}), None, "unrecognized tensors"),
    (lambda s: s.update({"layers.0.attention.wq.zeros": torch.ones(192, 6)}), None, "nonzero zero points"),
    (lambda s: s["layers.1.attention.wv.scales"].__setitem__((5, 1), 0.0), None,
     r"layers.1.attention.wv.scales: 1 scales are 0 or not finite \(the first at row 5, group 1\)"),
    (lambda s: s["output.scales"].__setitem__(7, float("nan")), None, "output.scales: 1 scales are 0 or not finite"),
    (lambda s: s["layers.0.feed_forward.w3.weight"].zero_(), None, "layers.0.feed_forward.w3.weight: every value is 0"),
    (lambda s: s["norm.weight"].zero_(), None, "norm.weight: every value is 0"),
])
def test_a_damaged_meta_checkpoint_is_refused_clearly(tmp_path, state_change, params_change, message):
    with pytest.raises(PocketQuantError, match=message):
        import_quantized(_edit(tmp_path, state_change, params_change))


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_meta_checkpoint_with_a_zeroed_third_is_refused(tmp_path, where):
    """The .pth's own CRC-32s catch what the loader cannot see: a third of the file zeroed loads as valid-looking
    tensors (torch.load does not check them)."""
    folder = _edit(tmp_path)
    pth = folder / "consolidated.00.pth"
    data = bytearray(pth.read_bytes())
    third = len(data) // 3
    start = {"first": 0, "middle": third, "last": 2 * third}[where]
    data[start:start + third] = bytes(third)
    pth.write_bytes(data)
    with pytest.raises(PocketQuantError, match="damaged|not a readable PyTorch checkpoint"):
        import_quantized(folder)
    data = bytearray(_edit(tmp_path / "again").joinpath("consolidated.00.pth").read_bytes())
    data[len(data) // 2] ^= 4  # one bit, inside a tensor's record
    pth.write_bytes(data)
    with pytest.raises(PocketQuantError, match="Bad CRC-32"):
        import_quantized(folder)


def test_a_gguf_with_an_all_zero_tensor_is_refused(tmp_path):
    import gguf

    from pocketquant.export.gguf import export_gguf

    export_gguf(_quantized(), None, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    data[t.data_offset:t.data_offset + t.n_bytes] = bytes(t.n_bytes)
    (tmp_path / "m.gguf").write_bytes(data)
    with pytest.raises(PocketQuantError, match="tensor blk.1.ffn_up.weight is all zeros"):
        import_quantized(tmp_path / "m.gguf")


def _quantized(scale_rule=None, lora=False, hadamard=False):
    model = apply(tiny(), *from_options("rtn", scale_rule=scale_rule))
    if hadamard:
        model.set_online_hadamards(down=True, qk=False)
    for m in model.layers.modules() if lora else ():
        if hasattr(m, "lora") and hasattr(m, "qweight"):
            m.lora = LoRA(m.in_features, m.out_features, 4, 2.0)
            torch.nn.init.normal_(m.lora.B.weight, 0, 0.05)
            m.lora.to(torch.bfloat16)  # as a packed file holds them
    return model


@pytest.mark.parametrize("rule, lora, hadamard", [("absmax", False, False), ("search", True, False),
                                                  ("absmax", False, True)])
def test_export_to_meta_and_back_is_exact_for_positive_scales(tmp_path, rule, lora, hadamard):
    model = _quantized(rule, lora, hadamard)
    path, (requantized, groups) = export_meta(model, None, tmp_path / "m")
    assert requantized == 0 and groups > 0
    params = json.loads((path / "params.json").read_text())
    assert params["quantization_args"] == {"group_size": 32, "scheme": "int4_weight_int8_dynamic_activation",
                                           "spinquant": hadamard}
    assert ("lora_args" in params) == lora
    back = import_quantized(path)[0].model
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs) and back.config.hadamard_down == hadamard
    for k in ours:  # (adapter parameters load in the model's float dtype; their values are the bf16 ones)
        assert ".lora." in k or ours[k].dtype == theirs[k].dtype, k
        assert torch.equal(ours[k].float(), theirs[k].float()), k
    assert torch.equal(logits(model), logits(back))
    with pytest.raises(PocketQuantError, match="exists"):
        export_meta(model, None, path)


def test_export_to_meta_makes_every_scale_positive(tmp_path):
    """ExecuTorch's kernels take positive scales: a negative one is flipped with its integers, exactly where the
    group has no -8 (whose twin +8 does not exist and becomes +7)."""
    model = _quantized()  # signed-max: about half the scales are negative
    path, (requantized, groups) = export_meta(model, None, tmp_path / "m")
    state = torch.load(path / "consolidated.00.pth", weights_only=True)
    assert all(bool((v > 0).all()) for k, v in state.items() if k.endswith(".scales"))
    q_ours, s_ours = unpack_int4(model.layers[0].mlp.down_proj.qweight), model.layers[0].mlp.down_proj.scales.float()
    q, s = state["layers.0.feed_forward.w2.weight"], state["layers.0.feed_forward.w2.scales"]
    w_ours = q_ours.float().reshape(*s.shape, -1) * s_ours[..., None]
    w = q.float().reshape(*s.shape, -1) * s[..., None]
    stuck = (s_ours < 0) & (q_ours.reshape(*s.shape, -1) == -8).any(-1)
    assert stuck.sum() > 0 and torch.equal(w[~stuck], w_ours[~stuck])  # signed-max: every negative group has a -8
    lowest = (q_ours.reshape(*s.shape, -1) == -8)[stuck]  # the group's largest weight, 8 steps: now 7
    assert torch.equal((w - w_ours)[stuck], torch.where(lowest, s_ours[stuck][:, None].expand(-1, 32), 0.0))
    assert 0 < requantized < groups * 0.6


@pytest.mark.parametrize("rope_scaled", [False, True])
def test_gguf_q4_0_and_q8_0_blocks_import_exactly(tmp_path, rope_scaled):
    from pocketquant.config import RopeScaling
    from pocketquant.export.gguf import export_gguf

    model = _quantized()
    if rope_scaled:  # a Llama 3 GGUF carries rope_freqs.weight
        model.config = dataclasses.replace(model.config, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
        model.reset_rope()
    export_gguf(model, None, tmp_path / "m.gguf")
    loaded, scheme, requantized = import_quantized(tmp_path / "m.gguf")
    assert requantized == {} and loaded.model.config.rope_scaling == model.config.rope_scaling
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k


@pytest.mark.slow
def test_gguf_types_that_are_not_ours_are_requantized_as_rtn_would():
    """SmolLM2's Q4_1 blocks (asymmetric) and Q8_0 embedding (a scale per 32) are not int4-eo8 numbers: the
    import dequantizes and quantizes them by RTN, exactly what `quantize --method rtn` makes, and says so."""
    from pocketquant.quant.recipe import quantize

    loaded, _, requantized = import_quantized("smollm2-135m")
    assert {k: len(v) for k, v in requantized.items()} == {"Q4_1": 210, "Q8_0": 2}
    rtn = quantize("smollm2-135m", from_options("rtn"), progress=False).model.state_dict()
    assert all(torch.equal(v, rtn[k]) for k, v in loaded.model.state_dict().items())


def test_quantize_method_import_records_a_recipe_that_replays(tmp_path):
    from pocketquant.checkpoints.packed import read_header
    from pocketquant.export.gguf import export_gguf

    export_gguf(_quantized(), None, tmp_path / "m.gguf")
    cli = [sys.executable, "-m", "pocketquant", "quantize", str(tmp_path / "m.gguf")]
    subprocess.run([*cli, "--method", "import", "-o", str(tmp_path / "a.safetensors")], check=True, capture_output=True)
    assert [s["method"] for s in read_header(tmp_path / "a.safetensors").recipe] == ["import"]
    subprocess.run([*cli, "--recipe", str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "b.safetensors")],
                   check=True, capture_output=True)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    refused = subprocess.run([*cli[:-2], "quantize", str(tmp_path / "a.safetensors"), "--method", "import", "-o",
                              str(tmp_path / "c.safetensors")], capture_output=True, text=True)
    assert refused.returncode == 1 and "nothing to import" in refused.stderr
    meta_layout.write_checkpoint(tiny(), tmp_path / "m")
    refused = subprocess.run([*cli[:-1], str(tmp_path / "m"), "--method", "rtn", "-o", str(tmp_path / "d.safetensors")],
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "already quantized (Meta's prequantized layout)" in refused.stderr


def test_llama_3_2_params_get_the_rope_scaling_of_their_hf_configs():
    """Meta's params.json for Llama 3.2 1B/3B name no RoPE factor; their HF configs (and ExecuTorch's llama3_2)
    say 32, Llama 3.1 and llama-models say 8."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pocketquant.model import rope_inv_freq

    one_b = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
             "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 500000.0,
             "use_scaled_rope": True}
    config = ModelConfig.from_meta(one_b)
    assert config.rope_scaling.factor == 32.0 and config.ffn_dim == 8192
    hf = LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                     max_position_embeddings=131072, rope_scaling={
                         "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(rope_inv_freq(64, 500000.0, config.rope_scaling), theirs.float(), rtol=1e-6, atol=0)
    assert ModelConfig.from_meta({**one_b, "dim": 4096, "n_layers": 32}).rope_scaling.factor == 8.0  # 3.1 8B
    assert ModelConfig.from_meta({**one_b, "rope_scale_factor": 16}).rope_scaling.factor == 16.0


needs_executorch = pytest.mark.skipif(not et.available(), reason="executorch and torchao are not installed "
                                      "(pip install 'pocketquant[executorch]')")


def executorch_eager_logits(folder, tokens) -> torch.Tensor:
    """Logits [T, V] of a Meta-layout checkpoint run by ExecuTorch's own eager Llama (Meta's code for these
    checkpoints): its pre-quantization transforms in export_llama's order, torchao's 8da4w linears, QLoRA
    adaptors, the native R4."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (the Hadamard operator)
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs
    from executorch.examples.models.llama.source_transformation import pre_quantization as pre
    from executorch.examples.models.llama.source_transformation.lora import transform_linear_for_lora_after_quantization
    from executorch.examples.models.llama.source_transformation.spin_quant import (
        inject_fast_hadamard_transform_native_for_spin_quant)

    params = json.loads((folder / "params.json").read_text())
    checkpoint = torch.load(folder / "consolidated.00.pth", weights_only=True)
    model = construct_transformer(ModelArgs(max_seq_len=64, max_context_len=64, use_kv_cache=False,
                                            generate_full_logits=True, **params))
    pre.transform_output_linear_for_pre_quantization(model, checkpoint, torch.float32)
    pre.transform_linear_for_pre_quantization(model, checkpoint, params["quantization_args"]["group_size"],
                                              torch.float32)
    pre.transform_embedding_for_pre_quantization(model, checkpoint, torch.float32, 8, 0)
    if params.get("lora_args"):
        transform_linear_for_lora_after_quantization(model, checkpoint, params["lora_args"]["rank"])
    if params["quantization_args"].get("spinquant"):
        inject_fast_hadamard_transform_native_for_spin_quant(model)
    pre.sanitize_checkpoint_from_pre_quantization(checkpoint)
    missing, unexpected = model.load_state_dict(checkpoint, strict=False)
    assert not unexpected and all(k.endswith(".zeros") for k in missing)
    with torch.no_grad():
        return model.float()(torch.tensor([tokens]))[0]


@needs_executorch
@pytest.mark.parametrize("lora, spinquant", [(0, False), (16, True)])
def test_meta_checkpoint_computes_what_executorch_does(tmp_path, lora, spinquant):
    """The same checkpoint through ExecuTorch's eager model, Meta's own code for these files."""
    meta_layout.write_checkpoint(tiny(), tmp_path / "m", lora_rank=lora, spinquant=spinquant)
    theirs = executorch_eager_logits(tmp_path / "m", TOKENS)
    assert_logits_close(logits(load(tmp_path / "m", runtime="reference").model), theirs)


@needs_executorch
@pytest.mark.slow
@pytest.mark.parametrize("lora, hadamard", [(False, True)])  # adaptors: ExecuTorch's eager model, above
def test_executorch_program_computes_what_pocketquant_does(tmp_path, lora, hadamard):
    """export_llama lowers our Meta-layout export (QLoRA adaptors; SpinQuant's R4); ExecuTorch's runtime runs
    the .pte. XNNPACK rounds the int4 scales to bf16 and quantizes activations its own way, so the logits agree
    to about 1% of the largest on average, and the greedy tokens but for near ties."""
    model = _quantized("absmax", lora, hadamard)
    path, (requantized, _), exported = et.export_executorch(model, tmp_path / "tiny.pte", context=64)
    assert requantized == 0 and path.stat().st_size > 0
    theirs, ours = et.pte_logits(path, TOKENS), logits(model)
    assert torch.equal(logits(exported), ours)  # positive scales: exported exactly
    top = ours.abs().max().item()
    assert (theirs - ours).abs().mean() < 0.01 * top and (theirs - ours).abs().max() < 0.1 * top
    picked = ours.gather(-1, theirs.argmax(-1, keepdim=True))[:, 0]  # their greedy token, by our logits
    assert (ours.max(-1).values - picked).max() < 0.05 * top  # the same, or a near tie
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.pte"]  # nothing else left behind


@pytest.mark.slow
def test_smollm2_in_metas_layout_runs_through_the_cli(tmp_path):
    """SmolLM2-135M (dequantized Q4_1 GGUF as float) written in Meta's layout: generate reads the directory,
    quantize --method import keeps its integers in a packed file."""
    from pocketquant.export.meta import write_tokenizer

    loaded = load_model("smollm2-135m")
    folder = tmp_path / "smol-int4-eo8"
    state = meta_layout.write_checkpoint(loaded.model, folder)
    write_tokenizer(loaded.tokenizer, folder)
    cli = [sys.executable, "-m", "pocketquant"]
    out = subprocess.run([*cli, "generate", str(folder), "--chat", "--prompt", "What is the capital of France?",
                          "--max-new-tokens", "12"], capture_output=True, text=True, check=True).stdout
    assert "Paris" in out
    subprocess.run([*cli, "quantize", str(folder), "--method", "import", "-o", str(tmp_path / "p.safetensors")],
                   check=True, capture_output=True)
    packed = load_model(tmp_path / "p.safetensors").model
    q = meta_layout.to_interleaved(unpack_int4(packed.layers[7].self_attn.k_proj.qweight), 3)
    assert torch.equal(q, state["layers.7.attention.wk.weight"])
    assert torch.equal(packed.layers[7].mlp.down_proj.scales, state["layers.7.feed_forward.w2.scales"])
    if et.available():  # and it computes what ExecuTorch's eager model (Meta's code) computes from the files:
        # the same at the first position; later, RoPE's float rounding (rotate-half here, complex products
        # there) moves int8 activation codes, which SmolLM2's large activations carry far (greedy tokens agree)
        tokens = loaded.tokenizer.encode("The capital of France is")
        ours, theirs = logits(load(folder, runtime="reference").model, tokens), executorch_eager_logits(folder, tokens)
        top = theirs.abs().max().item()
        assert (ours[0] - theirs[0]).abs().max() < 1e-5 * top and (ours - theirs).abs().mean() < 0.03 * top
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))

"""QAT prepare/convert, LoRA adapters, the training loop (resume, torchrun) and `pocketquant train` (tiny models)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import killed_at_write
from pocketquant.checkpoints import load_model
from pocketquant.errors import PocketQuantError
from pocketquant.layers import FakeQuantLinear, QuantLinear
from pocketquant.checkpoints.packed import read_header, save_packed
from pocketquant.quant import qat
from pocketquant.quant.lora import add_lora, lora_parameters, merge_lora
from pocketquant.quant.train import TrainConfig, learning_rate, train
from pocketquant.runtime import load
from pocketquant.scheme import PRESETS

G = torch.Generator().manual_seed(0)
TOKENS = torch.randint(0, 256, (2, 40), generator=G)
SCHEME = PRESETS["int4-eo8"]


def _model(tiny_text_dir):
    return load_model(tiny_text_dir[0]).model


def _examples(n=8, length=33):
    ids = torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    return ids, mask


def _randomize_adapters(model):
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=G) * 0.1)


@pytest.mark.parametrize("with_lora", [False, True])
def test_prepared_forward_equals_converted_and_packed_forward(tiny_text_dir, tmp_path, with_lora):
    model = qat.prepare(_model(tiny_text_dir), SCHEME)
    assert isinstance(model.layers[0].mlp.down_proj, FakeQuantLinear)
    if with_lora:
        assert len(add_lora(model, rank=4)) == 7 * len(model.layers)
        _randomize_adapters(model)
    with torch.no_grad():
        fake = model(TOKENS)
        packed = qat.convert(model, SCHEME)
        assert isinstance(packed.layers[0].mlp.down_proj, QuantLinear)
        torch.testing.assert_close(packed(TOKENS), fake, atol=1e-5 * fake.abs().max().item(), rtol=0)
    path = save_packed(tmp_path / "q.safetensors", packed, SCHEME, [{"method": "qat"}])
    assert (read_header(path).lora is not None) == with_lora
    for runtime in ("reference", "fast"):
        loaded = load(path, runtime=runtime).model
        if runtime == "fast":  # adapters take the module path, not the native all-layer step
            assert (loaded.fused_decode is None) == with_lora
        with torch.no_grad():
            out = loaded(TOKENS)
            _assert_close_positions(out, fake, exact=runtime == "reference")
            if with_lora:  # decode with adapters: the module path, same numbers as a full forward
                caches = loaded.new_caches(1, 64)
                loaded(TOKENS[:1, :20], caches, 0)
                step = loaded(TOKENS[:1, 20:21], caches, 20)
                torch.testing.assert_close(step[0, 0], out[0, 20], atol=1e-4 * fake.abs().max().item(), rtol=0)


def test_a_dequantized_model_fake_quantizes_back_to_the_same_function(tiny_text_dir):
    """The GPTQ starting point of training: packed integers as float weights, which prepare's fake
    quantization maps back onto the same integers (the signed-max scale is recovered exactly)."""
    packed = qat.convert(qat.prepare(_model(tiny_text_dir), SCHEME), SCHEME)
    with torch.no_grad():
        expected = packed(TOKENS)
        again = qat.prepare(qat.dequantize(packed), SCHEME)
        assert isinstance(again.layers[1].self_attn.o_proj, FakeQuantLinear)
        torch.testing.assert_close(again(TOKENS), expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


def _assert_close_positions(out, ref, exact: bool):
    """Logits agree at every position (reference runtime), or at 85% of them (fast kernels: their float
    sums differ from the reference by ~1e-6, which now and then flips one int8 activation code, and a flip
    moves that position's later logits; float32 adapters pass those differences on where bf16 ones often
    rounded them away)."""
    close = ((out - ref).abs() <= 1e-4 * ref.abs().max()).all(-1)
    assert close.all() if exact else close.float().mean() >= 0.85, (exact, close.float().mean())


def test_adapters_start_neutral_and_merge_into_the_weight(tiny_text_dir):
    with pytest.raises(PocketQuantError, match="prepare the model"):
        add_lora(_model(tiny_text_dir))
    model = qat.prepare(_model(tiny_text_dir), SCHEME)
    with torch.no_grad():
        before = model(TOKENS)
        add_lora(model, rank=4, targets=("q_proj", "mlp.*"))
        assert model.layers[0].self_attn.k_proj.lora is None and model.layers[0].mlp.up_proj.lora is not None
        assert torch.equal(model(TOKENS), before)  # B starts at zero
        _randomize_adapters(model)
        up = model.layers[0].mlp.up_proj
        x = torch.randn(5, up.in_features, generator=G)
        separate = x @ up.weight.T + up.lora(x)
        merge_lora(model)  # the merged weight is float32, the adapter's bf16: agreement to bf16 rounding
        torch.testing.assert_close(x @ up.weight.T, separate, atol=1e-2 * separate.abs().max().item(), rtol=0)
    assert up.lora is None
    with pytest.raises(PocketQuantError, match="match no block linear"):
        add_lora(model, targets=("wq",))


def test_schedule_warms_up_then_decays_to_zero():
    lrs = [learning_rate(1.0, s, 20, 4) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.01


def test_qat_then_lora_lowers_the_loss_and_trains_what_each_phase_says(tiny_text_dir):
    model, teacher = _model(tiny_text_dir), _model(tiny_text_dir)
    original = model.layers[0].mlp.up_proj.weight.detach().clone()
    ids, mask = _examples(2)
    config = TrainConfig(SCHEME, qat=True, lora=True, steps=8, lora_steps=8, batch=2, grad_accum=1, lr=1e-3,
                         lora_lr=1e-2, warmup=1, rank=4, grad_checkpointing=True, distill=0.0)
    model, losses = train(model, teacher, config, ids, mask)
    assert len(losses) == 16 and losses[7] < losses[0] and losses[15] < losses[8]
    assert not torch.equal(model.layers[0].mlp.up_proj.weight, original)  # QAT moved the backbone
    assert any(p.abs().sum() > 0 for p in lora_parameters(model) if p.shape[1] == 4)  # B moved from zero
    assert not any(p.requires_grad for p in model.parameters())


class _Killed(Exception):
    pass


def _kill_after(n):
    """A progress wrapper that raises after `n` steps in all (the phases share the count)."""
    seen = [0]

    def progress(iterable, **kw):
        for x in iterable:
            if seen[0] == n:
                raise _Killed
            seen[0] += 1
            yield x
    return progress


def test_a_killed_run_resumes_to_the_same_losses_and_weights(tiny_text_dir, tmp_path):
    ids, mask = _examples(6)
    config = TrainConfig(SCHEME, qat=True, lora=True, steps=4, lora_steps=4, grad_accum=2, lr=1e-3,
                         lora_lr=1e-2, warmup=1, rank=4, checkpoint_every=1, distill=0.5)
    whole, losses = train(_model(tiny_text_dir), _model(tiny_text_dir), config, ids, mask, tmp_path / "a")
    with pytest.raises(_Killed):  # killed in the LoRA phase, after its first step
        train(_model(tiny_text_dir), _model(tiny_text_dir), config, ids, mask, tmp_path / "b", _kill_after(5))
    resumed, again = train(_model(tiny_text_dir), _model(tiny_text_dir), config, ids, mask, tmp_path / "b")
    assert again == losses
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(PocketQuantError, match="other settings or another model"):
        train(_model(tiny_text_dir), _model(tiny_text_dir), TrainConfig(SCHEME, steps=3), ids, mask, tmp_path / "b")


def test_a_kill_at_any_write_of_the_training_state_resumes_to_the_same_result(tiny_text_dir, tmp_path, monkeypatch):
    ids, mask = _examples(6)
    config = TrainConfig(SCHEME, qat=True, lora=True, steps=2, lora_steps=1, lr=1e-3, lora_lr=1e-2, warmup=1,
                         rank=4, checkpoint_every=1, distill=0.0)
    whole, losses = train(_model(tiny_text_dir), None, config, ids, mask)
    for k in range(1, 20):
        state, finished = tmp_path / f"state-{k}", True
        with killed_at_write(monkeypatch, k, during=k % 2 == 0):
            try:
                train(_model(tiny_text_dir), None, config, ids, mask, state)
            except KeyboardInterrupt:
                finished = False
        resumed, again = train(_model(tiny_text_dir), None, config, ids, mask, state)
        assert again == losses, f"killed at write {k}"
        assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
        if finished:
            break
    assert k == 10  # the first manifest, then three writes for each of the three steps


TORCHRUN_SCRIPT = """
import sys, torch, torch.distributed as dist
from safetensors.torch import save_file
from pocketquant.checkpoints import load_model
from pocketquant.quant.train import TrainConfig, train
from pocketquant.scheme import PRESETS
dist.init_process_group("gloo")
torch.set_num_threads(1)
ids = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(1))
mask = torch.ones_like(ids, dtype=torch.bool)
config = TrainConfig(PRESETS["int4-eo8"], qat=True, lora=True, steps=2, lora_steps=2, grad_accum=1, lr=1e-3,
                     lora_lr=1e-2, warmup=1, rank=4, distill=0.5)
model, losses = train(load_model(sys.argv[1]).model, load_model(sys.argv[1]).model, config, ids, mask)
state = {k: v.contiguous() for k, v in model.state_dict().items() if "lm_head" not in k}
save_file(state | {"losses": torch.tensor(losses)}, f"{sys.argv[2]}/rank{dist.get_rank()}.safetensors")
"""


def test_training_under_torchrun_keeps_processes_in_step(tiny_text_dir, tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tiny_text_dir[0]), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert not torch.equal(a.pop("losses"), b.pop("losses"))  # each process read its own examples
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["layers.0.self_attn.q_proj.lora.B.weight"].abs().sum() > 0


CHAT = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]


def test_chat_data_trains_on_the_assistant_tokens_only(smollm2_gguf, tmp_path):
    from pocketquant.data import training_examples

    tok = load_model(smollm2_gguf).tokenizer
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n\n" + json.dumps({"messages": CHAT[:2]}) + "\n")
    ids, mask = training_examples(tok, data, 64)
    assert ids.shape == (2, 64)
    assert tok.decode(ids[0][mask[0]].tolist()) == "Paris.<|im_end|>\nRome.<|im_end|>\n"
    assert tok.decode(ids[1][mask[1]].tolist()) == "Paris.<|im_end|>\n"
    assert "capital of France" in tok.decode(ids[0][~mask[0]].tolist())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CHAT[:1]}) + "\n")
    with pytest.raises(PocketQuantError, match="no assistant message"):
        training_examples(tok, bad, 64)
    bad.write_text("[1, 2]\n")
    with pytest.raises(PocketQuantError, match=r"bad.jsonl:1: expected"):
        training_examples(tok, bad, 64)


def test_cli_train_writes_a_packed_file_with_adapters(tiny_text_dir, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    run = [sys.executable, "-m", "pocketquant", "train", str(tiny_text_dir[0]), "--data", str(text),
           "--seq-len", "32", "--steps", "3", "--lora-steps", "3", "--grad-accum", "1", "--rank", "4"]
    out = tmp_path / "qat.safetensors"
    proc = subprocess.run(run + ["--qat", "--lora", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "trained 6 steps" in proc.stdout and not (tmp_path / "qat.safetensors.train-state").exists()
    header = read_header(out)
    assert header.lora == {"rank": 4, "scale": 2.0, "dtype": "bfloat16"}
    assert [s["method"] for s in header.recipe] == ["spinquant", "gptq", "qat+lora"]
    assert header.recipe[-1]["steps"] == 3 and not header.recipe[0]["learn"] and header.recipe[1]["samples"] == 128
    assert header.config.hadamard_down and not header.config.tie_embeddings  # rotated: R4 online, norms folded
    plain = tmp_path / "plain.safetensors"
    proc = subprocess.run(run + ["--qat", "--rotations", "none", "--init", "float", "-o", str(plain)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not read_header(plain).config.hadamard_down and read_header(plain).lora is None
    merged = tmp_path / "merged.safetensors"
    proc = subprocess.run(run + ["--qat", "--lora", "--merge-lora", "-o", str(merged)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert read_header(merged).lora is None and read_header(merged).recipe[-1]["merge_lora"]
    bad = subprocess.run(run + ["-o", str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 1 and "--qat, --lora, or both" in bad.stderr


def test_train_killed_in_its_gptq_start_or_at_its_end_reruns_to_the_same_file(tiny_text_dir, tmp_path, monkeypatch):
    """Kills in the GPTQ step, in the training step, or while their states are removed must neither block the
    rerun nor change the file."""
    from pocketquant.quant.gptq import GPTQConfig
    from pocketquant.quant.recipe import quantize
    from pocketquant.quant.spinquant import SpinQuantConfig

    text = tmp_path / "train.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    steps = (SpinQuantConfig(SCHEME, learn=False), GPTQConfig(SCHEME, 4, 32, text=str(text)),
             TrainConfig(SCHEME, steps=2, seq_len=32, grad_accum=1, checkpoint_every=1, data=str(text)))
    whole = quantize(tiny_text_dir[0], steps, tmp_path / "whole.safetensors", progress=False)
    out = tmp_path / "out.safetensors"
    # kills: in GPTQ's first and second layer, in training's first and second step, in removing the states
    for k in (2, 6, 7, 5, 3):
        with killed_at_write(monkeypatch, k), pytest.raises(KeyboardInterrupt):
            quantize(tiny_text_dir[0], steps, out, progress=False)
    again = quantize(tiny_text_dir[0], steps, out, progress=False)
    assert out.read_bytes() == whole.path.read_bytes() and again.report["losses"] == whole.report["losses"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "tiny", "train.txt", "whole.safetensors"]

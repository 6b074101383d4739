"""Hadamard matrices, function-preserving rotations, Cayley SGD and the SpinQuant recipe (tiny models)."""

import pytest
import torch

from pocketquant.checkpoints import load_model
from pocketquant.errors import PocketQuantError
from pocketquant.hadamard import hadamard_matrix, hadamard_transform, has_hadamard
from pocketquant.checkpoints.packed import read_header, save_packed
from pocketquant.quant import rotation, rtn, spinquant
from pocketquant.runtime import load

G = torch.Generator().manual_seed(0)
TOKENS = torch.randint(0, 256, (2, 48), generator=G)


@pytest.mark.parametrize("n", [2, 12, 20, 44, 64, 192, 576, 1536, 3072])
def test_hadamard_matrices_of_model_widths(n):
    H = hadamard_matrix(n)
    assert torch.equal(H @ H.T, n * torch.eye(n)) and set(H.unique().tolist()) == {-1.0, 1.0}
    x = torch.randn(3, n, dtype=torch.float64, generator=G)
    torch.testing.assert_close(hadamard_transform(x), x @ H.double().T / n ** 0.5)


def test_widths_without_a_construction_are_reported():
    assert not has_hadamard(7 * 16)  # 112 = 7 x 16 and 7 - 1 is not a prime = 3 mod 4
    assert hadamard_matrix(112) is None


def _model(tiny_text_dir):
    return load_model(tiny_text_dir[0]).model  # tied, ffn 192 = 12 x 16, head_dim 16


@pytest.mark.parametrize("r3", [False, True])
def test_rotated_float_model_computes_the_same_function(tiny_text_dir, r3):
    ref, model = _model(tiny_text_dir), _model(tiny_text_dir)
    rotation.fold_norms(model)
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert all(torch.all(layer.input_layernorm.weight == 1) for layer in model.layers)
    R1, R2 = rotation.random_rotations(model, seed=3)
    rotation.rotate(model, R1, R2, r4=True, r3=r3)
    assert model.config.hadamard_down and model.config.hadamard_qk == r3
    with torch.no_grad():
        a, b = ref(TOKENS), model(TOKENS)
    torch.testing.assert_close(b, a, atol=1e-5 * a.abs().max().item(), rtol=0)
    ppl = [torch.nn.functional.cross_entropy(x[:, :-1].reshape(-1, x.shape[-1]), TOKENS[:, 1:].reshape(-1)).exp()
           for x in (a, b)]
    assert abs(ppl[1] / ppl[0] - 1) < 1e-3
    with pytest.raises(PocketQuantError, match="already rotated"):
        rotation.rotate(model, R1, R2)


def test_cayley_steps_keep_rotations_orthogonal():
    R = torch.linalg.qr(torch.randn(48, 48, dtype=torch.float64, generator=G))[0]
    for _ in range(20):
        R = spinquant.cayley_step(R, torch.randn(48, 48, dtype=torch.float64, generator=G), lr=1.5)
    assert (R.T @ R - torch.eye(48, dtype=torch.float64)).abs().max() < 1e-12


@pytest.mark.parametrize("loss,int4_weights", [("ce", False), ("kl", True), ("ce", True)])
def test_rotation_learning_lowers_the_loss_and_leaves_the_model_as_it_was(tiny_text_dir, loss, int4_weights):
    model = rotation.fold_norms(_model(tiny_text_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = spinquant.SpinQuantConfig(iterations=12, samples=1, seq_len=48, lr=1.0, loss=loss,
                                       fake_quant_weights=int4_weights)
    R1, R2, losses, held = spinquant.learn_rotations(model, config, TOKENS[:1], heldout=TOKENS[:1])
    # What the search guarantees: its loss on the block it learns from falls, measured before the first step
    # and after the last (on random tokens nothing carries over to another block: no claim about one). KL is
    # searched with int4 weights: with 16-bit ones it starts near 1e-4, too weak a signal for 12 steps to
    # lower on every CPU's rounding.
    assert len(losses) == 12 and held[1] < held[0] * (1 - 1e-4) and losses[-1] < losses[0]
    assert (R1.T @ R1 - torch.eye(R1.shape[0], dtype=R1.dtype)).abs().max() < 1e-5
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in [R1, *R2])


def test_spinquant_recipe_saves_reusable_rotations_and_runs_packed(tiny_text_dir, tmp_path):
    config = spinquant.SpinQuantConfig(iterations=3, samples=2, seq_len=48)
    first, *_ = spinquant.prepare(_model(tiny_text_dir), config, TOKENS, save_to=tmp_path / "rot.safetensors")
    again, losses, _ = spinquant.prepare(_model(tiny_text_dir), config, None, rotations=tmp_path / "rot.safetensors")
    assert losses == []  # nothing learned the second time
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(PocketQuantError, match="do not fit"):
        spinquant.load_rotations(tmp_path / "rot.safetensors", load_model("random:smollm2-135m").model)

    loaded = load_model(tiny_text_dir[0])
    scheme = rtn.RTNConfig().scheme
    quantized = rtn.apply(first, rtn.RTNConfig(scheme))
    path = save_packed(tmp_path / "q.safetensors", quantized, scheme, [config.to_dict()], loaded.tokenizer)
    with torch.no_grad():
        ref = quantized(TOKENS)
        for runtime in ("reference", "fast"):
            model = load(path, runtime=runtime).model
            assert model.config.hadamard_down
            torch.testing.assert_close(model(TOKENS), ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


@pytest.mark.slow
def test_cli_spinquant_then_gptq_and_reuse_of_its_rotations(tiny_text_dir, tmp_path):
    import subprocess
    import sys

    run = [sys.executable, "-m", "pocketquant", "quantize", str(tiny_text_dir[0])]
    out = tmp_path / "spin.safetensors"
    proc = subprocess.run(run + ["-o", str(out), "--method", "spinquant", "--spin-iterations", "3",
                                 "--spin-samples", "3", "--spin-len", "32", "--calib-samples", "4",
                                 "--calib-len", "32", "--spin-seed", "1", "--spin-int4-weights"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rotations = tmp_path / "spin.rotations.safetensors"
    assert "rotation search: loss" in proc.stdout and rotations.is_file()
    assert not (tmp_path / "spin.safetensors.gptq-state").exists()
    again = tmp_path / "again.safetensors"
    proc = subprocess.run(run + ["-o", str(again), "--method", "spinquant", "--rotations", str(rotations),
                                 "--then", "rtn"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [r["method"] for r in read_header(again).recipe] == ["spinquant", "rtn"]
    assert [r["method"] for r in read_header(out).recipe] == ["spinquant", "gptq"]
    assert read_header(out).recipe[0]["seed"] == 1 and read_header(out).recipe[0]["fake_quant_weights"]
    # the same rotations: the same (RTN) int8 embedding and output, as stored
    a, b = (load(p, runtime="reference").model for p in (out, again))
    assert torch.equal(a.embed_tokens.qweight, b.embed_tokens.qweight)
    assert torch.equal(a.lm_head.qweight, b.lm_head.qweight)
    bad = subprocess.run(run + ["-o", str(tmp_path / "x.safetensors"), "--method", "spinquant",
                                "--share-embedding-output"], capture_output=True, text=True)
    assert bad.returncode == 1 and "does not apply to rotated models" in bad.stderr


@pytest.mark.parametrize("kv_cache_bits", [None, 8])
def test_native_decode_applies_the_online_rotations(tiny_text_dir, tmp_path, kv_cache_bits):
    """R4 (and, with an int8 KV cache, R3) inside the one-call decode step equal the reference modules."""
    scheme = rtn.RTNConfig().scheme.replace(kv_cache_bits=kv_cache_bits)
    config = spinquant.SpinQuantConfig(scheme, learn=False)
    model, *_ = spinquant.prepare(_model(tiny_text_dir), config, None)
    assert model.config.hadamard_qk == (kv_cache_bits == 8)
    path = save_packed(tmp_path / "q.safetensors", rtn.apply(model, rtn.RTNConfig(scheme)), scheme,
                       [config.to_dict()])
    fast, ref = load(path).model, load(path, runtime="reference").model
    assert fast.fused_decode is not None
    caches_f, caches_r = fast.new_caches(1, 64), ref.new_caches(1, 64)
    with torch.no_grad():
        fast(TOKENS[:1, :20], caches_f, 0)
        ref(TOKENS[:1, :20], caches_r, 0)
        for pos in range(20, 28):
            a, b = fast(TOKENS[:1, pos:pos + 1], caches_f, pos), ref(TOKENS[:1, pos:pos + 1], caches_r, pos)
            torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=0)
    _batched_decode_gives_each_sequence_its_own_bits(fast, ref)


def _batched_decode_gives_each_sequence_its_own_bits(fast, ref):
    """Three sequences at different positions, one native step for all of them: each gets exactly the logits
    it gets decoded alone, and close to the reference modules' batched step (within an int8 code's flip at
    a rounding edge: the native step's norms sum in another order)."""
    lengths, steps, text = (5, 12, 20), 6, TOKENS[0]

    def alone(n):
        caches = fast.new_caches(1, 64)
        fast(text[None, :n], caches, 0)
        return [fast(text[None, n + s:n + s + 1], caches, n + s) for s in range(steps)]

    def batched(model):
        caches = model.new_caches(len(lengths), 64)
        rows = [[c.row(b) for c in caches] for b in range(len(lengths))]
        for b, n in enumerate(lengths):
            model(text[None, :n], rows[b], 0)
        by_layer = [list(layer) for layer in zip(*rows)]
        pos = torch.tensor(lengths)
        return [model(torch.stack([text[n + s:n + s + 1] for n in lengths]), by_layer, pos + s)
                for s in range(steps)]
    with torch.no_grad():
        each, together, reference = [alone(n) for n in lengths], batched(fast), batched(ref)
    for s in range(steps):
        for b in range(len(lengths)):
            assert torch.equal(together[s][b], each[b][s][0])
        torch.testing.assert_close(together[s], reference[s], atol=5e-3 * reference[s].abs().max().item(), rtol=0)


TORCHRUN_SCRIPT = """
import sys, torch, torch.distributed as dist
from safetensors.torch import save_file
from pocketquant.checkpoints import load_model
from pocketquant.quant import rotation, spinquant
dist.init_process_group("gloo")
torch.set_num_threads(1)
model = rotation.fold_norms(load_model(sys.argv[1]).model)
tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
R1, R2, losses, _ = spinquant.learn_rotations(model, spinquant.SpinQuantConfig(iterations=3, samples=4, seq_len=32),
                                           tokens)
save_file({"R1": R1, "R2": R2[1], "losses": torch.tensor(losses)}, f"{sys.argv[2]}/rank{dist.get_rank()}.safetensors")
"""


def test_rotation_search_under_torchrun_keeps_processes_in_step(tiny_text_dir, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "search.py"
    script.write_text(TORCHRUN_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tiny_text_dir[0]), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert not torch.equal(a["losses"], b["losses"])  # each process read its own calibration blocks
    assert torch.equal(a["R1"], b["R1"]) and torch.equal(a["R2"], b["R2"])  # averaged gradients, same steps

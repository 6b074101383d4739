"""The Arm kernels, cross-compiled for aarch64 and run under qemu-user, against this (x86) build: activation
quantization and the int4 / int8 linear layers on odd shapes bit for bit, on every Arm path each emulated CPU
runs (cortex-a53: ARMv8.0, no dot product instructions; neoverse-n1: dotprod; max: i8mm too), and
decode steps of a whole (tiny, rotated) model logit by logit.
Needs Debian's gcc-aarch64-linux-gnu and qemu-user; skipped with the reason when they are missing. Also: the
optional extension is built wherever a compiler is."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketquant.layers import QuantLinear
from pocketquant.runtime import kernels
from pocketquant.runtime.engine import PROJECTIONS, FastLinear, SharedActivations
from pocketquant.scheme import ActSpec, LinearSpec, WeightSpec

GCC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
needs_cross_tools = pytest.mark.skipif(not (GCC and QEMU and kernels.available()),
                                       reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt install "
                                              "gcc-aarch64-linux-gnu qemu-user) and this build's kernels")
SOURCES = Path(kernels.__file__).parent
# (CPU, the Arm paths it must run, the paths it must refuse)
CPUS = [("cortex-a53", ["neon", "portable"], ["i8mm", "dotprod"]),
        ("neoverse-n1", ["dotprod", "neon", "portable"], ["i8mm"]),
        ("max", ["i8mm", "dotprod", "neon", "portable"], [])]
G = torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    out = tmp_path_factory.mktemp("arm") / "driver"
    subprocess.run([GCC, "-O2", "-std=gnu11", "-ffp-contract=off", "-fopenmp", "-static",
                    str(Path(__file__).parent / "arm" / "driver.c"),
                    *map(str, sorted(SOURCES.glob("*.c"))),
                    "-o", str(out), "-lm"], check=True, capture_output=True)
    return out


def _bytes(*tensors) -> bytes:
    return b"".join(t.contiguous().numpy().tobytes() for t in tensors)


def _cases():
    """(input bytes, this build's output bytes) for every case."""
    cases = []
    for M, K in [(1, 64), (3, 100), (7, 576), (2, 4)]:
        x = torch.randn(M, K, generator=G) * torch.logspace(-3, 3, M)[:, None] + 0.2
        x[0, : K // 2] = 0
        qa, scale, zp = kernels.quantize_rows(x)
        cases.append((_bytes(torch.tensor([0, M, K, 0, 0]), x), _bytes(qa, scale, zp)))
    shapes = [(bits, K, N, M) for bits in (4, 8) for K, N in ((32, 17), (576, 53), (2048, 37), (8192, 37))
              for M in (1, 7, 8, 9)] + [(4, 576, 33, 64), (8, 576, 33, 64), (4, 96, 19, 513), (4, 64, 17, 2),
                                         (4, 32, 9, 6)]
    # int8 inputs not a multiple of 16 (a padded last load) or of 8 (i8mm hands over to udot's kernel)
    shapes += [(8, 36, 17, 2), (8, 40, 9, 6), (8, 20, 5, 3), (8, 44, 3, 1)]
    for bits, K, N, M in shapes:
        spec = LinearSpec(WeightSpec(bits, 32 if bits == 4 else 0), ActSpec())
        f = FastLinear(QuantLinear.from_float(torch.randn(N, K, generator=G) * 0.05, spec), SharedActivations())
        x = torch.randn(M, K, generator=G)
        x[min(3, M - 1)] *= 1000  # one token of a very different scale
        acts = kernels.quantize_rows(x)
        head = torch.tensor([bits, M, K, N, f.group if bits == 4 else 0])
        if bits == 4:
            y = kernels.linear_w4(acts, f.packed, f.scales, f.rowcorr, f.group, N, 2)
            cases.append((_bytes(head, *acts, f.packed, f.scales, f.rowcorr), _bytes(y)))
        else:
            y = kernels.linear_w8(acts, f.packed, f.scales, f.wsum, N, 2)
            cases.append((_bytes(head, *acts, f.packed, f.scales, f.wsum), _bytes(y)))
    return cases


def test_the_kernels_are_built_wherever_a_compiler_is():
    """The extension is optional (an install without a C compiler still works, on the reference runtime), so a
    build that fails must not pass unnoticed as a suite of skipped kernel tests."""
    if shutil.which("gcc") or shutil.which("cc"):
        assert kernels.available()


@needs_cross_tools
@pytest.mark.parametrize("cpu, runs, refuses", CPUS)
def test_every_arm_path_gives_this_builds_bits(driver, cpu, runs, refuses):
    cases = _cases()
    given = b"".join(c for c, _ in cases)
    for path in refuses:
        run = subprocess.run([QEMU, "-cpu", cpu, str(driver), path], input=b"", capture_output=True)
        assert run.returncode == 3, f"{cpu} should not run {path}"
    for path in runs:
        run = subprocess.run([QEMU, "-cpu", cpu, str(driver), path], input=given, capture_output=True, timeout=600)
        assert run.returncode == 0, run.stderr.decode()
        out, at = run.stdout, 0
        for i, (_, want) in enumerate(cases):
            got = out[at:at + len(want)]
            at += len(want)
            if got != want:
                diff = np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8)
                pytest.fail(f"{cpu}/{path}: case {i} differs in {int(diff.sum())} of {len(want)} bytes")
        assert at == len(out)


def _decode_case(model, steps: int, batch: int, max_t: int):
    """(input bytes, the hidden states this build's native decode step gives after each step) for `batch`
    sequences decoded together from position 0, each from its own tokens."""
    c, fd = model.config, model.fused_decode
    first = model.layers[0].self_attn.q_proj
    cache = model.new_caches(1, max_t)[0]
    m = fd.layers[0].had_down_m
    parts = [torch.tensor([1, c.n_layers, batch, steps, max_t, c.dim, c.n_heads, c.n_kv_heads, c.head_dim,
                           c.ffn_dim, cache.bits or 0, m, int(c.hadamard_qk)]),
             torch.tensor([model.layers[0].input_layernorm.eps], dtype=torch.float32), fd.inv_freq.float()]
    if m:
        parts.append(fd.had_down.float())
    for layer in model.layers:
        parts += [layer.input_layernorm.weight.float(), layer.post_attention_layernorm.weight.float()]
        for name in PROJECTIONS:
            f = layer.get_submodule(name)
            parts += [torch.tensor([f.out_features, f.in_features, f.group]), f.packed, f.scales, f.rowcorr]
    assert first.bits == 4
    caches = model.new_caches(batch, max_t)
    rows = [[cache.row(b) for cache in caches] for b in range(batch)]
    by_layer = [list(layer) for layer in zip(*rows)]
    tokens = torch.randint(0, c.vocab_size, (steps, batch), generator=G)
    outs = []
    for s in range(steps):
        pos = torch.full((batch,), s, dtype=torch.int64)
        x = model.embed_tokens(tokens[s][:, None]).float()
        parts += [pos, x.reshape(batch, -1)]
        outs.append(fd(x, by_layer, pos).reshape(batch, -1))
    return _bytes(*parts), outs


@needs_cross_tools
@pytest.mark.parametrize("kv_cache_bits", [None, 8])
def test_decode_steps_on_arm_give_this_builds_logits(driver, tiny_text_dir, tmp_path, kv_cache_bits):
    """A rotated model (R4 on down_proj's input, and R3 with an int8 KV cache), three sequences per step: the
    Arm build's hidden states after every step give this build's logits (attention and softmax sum in a
    vector-width order of their own, so equal to float rounding, not to the bit)."""
    from pocketquant.checkpoints import load_model
    from pocketquant.checkpoints.packed import save_packed
    from pocketquant.quant import rtn, spinquant
    from pocketquant.runtime import load

    scheme = rtn.RTNConfig().scheme.replace(kv_cache_bits=kv_cache_bits)
    config = spinquant.SpinQuantConfig(scheme, learn=False)
    model, *_ = spinquant.prepare(load_model(tiny_text_dir[0]).model, config, None)
    path = save_packed(tmp_path / "q.safetensors", rtn.apply(model, rtn.RTNConfig(scheme)), scheme,
                       [config.to_dict()])
    model = load(path).model
    with torch.inference_mode():
        given, want = _decode_case(model, steps=8, batch=3, max_t=16)
        for cpu, runs, _ in CPUS[::2]:  # without and with the dot product instructions
            for path_name in runs:
                run = subprocess.run([QEMU, "-cpu", cpu, str(driver), path_name], input=given, capture_output=True,
                                     timeout=600)
                assert run.returncode == 0, run.stderr.decode()
                got = torch.from_numpy(np.frombuffer(run.stdout, np.float32).copy()).view(len(want), *want[0].shape)
                for s, (a, b) in enumerate(zip(got, want)):
                    la, lb = (model.lm_head(model.norm(h[:, None]))[:, 0] for h in (a, b))
                    torch.testing.assert_close(la, lb, atol=1e-4 * lb.abs().max().item(), rtol=0,
                                               msg=lambda m: f"{cpu}/{path_name}, step {s}: {m}")


@needs_cross_tools
def test_prefill_attention_on_arm_gives_this_builds_outputs(driver):
    """Causal attention over a prompt (the GEMM-like path of prefill and evaluation), with and without the Arm
    vector code: the scores and the weighted values take the same steps as here, and the softmax's sum adds in
    another order, so equal to float rounding."""
    cases, want = [], []
    for T, start, H, KV, D in [(19, 5, 4, 2, 64), (1, 30, 2, 1, 64), (40, 0, 3, 3, 128)]:
        S = start + T
        q, k, v = (torch.randn(*shape, generator=G) for shape in ((T, H, D), (KV, S, D), (KV, S, D)))
        cases.append(_bytes(torch.tensor([2, T, start, H, KV, D]), q, k, v))
        want.append(kernels.attention(q.permute(1, 0, 2)[None], k[None], v[None], start).reshape(T, H, D))
    for cpu, runs, _ in CPUS[::2]:
        for path in runs:
            run = subprocess.run([QEMU, "-cpu", cpu, str(driver), path], input=b"".join(cases), capture_output=True,
                                 timeout=600)
            assert run.returncode == 0, run.stderr.decode()
            got, at = np.frombuffer(run.stdout, np.float32), 0
            for w in want:
                a = torch.from_numpy(got[at:at + w.numel()].copy()).view_as(w)
                at += w.numel()
                torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{cpu}/{path}: {m}")
            assert at == len(got)

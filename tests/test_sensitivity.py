"""Sensitivity (the KL each linear adds alone, measured and estimated) and the budget step that keeps the most
sensitive linears at int8: the bytes it promises, the file it makes, its replay and its exports."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pocketquant.checkpoints import load_model
from pocketquant.checkpoints.packed import load_packed, read_header
from pocketquant.errors import PocketQuantError
from pocketquant.layers import QuantLinear, set_module
from pocketquant.quant import recipe
from pocketquant.quant.context import Context
from pocketquant.quant.rtn import RTNConfig
from pocketquant.quant.sensitivity import BudgetConfig, choose, estimated_kl, file_bytes, linear_kl, parse_budget
from pocketquant.scheme import PRESETS

SCHEME = PRESETS["int4-eo8"]
TOKENS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pocketquant", *map(str, args)], capture_output=True, text=True)


def kl_of(model, reference_logp) -> float:
    logp = F.log_softmax(model(TOKENS).float(), -1)
    return float(F.kl_div(logp, reference_logp, log_target=True, reduction="sum")) / TOKENS.numel()


@torch.no_grad()
def test_each_linears_kl_is_the_models_kl_with_it_alone_quantized(tiny_text_dir):
    model = load_model(tiny_text_dir[0]).model
    before = model(TOKENS)
    reference = F.log_softmax(before.float(), -1)
    kl = linear_kl(model, TOKENS, SCHEME)
    assert len(kl) == 2 * 7 and all(v > 0 for v in kl.values())
    assert torch.equal(model(TOKENS), before)  # left as it was
    for name in ("layers.0.self_attn.k_proj", "layers.1.mlp.down_proj"):
        _, i, short = name.split(".", 2)
        layer = model.layers[int(i)]
        original = layer.get_submodule(short)
        set_module(layer, short, QuantLinear.from_float(original.weight, SCHEME.linear))
        assert kl_of(model, reference) == pytest.approx(kl[name], rel=1e-4)
        set_module(layer, short, original)


def test_the_second_order_estimate_ranks_linears_as_the_measurement_does(tiny_text_dir):
    model = load_model(tiny_text_dir[0]).model
    tokens = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = linear_kl(model, tokens, SCHEME)
    estimate = estimated_kl(model, tokens, SCHEME, draws=8)
    names = list(exact)
    a, b = (torch.tensor([d[n] for n in names]).argsort().argsort().float() for d in (exact, estimate))
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.8
    assert 0.5 < sum(estimate.values()) / sum(exact.values()) < 2
    assert all(p.requires_grad for p in model.parameters())  # as it was


@pytest.mark.parametrize("text, parsed", [("+10%", ("ratio", 1.1)), ("1.25", ("ratio", 1.25)),
                                          ("120MB", ("bytes", 1.2e8)), ("5000b", ("bytes", 5000))])
def test_budgets_are_percentages_ratios_or_sizes(text, parsed):
    kind, value = parse_budget(text)
    assert kind == parsed[0] and value == pytest.approx(parsed[1])


@pytest.mark.parametrize("text", ["", "ten", "-10%", "0.9", "12 parsecs", "5"])
def test_a_bad_budget_is_refused(text):
    with pytest.raises(PocketQuantError, match="budget"):
        BudgetConfig(SCHEME, text)


def test_the_choice_fits_the_budget_and_prefers_kl_per_byte(tiny_text_dir):
    model = load_model(tiny_text_dir[0]).model
    kl = {n: 1.0 for n in linear_kl(model, TOKENS[:1], SCHEME)}
    kl["layers.1.self_attn.k_proj"] = 2.0  # among the smallest (64 x 32) and the most sensitive: the most KL per byte
    base = file_bytes(model, SCHEME)
    for budget in ("+5%", "+20%", "1.5"):
        chosen = choose(model, SCHEME, kl, budget)
        assert 0 < file_bytes(model, BudgetConfig(SCHEME).mixed(chosen)) - base <= base * (parse_budget(budget)[1] - 1)
        assert "layers.1.self_attn.k_proj" in chosen
    assert choose(model, SCHEME, kl, "+0%") == []
    with pytest.raises(PocketQuantError, match="alone takes"):
        choose(model, SCHEME, kl, f"{base // 2}B")


def test_a_budget_step_comes_right_before_the_quantizer():
    for steps in ([BudgetConfig(SCHEME)], [BudgetConfig(SCHEME), BudgetConfig(SCHEME), RTNConfig(SCHEME)]):
        with pytest.raises(PocketQuantError, match="right before"):
            recipe.check(steps)
    step = BudgetConfig(SCHEME, "1.2", 3, 64, "t.txt", ("layers.0.mlp.up_proj",))
    assert recipe.step_from_dict(json.loads(json.dumps(step.to_dict()))) == step


def test_quantize_with_a_budget_writes_what_it_measured_and_replays_without_measuring(tiny_text_dir, tmp_path):
    src = tiny_text_dir[0]
    plain, mixed, again = (tmp_path / f"{n}.safetensors" for n in ("plain", "mixed", "again"))
    assert cli("quantize", src, "-o", plain, "--method", "rtn").returncode == 0
    proc = cli("quantize", src, "-o", mixed, "--method", "rtn", "--budget", "+15%", "--budget-samples", "2",
               "--calib-len", "32")
    assert proc.returncode == 0, proc.stderr
    assert "block linears kept at int8 per channel" in proc.stdout and "sensitivity" in proc.stderr
    header = read_header(mixed)
    kept = header.recipe[0]["upgraded"]
    assert kept and [p for p, _ in header.scheme.overrides] == kept
    assert mixed.stat().st_size - plain.stat().st_size <= 0.15 * plain.stat().st_size + 200  # + the longer header
    model, scheme, _ = load_packed(mixed)
    bits = {n: m.spec.weight.bits for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(n for n, b in bits.items() if b == 8 and n != "lm_head") == sorted(kept)
    shown = cli("inspect", mixed).stdout
    assert f"w8 per channel a8: {len(kept)} (" in shown and f"{len(kept)} linears (the scheme's overrides)" in shown
    proc = cli("quantize", src, "-o", again, "--recipe", mixed)
    assert proc.returncode == 0 and "sensitivity" not in proc.stderr
    assert again.read_bytes() == mixed.read_bytes()
    proc = cli("quantize", src, "-o", tmp_path / "x.safetensors", "--recipe", mixed, "--budget", "+5%")
    assert proc.returncode == 1 and "drop --method / --scheme / --budget" in proc.stderr
    from pocketquant.runtime import load

    fast = load(mixed)  # the int8 linears run on the native kernels, the same numbers as the reference
    with torch.no_grad():
        torch.testing.assert_close(fast.model(TOKENS[:1]), model(TOKENS[:1]), atol=2e-3, rtol=2e-3)
    proc = cli("export", mixed, "--to", "meta", "-o", tmp_path / "meta")
    assert proc.returncode == 1 and "int8 (mixed precision" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = cli("export", mixed, "--to", "gguf", "-o", tmp_path / "m.gguf")
    assert proc.returncode == 0, proc.stderr


def test_the_sensitivity_verb_prints_plots_and_writes_json(tiny_text_dir, tmp_path):
    png, out = tmp_path / "s.png", tmp_path / "s.json"
    proc = cli("sensitivity", tiny_text_dir[0], "--samples", "2", "--calib-len", "32", "--png", png, "--json", out,
               "--budget", "+20%")
    assert proc.returncode == 0, proc.stderr
    assert "most sensitive" in proc.stdout and "--budget +20%" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kl = json.loads(out.read_text())["kl"]
    assert len(kl) == 14 and all(v > 0 for v in kl.values())
    proc = cli("sensitivity", tiny_text_dir[0], "--budget", "lots")
    assert proc.returncode == 1 and "budget 'lots'" in proc.stderr

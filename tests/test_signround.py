"""SignRound: tuned rounding against round-to-nearest, the recipe step, determinism and resume after a kill."""

import pytest
import torch

from conftest import killed_at_write
from pocketquant.checkpoints import load_model
from pocketquant.errors import PocketQuantError
from pocketquant.layers import QuantLinear
from pocketquant.quant import recipe, rtn, signround
from pocketquant.quant.signround import RoundingLinear, SignRoundConfig
from pocketquant.scheme import PRESETS

G = torch.Generator().manual_seed(0)
CONFIG = SignRoundConfig(samples=4, seq_len=32, iterations=30, batch=2)


def _model(tiny_text_dir):
    return load_model(tiny_text_dir[0]).model


def test_untrained_rounding_is_round_to_nearest():
    w = torch.randn(48, 96, generator=G)
    spec = PRESETS["int4-eo8"].linear
    x = torch.randn(5, 96, generator=G)
    tuned, plain = RoundingLinear(w, spec, 0.5).quantized(), QuantLinear.from_float(w, spec)
    assert torch.equal(tuned.qweight, plain.qweight) and torch.equal(tuned.scales, plain.scales)
    assert torch.allclose(RoundingLinear(w, spec, 0.5)(x), plain(x), atol=1e-4)  # its forward is the scheme's


def test_signround_beats_rtn_and_is_deterministic(tiny_text_dir):
    tokens = torch.randint(0, 256, (4, 32), generator=G)
    ref = _model(tiny_text_dir)
    with torch.no_grad():
        target = ref(tokens).log_softmax(-1)

        def kl(model):
            return torch.nn.functional.kl_div(model(tokens).log_softmax(-1), target, log_target=True,
                                              reduction="batchmean").item()
        notes = []
        tuned = signround.apply(_model(tiny_text_dir), CONFIG, tokens, note=notes.append)
        plain = rtn.apply(_model(tiny_text_dir), rtn.RTNConfig())
    assert isinstance(tuned.layers[1].mlp.down_proj, QuantLinear)
    assert kl(tuned) < 0.8 * kl(plain)
    assert "round-to-nearest to tuned" in notes[-1]
    again = signround.apply(_model(tiny_text_dir), CONFIG, tokens)
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), again.state_dict().values()))
    other = signround.apply(_model(tiny_text_dir), SignRoundConfig(**{**vars(CONFIG), "seed": 1}), tokens)
    assert not torch.equal(tuned.layers[0].mlp.up_proj.qweight, other.layers[0].mlp.up_proj.qweight)


@pytest.mark.parametrize("when", ["after", "during"])
def test_a_kill_at_any_write_then_a_rerun_gives_the_uninterrupted_result(tiny_text_dir, tmp_path, monkeypatch, when):
    tokens = torch.randint(0, 256, (4, 32), generator=G)
    config = SignRoundConfig(samples=4, seq_len=32, iterations=8, batch=2)
    whole = signround.apply(_model(tiny_text_dir), config, tokens).state_dict()
    state = tmp_path / "state"
    for k in (1, 3, 5, 7):  # the first manifest, then per layer: the manifest (pending), the layer, its outputs,
        # the manifest (committed)
        with killed_at_write(monkeypatch, k, during=when == "during"), pytest.raises(KeyboardInterrupt):
            signround.apply(_model(tiny_text_dir), config, tokens, state_dir=state)
        notes = []
        resumed = signround.apply(_model(tiny_text_dir), config, tokens, state_dir=state, note=notes.append)
        assert all(torch.equal(whole[n], resumed.state_dict()[n]) for n in whole), f"killed at write {k}"
        if k >= 5:
            assert any("resuming" in n for n in notes)
        signround.signround_state(state).remove()
        assert not state.exists()


def test_the_recipe_step(tiny_text_dir, tmp_path):
    steps = recipe.from_options("hadamard", then="signround", signround={"samples": 4, "seq_len": 32,
                                                                        "iterations": 5})
    assert [s.to_dict()["method"] for s in steps] == ["spinquant", "signround"]
    assert recipe.check(recipe.step_from_dict(s.to_dict()) for s in steps) == steps  # the JSON round trip
    out = tmp_path / "sr.safetensors"
    r = recipe.quantize(str(tiny_text_dir[0]), steps, out, progress=False)
    assert r.recipe == steps and not (tmp_path / "sr.safetensors.signround-state").exists()
    again = recipe.quantize(str(tiny_text_dir[0]), recipe.read(out), tmp_path / "again.safetensors", progress=False)
    assert again.path.read_bytes() == out.read_bytes()  # the stored recipe makes the same file
    with pytest.raises(PocketQuantError, match="rtn, gptq or signround once"):
        recipe.check([rtn.RTNConfig(), SignRoundConfig()])
    for bad in ({"lr": 2.0}, {"min_scale": 0.0}, {"iterations": 0}, {"lr": float("nan")}):
        with pytest.raises(PocketQuantError, match="signround"):
            SignRoundConfig(**bad)

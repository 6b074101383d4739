"""GPTQ: the column algorithm against RTN, and the layer-by-layer run with checkpoints and resume."""

import contextlib
from pathlib import Path

import pytest
import torch

from conftest import killed_at_write
from pocketquant.checkpoints import load_model
from pocketquant.errors import PocketQuantError
from pocketquant.layers import QuantLinear
from pocketquant.numerics import dequantize_weight, quantize_weight
from pocketquant.quant import gptq, rtn
from pocketquant.scheme import WeightSpec

G = torch.Generator().manual_seed(0)
SPEC = WeightSpec(4, 32)


def correlated_inputs(n=4096, k=128):
    """Inputs near a 32-dimensional subspace, as a layer's activations tend to be."""
    return torch.randn(n, 32, generator=G) @ torch.randn(32, k, generator=G) + 0.1 * torch.randn(n, k, generator=G)


def output_error(x, w, q, scales):
    return (x @ w.T - x @ dequantize_weight(q, scales).T).pow(2).mean().item()


@pytest.mark.parametrize("rule", ["signed-max", "search"])
def test_identity_hessian_gives_round_to_nearest(rule):
    """With uncorrelated unit inputs no error can be moved anywhere: GPTQ must equal RTN exactly (and the search
    rule's weighting by the inputs' mean squares, all 1, must change nothing)."""
    w, spec = torch.randn(24, 96, generator=G), WeightSpec(4, 32, rule)
    q, s = gptq.gptq_weight(w, torch.eye(96), spec, damp=0.0)
    q_rtn, s_rtn = quantize_weight(w, spec)
    assert torch.equal(q, q_rtn) and torch.equal(s, s_rtn)


@pytest.mark.parametrize("act_order, rule", [(False, "signed-max"), (True, "signed-max"), (False, "search"),
                                             (True, "search")])
def test_gptq_lowers_the_output_error_of_round_to_nearest(act_order, rule):
    x, w, spec = correlated_inputs(), torch.randn(64, 128, generator=G), WeightSpec(4, 32, rule)
    H = 2 * x.T @ x / x.shape[0]
    q, s = gptq.gptq_weight(w, H, spec, act_order=act_order)
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7 and s.shape == (64, 4)
    assert rule != "search" or (s > 0).all()
    rtn_err, gptq_err = output_error(x, w, *quantize_weight(w, spec)), output_error(x, w, q, s)
    assert gptq_err < 0.5 * rtn_err  # measured: 0.15 (0.10 with act_order)


def test_gptaq_pulls_the_quantized_linear_toward_the_float_one_on_the_float_inputs():
    """GPTAQ: the quantized model's inputs x~ differ from the float model's x (earlier layers' error, mostly a
    function of x); pulled toward w x, the quantized linear on x~ matches the float one better than GPTQ's,
    which matches w x~."""
    x = correlated_inputs()
    distortion = torch.eye(128) + 0.1 * torch.randn(128, 128, generator=G) / 128 ** 0.5
    x_q = x @ distortion + 0.02 * torch.randn(x.shape, generator=G)
    w = torch.randn(64, 128, generator=G)
    H, cross = 2 * x_q.T @ x_q / len(x), 2 * (x - x_q).T @ x_q / len(x)

    def error(q, s):  # of the quantized linear on x~ against the float linear on x
        return (x @ w.T - x_q @ dequantize_weight(q, s).T).pow(2).mean().item()
    errors = {a: error(*gptq.gptq_weight(w, H, SPEC, cross=cross, asymmetry=a)) for a in (0.0, 0.25, 1.0)}
    assert errors[0.0] == error(*gptq.gptq_weight(w, H, SPEC))  # no pull: plain GPTQ
    assert errors[1.0] < errors[0.25] < 0.75 * errors[0.0]  # measured: 8.3, 27.7 against 42.8


@pytest.mark.parametrize("act_order", [False, True])
def test_gptaq_blocks_are_only_a_schedule(act_order):
    """Updating the later columns block by block gives what updating them after every column gives."""
    x = correlated_inputs()
    x_q, w = x + 0.2 * torch.randn(x.shape, generator=G), torch.randn(64, 128, generator=G)
    H, cross = 2 * x_q.T @ x_q / len(x), 2 * (x - x_q).T @ x_q / len(x)
    runs = [gptq.gptq_weight(w.double(), H, SPEC, act_order=act_order, block=b, cross=cross, asymmetry=0.5)
            for b in (32, 128)]
    assert (runs[0][0] != runs[1][0]).float().mean() < 0.002 and torch.allclose(runs[0][1], runs[1][1])


def test_dead_inputs_and_bad_hessians():
    w, H = torch.randn(8, 64, generator=G), torch.eye(64)
    H[5, 5] = 0  # an input that was always zero
    q, _ = gptq.gptq_weight(w, H, SPEC)
    assert (q[:, 5] == 0).all()
    with pytest.raises(PocketQuantError, match="positive definite"):
        gptq.gptq_weight(w, -torch.eye(64), SPEC, damp=0.0)


def _model(tiny_text_dir):
    return load_model(tiny_text_dir[0]).model


def test_layer_by_layer_gptq_beats_rtn_on_its_calibration_text(tiny_text_dir):
    tokens = torch.randint(0, 256, (8, 64), generator=G)
    ref = _model(tiny_text_dir)
    with torch.no_grad():
        target = ref(tokens).log_softmax(-1)
        errors = {}
        for name, model in (("rtn", rtn.apply(_model(tiny_text_dir), rtn.RTNConfig())),
                            ("gptq", gptq.apply(_model(tiny_text_dir), gptq.GPTQConfig(samples=8, seq_len=64),
                                                tokens))):
            assert isinstance(model.layers[1].mlp.down_proj, QuantLinear)
            errors[name] = torch.nn.functional.kl_div(model(tokens).log_softmax(-1), target, log_target=True,
                                                      reduction="batchmean").item()
    assert errors["gptq"] < errors["rtn"]


@pytest.mark.parametrize("asymmetry", [0.0, 0.25])
def test_a_killed_run_resumes_after_its_last_finished_layer(tiny_text_dir, tmp_path, monkeypatch, asymmetry):
    tokens = torch.randint(0, 256, (4, 32), generator=G)
    config = gptq.GPTQConfig(samples=4, seq_len=32, asymmetry=asymmetry)  # GPTAQ: two input streams to resume
    whole = gptq.apply(_model(tiny_text_dir), config, tokens)

    state = tmp_path / "state"
    real, calls = gptq.gptq_weight, []

    def dies_in_layer_1(*args, **kw):
        calls.append(1)
        if len(calls) > 7 + 3:  # layer 0's seven linears, then three of layer 1
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(gptq, "gptq_weight", dies_in_layer_1)
    with pytest.raises(KeyboardInterrupt):
        gptq.apply(_model(tiny_text_dir), config, tokens, state_dir=state)
    assert (state / "layer-0.safetensors").is_file() and not (state / "layer-1.safetensors").exists()

    calls.clear()
    monkeypatch.setattr(gptq, "gptq_weight", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    notes, shown = [], []

    def progress(items, **kw):  # what the progress bar is given: the layers left, counted from the first
        shown.append((list(items), kw["initial"], kw["total"]))
        return items
    resumed = gptq.apply(_model(tiny_text_dir), config, tokens, progress=progress, state_dir=state, note=notes.append)
    assert len(calls) == 7  # only layer 1 was quantized again
    assert shown == [([1], 1, 2)] and f"gptq: resuming from {state}: layers 0 to 0 of 2" in notes[0]
    gptq.gptq_state(state).remove()  # what the caller does once the result is written
    assert not state.exists()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _killed_after_layer_0(model, config, tokens, state, monkeypatch):
    real, calls = gptq.gptq_weight, []

    def dies_in_layer_1(*args, **kw):
        calls.append(1)
        if len(calls) > 7:
            raise KeyboardInterrupt
        return real(*args, **kw)

    with monkeypatch.context() as m:
        m.setattr(gptq, "gptq_weight", dies_in_layer_1)
        with pytest.raises(KeyboardInterrupt):
            gptq.apply(model, config, tokens, state_dir=state)


def test_a_checkpoint_of_other_settings_or_another_model_is_refused(tiny_text_dir, tmp_path, monkeypatch):
    tokens = torch.randint(0, 256, (4, 32), generator=G)
    state, config = tmp_path / "state", gptq.GPTQConfig(samples=4, seq_len=32)
    _killed_after_layer_0(_model(tiny_text_dir), config, tokens, state, monkeypatch)
    with pytest.raises(PocketQuantError, match="other settings or another model"):
        gptq.apply(_model(tiny_text_dir), gptq.GPTQConfig(samples=4, seq_len=32, damp=0.5), tokens, state_dir=state)
    other = _model(tiny_text_dir)
    with torch.no_grad():
        other.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(PocketQuantError, match="other settings or another model"):
        gptq.apply(other, config, tokens, state_dir=state)


def test_a_damaged_checkpoint_is_refused(tiny_text_dir, tmp_path, monkeypatch):
    tokens = torch.randint(0, 256, (4, 32), generator=G)
    state, config = tmp_path / "state", gptq.GPTQConfig(samples=4, seq_len=32)
    _killed_after_layer_0(_model(tiny_text_dir), config, tokens, state, monkeypatch)
    layer = state / "layer-0.safetensors"
    layer.write_bytes(layer.read_bytes()[:-7])
    with pytest.raises(PocketQuantError, match="damaged GPTQ state"):
        gptq.apply(_model(tiny_text_dir), config, tokens, state_dir=state)
    (state / "state.json").write_text('{"format": "pocketquant.state", "files": "x"')
    with pytest.raises(PocketQuantError, match="damaged GPTQ state"):
        gptq.apply(_model(tiny_text_dir), config, tokens, state_dir=state)


@contextlib.contextmanager
def _killed_at_unlink(monkeypatch):
    def killed(self, missing_ok=False):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", killed)
        yield


@pytest.mark.parametrize("when", ["after", "during"])
def test_a_kill_at_any_write_then_a_rerun_gives_the_uninterrupted_result(tiny_text_dir, tmp_path, monkeypatch, when):
    """Every file operation of a GPTQ run is a place a kill can land: between two writes ("after") or in the
    middle of one ("during", its temporary file half written). A rerun must give exactly the uninterrupted
    result and leave nothing behind."""
    tokens = torch.randint(0, 256, (4, 32), generator=G)
    config = gptq.GPTQConfig(samples=4, seq_len=32)
    whole = gptq.apply(_model(tiny_text_dir), config, tokens).state_dict()
    for k in range(20):
        state, finished = tmp_path / f"{when}-{k}", True
        with killed_at_write(monkeypatch, k, during=when == "during") as writes:
            try:
                gptq.apply(_model(tiny_text_dir), config, tokens, state_dir=state)
            except KeyboardInterrupt:
                finished = False
        resumed = gptq.apply(_model(tiny_text_dir), config, tokens, state_dir=state).state_dict()
        assert all(torch.equal(whole[n], resumed[n]) for n in whole), f"killed at write {k} ({writes[-1].name})"
        for kill in (killed_at_write(monkeypatch, 0, during=when == "during"), _killed_at_unlink(monkeypatch)):
            with kill, pytest.raises(KeyboardInterrupt):  # a kill while the finished state is being removed
                gptq.gptq_state(state).remove()
            again = gptq.apply(_model(tiny_text_dir), config, tokens, state_dir=state).state_dict()
            assert all(torch.equal(whole[n], again[n]) for n in whole)
        gptq.gptq_state(state).remove()
        assert not state.exists()
        if finished:  # k is past the last write of a run
            break
    assert k > 8  # the state of every layer was written and committed: 2 layers x 4 writes + the first


def test_a_state_directory_that_is_a_link_or_holds_other_files_is_left_alone(tiny_text_dir, tmp_path):
    tokens = torch.randint(0, 256, (4, 32), generator=G)
    config = gptq.GPTQConfig(samples=4, seq_len=32)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    with pytest.raises(PocketQuantError, match="not a plain directory"):
        gptq.apply(_model(tiny_text_dir), config, tokens, state_dir=tmp_path / "link")
    assert list(elsewhere.iterdir()) == []
    (elsewhere / "notes.txt").write_text("mine")
    with pytest.raises(PocketQuantError, match="not pocketquant GPTQ state"):
        gptq.apply(_model(tiny_text_dir), config, tokens, state_dir=elsewhere)
    assert [p.name for p in elsewhere.iterdir()] == ["notes.txt"]

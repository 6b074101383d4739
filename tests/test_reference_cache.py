"""The cached reference: its KL estimate against the exact one, and a second evaluation that reads it."""

import pytest
import torch

from pocketquant.errors import PocketQuantError
from pocketquant.eval import reference as ref_cache
from pocketquant.eval.run import evaluate
from pocketquant.quant import recipe

G = torch.Generator().manual_seed(0)


def test_the_kl_estimate_is_exact_with_the_whole_vocabulary_and_unbiased_without():
    p = torch.randn(2000, 300, generator=G).mul(3).log_softmax(-1)
    q = (p + torch.randn(2000, 300, generator=G)).log_softmax(-1)
    exact = (p.exp() * (p - q)).sum(-1)
    y = torch.randint(0, 300, (2000,), generator=G)
    whole, agree = ref_cache.TopK.of(p, y, 300).compare(q)
    assert torch.allclose(whole, exact, atol=1e-5) and agree == int((p.argmax(-1) == q.argmax(-1)).sum())
    for k in (4, 16, 64):  # a heavy remainder, estimated from 16 draws per position
        head_only = ref_cache.TopK.of(p, y, k, draws=1)
        head_only.rest.zero_()
        estimate = ref_cache.TopK.of(p, y, k).compare(q)[0]
        error, dropped = abs(estimate.mean() - exact.mean()), exact.mean() - head_only.compare(q)[0].mean()
        assert error < 0.03 * exact.mean() and error < dropped / 5  # far better than dropping the remainder


@pytest.fixture
def two_models(tiny_text_dir, tmp_path):
    packed = tmp_path / "rtn.safetensors"
    recipe.quantize(str(tiny_text_dir[0]), recipe.from_options("rtn"), packed, progress=False)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    return [str(tiny_text_dir[0]), str(packed)], str(text)


def test_a_second_evaluation_reads_the_reference_and_scores_the_same(two_models, tmp_path, monkeypatch):
    models, text = two_models
    cache = tmp_path / "cache"
    exact = evaluate(models, text, [], context=64, progress=False)
    for k in (16, 256):  # the tiny model's whole vocabulary: the exact KL
        monkeypatch.setattr(ref_cache, "TOP_K", k)
        first = evaluate(models, text, [], context=64, progress=False, reference_cache=tmp_path / f"cache{k}")
        for a, b in zip(first.models, exact.models):  # perplexity and agreement exact, KL a lower bound
            assert a.metrics["ppl_token"] == b.metrics["ppl_token"]
            assert a.metrics["top1_agreement"] == b.metrics["top1_agreement"]
            assert a.metrics["kl_mean"] == pytest.approx(b.metrics["kl_mean"], rel=1e-4 if k == 256 else 0.1, abs=1e-7)
    first = evaluate(models, text, [], context=64, progress=False, reference_cache=cache)
    assert first.settings["reference_cache"]["read"] is False and len(list(cache.iterdir())) == 1

    import pocketquant.runtime

    real = pocketquant.runtime.load

    def never_run(*args, **kw):
        raise AssertionError("the cached reference model was run")

    def load(source, *args, **kw):  # the reference model is loaded (its weights name the cache) but never run
        loaded = real(source, *args, **kw)
        if source == models[0]:
            loaded.model.forward = never_run
        return loaded
    monkeypatch.setattr(pocketquant.runtime, "load", load)
    second = evaluate(models, text, [], context=64, progress=False, reference_cache=cache)
    assert second.settings["reference_cache"]["read"] is True
    assert [m.metrics for m in second.models] == [m.metrics for m in first.models]
    monkeypatch.setattr(pocketquant.runtime, "load", real)
    other = evaluate(models, text, [], context=32, progress=False, reference_cache=cache)  # other settings
    assert other.settings["reference_cache"]["read"] is False and len(list(cache.iterdir())) == 2


def test_a_damaged_cache_is_refused(two_models, tmp_path):
    models, text = two_models
    cache = tmp_path / "cache"
    evaluate(models, text, [], context=64, progress=False, reference_cache=cache)
    (f,) = cache.iterdir()
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(PocketQuantError, match="damaged reference cache"):
        evaluate(models, text, [], context=64, progress=False, reference_cache=cache)


def test_llama_cpp_quantizations_of_the_reference_are_scored_beside_ours(two_models, capfd):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'pocketquant[llama-cpp]')")
    models, text = two_models
    result = evaluate(models, text, [], context=64, progress=False, llama_cpp=["Q8_0", "q4_0"])
    assert "llama_model_quantize" not in capfd.readouterr().err  # the quantizer's log of every tensor is not shown
    names = [m.name for m in result.models]
    assert names[2:] == ["llama.cpp Q8_0", "llama.cpp Q4_0"]
    q8, q4 = (m.metrics for m in result.models[2:])
    assert q8["kl_mean"] < q4["kl_mean"] and q4["file_bytes"] < q8["file_bytes"]
    assert q8["kl_mean"] < 0.01 and q8["top1_agreement"] > 0.9  # llama.cpp runs the same model
    with pytest.raises(PocketQuantError, match="unknown llama.cpp type"):
        evaluate(models, text, [], context=64, progress=False, llama_cpp=["Q4_NOPE"])


def test_the_cli_refuses_a_cache_it_cannot_own(two_models, tmp_path, capsys):
    from pocketquant.cli import main

    models, text = two_models
    for cache, message in ((models[0] + "/cache", "would write inside the input"), (text, "not a directory"),
                           ("", "needs the name of a directory")):
        assert main(["eval", *models, "--data", text, "--tasks", "--reference-cache", cache]) != 0
        assert message in capsys.readouterr().err
    assert main(["eval", *models, "--data", str(tmp_path / "missing.txt"), "--tasks",
                 "--reference-cache", str(tmp_path / "new")]) != 0
    assert not (tmp_path / "new").exists()  # a failed run leaves no empty cache directory

"""Evaluation: windows, KL/agreement, perplexity against transformers, tasks, reports."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pocketquant.checkpoints import load_model
from pocketquant.errors import PocketQuantError
from pocketquant.eval.perplexity import score_text, windows
from pocketquant.eval.run import evaluate
from pocketquant.eval.tasks import MCItem, continuation_logprob, load_mc, score_mc

TEXT = "The quick brown fox jumps over the lazy dog. " * 12


@pytest.mark.parametrize("n, context, stride", [(10, 4, 4), (10, 4, 2), (101, 16, 5), (5, 16, 16), (17, 4, 1)])
def test_windows_score_every_target_once_with_enough_history(n, context, stride):
    targets = []
    for start, first in windows(n, context, stride):
        end = min(start + context, n - 1)
        scored = list(range(start + 1 + first, end + 1))
        assert all(t - start - 1 >= (context - stride if start else 0) for t in scored)
        targets += scored
    assert targets == list(range(1, n))


def hf_perplexity(model, tokens, context):
    """Disjoint windows scored with transformers' own loss."""
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, context):
        window = torch.tensor([tokens[start:start + context + 1]])
        with torch.no_grad():
            loss = model(window, labels=window).loss  # mean over window length - 1 targets
        nll, count = nll + float(loss) * (window.shape[1] - 1), count + window.shape[1] - 1
    return torch.tensor(nll / count).exp().item()


def test_token_perplexity_equals_transformers(tiny_text_dir):
    path, ref = tiny_text_dir
    loaded = load_model(path)
    tokens = loaded.tokenizer.encode(TEXT)
    ours = score_text([loaded.model], tokens, context=64)[0].perplexity()
    assert ours == pytest.approx(hf_perplexity(ref, tokens, 64), rel=1e-5)


def test_kl_against_itself_is_exactly_zero(tiny_text_dir):
    path, _ = tiny_text_dir
    result = evaluate([str(path), str(path)], data=None, tasks=[], context=128, limit=600, progress=False)
    same = result.models[1].metrics
    assert same["kl_mean"] == 0.0 and same["kl_p99"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["ppl_token"] == result.models[0].metrics["ppl_token"]
    assert result.settings["tokens_scored"] == 600


def test_packed_models_score_the_same_on_both_runtimes(tiny_text_dir, tmp_path):
    """The fast kernels (eval's default) compute the reference's integers; only float rounding may differ."""
    from pocketquant.checkpoints.packed import save_packed
    from pocketquant.quant import rtn
    from pocketquant.runtime import kernels
    from pocketquant.scheme import PRESETS

    if not kernels.available():
        pytest.skip("native kernels not built")
    path, _ = tiny_text_dir
    loaded = load_model(path)
    packed = save_packed(tmp_path / "q.safetensors", rtn.apply(loaded.model, rtn.RTNConfig()), PRESETS["int4-eo8"],
                         [{"method": "rtn"}], loaded.tokenizer)
    runs = {rt: evaluate([str(path), str(packed)], context=128, limit=600, progress=False, runtime=rt)
            for rt in ("fast", "reference")}
    fast, ref = (runs[rt].models[1] for rt in ("fast", "reference"))
    import inspect

    assert runs["fast"].settings["runtime"] == "fast"
    assert inspect.signature(evaluate).parameters["runtime"].default == "fast"
    assert fast.metrics["kl_mean"] > 0.001  # the quantized model does differ from the float one...
    for key in ("ppl_token", "ppl_word", "kl_mean", "kl_median"):  # ...by the same amount on both runtimes
        assert fast.metrics[key] == pytest.approx(ref.metrics[key], rel=1e-3), key
    assert fast.tasks == ref.tasks


def test_kl_of_a_different_model_is_positive_and_correct(tiny_text_dir):
    path, _ = tiny_text_dir
    a = load_model(path).model
    b = load_model(path).model
    with torch.no_grad():
        b.layers[0].mlp.down_proj.weight.mul_(1.5)
    tokens = load_model(path).tokenizer.encode(TEXT)[:200]
    scores = score_text([a, b], tokens, context=64)
    x = torch.tensor([tokens[:64]])
    with torch.no_grad():
        p, q = F.log_softmax(a(x)[0], -1), F.log_softmax(b(x)[0], -1)
    direct = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # KL(p || q) per token
    torch.testing.assert_close(scores[1].kl[0], direct, atol=1e-6, rtol=1e-5)
    assert 0 < scores[1].kl_stats()["top1_agreement"] <= 1


def test_continuation_logprob(tiny_text_dir):
    path, _ = tiny_text_dir
    model = load_model(path).model
    ctx, cont = [5, 6, 7], [8, 9]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ctx + cont]))[0], -1)
    expected = float(logp[2, 8] + logp[3, 9])
    assert continuation_logprob(model, ctx, cont)[0] == pytest.approx(expected, abs=1e-5)


def test_mc_scoring_picks_the_likeliest_choice(tiny_text_dir):
    path, _ = tiny_text_dir
    loaded = load_model(path)
    items = [MCItem("Pick one", ("aaaa", "bb", "c"), 0), MCItem("Again", ("x", "yy"), 1)]
    lls = [[continuation_logprob(loaded.model, loaded.tokenizer.encode(f"Question: {i.question}\nAnswer:"),
                                 loaded.tokenizer.encode(" " + c, add_bos=False))[0] for c in i.choices]
           for i in items]
    expected = sum(max(range(len(ll)), key=ll.__getitem__) == i.answer for ll, i in zip(lls, items)) / 2
    assert score_mc(loaded.model, loaded.tokenizer, items)["acc"] == expected


def test_task_file_errors(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a"]}\n')
    with pytest.raises(PocketQuantError, match=r"t.jsonl:2: expected"):
        load_mc(bad)
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 2}\n')
    with pytest.raises(PocketQuantError, match="answer 2 is not an index into 2 choices"):
        load_mc(bad)
    assert len(load_mc(__import__("pocketquant.eval.run", fromlist=["x"]).task_files(None)["basic-mc"])) == 48


def test_models_with_different_vocabularies_are_refused(tiny_text_dir, tmp_path):
    from conftest import hf_model

    path, _ = tiny_text_dir
    hf_model(vocab_size=300).save_pretrained(tmp_path / "other")
    with pytest.raises(PocketQuantError, match="vocabulary of 300 tokens differs from the reference's 256"):
        evaluate([str(path), str(tmp_path / "other")], tasks=[], limit=50, progress=False)


@pytest.mark.slow
def test_cli_eval_data_formats_json_and_report(tiny_text_dir, tmp_path):
    path, _ = tiny_text_dir
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": TEXT[:200]}) + "\n" + json.dumps({"text": TEXT}) + "\n")
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" = Title = \n\n" + TEXT)
    run = [sys.executable, "-m", "pocketquant", "eval", str(path), str(path), "--context", "128"]
    for data in ("a.txt", "b.jsonl", "wikitext-2-raw"):
        proc = subprocess.run(run + ["--data", str(tmp_path / data), "--tasks"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "context 128, stride 128" in proc.stdout and "perplexity (token)" in proc.stdout
    proc = subprocess.run(run + ["--limit", "300", "--fake-quant", "int4-eo8", "--json", str(tmp_path / "r.json"),
                                 "--report", str(tmp_path / "rep")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    names = [m["name"] for m in result["models"]]
    assert names == [str(path), str(path), f"{path} (fake-quant int4-eo8)"]
    fq = result["models"][2]
    assert fq["kl_mean"] > 0 and set(fq["tasks"]["basic-mc"]) == {"acc", "acc_norm", "n"}
    assert result["settings"]["tokens_scored"] == 300 and result["settings"]["context"] == 128
    assert "| perplexity (token) |" in (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run(run + ["--data", str(tmp_path / "nope.txt")], capture_output=True, text=True)
    assert missing.returncode == 1 and "no such text file" in missing.stderr

"""lm-evaluation-harness drives our models through the adapter and gets our numbers."""

import pytest

from pocketquant.checkpoints import load_model
from pocketquant.eval.perplexity import score_text
from pocketquant.eval.run import task_files
from pocketquant.eval.tasks import load_mc, score_mc

TASK = """task: pq_basic_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture
def adapter(tiny_text_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pocketquant.eval.lm_eval_adapter import PocketQuantLM

    path, _ = tiny_text_dir
    return path, PocketQuantLM(model=str(path), max_length=128)


@pytest.mark.slow
def test_harness_multiple_choice_equals_our_scorer(adapter, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    path, lm = adapter
    data = task_files(None)["basic-mc"]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "pq.yaml").write_text(TASK.format(data=data))
    out = lm_eval.simple_evaluate(model=lm, tasks=["pq_basic_mc"], bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    harness = out["results"]["pq_basic_mc"]
    loaded = load_model(path)
    ours = score_mc(loaded.model, loaded.tokenizer, load_mc(data))
    assert harness["acc,none"] == pytest.approx(ours["acc"])
    assert harness["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_rolling_loglikelihood_and_generation(adapter):
    from lm_eval.api.instance import Instance

    path, lm = adapter
    text = "hello world, " * 30
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    (ll,) = lm.loglikelihood_rolling([req])
    tokens = [lm.prefix] + lm.tok.encode(text, add_bos=False)
    assert ll == pytest.approx(-score_text([lm.model], tokens, context=128)[0].nll, rel=1e-6)
    assert ll < 0
    gen = Instance("generate_until", {}, ("abc", {"until": ["\n"], "max_gen_toks": 20}), 0)
    (text_out,) = lm.generate_until([gen])
    assert isinstance(text_out, str) and "\n" not in text_out and len(text_out) <= 20  # one byte per token

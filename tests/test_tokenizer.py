"""Tokenizers against their references: transformers for GGUF / tokenizer.json, Meta's own code for
Llama 3's tokenizer.model and chat format."""

import json

import pytest

from pocketquant import tokenizer as tk

TEXTS = [
    "Hello world",
    "  leading spaces,   runs of spaces\tand\ttabs\n\n\nand newlines \n",
    "Unicode: naïve café, 日本語のテキスト, emoji 🦙🚀, Ελληνικά, русский, 한국어",
    "numbers 1234567 3.14159 2024-11-27 and 1,000,000",
    "code:\n    def f(x):\n        return x ** 2  # square\n",
    "don't can't I'm they're we've you'll he'd",
    "",
    " ",
    "\u00a0non-breaking\u2009thin space\u200bzero-width",
]


def test_builtin_templates_render_the_known_formats():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chatml = tk.Tokenizer(None, {"<|im_start|>": 1}, None, None, False, None)
    assert chatml.apply_chat_template(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    llama3 = tk.Tokenizer(None, {"<|start_header_id|>": 1, "<|begin_of_text|>": 0}, "<|begin_of_text|>",
                          None, True, None)
    assert llama3.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")


def test_malformed_message_is_refused():
    chatml = tk.Tokenizer(None, {"<|im_start|>": 1}, None, None, False, None)
    with pytest.raises(tk.PocketQuantError, match="needs 'role' and 'content'"):
        chatml.apply_chat_template([{"text": "hi"}])


# ---- real tokenizers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_gguf):
    from transformers import AutoTokenizer

    from pocketquant.checkpoints.gguf import open_gguf

    ours = tk.from_gguf(open_gguf(smollm2_gguf), smollm2_gguf)
    ref = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return ours, ref


SPECIAL_TEXTS = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
                 "<|endoftext|>text after end<|im_end|>"]


@pytest.mark.real
@pytest.mark.parametrize("text", TEXTS + SPECIAL_TEXTS)
def test_smollm2_gguf_tokenizer_matches_transformers(smollm2_tokenizers, text):
    ours, ref = smollm2_tokenizers
    ids = ours.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text


@pytest.mark.real
def test_smollm2_special_tokens_and_template(smollm2_tokenizers):
    ours, ref = smollm2_tokenizers
    assert ours.encode("<|im_start|>") == [1] and ours.stop_ids >= {2}  # <|im_end|> ends a turn
    msgs = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    assert ours.encode_chat(msgs) == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                             return_dict=False)


@pytest.mark.real
def test_hf_tokenizer_json_directory(smollm2_tokenizers, tmp_path):
    """A tokenizer.json + tokenizer_config.json directory, as transformers saves it."""
    ours_gguf, ref = smollm2_tokenizers
    ref.save_pretrained(tmp_path)
    ours = tk.from_hf_dir(tmp_path)
    assert ours.add_bos is False and ours.eos_token == "<|im_end|>"
    for text in TEXTS + SPECIAL_TEXTS:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    msgs = [{"role": "user", "content": "Hi"}]
    assert ours.encode_chat(msgs) == ours_gguf.encode_chat(msgs)


@pytest.fixture(scope="module")
def llama3(llama_models_pkg):
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    from pocketquant.fetch import LLAMA3_TOKENIZER, fetch

    path = fetch(LLAMA3_TOKENIZER)  # SHA-256 checked
    meta = MetaTokenizer(path)
    return tk.from_llama3_model(path), meta, ChatFormat(meta)


LLAMA3_SPECIAL = ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
                  "<|python_tag|>print(1)<|eom_id|><|reserved_special_token_100|>"]


@pytest.mark.real
@pytest.mark.parametrize("text", TEXTS + LLAMA3_SPECIAL)
def test_llama3_tokenizer_matches_meta(llama3, text):
    ours, meta, _ = llama3
    assert ours.encode(text) == meta.encode(text, bos=True, eos=False, allowed_special="all")
    assert ours.decode(ours.encode(text, add_bos=False)) == text


DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Capital of Japan?"}, {"role": "assistant", "content": "Tokyo"},
     {"role": "user", "content": "  And of Peru?\n\nThink  twice. "}],
]


@pytest.mark.real
@pytest.mark.parametrize("dialog", DIALOGS)
def test_llama3_chat_template_matches_meta_chat_format(llama3, dialog):
    from llama_models.datatypes import RawMessage, StopReason

    ours, _, chat_format = llama3
    raw = [RawMessage(role=m["role"], content=m["content"], stop_reason=StopReason.end_of_turn)
           for m in dialog]
    assert ours.encode_chat(dialog) == chat_format.encode_dialog_prompt(raw).tokens
    assert ours.stop_ids == {128001, 128008, 128009}


@pytest.mark.real
def test_tiktoken_file_of_another_kind_is_refused(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x0a\x0b<s>\xff\xfe sentencepiece")
    with pytest.raises(tk.PocketQuantError, match="not a Llama 3 tiktoken tokenizer.model"):
        tk.from_llama3_model(bad)

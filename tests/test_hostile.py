"""Hostile and careless input: every case gets a one-line `pocketquant VERB: error: ...` (exit 1 or 2), no
traceback, nothing written or deleted outside the chosen output, and bounded time."""

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import hf_model, hf_to_gguf, hf_to_meta, save_byte_tokenizer, write_json
from pocketquant.cli import main
from pocketquant.files import atomic_write, sha256_of


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `pocketquant ARGV` in this process -> (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv, match: str) -> str:
    """Assert that the command fails with one clear line that contains `match`; return that line."""
    code, _, err = cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code in (1, 2), err
    assert "Traceback" not in err and lines, err
    assert lines[-1].startswith((f"pocketquant {argv[0]}: error: ", "pocketquant: error: ")), err
    assert match in lines[-1], lines[-1]
    return lines[-1]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (links as their target's name) -> its SHA-256: what a command must not touch."""
    return {str(p.relative_to(root)): (f"-> {os.readlink(p)}" if p.is_symlink() else sha256_of(p))
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


@pytest.fixture
def tiny(tmp_path):
    """A tiny HF model directory with a tokenizer, and a packed RTN file of it."""
    d = tmp_path / "tiny"
    hf_model(tie_word_embeddings=True, rope_scaling=None).save_pretrained(d)
    save_byte_tokenizer(d)
    packed = tmp_path / "q.safetensors"
    assert main(["quantize", str(d), "-o", str(packed), "--method", "rtn"]) == 0
    return d, packed


# --- damaged and hostile model files -------------------------------------------------------------------------

CONFIG_CASES = [
    ("hidden_size", "64", "dim must be an int, got '64'"),
    ("num_hidden_layers", 10 ** 9, "n_layers=1000000000 is beyond any supported model"),
    ("num_hidden_layers", [2], "n_layers must be an int"),
    ("num_attention_heads", 0, "n_heads=0 must be positive"),
    ("num_attention_heads", None, "n_heads must be an int, got None"),
    ("vocab_size", 256.0, "vocab_size must be an int, got 256.0"),
    ("rms_norm_eps", "1e-5", "norm_eps must be a float"),
    ("rope_theta", None, "rope_theta must be a float, got None"),
    ("max_position_embeddings", 10 ** 12, "max_seq_len=1000000000000 is beyond any supported model"),
    ("tie_word_embeddings", "false", "tie_embeddings must be a bool"),
    ("rope_scaling", [1, 2], "rope_scaling must be an object"),
    ("rope_scaling", {"rope_type": "llama3", "factor": "8"}, "lacks the field 'low_freq_factor'"),
]


@pytest.mark.parametrize("field,value,match", CONFIG_CASES)
def test_config_json_with_wrong_types_or_sizes(tiny, capsys, field, value, match):
    d, _ = tiny
    write_json(d / "config.json", {**json.loads((d / "config.json").read_text()), field: value})
    refused(capsys, "generate", d, "--prompt", "hi", "--max-new-tokens", "1", match=match)


@pytest.mark.parametrize("body,match", [(b"[1, 2]", "a config must be a JSON object"),
                                        (b"", "is not valid JSON"), (b'{"a": "\xff\xfe"}', "is not valid JSON")])
def test_config_json_that_is_not_an_object(tiny, capsys, body, match):
    d, _ = tiny
    (d / "config.json").write_bytes(body)
    refused(capsys, "quantize", d, "-o", d.parent / "out.safetensors", match=match)
    assert not (d.parent / "out.safetensors").exists()


@pytest.mark.parametrize("field,value,match", [("n_layers", "2", "n_layers must be an int"),
                                               ("n_heads", 0, "n_heads=0 must be positive"),
                                               ("dim", None, "dim=None"), ("multiple_of", "x", "multiple_of='x'"),
                                               ("max_seq_len", 10 ** 12, "beyond any supported model"),
                                               ("rope_theta", [1], "rope_theta must be a float")])
def test_params_json_with_wrong_types_or_sizes(tmp_path, capsys, field, value, match):
    d = tmp_path / "meta"
    hf_to_meta(hf_model(), d)
    write_json(d / "params.json", {**json.loads((d / "params.json").read_text()), field: value})
    refused(capsys, "quantize", d, "-o", tmp_path / "out.safetensors", match=match)


def test_gguf_with_four_billion_blocks_is_refused_at_once(tmp_path, capsys):
    model = hf_model()
    model.config.num_hidden_layers = 4_000_000_000  # what the header says; the tensors are two layers
    path = hf_to_gguf(model, tmp_path / "m.gguf")
    t0 = time.perf_counter()
    refused(capsys, "quantize", path, "-o", tmp_path / "out.safetensors", match="n_layers=4000000000 is beyond")
    assert time.perf_counter() - t0 < 10


def rewrite_safetensors_header(path: Path, change, reseal: bool = True):
    """Apply change(header dict) to a safetensors file's JSON header, keeping its tensor data; with `reseal`, the
    header's checksum is made to match again (a file edited on purpose, for the loader's own checks to catch)."""
    from pocketquant.checkpoints import integrity

    header, start, _ = integrity.raw_header(path)
    data = path.read_bytes()[start:]
    change(header)
    if reseal:
        meta, table = header["__metadata__"], {k: v for k, v in header.items() if k != "__metadata__"}
        meta[integrity.HEADER_KEY] = integrity.header_digest(meta, table)
    blob = integrity.header_bytes(header)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _scheme_edit(change, recipe_too=False):
    def edit(header):
        meta = header["__metadata__"]
        scheme = json.loads(meta["scheme"])
        change(scheme)
        meta["scheme"] = json.dumps(scheme)
        if recipe_too:
            recipe = json.loads(meta["recipe"])
            for step in recipe:
                change(step["scheme"])
            meta["recipe"] = json.dumps(recipe)
    return edit


def _tokenizer_edit(change):
    def edit(header):
        spec = json.loads(header["__metadata__"]["tokenizer"])
        tokenizer = json.loads(spec["tokenizer_json"])
        change(tokenizer)
        spec["tokenizer_json"] = json.dumps(tokenizer)
        header["__metadata__"]["tokenizer"] = json.dumps(spec)
    return edit


def _config_edit(**fields):
    def change(header):
        header["__metadata__"]["config"] = json.dumps({**json.loads(header["__metadata__"]["config"]), **fields})
    return change


@pytest.mark.parametrize("change,match", [
    (_config_edit(n_layers=10 ** 9), "n_layers=1000000000 is beyond"),
    (_config_edit(n_layers=3), "the config says 3 layers, but the weights hold 2"),
    (_config_edit(max_seq_len=10 ** 12), "max_seq_len=1000000000000 is beyond"),
    (_config_edit(dim="64"), "dim must be an int"),
    (_config_edit(rope_theta=None), "rope_theta must be a float"),
    (_config_edit(rope_scaling={"factor": "x"}), "factor must be a float"),
    (lambda h: h["__metadata__"].update(config="[1]"), "expected a JSON object, got list"),
    (lambda h: h["__metadata__"].update(scheme='{"name": 1}'), "not a valid quantization scheme"),
    (lambda h: h["__metadata__"].update(lora='{"rank": "x"}'), "damaged packed header"),
    (lambda h: h["__metadata__"].update(tokenizer='{"kind": 5}'), "unknown tokenizer kind 5"),
    (lambda h: h["__metadata__"].update(tokenizer='{"kind": "hf", "tokenizer_json": 5}'), "damaged tokenizer"),
    (lambda h: h["norm.weight"].update(dtype="I32"), "tensor norm.weight is torch.int32, expected floating-point"),
    (_config_edit(hadamard_down=True), "hadamard_down=True contradicts the recipe (rtn)"),
    (_config_edit(hadamard_qk=True), "hadamard_qk=True contradicts hadamard_down=False with a float KV cache"),
    (_scheme_edit(lambda s: s["linear"].update(act=None)), "is not the one its recipe's rtn step used"),
    (_scheme_edit(lambda s: s["linear"]["weight"].update(scale_dtype="float32"), recipe_too=True),
     "tensor layers.0.self_attn.q_proj.scales is torch.float16, expected torch.float32"),
    (lambda h: h["__metadata__"].update(lora='{"rank": 4, "scale": 2.0, "dtype": "bfloat16"}'),
     "the header says the file holds LoRA adapters, but it has none"),
    (_tokenizer_edit(lambda t: t["model"]["vocab"].update(zzz=999)),
     "the tokenizer has token ids up to 999, but the model's vocabulary has 256 entries"),
])
def test_a_damaged_packed_header_is_refused(tiny, capsys, change, match):
    _, packed = tiny
    rewrite_safetensors_header(packed, change)
    refused(capsys, "generate", packed, "--prompt", "hi", "--max-new-tokens", "1", match=match)


def test_a_scheme_that_quantizes_no_block_linear_is_refused(tiny, tmp_path, capsys):
    from pocketquant.quant import recipe

    d, _ = tiny
    data = json.loads(recipe.to_json(recipe.from_options("rtn")))
    data["steps"][0]["scheme"]["overrides"] = [["layers.*", None]]
    write_json(tmp_path / "r.json", data)
    refused(capsys, "quantize", d, "--recipe", tmp_path / "r.json", "-o", tmp_path / "o.safetensors",
            match="quantizes no block linear")


@pytest.mark.hostile
def test_every_flipped_bit_is_caught(tiny, tmp_path, capsys):
    """One bit flipped in any byte of the header, or anywhere in the tensor data, and a file cut short or added
    to: `inspect --verify` refuses every one, and so does loading (unless told not to check the tensors)."""
    from pocketquant.checkpoints import integrity
    from pocketquant.errors import PocketQuantError
    from pocketquant.inspect import verify

    _, packed = tiny
    data = packed.read_bytes()
    _, start, _ = integrity.raw_header(packed)
    damaged = tmp_path / "damaged.safetensors"
    positions = [*range(start), *range(start, len(data), 97), len(data) - 1]
    accepted = []
    for i in positions:
        flipped = bytearray(data)
        flipped[i] ^= 1 << (i % 8)
        damaged.write_bytes(flipped)
        try:
            verify(damaged)
            accepted.append(i)
        except PocketQuantError:
            pass
    for cut in (data[:-1], data + b"\0", data[:start + 100]):
        damaged.write_bytes(cut)
        with pytest.raises(PocketQuantError, match="cut short or added to|damaged tensor data|not a readable"):
            verify(damaged)
    assert accepted == [], f"{len(accepted)} of {len(positions)} flipped files accepted"
    flipped = bytearray(data)
    flipped[len(data) - 200] ^= 0x10
    damaged.write_bytes(flipped)
    refused(capsys, "inspect", damaged, "--verify", match="damaged tensor data")
    refused(capsys, "generate", damaged, "--prompt", "hi", "--max-new-tokens", "1", match="damaged tensor data")
    assert cli(capsys, "generate", damaged, "--prompt", "hi", "--max-new-tokens", "1", "--no-verify")[0] == 0
    code, out, _ = cli(capsys, "inspect", packed, "--verify")
    assert code == 0 and out.startswith("verified: the header (SHA-256) and all 37 tensors (CRC-32)")


def test_a_header_that_says_format_1_0_is_still_verified_if_it_has_checksums(tiny, capsys):
    _, packed = tiny
    rewrite_safetensors_header(packed, lambda h: h["__metadata__"].update(format_version="1.0"), reseal=False)
    refused(capsys, "inspect", packed, match="the header is damaged")


def test_files_of_format_1_0_without_checksums_still_load(tiny, capsys):
    from pocketquant.checkpoints import integrity

    _, packed = tiny

    def as_written_by_1_0(header):
        meta = header["__metadata__"]
        meta["format_version"] = "1.0"
        del meta[integrity.HEADER_KEY], meta[integrity.TENSORS_KEY]
    rewrite_safetensors_header(packed, as_written_by_1_0, reseal=False)
    assert cli(capsys, "generate", packed, "--prompt", "hi", "--max-new-tokens", "2")[0] == 0
    refused(capsys, "inspect", packed, "--verify", match="format 1.0 files have no checksums to verify")


def test_a_refused_run_does_not_block_the_corrected_one(tiny, tmp_path, capsys):
    d, _ = tiny
    out = tmp_path / "out.safetensors"
    refused(capsys, "train", d, "--qat", "--targets", "nothing", "--lora", "--seq-len", "32", "--steps", "1",
            "--lora-steps", "1", "--init", "float", "--rotations", "none", "-o", out, match="match no block linear")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors", "tiny"]  # nothing left behind
    code, _, err = cli(capsys, "train", d, "--qat", "--seq-len", "32", "--steps", "1", "--init", "float",
                       "--rotations", "none", "-o", out)
    assert code == 0 and out.is_file() and not (tmp_path / "out.safetensors.train-state").exists(), err


@pytest.mark.parametrize("body,match", [
    ('{"question": "q", "choices": "ab", "answer": 1}', "choices: a list of strings"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 1.7}', "answer: an integer index"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "answer 2 is not an index"),
])
def test_malformed_task_files(tiny, tmp_path, capsys, body, match):
    d, _ = tiny
    (tmp_path / "t.jsonl").write_text(body + "\n")
    refused(capsys, "eval", d, "--tasks", tmp_path / "t.jsonl", "--limit", "20", match=match)


def test_malformed_tokenizer_files(tiny, capsys):
    d, _ = tiny
    for body, match in (("{nope", "is not valid JSON"), ("[1]", "expected a JSON object"),
                        ('{"eos_token": [1]}', "a special token must be a string"),
                        ('{"chat_template": 5}', "chat_template must be a string"),
                        ("[" * 100_000 + "]" * 100_000, "RecursionError")):
        (d / "tokenizer_config.json").write_text(body)
        refused(capsys, "generate", d, "--prompt", "hi", match=match)
    (d / "tokenizer_config.json").write_text("{}")
    (d / "chat_template.jinja").write_bytes(b"\xff{{ messages }}")
    refused(capsys, "generate", d, "--prompt", "hi", "--chat", match="not UTF-8 text")


def test_added_tokens_past_the_vocabulary_are_a_warning_and_text_holding_them_is_refused(tiny, capsys):
    d, _ = tiny
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["added_tokens"] = [{"id": 256, "content": "<pad>", "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True}]
    write_json(d / "tokenizer.json", spec)
    with pytest.warns(UserWarning, match="added tokens go up to id 256, past the model's 256 entries"):
        assert cli(capsys, "generate", d, "--prompt", "hi", "--max-new-tokens", "1")[0] == 0
    refused(capsys, "generate", d, "--prompt", "hi <pad>", match="the text holds a token (id 256) the model has no")
    spec["model"]["vocab"]["zz"] = 300  # an id of the vocabulary itself: refused
    write_json(d / "tokenizer.json", spec)
    refused(capsys, "generate", d, "--prompt", "hi", match="the tokenizer has token ids up to 300")


def test_a_packed_file_is_not_quantized_again(tiny, capsys):
    _, packed = tiny
    (packed.parent / "garbage.safetensors").write_bytes(b"not safetensors")
    refused(capsys, "quantize", packed.parent / "garbage.safetensors", "-o", packed.parent / "o.safetensors",
            match="not a readable safetensors file")  # not taken for a packed file
    refused(capsys, "quantize", packed, "-o", packed.parent / "again.safetensors", match="already quantized")
    refused(capsys, "train", packed, "--qat", "-o", packed.parent / "again.safetensors", match="already quantized")


@pytest.mark.parametrize("index,match", [
    ("{not json", "is not valid JSON"),
    ('{"weight_map": ["model.safetensors"]}', "expected {\"weight_map\""),
    ('{"weight_map": {"lm_head.weight": "../outside.safetensors"}}', "names shards outside the model directory"),
])
def test_a_damaged_shard_index_is_refused(tiny, capsys, index, match):
    d, _ = tiny
    (d / "model.safetensors.index.json").write_text(index)
    refused(capsys, "generate", d, "--prompt", "hi", match=match)


def test_nan_weights_are_refused(tiny, capsys):
    from safetensors.torch import load_file, save_file

    d, _ = tiny
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    refused(capsys, "generate", d, "--prompt", "hi",
            match="layers.1.mlp.up_proj.weight: 1 NaN/inf weights (first in row 3)")


def test_a_chat_template_that_never_ends_is_stopped(tiny, capsys):
    d, _ = tiny
    loops = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    write_json(d / "tokenizer_config.json", {"chat_template": loops})
    t0 = time.perf_counter()
    refused(capsys, "generate", d, "--chat", "--prompt", "hi", match="rendering took longer than")
    assert time.perf_counter() - t0 < 15
    for template, match in (("{{ 'x' * 10000000000 }}", "is too large"), ("{{ ('x' * 10**6) * 1000 }}", "is too large"),
                            ("{{ 'x'|center(10**9) }}", "would make too large a text"),
                            ("{{ '%1000000000s' % 'x' }}", "is too large"),
                            ("{% set ns = namespace(x='xxxxxxxx') %}{% for i in range(40) %}"
                             "{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x|length }}", "more than 256 MB")):
        write_json(d / "tokenizer_config.json", {"chat_template": template})
        refused(capsys, "generate", d, "--chat", "--prompt", "hi", match=match)


# --- careless arguments ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,match", [
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--top-p", "nan"], "top_p must be in (0, 1]"),
    (["--seed", str(2 ** 64)], "seed must be an integer in [0, 2**64)"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**64)"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--max-new-tokens", str(10 ** 12)], "exceeds the model's context of 256 tokens"),
])
def test_bad_sampling_arguments(tiny, capsys, args, match):
    d, _ = tiny
    refused(capsys, "generate", d, "--prompt", "hi", *args, match=match)


def test_too_many_threads_are_capped_with_a_warning(tiny, capsys):
    d, _ = tiny
    code, out, err = cli(capsys, "generate", d, "--prompt", "hi", "--max-new-tokens", "2", "--threads", "1000")
    assert code == 0 and f"--threads 1000 is more than the {len(os.sched_getaffinity(0))} CPUs" in err
    assert torch.get_num_threads() <= len(os.sched_getaffinity(0))


def test_text_that_is_not_utf8(tiny, tmp_path):
    d, _ = tiny
    run = [sys.executable, "-m", "pocketquant"]
    prompt = subprocess.run(run + ["generate", str(d), "--prompt", b"caf\xe9 \xff"], capture_output=True)
    chat = subprocess.run(run + ["chat", str(d)], input=b"hello \xff\xfe\n", capture_output=True)
    for proc in (prompt, chat):
        err = proc.stderr.decode()
        assert proc.returncode == 1 and "Traceback" not in err and "is not valid UTF-8 text" in err, err


@pytest.mark.parametrize("name,body", [("data.txt", b"caf\xe9"), ("tasks.jsonl", b'{"question": "\xff"}')])
def test_eval_files_that_are_not_utf8(tiny, tmp_path, capsys, name, body):
    d, _ = tiny
    (tmp_path / name).write_bytes(body)
    flag = "--data" if name == "data.txt" else "--tasks"
    refused(capsys, "eval", d, flag, tmp_path / name, "--limit", "20", match="not UTF-8 text")


@pytest.mark.parametrize("args,match", [
    (["--limit", "-5"], "--limit must be >= 1 token"),
    (["--context", "100000"], "beyond the model's context of 256 tokens"),
    (["--data", "EMPTY"], "scoring needs at least 2"),
])
def test_bad_evaluation_arguments(tiny, tmp_path, capsys, args, match):
    d, _ = tiny
    (tmp_path / "empty.txt").write_text("")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    refused(capsys, "eval", d, "--tasks", *args, match=match)


@pytest.mark.parametrize("args,match", [
    (["--method", "gptq", "--calib-len", "100000"], "--calib-len of 100,000 tokens is beyond the model's context"),
    (["--method", "gptq", "--calib-samples", "0", "--calib-len", "32"], "GPTQ needs samples, seq_len and block >= 1"),
    (["--method", "spinquant", "--spin-len", "4096", "--calib-len", "32"], "--spin-len of 4,096 tokens is beyond"),
    (["--method", "spinquant", "--spin-iterations", "-1", "--calib-len", "32"], "iterations must be at least 1"),
    (["--method", "spinquant", "--spin-lr", "nan", "--calib-len", "32"], "learning rate must be a finite number"),
    (["--method", "gptq", "--damp", "nan", "--calib-len", "32"], "damping must be a finite number"),
])
def test_bad_calibration_arguments(tiny, tmp_path, capsys, args, match):
    d, _ = tiny
    refused(capsys, "quantize", d, "-o", tmp_path / "out.safetensors", *args, match=match)
    assert not list(tmp_path.glob("out.safetensors*"))


# --- outputs: never over an input, never through a link, never half written --------------------------------------

def test_outputs_never_replace_an_input(tiny, capsys):
    d, packed = tiny
    root = d.parent
    before = snapshot(root)
    refused(capsys, "quantize", d, "-o", d / "model.safetensors", match="it would replace")
    other = root / "other.safetensors"  # a packed file of another model, given as the recipe and as the output
    other.write_bytes(packed.read_bytes())
    before = snapshot(root)
    refused(capsys, "quantize", d, "--recipe", other, "-o", other, match="it would replace")
    (root / "calib.txt").write_text("text " * 1000)
    for option in ("--calib-text", "--rotations"):
        refused(capsys, "quantize", d, "--method", "hadamard", option, root / "calib.txt", "-o", root / "calib.txt",
                match="must end in .safetensors")
    (root / "calib.safetensors").write_text("text " * 1000)
    refused(capsys, "quantize", d, "--method", "gptq", "--calib-text", root / "calib.safetensors", "-o",
            root / "calib.safetensors", match="it would replace")
    (root / "calib.txt").unlink()
    (root / "calib.safetensors").unlink()
    refused(capsys, "eval", packed, "--json", packed, match="it would replace")
    refused(capsys, "bench", packed, "--float", d, "--json", packed, match="it would replace")
    refused(capsys, "export", packed, "--to", "gguf", "-o", packed, match="must end in .gguf")
    (root / "m.gguf").write_bytes(b"")
    refused(capsys, "export", root / "m.gguf", "--to", "gguf", "-o", root / "m.gguf", match="it would replace")
    (root / "m.gguf").unlink()
    assert snapshot(root) == before


@pytest.mark.parametrize("verb", ["quantize", "export"])
def test_output_that_is_a_directory_or_cannot_be_written(tiny, tmp_path, capsys, verb):
    d, packed = tiny
    suffix = ".safetensors" if verb == "quantize" else ".gguf"
    extra = ["--to", "gguf"] if verb == "export" else []
    (tmp_path / f"dir{suffix}").mkdir()
    refused(capsys, verb, d, *extra, "-o", tmp_path / f"dir{suffix}", match="is a directory")
    refused(capsys, verb, d, *extra, "-o", tmp_path, match="is a directory")  # not "must end in"
    refused(capsys, verb, d, *extra, "-o", packed / f"x{suffix}", match="is not a directory")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        refused(capsys, verb, d, *extra, "-o", tmp_path / "ro" / f"x{suffix}", match="cannot write")


def test_only_pocketquant_temporary_files_of_the_output_are_removed(tiny, tmp_path, capsys):
    d, _ = tiny
    others = [".notes.txt.partial-draft", ".x.partial-999999999-abc", ".out.safetensors.partial-draft"]
    for name in others:
        (tmp_path / name).write_text("someone else's")
    assert cli(capsys, "quantize", d, "-o", tmp_path / "out.safetensors", "--method", "rtn")[0] == 0
    assert all((tmp_path / name).read_text() == "someone else's" for name in others)


def test_planted_links_are_never_followed(tiny, tmp_path, capsys):
    d, _ = tiny
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.safetensors"
    for pid in (os.getpid(), 999_999_999):  # this process, and one long dead
        (tmp_path / f".out.safetensors.partial-{pid}").symlink_to(victim)
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").symlink_to(victim)
    assert cli(capsys, "quantize", d, "-o", out, "--method", "rtn")[0] == 0
    assert cli(capsys, "eval", d, "--limit", "40", "--context", "16", "--tasks", "--report", report)[0] == 0
    assert victim.read_text() == "precious"
    assert not (report / "report.md").is_symlink() and "pocketquant evaluation" in (report / "report.md").read_text()
    assert not (tmp_path / ".out.safetensors.partial-999999999").is_symlink()  # a dead writer's leftover: gone


def test_a_killed_writer_leaves_its_partial_file_for_the_next_write_to_remove(tmp_path):
    (tmp_path / ".out.bin.partial-999999999-abc").write_bytes(b"x" * 1000)  # a writer long dead
    (tmp_path / f".out.bin.partial-{os.getpid()}-xyz").write_bytes(b"x")  # one killed with this process's PID

    def killed(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.bin", killed)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the stale files and this attempt's are all gone
    atomic_write(tmp_path / "out.bin", lambda tmp: tmp.write_bytes(b"whole"))
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"] and (tmp_path / "out.bin").read_bytes() == b"whole"
    assert oct((tmp_path / "out.bin").stat().st_mode & 0o777) != oct(0o600)  # not left private like a temp file


@pytest.mark.real
def test_a_damaged_cached_download_is_fetched_again(tmp_path, monkeypatch, capsys):
    from pocketquant import fetch

    monkeypatch.setenv("POCKETQUANT_CACHE", str(tmp_path))
    item = fetch.LLAMA3_TOKENIZER
    cached = tmp_path / f"{item.package}-{item.version}" / item.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the tokenizer")  # truncated or substituted
    assert fetch.fetch(item) == cached and sha256_of(cached) == item.sha256
    assert "is damaged or was replaced" in capsys.readouterr().err
    assert fetch.fetch(item) == cached  # verified once per process: the second use reads nothing

"""Recipes as data: every step round-trips through JSON, a bad recipe is refused with a message, and a
packed file's stored recipe replays to the same file."""

import json
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from pocketquant.errors import PocketQuantError
from pocketquant.checkpoints.packed import read_header
from pocketquant.quant import recipe
from pocketquant.quant.gptq import GPTQConfig
from pocketquant.quant.rtn import RTNConfig
from pocketquant.quant.spinquant import SpinQuantConfig
from pocketquant.quant.train import TrainConfig
from pocketquant.scheme import PRESETS

SCHEME = PRESETS["int4-eo8"]
SMALL_GPTQ = ["--calib-samples", "4", "--calib-len", "32"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pocketquant", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("step", [
    RTNConfig(PRESETS["int8"], search_clip=True),
    GPTQConfig(SCHEME, 7, 33, 0.05, False, 64, "calib.txt", 0.25),
    SpinQuantConfig(PRESETS["int4-eo8-g128"], iterations=3, lr=0.5, learn=False, loss="kl", rotations="r.safetensors"),
    TrainConfig(SCHEME, lora=True, steps=3, targets=("q_proj", "mlp.*"), merge_lora=True, data="chats.jsonl"),
    TrainConfig(SCHEME, qat=False, lora=True),
    recipe.ImportConfig(PRESETS["int4-eo8-g128"]),
])
def test_every_step_round_trips_through_json(step):
    d = json.loads(json.dumps(step.to_dict()))
    assert d["version"] == step.VERSION and recipe.step_from_dict(d) == step


def test_a_gptq_step_of_version_1_replays_plain_gptq():
    """Version 1 had no GPTAQ: a file made then is made again as it was, not with today's default pull."""
    d = GPTQConfig(SCHEME).to_dict()
    assert d["asymmetry"] > 0
    del d["asymmetry"]
    assert recipe.step_from_dict({**d, "version": 1}).asymmetry == 0
    assert recipe.step_from_dict(d).asymmetry == GPTQConfig().asymmetry


def test_recipe_files_round_trip_and_bad_ones_are_refused(tmp_path):
    steps = recipe.from_options("hadamard", "int4-eo8", gptq={"samples": 8})
    path = tmp_path / "r.json"
    path.write_text(recipe.to_json(steps))
    assert recipe.read(path) == steps
    path.write_text(json.dumps([s.to_dict() for s in steps]))  # a bare list of steps
    assert recipe.read(path) == steps
    good = json.loads(recipe.to_json(steps))
    for change, message in [
        (lambda r: r["steps"].reverse(), "spinquant step can only come first"),
        (lambda r: r["steps"].pop(), "must end by quantizing"),
        (lambda r: r["steps"][1].update(method="awq"), "unknown recipe step 'awq'"),
        (lambda r: r["steps"][1].update(damping=0.1), r"unknown field\(s\) damping"),
        (lambda r: r["steps"][1].update(samples="8"), "samples = '8' has the wrong type"),
        (lambda r: r["steps"][1].update(version=3), "gptq step version 3"),
        (lambda r: r.update(version=9), "recipe version 9"),
        (lambda r: r["steps"][1]["scheme"].update(name="int8"), "the same scheme"),
        (lambda r: r["steps"].append(r["steps"][1]), "rtn, gptq or signround once"),
        (lambda r: r["steps"].insert(0, {"method": "import"}), "a recipe's only step"),
        (lambda r: r.update(comment="x"), r"unknown recipe field\(s\) 'comment'"),
        (lambda r: r["steps"][1]["scheme"].update(colour=1), r"scheme: unknown field\(s\) 'colour'"),
        (lambda r: r["steps"][1]["scheme"]["linear"].update(bias=1), r"linear spec: unknown field\(s\) 'bias'"),
        (lambda r: r["steps"][1]["scheme"]["linear"]["weight"].update(zero=1), r"unknown field\(s\) 'zero'"),
        (lambda r: r["steps"][1]["scheme"].update(linear=None), "linear must be a linear spec"),
        (lambda r: r.update(version=-1), "recipe version -1"),
        (lambda r: r.update(version=True), "recipe version True"),
        (lambda r: r["steps"][1].update(version=-5), "gptq step version -5"),
        (lambda r: r["steps"][1].update(version=False), "gptq step version False"),
        (lambda r: r["steps"][1].update(asymmetry=1.5), "asymmetry must be between 0 and 1, got 1.5"),
        (lambda r: r["steps"][1].update(block=7), r"GPTQ block \(7 columns\) must be a multiple of the scheme's "
                                                  r"group size \(32\)"),
        (lambda r: r["steps"][1].update(block=10 ** 18), "GPTQ block must be in"),
        (lambda r: r["steps"][1].update(seq_len=1), "GPTQ seq_len must be in"),
        (lambda r: r["steps"][1].update(samples=10 ** 12), "GPTQ samples must be in"),
        (lambda r: r["steps"][0].update(iterations=10 ** 12), "SpinQuant iterations must be in"),
        (lambda r: r["steps"][1].update(method=["rtn"]), r"unknown recipe step \['rtn'\]"),
    ]:
        bad = json.loads(json.dumps(good))
        change(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(PocketQuantError, match=message):
            recipe.read(path)
    for text, message in [("{not json", "is not valid JSON"), ("[" * 10_000 + "]" * 10_000, "nests 10,000 levels"),
                          ('{"version": 1' + "0" * 5000 + "}", "not valid JSON: ValueError: Exceeds the limit"),
                          ("[" + " " * (2 << 20) + "]", "refusing JSON of more than 1,048,576"),
                          ('["' + ' \\" ' * 200_000, "is not valid JSON")]:  # 800 KB of quotes, never closed
        path.write_text(text)
        t0 = time.perf_counter()
        with pytest.raises(PocketQuantError, match=message):
            recipe.read(path)
        assert time.perf_counter() - t0 < 5  # looked at in one pass


@pytest.mark.parametrize("method", [["rtn"], pytest.param(["gptq", *SMALL_GPTQ], marks=pytest.mark.slow),
                                    pytest.param(["hadamard", *SMALL_GPTQ], marks=pytest.mark.slow)])
def test_a_packed_files_recipe_replays_to_the_same_bytes(tiny_text_dir, tmp_path, method):
    first, again, fromjson = (tmp_path / f"{n}.safetensors" for n in ("first", "again", "json"))
    proc = cli("quantize", tiny_text_dir[0], "-o", first, "--method", *method)
    assert proc.returncode == 0, proc.stderr
    proc = cli("quantize", tiny_text_dir[0], "-o", again, "--recipe", first)
    assert proc.returncode == 0, proc.stderr
    assert again.read_bytes() == first.read_bytes()
    stored = tmp_path / "stored.json"
    stored.write_text(recipe.to_json(recipe.read(first)))
    proc = cli("quantize", tiny_text_dir[0], "-o", fromjson, "--recipe", stored)
    assert proc.returncode == 0, proc.stderr
    assert fromjson.read_bytes() == first.read_bytes()


@pytest.mark.slow
def test_a_learned_rotation_replays_from_the_file_it_saved(tiny_text_dir, tmp_path):
    first, again = tmp_path / "first.safetensors", tmp_path / "again.safetensors"
    proc = cli("quantize", tiny_text_dir[0], "-o", first, "--method", "spinquant", "--then", "rtn",
               "--spin-iterations", "2", "--spin-samples", "2", "--spin-len", "32")
    assert proc.returncode == 0, proc.stderr
    assert read_header(first).recipe[0]["rotations"] == "first.rotations.safetensors"
    proc = cli("quantize", tiny_text_dir[0], "-o", again, "--recipe", first)
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(first), load_file(again)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    proc = cli("quantize", tiny_text_dir[0], "-o", tmp_path / "x.safetensors", "--recipe", first, "--method", "rtn")
    assert proc.returncode == 1 and "drop --method" in proc.stderr


def test_apply_runs_steps_on_a_model_in_memory(tiny_text_dir):
    from pocketquant.checkpoints import load_model
    from pocketquant.layers import QuantLinear
    from pocketquant.quant.context import Context

    loaded = load_model(tiny_text_dir[0])
    steps = (SpinQuantConfig(SCHEME, learn=False), GPTQConfig(SCHEME, 2, 32))
    ctx = Context(loaded.tokenizer)
    model = recipe.apply(loaded.model, *steps, ctx=ctx)
    assert isinstance(model.layers[0].mlp.down_proj, QuantLinear) and model.config.hadamard_down
    assert ctx.record == list(steps)
    with pytest.raises(PocketQuantError, match="no tokenizer"):
        recipe.apply(load_model(tiny_text_dir[0]).model, GPTQConfig(SCHEME, 2, 32))

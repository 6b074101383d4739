"""Generated hostile input, a tier of its own: `pytest -m hostile` runs it alone, `--slow` (CI) with the rest.

Command lines: for each verb, a cheap valid command on a tiny model, then every option (and the positional
arguments) given each hostile value of its kind, one at a time, plus options that belong to no verb, missing
values and missing arguments. Every case must end within 30 s with exit 0, or 1 / 2 and one line
`pocketquant VERB: error: ...`: no traceback, no input changed, nothing half written left behind.

Requests: a few thousand bodies generated from the OpenAI fields the server reads, each field given valid and
hostile values (wrong types, out of range, lone surrogates, NUL, huge, deep), plus broken JSON, wrong methods,
paths and content types, thrown at a live server. None may get a 500 or take the server down, its memory must
stay flat, and a normal request must get the same answer at the end as at the start."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from servers import rss_bytes, serving, tiny_chat_model
from pocketquant.cli import build_parser, main
from pocketquant.files import sha256_of

pytestmark = pytest.mark.hostile

CASE_SECONDS = 30
INTS = ["0", "-1", "1.5", "abc", "", "nan", "99999999999999999999999"]
FLOATS = ["nan", "inf", "-inf", "-1", "1e309", "abc", ""]
CHOICES = ["bogus", ""]
TEXTS = ["", "\udcff\udcfe", "x" * 100_000, "a\x00b"]  # (undecodable argv bytes arrive as lone surrogates)
INPUT_OPTIONS = {"model", "models", "file", "packed", "recipe", "calib_text", "rotations", "data", "tasks",
                 "float_source", "also"}
OUTPUT_OPTIONS = {"output", "json", "plot", "report", "reference_cache"}


class Hang(BaseException):
    """A case ran past CASE_SECONDS (a BaseException: no `except Exception` inside pocketquant swallows it)."""


@contextlib.contextmanager
def within(seconds: float):
    def expire(signum, frame):
        raise Hang()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs (a tiny model, its packed file, texts, a recipe) and odd files, in one folder to watch."""
    root = tmp_path_factory.mktemp("hostile")
    inputs = root / "inputs"
    inputs.mkdir()
    packed = tiny_chat_model(inputs)
    model = packed.with_suffix("")  # the model folder beside it
    (inputs / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    from pocketquant.quant import recipe

    (inputs / "recipe.json").write_text(recipe.to_json(recipe.from_options("rtn")))
    (inputs / "empty.txt").write_text("")
    (inputs / "garbage.bin").write_bytes(bytes(range(256)) * 64)
    (inputs / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 100)
    (inputs / "folder").mkdir()
    (inputs / "loop").symlink_to(inputs / "loop")
    odd_inputs = [inputs / "missing", inputs / "folder", inputs / "empty.txt", inputs / "garbage.bin",
                  inputs / "latin1.txt", inputs / "loop", inputs / ("n" * 5000), "random:nonsense"]
    return {"root": root, "inputs": inputs, "model": model, "packed": packed, "odd_inputs": odd_inputs,
            "out": root / "out"}


def base_command(verb: str, w: dict) -> list[str]:
    """A valid command that takes a second or two."""
    out, model, packed, inputs = w["out"], str(w["model"]), str(w["packed"]), w["inputs"]
    return {
        "quantize": [model, "-o", str(out / "q.safetensors"), "--method", "spinquant", "--spin-iterations", "1",
                     "--spin-samples", "1", "--spin-len", "32", "--calib-samples", "2", "--calib-len", "32",
                     "--calib-text", str(inputs / "text.txt")],
        "train": [model, "--qat", "-o", str(out / "t.safetensors"), "--steps", "1", "--seq-len", "32",
                  "--init", "float", "--rotations", "none", "--data", str(inputs / "text.txt")],
        "inspect": [packed, "--verify"],
        "eval": [model, packed, "--limit", "40", "--context", "16", "--data", str(inputs / "text.txt"), "--json",
                 str(out / "e.json")],
        "bench": [packed, "--float", model, "--prompt-tokens", "8", "--decode-tokens", "2", "--repeats", "1"],
        "export": [packed, "--to", "gguf", "-o", str(out / "m.gguf")],
        "generate": [packed, "--prompt", "hi", "--max-new-tokens", "2", "--chat"],
        "chat": [packed, "--max-new-tokens", "2"],
    }[verb]


def hostile_values(action, w: dict) -> list[str]:
    if action.choices:
        return CHOICES
    if action.type is int:
        return INTS
    if action.type is float:
        return FLOATS
    if action.dest in INPUT_OPTIONS:
        return [str(p) for p in w["odd_inputs"]]
    if action.dest in OUTPUT_OPTIONS:
        return [str(w["packed"]), str(w["model"] / "model.safetensors"), str(w["model"]), "",
                str(w["packed"] / "x.out"), str(w["out"] / ("n" * 5000))]
    return TEXTS


def cases(verb: str, w: dict) -> list[list[str]]:
    """The valid command, then each option (or positional) set to each hostile value, then structural damage."""
    base = base_command(verb, w)
    actions = [a for a in build_parser(verb).verbs[verb]._actions if a.dest != "help" and a.nargs != 0]
    out = [base] if verb != "bench" else []  # (a whole bench takes 15 s; tests/test_runtime_export.py runs one)
    for action in actions:
        for value in hostile_values(action, w):
            if not (verb == "bench" and action.dest == "threads" and value == INTS[-1]):  # valid: capped
                out.append(_with(base, action, value))
    out += [base + ["--bogus-option"], base + ["--calib-len", "3"] * (verb != "quantize"), base[1:],
            base + [base[-2]] if base[-2].startswith("-") else base + ["-o"], []]
    return [c for c in out if c is not None]


def _with(base: list[str], action, value: str) -> list[str]:
    """`base` with `action` given `value`: its value replaced where the base gives it, else added."""
    if not action.option_strings:  # a positional: the first argument (every base names its model first)
        return [value, *base[1:]]
    for flag in action.option_strings:
        if flag in base:
            i = base.index(flag)
            if action.nargs in ("*", "+"):
                return [*base[:i + 1], value, *base[i + 1:]]
            return [*base[:i + 1], value, *base[i + 2:]]
    return [*base, action.option_strings[0], value]


def named_inputs(verb: str, argv: list[str]) -> dict[str, str]:
    """Every file the command reads (the paths it names that are not outputs, and the files in named folders)
    -> its SHA-256 (a link: its target's name): what it must leave as it was."""
    outputs = {"-o", "--output", "--json", "--plot", "--report"}
    files = {}
    for i, arg in enumerate(argv):
        try:
            path = Path(arg)
            if (i and argv[i - 1] in outputs) or not (path.is_absolute() and (path.exists() or path.is_symlink())):
                continue
            for p in [path] if not path.is_dir() or path.is_symlink() else sorted(path.rglob("*")):
                if p.is_symlink() or p.is_file():
                    files[str(p)] = f"-> {os.readlink(p)}" if p.is_symlink() else sha256_of(p)
        except OSError:  # a name too long to look at: nothing there to change
            continue
    return files


def run_case(verb: str, argv: list[str]) -> tuple[int | str, str, float]:
    """(exit code, or "traceback: ..." / "hang"; standard error; seconds) of `pocketquant VERB ARGV`."""
    err, t0 = io.StringIO(), time.perf_counter()
    stdin, sys.stdin = sys.stdin, io.StringIO("hello there\nand again\n")
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), within(CASE_SECONDS):
            try:
                code = main([verb, *argv])
            except SystemExit as e:  # argparse's own errors
                code = e.code
    except Hang:
        code = "hang"
    except Exception as e:  # what a user would see as a traceback
        code = f"traceback: {type(e).__name__}: {str(e)[:200]}"
    finally:
        sys.stdin = stdin
    return code, err.getvalue(), time.perf_counter() - t0


VERBS = ["quantize", "train", "inspect", "eval", "export", "generate", "chat", "bench"]


@pytest.mark.parametrize("verb", VERBS)
def test_generated_command_lines(world, verb):
    import shutil

    problems, counts = [], {"ok": 0, "refused": 0}
    for argv in cases(verb, world):
        shutil.rmtree(world["out"], ignore_errors=True)
        world["out"].mkdir()
        inputs = named_inputs(verb, argv)
        code, err, seconds = run_case(verb, argv)
        shown = f"{verb} {' '.join(a[:60] for a in argv)}"
        lines = err.strip().splitlines()
        left = sorted(p.name for p in world["out"].rglob("*"))
        if code not in (0, 1, 2):
            problems.append(f"{shown}: {code}")
        elif "Traceback" in err:
            problems.append(f"{shown}: a traceback on standard error")
        elif code and not (lines and lines[-1].startswith((f"pocketquant {verb}: error: ", "pocketquant: error: "))):
            problems.append(f"{shown}: exit {code} without a one-line error: {lines[-1:]} ")
        elif code and left:
            problems.append(f"{shown}: refused, but left {left[:3]}")
        elif any(".partial-" in name or name.endswith("-state") for name in left):
            problems.append(f"{shown}: left temporary files {left[:3]}")
        if seconds > CASE_SECONDS:
            problems.append(f"{shown}: took {seconds:.0f} s")
        changed = [name for name, digest in inputs.items()
                   if not (os.path.lexists(name) and (f"-> {os.readlink(name)}" if os.path.islink(name)
                                                      else sha256_of(name)) == digest)]
        if changed:
            problems.append(f"{shown}: changed or removed its input {changed[0]}")
        counts["ok" if code == 0 else "refused"] += 1
    print(f"\n{verb}: {counts['ok'] + counts['refused']} command lines, {counts['ok']} ran, {counts['refused']} "
          f"refused, {len(problems)} problems")
    assert not problems, "\n".join(problems[:20])
    assert counts["ok"] >= (verb != "bench") and counts["refused"] >= 10


# --- the server -------------------------------------------------------------------------------------------------

ROLES = ["user", "system", "assistant", "", "tool", 5, None, "\ud800", "x" * 10_000]
CONTENTS = ["hi", "", "word " * 200, [{"type": "text", "text": "a"}], [{"type": "image_url"}], None, 5, "\x00",
            "\U0001f600" * 20, "\ud800", "\u202eevil", {"a": 1}, ["a"], "\ufeffbom"]
FIELDS = {
    "max_tokens": [1, 4, 0, -1, 1.5, "4", None, True, 10 ** 9, 2 ** 63, [4]],
    "max_completion_tokens": [2, 0, -5, "x", None],
    "temperature": [0, 1e-300, 2, 2.0001, -0.0, "1", None, True, 5e-324, 1e308, float("nan"), float("inf")],
    "top_p": [1, 1e-300, 0, 1.0000001, -1, None, 0.5, float("nan")],
    "n": [1, 2, 0, None, "1"],
    "stop": [None, "x", ["a", "b"], [], ["a"] * 5, [""], [1], "\ud800", {"a": 1}],
    "stream": [True, False, "yes", 1, None],
    "stream_options": [{"include_usage": True}, "x", [1], {"include_usage": "yes"}, None, {}],
    "seed": [0, -1, 2 ** 63, 2 ** 64, 1.5, "1", None, 7],
    "model": [None, "tiny", "other", 5, "", ["tiny"]],
    "user": ["u", 5, None],
    "logit_bias": [{"1": 100}, "x", None],
}
PROMPTS = ["hi", "", [1, 2, 3], [True], [-1], [10 ** 6], [[1, 2]], ["a", "b"], ["one"], None, 5, {"a": 1},
           "\ud800", "a" * 100_000, [0] * 70]
VALID = {"max_tokens": [1, 4, 8, None], "max_completion_tokens": [2, None], "temperature": [0, 1e-300, 0.7, 2, None],
         "top_p": [1, 1e-300, 0.5, None], "n": [1, None], "stop": [None, "x", ["a", "b"], []],
         "stream": [True, False, None], "stream_options": [{"include_usage": True}, None], "seed": [0, 7, None],
         "model": [None, "tiny"], "user": ["u"], "logit_bias": [None]}


def hostile_bodies(seed: int, count: int):
    """(path, body bytes, content type) for `count` requests, deterministic for `seed`."""
    rng = random.Random(seed)

    def value(pool):
        return rng.choice(pool)
    for i in range(count):
        kind = rng.random()
        clean = rng.random() < 0.4  # every field in range: these run the model
        chat = rng.random() < 0.6
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {}
        if chat:
            body["messages"] = [{"role": value(ROLES) if rng.random() < 0.2 and not clean else "user",
                                 "content": value(CONTENTS) if rng.random() < 0.5 and not clean else "hello"}
                                for _ in range(rng.choice([1, 1, 2, 3]))]
            if rng.random() < 0.05 and not clean:
                body["messages"] = value([[], "hi", None, [1], [{"content": "x"}]])
        else:
            body["prompt"] = value(PROMPTS) if rng.random() < 0.6 and not clean else "hello"
        for name in rng.sample(sorted(FIELDS), rng.randint(0, 5)):
            body[name] = value(VALID[name] if clean else FIELDS[name])
        body.setdefault("max_tokens", rng.choice([1, 2, 4, 8]))  # most requests cheap; some run to the context
        if rng.random() < 0.1:
            body[f"x-{rng.randint(0, 99)}"] = value([1, "a", None, [1], {"b": 2}])
        data = json.dumps(body).encode()  # NaN and Infinity as JSON's non-standard literals, as some clients send
        if clean:
            pass
        elif kind < 0.06:
            data = data[:rng.randint(0, len(data))]  # cut short
        elif kind < 0.09:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
        elif kind < 0.10:
            depth = rng.choice([50, 5000, 200_000])
            data = b"[" * depth + b"]" * depth
        elif kind < 0.11:
            data = b'{"messages": [{"role": "user", "content": "' + b"y" * rng.choice([900_000, 1_100_000]) + b'"}]}'
        elif kind < 0.12:
            data = json.dumps(value([[1], "s", 5, None, True])).encode()
        elif kind < 0.13:
            data = data.replace(b'"hello"', b'"\xff\xfe\xc0\xaf"')  # not UTF-8
        elif kind < 0.14:
            data = b'{"max_tokens": 1' + b"0" * 5000 + b', "prompt": "x"}'
        elif kind < 0.15:
            path = value(["/v1/models", "/health", "/v1/nothing", "/", "/v1/chat/completions/x", "/%ff", "//v1"])
        content_type = value(["text/plain", "", "application/x-www-form-urlencoded"]) if rng.random() < 0.05 \
            and not clean else "application/json"
        yield path, data, content_type


class _Client:
    """Plain HTTP/1.1 on one keep-alive connection (a new one after the server closes it)."""

    def __init__(self, url: str):
        self.host, self.port = url.removeprefix("http://").split(":")
        self.conn = None

    def send(self, method: str, path: str, data: bytes, content_type: str) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, int(self.port), timeout=CASE_SECONDS)
            try:
                self.conn.request(method, path, body=data, headers={"Content-Type": content_type})
                r = self.conn.getresponse()
                answer = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.close()
                return r.status, answer
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine) as e:
                self.close()  # the server closed an idle keep-alive connection: once more on a new one
                if attempt:
                    raise AssertionError(f"the server dropped the connection: {e!r}") from e
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def test_thousands_of_generated_requests(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    question = json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12,
                           "temperature": 0}).encode()
    with serving(tiny_chat_model(folder), folder / "serve.log", "--ctx", "64", "--parallel", "4", "--name",
                 "tiny") as (url, proc):
        client = _Client(url)
        status, first = client.send("POST", "/v1/chat/completions", question, "application/json")
        assert status == 200
        answer = json.loads(first)["choices"][0]["message"]["content"]
        statuses, problems, first_pass, replay = {}, [], [], []
        requests = list(hostile_bodies(seed=27, count=2500))
        # the first 1,250 requests come again: every code path and allocation size has been seen once by then, so
        # memory must not climb past the first pass's peak (a one-time step of the allocator is not a leak)
        for i, (path, data, content_type) in enumerate(requests + requests[:1250]):
            method = "GET" if path in ("/v1/models", "/health") else "POST"
            t0 = time.perf_counter()
            status, body = client.send(method, path, data, content_type)
            statuses[status] = statuses.get(status, 0) + 1
            if status >= 500 and status != 503 or time.perf_counter() - t0 > CASE_SECONDS:
                problems.append(f"{status} in {time.perf_counter() - t0:.1f} s for {path} {data[:200]!r}: "
                                f"{body[:300]!r}")
            elif status >= 400 and not json.loads(body).get("error", {}).get("message"):
                problems.append(f"{status} without an OpenAI error object for {data[:200]!r}")
            if i >= 500 and i % 250 == 0:
                (first_pass if i <= 2500 else replay).append(rss_bytes(proc.pid))
            assert proc.poll() is None, f"the server died at request {i}: {path} {data[:300]!r}"
        client.close()
        status, last = _Client(url).send("POST", "/v1/chat/completions", question, "application/json")
        assert status == 200 and json.loads(last)["choices"][0]["message"]["content"] == answer
    early, late = max(first_pass), max(replay)
    print(f"\n3,750 generated requests: {dict(sorted(statuses.items()))}; server memory at most "
          f"{early / 2**20:.0f} MB in the first 2,500, {late / 2**20:.0f} MB while 1,250 of them came again")
    assert not problems, "\n".join(problems[:10])
    assert statuses.get(200, 0) > 500 and statuses.get(400, 0) > 500  # both kinds were exercised
    assert late - early < 16 << 20, "the server's memory grew"

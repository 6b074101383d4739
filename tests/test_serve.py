"""`pocketquant serve`: a real server process on loopback, driven by the official `openai` client (and raw HTTP
for what a client library would never send)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from servers import free_port, serving, tiny_chat_model

openai = pytest.importorskip("openai")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """SmolLM2-135M quantized with RTN."""
    path = tmp_path_factory.mktemp("serve") / "smol.safetensors"
    subprocess.run([sys.executable, "-m", "pocketquant", "quantize", "smollm2-135m", "--method", "rtn", "-o",
                    str(path)], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def served(packed, tmp_path_factory):
    """SmolLM2-135M (RTN) served with 8 slots of 512 tokens and a queue of 40 -> (URL, process, log file)."""
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with serving(packed, log, "--parallel", "8", "--ctx", "512", "--queue", "40", "--name", "smol") as (url, proc):
        yield url, proc, log


@pytest.fixture(scope="module")
def server(served):
    return served[0]


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_completion_streamed_and_not(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["smol"]
    whole = c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=16, temperature=0)
    assert "Paris" in whole.choices[0].message.content and whole.id.startswith("chatcmpl-")
    assert whole.usage.prompt_tokens > 10 and whole.usage.completion_tokens <= 16
    stream = c.chat.completions.create(model="smol", messages=QUESTION, max_completion_tokens=16, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason


def test_completion_stops_at_a_stop_sequence(server):
    r = client(server).completions.create(model="smol", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0,
                                          stop=[" 8", "zzz"])
    assert r.id.startswith("cmpl-")
    assert r.choices[0].text == " 5, 6, 7," and r.choices[0].finish_reason == "stop"
    length = client(server).completions.create(model="smol", prompt="1, 2, 3,", max_tokens=3, temperature=0)
    assert length.choices[0].finish_reason == "length" and length.usage.completion_tokens == 3


def _post(url: str, body: bytes, content_type="application/json", path="/v1/chat/completions"):
    request = urllib.request.Request(url + path, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": "gpt-4", "messages": QUESTION}).encode(), 404, "does not exist"),
    (json.dumps({"messages": []}).encode(), 400, "non-empty list"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "content must be a string"),
    (json.dumps({"messages": QUESTION, "max_tokens": "ten"}).encode(), 400, "max_tokens must be an integer"),
    (json.dumps({"messages": QUESTION, "max_tokens": 10 ** 9}).encode(), 400, "tokens left in the context"),
    (json.dumps({"messages": QUESTION, "temperature": True}).encode(), 400, "temperature must be a number"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 600}]}).encode(), 400, "context is 512"),
    (json.dumps({"messages": QUESTION, "stop": [1]}).encode(), 400, "stop must be"),
    (json.dumps({"messages": QUESTION, "top_p": 0}).encode(), 400, "top_p must be a number in (0, 1]"),
    (json.dumps({"messages": QUESTION, "stream": True, "stream_options": "x"}).encode(), 400, "stream_options must"),
    (json.dumps({"messages": QUESTION, "stream": True, "stream_options": [1]}).encode(), 400, "stream_options must"),
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "not valid Unicode text"),
    (b'{"messages": [{"role": "\\udfff", "content": "hi"}]}', 400, "not valid Unicode text"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}', 400, "not valid Unicode text"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "RecursionError"),
    (b'{"max_tokens": 1' + b"0" * 5000 + b"}", 400, "not valid JSON"),
])
def test_bad_requests_get_an_openai_error_and_the_server_lives_on(server, body, status, words):
    code, answer = _post(server, body)
    assert code == status and words in answer["error"]["message"] and answer["error"]["type"]
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": [True, False], "max_tokens": 2}, 400, "token ids below 49,152"),
    ({"prompt": "a\ud800b", "max_tokens": 2}, 400, "not valid Unicode text"),
    ({"prompt": [[1, 2]], "max_tokens": 2}, 400, "prompt must be"),
])
def test_bad_completion_prompts(server, body, status, words):
    code, answer = _post(server, json.dumps(body).encode(), path="/v1/completions")
    assert code == status and words in answer["error"]["message"]


def test_any_sampling_setting_in_range_works(server):
    """A temperature or top_p too small to tell tokens apart keeps the likeliest token (these killed the
    server once); a tiny temperature with top_k gives what greedy gives."""
    c = client(server)
    greedy = c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=6, temperature=0)
    for kw in ({"temperature": 1e-300}, {"top_p": 1e-300}, {"temperature": 5e-324, "top_p": 1e-300}):
        r = c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=6, **kw)
        assert r.choices[0].message.content == greedy.choices[0].message.content, kw
    hot = c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=6, temperature=2, top_p=1, seed=3)
    assert hot.usage.completion_tokens >= 1


def test_unknown_paths_and_methods_get_openai_errors(server):
    for method, path, status in (("GET", "/v1/models/smol", 404), ("DELETE", "/v1/models", 405),
                                 ("GET", "/nothing", 404)):
        request = urllib.request.Request(server + path, method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == status and json.loads(e.value.read())["error"]["message"]


def test_each_request_is_logged_once(served):
    url, _, log = served
    client(url).completions.create(model="smol", prompt="Log me", max_tokens=2, temperature=0)
    _post(url, b"{broken")
    for _ in range(50):  # the line is written as the response goes out
        lines = log.read_text().splitlines()
        if any(" POST /v1/chat/completions 400 " in line for line in lines):
            break
        time.sleep(0.1)
    assert any(re.search(r" POST /v1/completions 200 2\+2 tokens [0-9.]+s$", line) for line in lines), lines[-5:]
    assert any(" POST /v1/chat/completions 400 " in line and "not valid JSON" in line for line in lines), lines[-5:]


def test_a_100_mb_body_is_refused_before_it_is_read(server):
    import http.client

    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(100 << 20))
    conn.endheaders()
    conn.send(b"{" + b" " * 4096)  # the rest never comes: the answer must not wait for it
    r = conn.getresponse()
    assert r.status == 413 and "limited to" in json.loads(r.read())["error"]["message"]


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    stream = client(server).chat.completions.create(model="smol", messages=QUESTION, max_tokens=400, temperature=0,
                                                    stream=True)
    next(iter(stream))
    stream.close()
    for _ in range(100):
        with urllib.request.urlopen(server + "/health", timeout=10) as r:
            if json.loads(r.read())["active"] == 0:
                break
        time.sleep(0.1)
    else:
        pytest.fail("the slot of a closed stream stayed taken")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_before_its_answer_frees_its_slot(server, stream):
    """Gone before the first event of its stream (which then never starts) or while its whole answer is made: its
    slot is free at once, not after the 480 tokens it asked for (2.4 s at 200 tok/s)."""
    body = json.dumps({"model": "smol", "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0,
                       "stream": stream}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.3)  # admitted and decoding
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 10:
        with urllib.request.urlopen(server + "/health", timeout=10) as r:
            if json.loads(r.read())["active"] == 0:
                break
        time.sleep(0.05)
    assert time.perf_counter() - t0 < 1.0, "the slot stayed taken after its client left"


@pytest.mark.slow
def test_32_concurrent_streams_equal_the_same_prompts_one_at_a_time(server):
    prompts = [[{"role": "user", "content": f"Count from {i} to {i + 5}, then name a color."}] for i in range(32)]

    def ask(messages):
        stream = client(server).chat.completions.create(model="smol", messages=messages, max_tokens=16,
                                                        temperature=0, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone and len(set(alone)) > 16


def test_batch_engine_gives_each_sequence_what_it_gets_alone():
    """Sequences of different lengths decoded together (one forward per step) equal each decoded alone."""
    import threading

    import torch

    from pocketquant.checkpoints.common import random_model
    from pocketquant.config import ModelConfig
    from pocketquant.quant.recipe import apply, from_options
    from pocketquant.runtime.batch import BatchEngine, Request
    from pocketquant.runtime.engine import use_fast_kernels
    from pocketquant.runtime.generate import Sampling

    model = random_model(ModelConfig(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=256, vocab_size=300,
                                     max_seq_len=128))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    model = use_fast_kernels(apply(model, *from_options("rtn")))
    engine = BatchEngine(model, slots=3, context=64, queue_size=4)

    def run(prompts):
        outs, done = [[] for _ in prompts], [threading.Event() for _ in prompts]
        for i, p in enumerate(prompts):
            def emit(token, finish, i=i):
                outs[i].append(token)
                if finish:
                    done[i].set()
            assert engine.submit(Request(p, 12, Sampling(), emit))
        assert all(d.wait(60) for d in done)
        return outs
    prompts = [[1, 5, 9], [7], list(range(20, 40)), [3] * 9]  # four requests, three slots: one waits
    try:
        assert run(prompts) == [run([p])[0] for p in prompts]
    finally:
        engine.close()


def test_a_failing_request_ends_alone_and_the_engine_runs_on():
    """A request whose forward pass fails gets the finish reason "error" with its reason; the others in the batch,
    and the requests after it, are served as if it had not been there."""
    import threading

    import torch

    from pocketquant.checkpoints.common import random_model
    from pocketquant.config import ModelConfig
    from pocketquant.errors import PocketQuantError
    from pocketquant.runtime.batch import BatchEngine, Request
    from pocketquant.runtime.generate import Sampling

    model = random_model(ModelConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=128, vocab_size=100,
                                     max_seq_len=64))

    class Faulty(torch.nn.Module):  # the real model, failing on any prompt that holds token 13
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def new_caches(self, *a):
            return model.new_caches(*a)

        def forward(self, tokens, *a, **kw):
            if (tokens == 13).any():
                raise PocketQuantError("token 13 is unlucky")
            return model(tokens, *a, **kw)
    engine = BatchEngine(Faulty(), slots=2, context=32, queue_size=4)

    def run(prompts):
        outs, done = [[] for _ in prompts], [threading.Event() for _ in prompts]
        requests = []
        for i, p in enumerate(prompts):
            def emit(token, finish, i=i):
                outs[i].append((token, finish))
                if finish:
                    done[i].set()
            requests.append(Request(p, 5, Sampling(), emit))
            assert engine.submit(requests[-1])
        assert all(d.wait(60) for d in done)
        return outs, requests
    try:
        alone, _ = run([[1, 2, 3]])
        (good, bad, after), requests = run([[1, 2, 3], [4, 13], [1, 2, 3]])
        assert bad == [(None, "error")] and requests[1].failure == "token 13 is unlucky"
        assert good == after == alone[0]
    finally:
        engine.close()


def test_a_port_in_use_is_an_error_not_a_hang(packed):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        run = subprocess.run([sys.executable, "-m", "pocketquant", "serve", str(packed), "--port",
                              str(taken.getsockname()[1])], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "could not serve at 127.0.0.1:" in run.stderr + run.stdout


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A tiny model served with an API key, a 2 s read timeout, 4 connections per client and greedy decoding by
    default -> base URL."""
    folder = tmp_path_factory.mktemp("guarded")
    with serving(tiny_chat_model(folder), folder / "serve.log", "--api-key", "sekret", "--read-timeout", "2",
                 "--max-client-connections", "4", "--temperature", "0", "--ctx", "64") as (url, _):
        yield url


def _raw(url: str, data: bytes, wait: float = 10.0) -> bytes:
    """Send raw bytes on a new connection -> what comes back before the server closes it (or `wait` passes)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except TimeoutError:
            pass
        return got


@pytest.mark.parametrize("header, status", [(b"Bearer sekret", 200), (b"bearer  sekret", 200), (b"sekret", 401),
                                            (b"Basic sekret", 401), (b"Bearer sekret2", 401), (b"Bearer", 401)])
def test_the_api_key_must_come_as_a_bearer_token(guarded, header, status):
    answer = _raw(guarded, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + header
                  + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:100]


def test_a_client_that_sends_its_headers_slowly_is_cut_off(guarded):
    host, port = guarded.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        t0 = time.perf_counter()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\n")
        with pytest.raises(OSError):
            for _ in range(40):
                time.sleep(0.25)
                s.sendall(b"X-Slow: 1\r\n")
                if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    raise ConnectionResetError("closed")
    assert time.perf_counter() - t0 < 5
    t0 = time.perf_counter()
    assert _raw(guarded, b"") == b"" and time.perf_counter() - t0 < 5  # one that sends nothing, likewise


def test_a_body_that_never_arrives_gets_408(guarded):
    t0 = time.perf_counter()
    answer = _raw(guarded, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": 1")
    assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 2 s" in answer
    assert time.perf_counter() - t0 < 8


def test_one_client_holds_a_bounded_number_of_connections(guarded):
    host, port = guarded.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(4)]
    try:
        answer = _raw(guarded, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", wait=5)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too many connections" in answer
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert _raw(guarded, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_serve_temperature_sets_the_default(guarded):
    c = openai.OpenAI(base_url=guarded + "/v1", api_key="sekret", max_retries=0, timeout=60)
    ask = [{"role": "user", "content": "hello"}]
    runs = {c.chat.completions.create(model=c.models.list().data[0].id, messages=ask, max_tokens=12)
            .choices[0].message.content for _ in range(3)}
    assert len(runs) == 1  # greedy by default on this server


@pytest.mark.parametrize("option, value, words", [
    ("--port", "0", "--port must be in 1..65535"), ("--parallel", "0", "--parallel must be at least 1"),
    ("--temperature", "nan", "--temperature must be in [0, 2]"), ("--temperature", "2.5", "--temperature must be"),
    ("--read-timeout", "0", "--read-timeout must be in (0, 3600]"),
    ("--max-client-connections", "-3", "--max-client-connections must be at least 1"),
    ("--max-client-connections", "0", "--max-client-connections must be at least 1"),
])
def test_bad_serve_options_are_refused_before_the_model_loads(option, value, words, capsys):
    from pocketquant.cli import main

    assert main(["serve", "no-such-model", option, value]) == 1  # refused before the model is looked for
    assert words in capsys.readouterr().err

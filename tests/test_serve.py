"""`pocketquant serve`: a real server process on loopback, driven by the official `openai` client (and raw HTTP
for what a client library would never send)."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """SmolLM2-135M quantized with RTN."""
    path = tmp_path_factory.mktemp("serve") / "smol.safetensors"
    subprocess.run([sys.executable, "-m", "pocketquant", "quantize", "smollm2-135m", "--method", "rtn", "-o",
                    str(path)], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def server(packed):
    """SmolLM2-135M (RTN) served with 8 slots of 512 tokens and a queue of 40."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pocketquant", "serve", str(packed), "--port", str(port),
                             "--parallel", "8", "--ctx", "512", "--queue", "40", "--name", "smol"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_completion_streamed_and_not(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["smol"]
    whole = c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=16, temperature=0)
    assert "Paris" in whole.choices[0].message.content
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
    assert r.choices[0].text == " 5, 6, 7," and r.choices[0].finish_reason == "stop"
    length = client(server).completions.create(model="smol", prompt="1, 2, 3,", max_tokens=3, temperature=0)
    assert length.choices[0].finish_reason == "length" and length.usage.completion_tokens == 3


def _post(url: str, body: bytes, content_type="application/json"):
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": content_type})
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
])
def test_bad_requests_get_an_openai_error_and_the_server_lives_on(server, body, status, words):
    code, answer = _post(server, body)
    assert code == status and words in answer["error"]["message"] and answer["error"]["type"]
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


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


def test_a_port_in_use_is_an_error_not_a_hang(packed):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        run = subprocess.run([sys.executable, "-m", "pocketquant", "serve", str(packed), "--port",
                              str(taken.getsockname()[1])], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "could not serve at 127.0.0.1:" in run.stderr + run.stdout

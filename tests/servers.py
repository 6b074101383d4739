"""Real `pocketquant serve` processes on loopback for the tests, and a tiny packed model with a chat template that
serves thousands of requests a minute."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_chat_model(folder: Path) -> Path:
    """A tiny random model (256-byte vocabulary, a plain chat template), quantized by RTN into a packed file."""
    from conftest import hf_model, save_byte_tokenizer, write_json
    from pocketquant.cli import main

    d = folder / "tiny-chat"
    hf_model(tie_word_embeddings=True, rope_scaling=None).save_pretrained(d)
    save_byte_tokenizer(d)
    write_json(d / "tokenizer_config.json", {"chat_template": CHAT_TEMPLATE})
    packed = folder / "tiny-chat.safetensors"
    assert main(["quantize", str(d), "-o", str(packed), "--method", "rtn"]) == 0
    return packed


@contextlib.contextmanager
def serving(model: Path, log: Path, *options: str):
    """Run `pocketquant serve MODEL OPTIONS` on a free port until the block ends -> (base URL, process). Its output
    goes to `log` (a pipe nobody reads would fill up and stall the server). The URL is handed out as soon as the
    server says it is serving, so the test checks that it already accepts connections then."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pocketquant", "serve", str(model), "--port", str(port),
                                 *options], stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(2400):
            if "serving " in log.read_text():
                break
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        else:
            raise AssertionError("the server never said it was serving:\n" + log.read_text())
        with urllib.request.urlopen(url + "/health", timeout=5) as r:  # no retry: it must accept at once
            assert json.loads(r.read())["status"] == "ok"
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_bytes(pid: int) -> int:
    """A process's resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")

"""Load on an OpenAI-compatible server: C clients at once, each sending R streamed chat completions one after
another (greedy, distinct prompts). Prints, per client count, the total generated tokens/s over the round's wall
time and the median time to first token. Works against `pocketquant serve` and llama.cpp's server alike.

    python benchmarks/serve_load.py http://127.0.0.1:8000 --clients 1 4 16 --requests 2 --max-tokens 64

The clients speak plain HTTP (the standard library) and read only what they count: on a small machine the
load generator shares the cores with the server, and a heavier client (the `openai` package parses every
chunk into objects, about 1 ms of CPU per token) would be measured as much as the server.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import statistics
import time
import urllib.parse

TOPICS = ["a lighthouse keeper", "a lost robot", "a river", "a baker in Paris", "a mountain goat", "an old clock",
          "a young astronaut", "a city garden", "a winter storm", "a chess player", "a fisherman", "a tiny dragon",
          "a library at night", "a desert caravan", "a jazz musician", "a forest fire", "a paper boat"]


def one_request(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first generated text, tokens generated) of one streamed chat completion."""
    where = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=600)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, chunks, usage = time.perf_counter(), None, 0, None
    conn.request("POST", where.path.rstrip("/") + "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": "Bearer unused"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"HTTP {response.status}: {response.read()[:300]!r}")
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            usage = event["usage"]["completion_tokens"]
        if event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
            first = first or time.perf_counter()
            chunks += 1
    conn.close()
    return (first or time.perf_counter()) - start, usage if usage is not None else chunks


def round_of(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    def client_run(c: int):
        return [one_request(url, model, f"Write a long story about {TOPICS[(c * requests + r) % len(TOPICS)]}"
                                        f" (number {c * requests + r}).", max_tokens) for r in range(requests)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client_run, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    tokens = sum(n for _, n in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1),
            "median_ttft_ms": round(1000 * statistics.median(t for t, _ in results))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="the server's address, without /v1")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="model name (default: the server's first)")
    args = ap.parse_args()
    if args.model is None:
        where = urllib.parse.urlsplit(args.url)
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
        conn.request("GET", where.path.rstrip("/") + "/v1/models", headers={"Authorization": "Bearer unused"})
        args.model = json.loads(conn.getresponse().read())["data"][0]["id"]
    one_request(args.url, args.model, "Hello", 4)  # warm up
    for c in args.clients:
        print(json.dumps(round_of(args.url, args.model, c, args.requests, args.max_tokens)), flush=True)


if __name__ == "__main__":
    main()

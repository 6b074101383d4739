"""Load on an OpenAI-compatible server: C clients at once, each sending R streamed chat completions one after
another (greedy, distinct prompts). Prints, per client count, the total generated tokens/s over the round's wall
time and the median time to first token. Works against `pocketquant serve` and llama.cpp's server alike.

    python benchmarks/serve_load.py http://127.0.0.1:8000 --clients 1 4 16 --requests 2 --max-tokens 64
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import time

import openai

TOPICS = ["a lighthouse keeper", "a lost robot", "a river", "a baker in Paris", "a mountain goat", "an old clock",
          "a young astronaut", "a city garden", "a winter storm", "a chess player", "a fisherman", "a tiny dragon",
          "a library at night", "a desert caravan", "a jazz musician", "a forest fire", "a paper boat"]


def one_request(client, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first generated text, tokens generated) of one streamed chat completion."""
    start, first, chunks, usage = time.perf_counter(), None, 0, None
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            chunks += 1
    return (first or time.perf_counter()) - start, usage if usage is not None else chunks


def round_of(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    def client_run(c: int):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        return [one_request(client, model, f"Write a long story about {TOPICS[(c * requests + r) % len(TOPICS)]}"
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
    ap.add_argument("url")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="model name (default: the server's first)")
    args = ap.parse_args()
    model = args.model or openai.OpenAI(base_url=args.url + "/v1", api_key="unused").models.list().data[0].id
    one_request(openai.OpenAI(base_url=args.url + "/v1", api_key="unused"), model, "Hello", 4)  # warm up
    for c in args.clients:
        print(json.dumps(round_of(args.url, model, c, args.requests, args.max_tokens)), flush=True)


if __name__ == "__main__":
    main()

"""Checking a request body before anything reaches the engine: every field's type and range, and every string
(valid UTF-8 text, no lone surrogates). Each problem is an `APIError` (a 4xx with an OpenAI-style error object)
naming the field."""

from __future__ import annotations

import json

from starlette.responses import JSONResponse

from pocketquant.runtime.generate import Sampling

MAX_BODY = 1 << 20  # bytes of a request body
MAX_STOPS = 4
SEED_LIMIT = 2 ** 63  # seeds in [0, 2^63), as OpenAI's API documents them


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def parse_body(data: bytes) -> dict:
    """A request body as a JSON object, or a 400 naming what is wrong."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, absurd nesting, a 5,000-digit number
        raise APIError(400, f"the body is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


def text(value, param: str) -> str:
    """`value` if it is a string that can be encoded as UTF-8 (JSON's \\ud800 escapes give lone surrogates)."""
    if not isinstance(value, str):
        raise APIError(400, f"{param} must be a string, got {type(value).__name__}", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} is not valid Unicode text ({e.reason} at position {e.start})", param) from e
    return value


def chat_messages(messages) -> list[dict]:
    """OpenAI chat messages as [{"role", "content"}] with text content (text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    plain = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, "each message needs a 'role' string and 'content'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, "only text content parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, "message content must be a string", "messages")
        plain.append({"role": text(m["role"], "messages"), "content": text(content, "messages")})
    return plain


def prompt_of(prompt, vocab_size: int) -> str | list[int]:
    """A completion prompt: a non-empty string (or a list of one), or token ids below `vocab_size`."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return text(prompt, "prompt")
    if isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t < vocab_size for t in prompt):
        return prompt  # (type(t) is int: JSON's true and false are not token ids)
    raise APIError(400, f"prompt must be a non-empty string (or one string, or token ids below {vocab_size:,})",
                   "prompt")


def _number(body: dict, name: str, default, lo, hi, integer=False, above_lo=False):
    """body[name] checked as a number (bools are not numbers) in [lo, hi] (or (lo, hi])."""
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and lo <= value <= hi and not (
        above_lo and value == lo)
    if not ok:
        interval = f"{'(' if above_lo else '['}{lo}, {hi}]"
        raise APIError(400, f"{name} must be {'an integer' if integer else 'a number'} in {interval}, "
                            f"got {value!r}"[:300], name)
    return value


def options(body: dict, default_temperature: float) -> dict:
    """Sampling, length, stop and streaming options, checked."""
    max_tokens = _number(body, "max_completion_tokens", None, 1, 1 << 30, integer=True)
    max_tokens = _number(body, "max_tokens", max_tokens, 1, 1 << 30, integer=True)
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise APIError(400, "n must be 1", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"stop must be a string or a list of up to {MAX_STOPS} non-empty strings", "stop")
    stop = [text(s, "stop") for s in stop]
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not (isinstance(stream_options, dict)
                                           and isinstance(stream_options.get("include_usage", False), bool)):
        raise APIError(400, 'stream_options must be an object such as {"include_usage": true}', "stream_options")
    sampling = Sampling(temperature=float(_number(body, "temperature", default_temperature, 0, 2)),
                        top_p=float(_number(body, "top_p", 1.0, 0, 1, above_lo=True)),
                        seed=_number(body, "seed", None, 0, SEED_LIMIT - 1, integer=True))
    return {"max_tokens": max_tokens, "stop": stop, "sampling": sampling, "stream": stream,
            "include_usage": bool((stream_options or {}).get("include_usage"))}

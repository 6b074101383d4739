"""An OpenAI-compatible HTTP API over the batch engine (Starlette): `GET /health`, `GET /v1/models`,
`POST /v1/chat/completions` and `POST /v1/completions`, streamed (server-sent events) or not. Bad input gets a
4xx with an OpenAI-style error object; a full queue gets 503 with Retry-After; a client that goes away frees
its slot."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from pocketquant.errors import PocketQuantError
from pocketquant.runtime.batch import BatchEngine, Request
from pocketquant.runtime.generate import Sampling, TextStream

MAX_BODY = 1 << 20  # bytes of a request body


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def create_app(engine: BatchEngine, tokenizer, model_name: str, api_key: str | None = None) -> Starlette:
    api = _API(engine, tokenizer, model_name, api_key)
    return Starlette(routes=[Route("/health", api.health), Route("/v1/models", api.models),
                             Route("/v1/chat/completions", api.chat, methods=["POST"]),
                             Route("/v1/completions", api.completions, methods=["POST"])])


class _API:
    def __init__(self, engine, tokenizer, model_name, api_key):
        self.engine, self.tokenizer, self.name, self.key = engine, tokenizer, model_name, api_key

    async def health(self, request: HTTPRequest):
        return JSONResponse({"status": "ok", **self.engine.load()})

    async def models(self, request: HTTPRequest):
        try:
            self._authorize(request)
        except APIError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": 0, "owned_by": "pocketquant"}]})

    async def chat(self, request: HTTPRequest):
        return await self._complete(request, chat=True)

    async def completions(self, request: HTTPRequest):
        return await self._complete(request, chat=False)

    async def _complete(self, request: HTTPRequest, chat: bool):
        try:
            self._authorize(request)
            body = await _json_body(request)
            prompt, options = self._parse(body, chat)
            job = _Job(self.engine, self.tokenizer, prompt, options, self.name)
            if not body.get("stream"):
                return JSONResponse(await self._whole(job, chat))
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            job.start()
            return StreamingResponse(self._events(job, chat, include_usage), media_type="text/event-stream")
        except APIError as e:
            return e.response()

    def _authorize(self, request: HTTPRequest):
        if self.key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(given, self.key.encode()):
            raise APIError(401, "invalid API key", kind="authentication_error")

    def _parse(self, body: dict, chat: bool) -> tuple[list[int], dict]:
        if body.get("model") not in (None, self.name):
            raise APIError(404, f"model {body.get('model')!r} does not exist; this server runs {self.name!r}",
                           "model", "not_found_error")
        try:
            prompt = self._chat_prompt(body.get("messages")) if chat else self._text_prompt(body.get("prompt"))
        except PocketQuantError as e:
            raise APIError(400, str(e), "messages" if chat else "prompt") from e
        options = _options(body)
        room = self.engine.context - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt):,} tokens; this server's context is "
                                f"{self.engine.context:,}", "messages" if chat else "prompt")
        if options["max_tokens"] is not None and options["max_tokens"] > room:
            raise APIError(400, f"max_tokens {options['max_tokens']:,} is more than the {room:,} tokens left in the "
                                f"context after the prompt", "max_tokens")
        options["max_tokens"] = options["max_tokens"] or room
        return prompt, options

    def _chat_prompt(self, messages) -> list[int]:
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
            plain.append({"role": m["role"], "content": content})
        return self.tokenizer.encode_chat(plain)

    def _text_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            return self.tokenizer.encode(prompt)
        vocab = self.engine.model.config.vocab_size
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            return prompt
        raise APIError(400, "prompt must be a non-empty string (or one string, or token ids)", "prompt")

    async def _whole(self, job: "_Job", chat: bool) -> dict:
        job.start()
        text, finish = "", None
        try:
            async for piece, finish in job.pieces():
                text += piece
        finally:
            job.cancel()  # a client that went away (or a shutdown) frees the slot at the next step
        choice = {"index": 0, "finish_reason": finish}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
        return {**_head(job, chat, chunk=False), "choices": [choice], "usage": job.usage()}

    async def _events(self, job: "_Job", chat: bool, include_usage: bool):
        head = _head(job, chat, chunk=True)

        def event(piece: str | None, finish: str | None, first=False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else {} if piece is None else {"content": piece}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        try:
            if chat:
                yield event(None, None, first=True)
            async for piece, finish in job.pieces():
                if piece:
                    yield event(piece, None)
                if finish:
                    yield event(None, finish)
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': job.usage()})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that went away frees its slot at the next step


def _head(job, chat: bool, chunk: bool) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": job.id, "object": kind, "created": job.created, "model": job.model_name}


async def _json_body(request: HTTPRequest) -> dict:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise APIError(413, f"request bodies are limited to {MAX_BODY:,} bytes")
    data = b""
    async for part in request.stream():
        data += part
        if len(data) > MAX_BODY:
            raise APIError(413, f"request bodies are limited to {MAX_BODY:,} bytes")
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


def _options(body: dict) -> dict:
    """Sampling, length and stop options, checked (bools are not numbers)."""
    def number(name, default, lo, hi, integer=False):
        value = body.get(name, default)
        if value is None:
            return default
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
            raise APIError(400, f"{name} must be {'an integer' if integer else 'a number'} in [{lo}, {hi}], "
                                f"got {value!r}"[:300], name)
        return value
    max_tokens = number("max_completion_tokens", None, 1, 1 << 30, True)
    max_tokens = number("max_tokens", max_tokens, 1, 1 << 30, True)
    if number("n", 1, 1, 1, True) != 1:
        raise APIError(400, "n must be 1", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    if not isinstance(body.get("stream", False), bool):
        raise APIError(400, "stream must be true or false", "stream")
    sampling = Sampling(temperature=float(number("temperature", 1.0, 0, 2)), top_p=float(number("top_p", 1.0, 0, 1)),
                        seed=number("seed", None, 0, 2 ** 63 - 1, True))
    if sampling.top_p == 0:
        raise APIError(400, "top_p must be above 0", "top_p")
    return {"max_tokens": max_tokens, "stop": stop, "sampling": sampling}


class _Job:
    """One request's run: tokens from the engine thread to this event loop, text out, stop strings cut."""

    def __init__(self, engine: BatchEngine, tokenizer, prompt: list[int], options: dict, model_name: str):
        self.engine, self.tokenizer, self.prompt, self.stops = engine, tokenizer, prompt, options["stop"]
        self.id, self.created, self.model_name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_name
        self.generated, self.queue, self.request = 0, asyncio.Queue(), None
        self.options = options

    def start(self):
        loop = asyncio.get_running_loop()

        def emit(token, finish):  # on the engine's thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (token, finish))
            except RuntimeError:  # the event loop has closed (a forced shutdown): nobody is listening
                self.cancel()
        self.request = Request(self.prompt, self.options["max_tokens"], self.options["sampling"], emit,
                               self.tokenizer.stop_ids)
        if not self.engine.submit(self.request):
            raise APIError(503, "the server is busy: every slot is taken and the queue is full; retry shortly",
                           kind="server_error")

    def cancel(self):
        if self.request is not None:
            self.request.cancelled.set()

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": self.generated,
                "total_tokens": len(self.prompt) + self.generated}

    async def pieces(self):
        """(text piece, finish reason or None) until the end; the stop token's text is not shown, and text is
        held back while it could be the start of a stop string."""
        text, pending, keep = TextStream(self.tokenizer), "", max((len(s) for s in self.stops), default=1) - 1
        while True:
            token, finish = await self.queue.get()
            if finish != "stop" or token not in self.tokenizer.stop_ids:
                self.generated += 1
                pending += text.push(token)
            cut = min((i for i in (pending.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.cancel()
                yield pending[:cut], "stop"
                return
            if finish:
                yield pending, finish
                return
            out, pending = (pending[:len(pending) - keep], pending[len(pending) - keep:]) if keep else (pending, "")
            if out:
                yield out, None

"""An OpenAI-compatible HTTP API over the batch engine (Starlette): `GET /health`, `GET /v1/models`,
`POST /v1/chat/completions` and `POST /v1/completions`, streamed (server-sent events) or not. Bad input gets a
4xx with an OpenAI-style error object (validate.py checks every field first); a full queue gets 503 with
Retry-After; a client that goes away frees its slot; a body that does not arrive in time gets 408. An error in
the server's own code is a 500 for that request alone: the server keeps serving. One log line per request."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import traceback
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from pocketquant.errors import PocketQuantError
from pocketquant.runtime.batch import BatchEngine, Request
from pocketquant.runtime.generate import TextStream
from pocketquant.server import validate
from pocketquant.server.validate import MAX_BODY, APIError

log = logging.getLogger("pocketquant.serve")


def create_app(engine: BatchEngine, tokenizer, model_name: str, api_key: str | None = None,
               temperature: float = 1.0, read_timeout: float = 15.0) -> Starlette:
    """The app; `temperature` is the default of requests that name none (OpenAI's is 1.0), and a request's body
    must arrive within `read_timeout` seconds."""
    api = _API(engine, tokenizer, model_name, api_key, temperature, read_timeout)

    async def http_error(request, e: HTTPException):  # unknown paths and methods, in OpenAI's error shape
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind="not_found_error"
                        if e.status_code == 404 else "invalid_request_error").response()

    async def server_error(request, e: Exception):  # a bug outside the completion routes
        return _internal_error(request, e)
    return Starlette(routes=[Route("/health", api.health), Route("/v1/models", api.models),
                             Route("/v1/chat/completions", api.chat, methods=["POST"]),
                             Route("/v1/completions", api.completions, methods=["POST"])],
                     exception_handlers={HTTPException: http_error, Exception: server_error})


class _API:
    def __init__(self, engine, tokenizer, model_name, api_key, temperature, read_timeout):
        self.engine, self.tokenizer, self.name, self.key = engine, tokenizer, model_name, api_key
        self.temperature, self.read_timeout = temperature, read_timeout

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
        t0, job = time.perf_counter(), None
        try:
            self._authorize(request)
            body = validate.parse_body(await _read_body(request, self.read_timeout))
            prompt, options = self._parse(body, chat)
            job = _Job(self.engine, self.tokenizer, prompt, options, self.name, chat)
            if not options["stream"]:
                response = JSONResponse(await self._whole(job, chat, request))
                _log(request, 200, job, t0)
                return response
            job.start()
            return _JobStream(job, self._events(job, chat, options["include_usage"], request, t0))
        except APIError as e:
            _log(request, e.status, job, t0, e.message)
            return e.response()
        except PocketQuantError as e:  # the library refused the input
            _log(request, 400, job, t0, str(e))
            return APIError(400, str(e)).response()
        except Exception as e:  # a bug: this request alone fails
            if job is not None:
                job.cancel()
            return _internal_error(request, e)

    def _authorize(self, request: HTTPRequest):
        """`Authorization: Bearer KEY` (the scheme's name in any case), compared in constant time."""
        if self.key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key.encode()):
            raise APIError(401, "invalid API key: send 'Authorization: Bearer KEY'", kind="authentication_error")

    def _parse(self, body: dict, chat: bool) -> tuple[list[int], dict]:
        model = body.get("model")
        if model is not None and (not isinstance(model, str) or model != self.name):
            raise APIError(404, f"model {model!r} does not exist; this server runs {self.name!r}"[:300],
                           "model", "not_found_error")
        options = validate.options(body, self.temperature)
        try:
            if chat:
                prompt = self.tokenizer.encode_chat(validate.chat_messages(body.get("messages")))
            else:
                prompt = validate.prompt_of(body.get("prompt"), self.engine.model.config.vocab_size)
                prompt = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        except PocketQuantError as e:
            raise APIError(400, str(e), "messages" if chat else "prompt") from e
        room = self.engine.context - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt):,} tokens; this server's context is "
                                f"{self.engine.context:,}", "messages" if chat else "prompt")
        if options["max_tokens"] is not None and options["max_tokens"] > room:
            raise APIError(400, f"max_tokens {options['max_tokens']:,} is more than the {room:,} tokens left in the "
                                f"context after the prompt", "max_tokens")
        options["max_tokens"] = options["max_tokens"] or room
        return prompt, options

    async def _whole(self, job: "_Job", chat: bool, request: HTTPRequest) -> dict:
        job.start()
        text, finish = "", None
        watch = asyncio.ensure_future(_cancel_on_disconnect(request, job))
        try:
            async for piece, finish in job.pieces():
                text += piece
        finally:
            watch.cancel()
            job.cancel()  # a client that went away (or a shutdown) frees the slot at the next step
        choice = {"index": 0, "finish_reason": finish}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
        return {**_head(job, chat, chunk=False), "choices": [choice], "usage": job.usage()}

    async def _events(self, job: "_Job", chat: bool, include_usage: bool, request: HTTPRequest, t0: float):
        head = _head(job, chat, chunk=True)

        def event(piece: str | None, finish: str | None, first=False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else {} if piece is None else {"content": piece}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        status = 200
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
        except Exception as e:  # the engine failed this request after the stream began (or a bug did)
            e = e if isinstance(e, APIError) else _internal_error(request, e, answer=False)
            status = e.status
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'code': None}})}\n\n"
        finally:
            job.cancel()  # a client that went away frees its slot at the next step
            _log(request, status, job, t0)


class _JobStream(StreamingResponse):
    """A stream of server-sent events that frees its job's slot however it ends, even when the client left before
    the first event (then the events' generator never starts, and its own `finally` never runs)."""

    def __init__(self, job: "_Job", events):
        super().__init__(events, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _cancel_on_disconnect(request: HTTPRequest, job: "_Job"):
    """Cancel `job` when its client goes away (the body is read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def _internal_error(request: HTTPRequest, e: Exception, answer: bool = True):
    """Log a bug with its traceback, once; its 500 response (or, with answer=False, the APIError)."""
    log.error("internal error on %s %s:\n%s", request.method, request.url.path,
              "".join(traceback.format_exception(e)))
    error = APIError(500, f"internal server error ({type(e).__name__})", kind="server_error")
    return error.response() if answer else error


def _head(job, chat: bool, chunk: bool) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": job.id, "object": kind, "created": job.created, "model": job.model_name}


def _log(request: HTTPRequest, status: int, job, t0: float, message: str = ""):
    """One line per request: client, method, path, status, tokens in and out, seconds, and why it failed."""
    client = f"{request.client.host}:{request.client.port}" if request.client else "-"
    tokens = f" {len(job.prompt)}+{job.generated} tokens" if job is not None else ""
    log.info("%s %s %s %d%s %.2fs%s", client, request.method, request.url.path, status, tokens,
             time.perf_counter() - t0, f" ({message[:200]})" if message else "")


async def _read_body(request: HTTPRequest, seconds: float) -> bytes:
    """The body, at most MAX_BODY bytes, arriving within `seconds` (413 / 408 otherwise)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise APIError(413, f"request bodies are limited to {MAX_BODY:,} bytes")

    async def read() -> bytes:
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > MAX_BODY:
                raise APIError(413, f"request bodies are limited to {MAX_BODY:,} bytes")
        return bytes(data)
    try:
        return await asyncio.wait_for(read(), seconds)
    except asyncio.TimeoutError as e:
        raise APIError(408, f"the request body did not arrive within {seconds:g} s") from e
    except ClientDisconnect as e:  # nobody to answer; the log says what happened
        raise APIError(400, "the client closed the connection before its body arrived") from e


class _Job:
    """One request's run: tokens from the engine thread to this event loop, text out, stop strings cut."""

    def __init__(self, engine: BatchEngine, tokenizer, prompt: list[int], options: dict, model_name: str, chat: bool):
        self.engine, self.tokenizer, self.prompt, self.stops = engine, tokenizer, prompt, options["stop"]
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created, self.model_name = int(time.time()), model_name
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
        held back while it could be the start of a stop string. A request the engine failed raises a 500."""
        text, pending, keep = TextStream(self.tokenizer), "", max((len(s) for s in self.stops), default=1) - 1
        while True:
            token, finish = await self.queue.get()
            if finish == "error":
                raise APIError(500, f"the model failed on this request: {self.request.failure}", kind="server_error")
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

"""Batched decoding: up to `slots` sequences share each forward step (one pass over the weights for all of
them), each with its own KV cache row and position; a new request's prompt is prefilled between steps. One
thread steps the model (the engine's own, or the one that calls `run`); callers submit requests and receive tokens
through a callback. A request that fails (an error while its prompt is prefilled or its token sampled) ends with
the finish reason "error" and its `failure`; a failed step ends the requests in it; the engine runs on."""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pocketquant.runtime.generate import Sampling, sample


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    emit: Callable[[int, str | None], None]  # (token, finish_reason or None), called on the engine thread
    stop_ids: frozenset = frozenset()
    cancelled: threading.Event = field(default_factory=threading.Event)  # set by the caller: free the slot
    failure: str | None = None  # why the request ended with "error"


@dataclass
class _Slot:
    request: Request
    position: int  # where the next token goes in the cache
    last: int = 0  # the token to feed next
    generated: int = 0
    generator: torch.Generator | None = None


class BatchEngine:
    """Runs requests on `model` in `slots` cache rows of `context` positions; `queue_size` more may wait.
    It steps on a thread of its own, or, with `thread=False`, wherever its owner calls `run`."""

    def __init__(self, model, slots: int = 4, context: int = 2048, queue_size: int = 64, thread: bool = True):
        self.model, self.context = model, context
        caches = model.new_caches(slots, context)
        self.rows = [[c.row(b) for c in caches] for b in range(slots)]  # per slot, per layer
        self.slots: list[_Slot | None] = [None] * slots
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=queue_size)
        self.wake, self.closed = threading.Event(), False
        self.thread = None
        if thread:
            self.thread = threading.Thread(target=self.run, name="pocketquant-batch", daemon=True)
            self.thread.start()

    def submit(self, request: Request) -> bool:
        """Queue a request; False when the queue is full."""
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            return False
        self.wake.set()
        return True

    def load(self) -> dict:
        return {"slots": len(self.slots), "active": sum(s is not None for s in self.slots),
                "queued": self.waiting.qsize()}

    def close(self):
        self.closed = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    @torch.inference_mode()
    def run(self, running: Callable[[], bool] = lambda: True):
        """Admit and step requests until `close()`, or until `running()` turns false."""
        while not self.closed and running():
            self._admit()
            active = [b for b, s in enumerate(self.slots) if s is not None]
            if active:
                self._step(active)
            else:
                self.wake.wait(0.5)
                self.wake.clear()

    def _admit(self):
        """Prefill waiting requests into free slots, one prompt at a time."""
        for b, slot in enumerate(self.slots):
            if slot is not None:
                continue
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                return
            if request.cancelled.is_set():
                continue
            seed = request.sampling.seed
            gen = None if seed is None else torch.Generator().manual_seed(seed)
            self.slots[b] = slot = _Slot(request, len(request.prompt), generator=gen)
            try:
                logits = self.model(torch.tensor([request.prompt]), self.rows[b], 0, last_only=True)[:, -1]
                self._emit(b, slot, logits)
            except Exception as e:
                self._fail([b], e)

    def _step(self, active: list[int]):
        """One token for every active sequence, in one forward pass."""
        for b in active:
            if self.slots[b].request.cancelled.is_set():
                self.slots[b] = None
        active = [b for b in active if self.slots[b] is not None]
        if not active:
            return
        slots = [self.slots[b] for b in active]
        tokens = torch.tensor([[s.last] for s in slots])
        positions = torch.tensor([s.position for s in slots])
        caches = [[self.rows[b][i] for b in active] for i in range(len(self.rows[0]))]
        try:
            logits = self.model(tokens, caches, positions, last_only=True)[:, -1]
        except Exception as e:  # the whole step: every sequence in it ends
            self._fail(active, e)
            return
        for i, (b, slot) in enumerate(zip(active, slots)):
            slot.position += 1
            try:
                self._emit(b, slot, logits[i:i + 1])
            except Exception as e:
                self._fail([b], e)

    def _fail(self, slots: list[int], error: Exception):
        """End the requests in `slots` with the finish reason "error" (their cache rows are free: a new request
        overwrites what it reads); a bug rather than a refusal is logged with its traceback."""
        from pocketquant.errors import PocketQuantError

        if not isinstance(error, PocketQuantError):
            logging.getLogger("pocketquant.serve").error("the engine failed:\n%s", traceback.format_exc())
        for b in slots:
            slot, self.slots[b] = self.slots[b], None
            if slot is not None:
                slot.request.failure = str(error)[:300] or type(error).__name__
                try:
                    slot.request.emit(None, "error")
                except Exception:  # a caller's callback failing leaves nothing more to tell it
                    pass

    def _emit(self, b: int, slot: _Slot, logits: torch.Tensor):
        request = slot.request
        token = int(sample(logits, request.sampling, slot.generator)[0])
        slot.last, slot.generated = token, slot.generated + 1
        finish = "stop" if token in request.stop_ids else \
            "length" if slot.generated >= request.max_tokens or slot.position + 1 >= self.context else None
        request.emit(token, finish)
        if finish:
            self.slots[b] = None

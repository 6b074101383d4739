"""A multi-turn conversation over the streaming generator."""

from __future__ import annotations

from collections.abc import Iterator

from pocketquant.model import Transformer
from pocketquant.runtime.generate import Sampling, stream_text
from pocketquant.tokenizer import Tokenizer


class ChatSession:
    """Keeps the message history; each `send` streams the assistant's reply and records it."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, system: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def send(self, text: str, max_new_tokens: int = 256, sampling: Sampling = Sampling()) -> Iterator[str]:
        self.messages.append({"role": "user", "content": text})
        prompt = self.tokenizer.encode_chat(self.messages)
        reply = []
        for piece in stream_text(self.model, self.tokenizer, prompt, max_new_tokens, sampling):
            reply.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(reply)})

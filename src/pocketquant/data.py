"""Text shipped with the package (never downloaded) and turning text into token blocks.

The Python 3.11 documentation sources (PSF license, see texts/PYTHON-DOCS-LICENSE.txt): the HOWTOs and
FAQ are the calibration/training text, the Tutorial is the evaluation text. They never overlap."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pocketquant.errors import PocketQuantError

CORPORA = {"calibration": "python-howto-faq.txt", "evaluation": "python-tutorial.txt"}


def shipped_text(split: str) -> str:
    if split not in CORPORA:
        raise PocketQuantError(f"unknown text split {split!r}; expected one of {sorted(CORPORA)}")
    return resources.files("pocketquant").joinpath("texts", CORPORA[split]).read_text(encoding="utf-8")


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise PocketQuantError(f"no such text file: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PocketQuantError(f"{path}: not UTF-8 text ({e})") from e
    except OSError as e:
        raise PocketQuantError(f"cannot read {path}: {e.strerror or e}") from e


def token_blocks(tokens: list[int], n: int, length: int) -> "torch.Tensor":
    """The first n disjoint blocks of `length` tokens [n, length] (calibration and training samples)."""
    import torch

    if n < 1 or length < 2:
        raise PocketQuantError(f"need at least one block of at least 2 tokens, got {n} x {length}")
    if len(tokens) < n * length:
        raise PocketQuantError(f"the text has {len(tokens):,} tokens, fewer than {n} x {length} = {n * length:,}; "
                               "use fewer or shorter samples, or more text")
    return torch.tensor(tokens[: n * length]).reshape(n, length)


def training_examples(tokenizer, path: str | Path | None, seq_len: int):
    """Training sequences from `path` (default: the shipped calibration text) -> (ids [N, seq_len],
    mask [N, seq_len]); mask[i, t] says whether token t is a target of the loss.

    Plain text is cut into blocks of `seq_len` tokens (every token but the first is a target). A
    `.jsonl` file holds one chat per line, {"messages": [{"role": ..., "content": ...}, ...]}, rendered
    with the model's chat template: only the assistant's tokens are targets; a chat is cut at `seq_len`
    tokens and padded with masked-out tokens."""
    import torch

    if path is None or Path(path).suffix != ".jsonl":
        tokens = tokenizer.encode(read_text(path) if path else shipped_text("calibration"))
        ids = token_blocks(tokens, len(tokens) // seq_len, seq_len)
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[:, 0] = False
        return ids, mask
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            ids, targets = _chat_tokens(tokenizer, _chat(line, f"{path}:{n}"), f"{path}:{n}")
            rows.append((ids[:seq_len], targets[:seq_len]))
    if not rows:
        raise PocketQuantError(f"{path}: no chats (one JSON object per line, with a 'messages' list)")
    ids = torch.zeros(len(rows), seq_len, dtype=torch.long)
    mask = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    for i, (t, m) in enumerate(rows):
        ids[i, :len(t)], mask[i, :len(m)] = torch.tensor(t), torch.tensor(m, dtype=torch.bool)
    if not mask.any():
        raise PocketQuantError(f"{path}: no assistant tokens within the first {seq_len} tokens of any chat")
    return ids, mask


def _chat(line: str, where: str) -> list[dict]:
    import json

    try:
        messages = json.loads(line)["messages"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PocketQuantError(f"{where}: expected {{\"messages\": [...]}} ({e})") from e
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise PocketQuantError(f"{where}: every message needs a string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise PocketQuantError(f"{where}: the chat has no assistant message to learn from")
    return messages


def _chat_tokens(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
    """The chat's tokens and, per token, whether an assistant message produced it (what the template
    adds for each message, found by rendering growing prefixes of the chat)."""
    if tokenizer.chat_template is None:
        raise PocketQuantError("this model's tokenizer has no chat template: train on plain text instead")
    ids, targets = [], []
    for i, m in enumerate(messages):
        prompt = tokenizer.encode_chat(messages[:i], add_generation_prompt=m["role"] == "assistant") if i else []
        full = tokenizer.encode_chat(messages[:i + 1], add_generation_prompt=False)
        if full[:len(ids)] != ids or prompt[:len(ids)] != ids or full[:len(prompt)] != prompt:
            raise PocketQuantError(f"{where}: the chat template does not render this chat message by message")
        targets += [False] * (len(prompt) - len(ids)) + [m["role"] == "assistant"] * (len(full) - len(prompt))
        ids = full
    return ids, targets

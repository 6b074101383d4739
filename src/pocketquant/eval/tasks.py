"""Multiple-choice tasks from local JSONL, scored by the log-likelihood of each choice (lm-eval style).

Each line: {"question": str, "choices": [str, ...], "answer": index of the right choice}. The prompt is
"Question: {question}\\nAnswer:" and each choice is scored as the continuation " {choice}". `acc` picks the
highest summed log-likelihood; `acc_norm` divides it by the choice's length in bytes first."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pocketquant.data import read_text
from pocketquant.errors import PocketQuantError


@dataclass(frozen=True)
class MCItem:
    question: str
    choices: tuple[str, ...]
    answer: int


def load_mc(path: str | Path) -> list[MCItem]:
    path = Path(path)
    if not path.is_file():
        raise PocketQuantError(f"no such task file: {path}")
    items = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            item = MCItem(d["question"], tuple(d["choices"]), d["answer"])
            if not (isinstance(item.question, str) and isinstance(d["choices"], list)
                    and all(isinstance(c, str) for c in item.choices)
                    and isinstance(item.answer, int) and not isinstance(item.answer, bool)):
                raise TypeError("question: a string, choices: a list of strings, answer: an integer index")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as e:
            raise PocketQuantError(f"{path}:{n}: expected {{\"question\", \"choices\", \"answer\"}} ({e})") from e
        if len(item.choices) < 2 or not 0 <= item.answer < len(item.choices):
            raise PocketQuantError(f"{path}:{n}: answer {item.answer} is not an index into "
                                   f"{len(item.choices)} choices")
        items.append(item)
    if not items:
        raise PocketQuantError(f"{path}: no questions")
    return items


@torch.inference_mode()
def continuation_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """(sum of log p(continuation | context), whether greedy decoding would produce it)."""
    ids = torch.tensor([context + continuation], device=model.device)
    logp = F.log_softmax(model(ids[:, :-1])[0, len(context) - 1:].float(), dim=-1)
    target = ids[0, len(context):]
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def score_mc(model, tokenizer, items: list[MCItem], progress=None) -> dict[str, float]:
    correct = correct_norm = 0
    for item in (progress(items, desc="task", unit="question") if progress else items):
        context = tokenizer.encode(f"Question: {item.question}\nAnswer:")
        lls = [continuation_logprob(model, context, tokenizer.encode(" " + c, add_bos=False))[0]
               for c in item.choices]
        norm = [ll / len(c) for ll, c in zip(lls, item.choices)]
        correct += max(range(len(lls)), key=lls.__getitem__) == item.answer
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == item.answer
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items)}

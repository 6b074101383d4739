"""What the steps of a recipe read beyond their own configs: the tokenizer for their text, where long
steps checkpoint, the float model before any step (the teacher of distillation), and what they report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pocketquant.errors import PocketQuantError


MAX_SAMPLES = 1 << 14  # calibration blocks a step may ask for (the shipped text holds about 1,700 of 512 tokens)
MAX_SEQ_LEN = 1 << 22  # tokens per block, at most (the model's context is checked when the step runs)
MAX_STEPS = 1 << 20  # optimizer steps


@dataclass
class Context:
    tokenizer: object = None  # encodes the steps' calibration and training text
    progress: Callable | None = None  # wraps an iterable in a progress bar (progress.bar), or None
    out: Path | None = None  # the packed file the recipe ends in: its checkpoints and rotations go beside it
    teacher: torch.nn.Module | None = None  # the float model before any step
    rank: int = 0  # this process under torchrun (only the first one writes files)
    report: dict = field(default_factory=dict)  # what the steps measured, by name
    record: object = None  # the config the packed file records for the step running (a step may change it)
    scheme: object = None  # the scheme the steps quantize with (a budget step makes it mixed)
    _encoded: dict = field(default_factory=dict)
    _examples: dict = field(default_factory=dict)

    def tokens(self, text: str | None) -> list[int]:
        """The token ids of the file `text` (None: the shipped calibration text), encoded once."""
        from pocketquant.data import read_text, shipped_text

        if self.tokenizer is None:
            raise PocketQuantError("this model has no tokenizer, and the recipe's steps need calibration text "
                                   "(rtn needs none: --method rtn)")
        if text not in self._encoded:
            body = read_text(text) if text else shipped_text("calibration")
            self.note(f"encoding the calibration text ({text or 'shipped'}: {len(body):,} characters)")
            self._encoded[text] = self.tokenizer.encode(body)
        return self._encoded[text]

    def blocks(self, text: str | None, n: int, length: int, at_most: bool = False) -> torch.Tensor:
        """The first n calibration blocks [n, length] of `text` (a chat .jsonl: its first n examples);
        `at_most`: fewer when the text holds fewer (at least one), with a warning."""
        if text and Path(text).suffix == ".jsonl":
            ids = self.examples(text, length)[0]
        else:
            tokens = self.tokens(text)
            ids = torch.tensor(tokens[: len(tokens) // length * length], dtype=torch.long).reshape(-1, length)
        if len(ids) < n and not (at_most and len(ids)):
            what = f"{len(ids)} blocks of {length} tokens" if not (text or "").endswith(".jsonl") else \
                f"{len(ids)} chats"
            raise PocketQuantError(f"{text or 'the shipped calibration text'} holds {what}, fewer than the {n} "
                                   "asked; use fewer or shorter samples, or more text")
        if len(ids) < n:
            import warnings

            warnings.warn(f"{text or 'the calibration text'} holds {len(ids)} blocks of {length} tokens; "
                          f"calibrating on those instead of {n}", stacklevel=2)
        return ids[:n]

    def examples(self, text: str | None, length: int):
        """Training sequences and their loss masks (data.training_examples), made once per text and length
        (the steps' checks and the steps themselves read the same ones)."""
        from pocketquant.data import training_examples

        if self.tokenizer is None:
            raise PocketQuantError("this model has no tokenizer: training needs text")
        if (text, length) not in self._examples:
            self._examples[text, length] = training_examples(self.tokenizer, text, length)
        return self._examples[text, length]

    def note(self, message: str):
        """Say what is happening (on standard error), where progress is shown."""
        if self.progress is not None and not self.rank:
            from pocketquant.progress import note

            note(message)

    def beside_out(self, suffix: str, every_rank: bool = False) -> Path | None:
        """OUT + suffix (OUT.gptq-state, ...); None without an output, or for all but the first process."""
        return None if self.out is None or (self.rank and not every_rank) else self.out.with_name(self.out.name + suffix)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), from logits [..., V] (the teacher's carry no gradient)."""
    import torch.nn.functional as F

    student = F.log_softmax(student_logits.float(), -1).reshape(-1, student_logits.shape[-1])
    teacher = F.log_softmax(teacher_logits.detach().float(), -1).reshape(-1, teacher_logits.shape[-1])
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def config_dict(config, method: str) -> dict:
    """A step's config as JSON data: its method, its version and every field (the scheme as its dict)."""
    d = {"method": method, "version": config.VERSION}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        d[f.name] = value.to_dict() if f.name == "scheme" else list(value) if isinstance(value, tuple) else value
    return d


def config_from_dict(cls, d: dict, method: str):
    """The config `config_dict` wrote; a newer version, an unknown field or a value of the wrong type is
    refused with a message naming it."""
    from pocketquant.scheme import QuantScheme

    if not isinstance(d, dict):
        raise PocketQuantError(f"a {method} step must be a JSON object, got {type(d).__name__}")
    version = d.get("version", 1)
    if type(version) is not int or not 1 <= version <= cls.VERSION:
        raise PocketQuantError(f"{method} step version {version!r:.40}: this pocketquant reads versions 1 to "
                               f"{cls.VERSION}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields) - {"method", "version"})
    if unknown:
        raise PocketQuantError(f"{method} step: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in d.items():
        if name in ("method", "version"):
            continue
        if name == "scheme":
            kwargs[name] = QuantScheme.from_dict(value) if isinstance(value, dict) else _bad(method, name, value)
            continue
        default = fields[name].default
        if default is dataclasses.MISSING:
            default = fields[name].default_factory()
        kwargs[name] = _typed(method, name, value, default)
    return cls(**kwargs)


def _typed(method: str, name: str, value, default):
    """`value` (from JSON) as the type of the field's default."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok, value = isinstance(value, (int, float)) and not isinstance(value, bool), float(value) if isinstance(
            value, (int, float)) else value
    elif isinstance(default, tuple):
        ok, value = isinstance(value, list) and all(isinstance(v, str) for v in value), tuple(value) if isinstance(
            value, list) else value
    else:  # a string, or None
        ok = value is None or isinstance(value, str)
    return value if ok else _bad(method, name, value)


def _bad(method: str, name: str, value):
    raise PocketQuantError(f"{method} step: {name} = {value!r:.100} has the wrong type")


def in_range(what: str, **values: tuple):
    """Refuse any `name=(value, lo, hi)` whose value lies outside [lo, hi], naming it: counts and sizes beyond
    these bounds come from a typing slip or a hostile file, and would run for days or fail deep inside a step."""
    for name, (value, lo, hi) in values.items():
        if not lo <= value <= hi:
            raise PocketQuantError(f"{what} {name} must be in [{lo:,}, {hi:,}], got {value:,}")

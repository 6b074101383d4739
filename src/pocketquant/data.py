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


def token_blocks(tokens: list[int], n: int, length: int) -> "torch.Tensor":
    """The first n disjoint blocks of `length` tokens [n, length] (calibration and training samples)."""
    import torch

    if n < 1 or length < 2:
        raise PocketQuantError(f"need at least one block of at least 2 tokens, got {n} x {length}")
    if len(tokens) < n * length:
        raise PocketQuantError(f"the text has {len(tokens):,} tokens, fewer than {n} x {length} = {n * length:,}; "
                               "use fewer or shorter samples, or more text")
    return torch.tensor(tokens[: n * length]).reshape(n, length)


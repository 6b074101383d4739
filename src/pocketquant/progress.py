"""Progress bars with an ETA for long work; silent when the output is not a terminal."""

from __future__ import annotations


def bar(iterable, desc: str = "", unit: str = "it", **kw):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=unit, disable=None, dynamic_ncols=True, **kw)

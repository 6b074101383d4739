"""Progress of long work, with an ETA: a bar on a terminal; elsewhere (a log file, a CI job) a line per item (a
layer, a step), or every few seconds for long runs of short items, so that long work is never silent. `note`
says what a step is doing before its first item ends."""

from __future__ import annotations

import sys
import time

LINE_SECONDS = 10.0  # away from a terminal: a line per item for up to LINE_ITEMS items, else one per this long
LINE_ITEMS = 200


def note(message: str):
    """A line on standard error: what is happening now (loading, encoding text, resuming)."""
    print(message, file=sys.stderr, flush=True)


def bar(iterable, desc: str = "", unit: str = "it", **kw):
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, unit=unit, dynamic_ncols=True, **kw)
    return _Lines(iterable, desc, unit, kw.get("total"), kw.get("initial", 0))


class _Lines:
    """`desc: 12/30 layers, 1m 40s, about 2m 30s left (loss=2.1)` lines; `set_postfix` as tqdm's."""

    def __init__(self, iterable, desc: str, unit: str, total: int | None = None, initial: int = 0):
        self.iterable, self.desc, self.unit, self.initial = iterable, desc, unit, initial
        self.total = total if total is not None else len(iterable) if hasattr(iterable, "__len__") else None
        self.postfix = ""

    def set_postfix(self, **values):
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def __iter__(self):
        start = last = time.monotonic()
        n = self.initial
        of = f" of {self.total:,}" if self.total is not None else ""
        note(f"{self.desc}: {n:,}{of} {self.unit}s done, starting")
        for item in self.iterable:
            yield item
            n, now = n + 1, time.monotonic()
            if (self.total or LINE_ITEMS + 1) <= LINE_ITEMS or now - last >= LINE_SECONDS or n == self.total:
                last = now
                per = (now - start) / (n - self.initial)
                left = f", about {_duration(per * (self.total - n))} left" if self.total and n < self.total else ""
                postfix = f" ({self.postfix})" if self.postfix else ""
                note(f"{self.desc}: {n:,}{of} {self.unit}s, {_duration(now - start)}{left}{postfix}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"

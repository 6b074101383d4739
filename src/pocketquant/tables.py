"""Plain-text tables for the terminal."""

from __future__ import annotations


def format_table(header: list[str], body: list[list[str]]) -> list[str]:
    """Lines of a table: the first column left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in body]

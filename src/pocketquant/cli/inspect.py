"""`pocketquant inspect FILE`."""

from __future__ import annotations


def register(p):
    p.add_argument("file", metavar="FILE", help="a packed .safetensors file")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from pocketquant.errors import PocketQuantError
    from pocketquant.inspect import report

    path = Path(args.file)
    if not path.is_file():
        raise PocketQuantError(f"no such file: {path}")
    print(report(path))
    return 0

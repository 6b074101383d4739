"""`pocketquant inspect FILE [--tensors] [--verify]`."""

from __future__ import annotations


def register(p):
    p.add_argument("file", metavar="FILE", help="a packed .safetensors file")
    p.add_argument("--tensors", action="store_true", help="also list every tensor with its dtype and shape")
    p.add_argument("--verify", action="store_true",
                   help="check the header and every tensor against their checksums (exit 1 if any differs)")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from pocketquant.errors import PocketQuantError
    from pocketquant.inspect import report, verify

    path = Path(args.file)
    if not path.is_file():
        raise PocketQuantError(f"no such file: {path}")
    if args.verify:
        print(verify(path), flush=True)
    print(report(path, args.tensors))
    return 0

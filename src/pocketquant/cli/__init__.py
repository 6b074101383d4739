"""`pocketquant <verb>`: each verb is a small module with `register(parser)` and `run(args)`; only the verb
being run is imported, and its library imports happen only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

from pocketquant.errors import PocketQuantError

VERBS = {
    "quantize": "quantize a float model into a packed file",
    "train": "quantization-aware training and LoRA adapters, then a packed file",
    "sensitivity": "how much KL each linear adds when it alone is quantized",
    "inspect": "show what a packed file holds and where its bytes go",
    "eval": "perplexity, KL-divergence and task accuracy, side by side",
    "bench": "size, memory and speed side by side with the float model and llama.cpp",
    "export": "write a model in another runtime's format (GGUF, Meta's layout, ExecuTorch)",
    "generate": "generate text from a prompt",
    "chat": "talk with a model in the terminal",
    "serve": "an OpenAI-compatible server with batched decoding",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every verb, or with `only`, of that verb alone (the others are listed, not imported)."""
    parser = argparse.ArgumentParser(prog="pocketquant", description="Quantize, evaluate and run small "
                                     "Llama-family models on a CPU.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    parser.verbs = {}  # verb -> its own parser
    for verb, help_text in VERBS.items():
        p = parser.verbs[verb] = sub.add_parser(verb, help=help_text, description=help_text)
        if only in (None, verb):
            importlib.import_module(f"pocketquant.cli.{verb}").register(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb if verb in VERBS else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the verb's own parser, with the verb's usage
        parser.verbs[args.verb].error(f"unrecognized arguments: {' '.join(unknown)} (pocketquant {args.verb} -h "
                                      "lists its options)")
    try:
        return args.run(args) or 0
    except PocketQuantError as e:
        print(f"pocketquant {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `pocketquant inspect FILE | head -1`: the reader has all it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail
        return 0
    except OSError as e:  # the system refused a file operation (a name too long, a full disk, no permission)
        where = f": {str(e.filename)[:200]}" if e.filename else ""
        print(f"pocketquant {args.verb}: error: {e.strerror or _first_line(e)}{where}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "allocate" not in str(e):
            raise  # a bug, not the machine: keep the traceback
        print(f"pocketquant {args.verb}: error: out of memory ({_first_line(e)}); try a smaller model, fewer "
              "tokens or a smaller batch", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]

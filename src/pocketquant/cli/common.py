"""Options shared by the verbs that run a model."""

from __future__ import annotations

import argparse

DTYPES = ("float32", "bfloat16")


def schemes() -> list[str]:
    from pocketquant.scheme import PRESETS  # light: no torch

    return list(PRESETS)


def add_model_options(p: argparse.ArgumentParser):
    p.add_argument("model", metavar="MODEL",
                   help="a path (HF directory, Meta directory, .gguf) or a known name such as smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="float32 (default) or bfloat16")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--runtime", default="fast", choices=["fast", "reference"],
                   help="for packed files: native kernels (default) or the reference definition")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="for packed files: skip checking every tensor against its checksum at load (the header is "
                        "always checked)")


def add_sampling_options(p: argparse.ArgumentParser):
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many tokens (256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def set_threads(threads: int | None):
    """Use `threads` CPU threads: at least 1, and no more than the CPUs this process may run on (more only
    slow every kernel down)."""
    import torch

    from pocketquant.errors import PocketQuantError

    if threads is not None:
        if threads < 1:
            raise PocketQuantError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(capped_threads(threads))


def capped_threads(threads: int) -> int:
    """`threads`, lowered (with a warning) to the CPUs this process may run on."""
    import sys

    cpus = available_cpus()
    if threads > cpus:
        print(f"pocketquant: --threads {threads} is more than the {cpus} CPUs available; using {cpus}",
              file=sys.stderr)
    return min(threads, cpus)


def available_cpus() -> int:
    """The CPUs this process may run on."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def utf8_text(text: str, what: str) -> str:
    """`text` (from the command line or a terminal), refused when it is not valid UTF-8."""
    from pocketquant.errors import PocketQuantError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable bytes arrive as lone surrogates
        raise PocketQuantError(f"{what} is not valid UTF-8 text ({e.reason} at position {e.start})") from e
    return text


def open_model(args):
    """Load the model the arguments name; it must have a tokenizer to run on text."""
    from pocketquant.errors import PocketQuantError
    from pocketquant.runtime import load

    set_threads(args.threads)
    loaded = load(args.model, args.dtype, args.runtime, args.verify)
    if loaded.tokenizer is None:
        raise PocketQuantError(f"{args.model} has no tokenizer, so it cannot run on text")
    return loaded


def sampling_from(args):
    from pocketquant.runtime.generate import Sampling

    if args.max_new_tokens < 1:
        from pocketquant.errors import PocketQuantError

        raise PocketQuantError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return Sampling(args.temperature, args.top_k, args.top_p, args.seed)

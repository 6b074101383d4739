"""`pocketquant chat MODEL`: a multi-turn conversation, replies streamed as they come."""

from __future__ import annotations

import sys

from pocketquant.cli.common import add_model_options, add_sampling_options, open_model, sampling_from, utf8_text


def register(p):
    add_model_options(p)
    p.add_argument("--system", default=None, help="system message")
    add_sampling_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from pocketquant.runtime.chat import ChatSession

    sampling = sampling_from(args)
    if hasattr(sys.stdin, "reconfigure"):  # bad bytes reach utf8_text, which names them
        sys.stdin.reconfigure(errors="surrogateescape")
    system = args.system and utf8_text(args.system, "--system")
    loaded = open_model(args)
    session = ChatSession(loaded.model, loaded.tokenizer, system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        for piece in session.send(utf8_text(line.rstrip("\n"), "the input"), args.max_new_tokens, sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()

"""`pocketquant generate MODEL --prompt TEXT`."""

from __future__ import annotations

import sys

from pocketquant.cli.common import add_model_options, add_sampling_options, open_model, sampling_from, utf8_text


def register(p):
    add_model_options(p)
    p.add_argument("--prompt", required=True, help="the text to continue (or the user message with --chat)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    add_sampling_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from pocketquant.runtime.generate import stream_text

    sampling = sampling_from(args)
    prompt, system = utf8_text(args.prompt, "--prompt"), args.system and utf8_text(args.system, "--system")
    loaded = open_model(args)
    tok = loaded.tokenizer
    if args.chat:
        messages = ([{"role": "system", "content": system}] if system else [])
        ids = tok.encode_chat(messages + [{"role": "user", "content": prompt}])
    else:
        ids = tok.encode(prompt)
    for piece in stream_text(loaded.model, tok, ids, args.max_new_tokens, sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0

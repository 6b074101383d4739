"""Give a packed random-weight shape (e.g. `random:llama-3.2-1b` quantized) a tokenizer so that servers which need
text can run it: the donor's tokenizer (SmolLM2's by default), its vocabulary padded with reserved tokens up to
the shape's vocabulary size. The padding tokens are never produced by encoding text and decode to their own
names; prompts tokenize as the donor's, so both servers under test see the same prompts.

    pocketquant quantize random:llama-3.2-1b --method rtn -o 1b.safetensors
    python benchmarks/lend_tokenizer.py 1b.safetensors 1b-text.safetensors
    pocketquant export 1b-text.safetensors --to gguf -o 1b-text.gguf

Only for speed work: the weights are random, so the text they produce means nothing.
"""

from __future__ import annotations

import argparse
import json

from pocketquant.checkpoints import load_model
from pocketquant.checkpoints.packed import load_packed, read_header, save_packed
from pocketquant.tokenizer import Tokenizer


def padded(tokenizer: Tokenizer, size: int) -> Tokenizer:
    spec = tokenizer.to_spec()
    body = json.loads(spec["tokenizer_json"])
    vocab = body["model"]["vocab"]
    taken = max(vocab.values(), default=-1) + 1
    taken = max([taken, *(t["id"] + 1 for t in body.get("added_tokens", []))])
    if taken > size:
        raise SystemExit(f"the donor's vocabulary ({taken:,}) is larger than the model's ({size:,})")
    vocab.update({f"<reserved_{i}>": i for i in range(taken, size)})
    return Tokenizer.from_spec({**spec, "tokenizer_json": json.dumps(body)})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed", help="a packed file without a tokenizer")
    ap.add_argument("out")
    ap.add_argument("--donor", default="smollm2-135m", help="the model whose tokenizer to lend")
    args = ap.parse_args()
    model, tokenizer, header = load_packed(args.packed)
    if tokenizer is not None:
        raise SystemExit(f"{args.packed} has a tokenizer already")
    donor = load_model(args.donor).tokenizer
    save_packed(args.out, model, header.scheme, header.recipe, padded(donor, model.config.vocab_size))
    print(f"wrote {args.out}: {args.packed} with {args.donor}'s tokenizer, padded to {model.config.vocab_size:,}")


if __name__ == "__main__":
    main()

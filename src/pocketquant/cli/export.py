"""`pocketquant export MODEL --to gguf|meta|executorch -o OUT`."""

from __future__ import annotations


def register(p):
    p.add_argument("model", metavar="MODEL", help="a packed .safetensors file (gguf: a float model too)")
    p.add_argument("--to", required=True, choices=["gguf", "meta", "executorch"],
                   help="gguf (llama.cpp), meta (Meta's prequantized INT4_EO8 layout: a directory with "
                        "consolidated.00.pth and params.json), executorch (a .pte program, XNNPACK)")
    p.add_argument("--type", default="Q4_0", choices=["F32", "F16", "Q8_0", "Q4_0"],
                   help="gguf: weight type for float weights (packed int4/int8 weights map to Q4_0/Q8_0 as they are)")
    p.add_argument("--context", type=int, default=2048,
                   help="executorch: positions of the program's KV cache (default 2048, at most the model's)")
    p.add_argument("-o", "--output", required=True, help="the file (gguf, executorch) or new directory (meta)")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from pocketquant.checkpoints import load_model
    from pocketquant.errors import PocketQuantError
    from pocketquant.files import check_output, disk_bytes

    suffix = {"gguf": ".gguf", "executorch": ".pte", "meta": None}[args.to]
    if args.to == "meta" and Path(args.output).exists():
        raise PocketQuantError(f"{args.output} exists; name a new directory for the export")
    check_output(args.output, [args.model], suffix=suffix)
    loaded = load_model(args.model)
    if args.to != "gguf" and not _quantized(loaded.model):
        raise PocketQuantError(f"{args.model} holds float weights; quantize it first (pocketquant quantize)")
    if args.to == "gguf":
        from pocketquant.export.gguf import export_gguf

        path = export_gguf(loaded.model, loaded.tokenizer, args.output, args.type)
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
        return 0
    if args.to == "meta":
        from pocketquant.export.meta import export_meta

        path, requantized = export_meta(loaded.model, loaded.tokenizer, args.output)
    else:
        from pocketquant.export.executorch import export_executorch

        print("lowering with ExecuTorch's export_llama (XNNPACK); minutes per model on a small CPU ...", flush=True)
        path, requantized, exported = export_executorch(loaded.model, args.output, args.context)
    print(f"wrote {path} ({disk_bytes(path):,} bytes)")
    _say_requantized(*requantized)
    if args.to == "executorch":
        check_program(path, exported, loaded.tokenizer, min(args.context, loaded.model.config.max_seq_len))
    return 0


def _quantized(model) -> bool:
    from pocketquant.layers import QuantLinear

    return any(isinstance(m, QuantLinear) for m in model.modules())


def _say_requantized(changed: int, groups: int):
    if changed:
        print(f"{changed:,} of {groups:,} weight groups ({100 * changed / groups:.1f}%) had a negative scale and held "
              "the lowest integer (-8 or -128), which became +7 or +127 when the group was flipped to a positive scale "
              "(ExecuTorch's kernels take positive scales only); quantize with --scale-rule search (positive "
              "scales) for an exact export")


def check_program(path, model, tokenizer, context: int):
    """The program against pocketquant's reference runtime on the weights it holds: logits on a short prompt,
    and the greedy answer to a question."""
    import torch

    from pocketquant.export.executorch import pte_greedy, pte_logits
    from pocketquant.runtime.generate import stream_generate

    tokens = (tokenizer.encode("The capital of France is") if tokenizer else list(range(1, 9)))[:context]
    theirs = pte_logits(path, tokens)
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0]
    same = int((ours.argmax(-1) == theirs.argmax(-1)).sum())
    print(f"check: logits of the program vs pocketquant's on {len(tokens)} tokens: max |difference| "
          f"{(ours - theirs).abs().max():.4f}, mean {(ours - theirs).abs().mean():.4f} (largest logit "
          f"{ours.abs().max():.2f}); the same next token at {same} of {len(tokens)} positions")
    if tokenizer is None or tokenizer.chat_template is None:
        return
    prompt = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    if len(prompt) + 16 > context:
        return
    program = tokenizer.decode(pte_greedy(path, prompt, 16, tokenizer.stop_ids))
    pocketquant = "".join(r.text for r in stream_generate(model, tokenizer, prompt, 16))
    print(f"check: greedy answer to 'What is the capital of France?': the program {program.strip()!r}, "
          f"pocketquant {pocketquant.strip()!r}" + (" (the same)" if program.strip() == pocketquant.strip() else ""))

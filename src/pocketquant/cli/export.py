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
    from pocketquant.files import check_output

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
        path, requantized = export_executorch(loaded.model, args.output, args.context)
    size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
    print(f"wrote {path} ({size:,} bytes)")
    _say_requantized(*requantized)
    if args.to == "executorch":
        _compare(loaded, path)
    return 0


def _quantized(model) -> bool:
    from pocketquant.layers import QuantLinear

    return any(isinstance(m, QuantLinear) for m in model.modules())


def _say_requantized(stuck: int, groups: int):
    if stuck:
        print(f"{stuck:,} of {groups:,} weight groups ({100 * stuck / groups:.1f}%) had a negative scale next to the "
              "lowest integer and were quantized again with a positive one (ExecuTorch's kernels take positive "
              "scales only); quantize with --scale-rule absmax for an exact export")


def _compare(loaded, path):
    """The program's logits against pocketquant's own on a short prompt."""
    import torch

    from pocketquant.export.executorch import pte_logits

    tokens = loaded.tokenizer.encode("The capital of France is") if loaded.tokenizer else list(range(1, 9))
    theirs = pte_logits(path, tokens)
    with torch.no_grad():
        ours = loaded.model(torch.tensor([tokens]))[0]
    same = int((ours.argmax(-1) == theirs.argmax(-1)).sum())
    print(f"check: the program's logits vs pocketquant's on {len(tokens)} tokens: max |difference| "
          f"{(ours - theirs).abs().max():.4f} (largest logit {ours.abs().max():.2f}), the same next token at "
          f"{same} of {len(tokens)} positions")

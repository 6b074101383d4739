"""`pocketquant export MODEL --to gguf [--type Q4_0] -o OUT.gguf`."""

from __future__ import annotations


def register(p):
    p.add_argument("model", metavar="MODEL", help="a float model or a packed .safetensors file")
    p.add_argument("--to", required=True, choices=["gguf"], help="target format")
    p.add_argument("--type", default="Q4_0", choices=["F32", "F16", "Q8_0", "Q4_0"],
                   help="weight type for float weights (packed int4/int8 weights map to Q4_0/Q8_0 as they are)")
    p.add_argument("-o", "--output", required=True, help="the file to write")
    p.set_defaults(run=run)


def run(args) -> int:
    from pocketquant.checkpoints import load_model
    from pocketquant.export.gguf import export_gguf
    from pocketquant.files import check_output

    check_output(args.output, [args.model], suffix=".gguf")
    loaded = load_model(args.model)
    path = export_gguf(loaded.model, loaded.tokenizer, args.output, args.type)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0

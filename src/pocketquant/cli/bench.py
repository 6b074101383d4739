"""`pocketquant bench PACKED --float MODEL [--llama-cpp]`."""

from __future__ import annotations


def register(p):
    p.add_argument("packed", metavar="PACKED", help="a packed .safetensors file (the first column)")
    p.add_argument("--float", dest="float_source", default=None, metavar="MODEL",
                   help="its float model (path or name, e.g. smollm2-135m or random:llama-3.2-1b)")
    p.add_argument("--llama-cpp", action="store_true",
                   help="also run llama.cpp (llama-cpp-python) on a GGUF export of the same weights")
    p.add_argument("--reference", action="store_true", help="also time the reference runtime")
    p.add_argument("--also", action="append", default=[], metavar="PACKED",
                   help="another packed file, or a Meta prequantized directory, to time in its own column "
                        "(repeatable), e.g. the same weights with an int8 KV cache")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every column (default 2)")
    p.add_argument("--prompt-tokens", type=int, default=512,
                   help="prompt length: time to first token and prefill speed (default 512)")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens generated for decode speed (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each configuration; the median is shown "
                   "(default 3)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the results as a bar chart")
    p.set_defaults(run=run)


def run(args) -> int:
    import sys

    from pocketquant.bench import Settings, bench, plot, table, write_json
    from pocketquant.cli.common import capped_threads
    from pocketquant.errors import PocketQuantError
    from pocketquant.files import check_output

    if min(args.threads, args.prompt_tokens, args.decode_tokens, args.repeats) < 1:
        raise PocketQuantError("--threads, --prompt-tokens, --decode-tokens and --repeats must be >= 1")
    if args.repeats > 100:
        raise PocketQuantError(f"--repeats {args.repeats} is more than the 100 runs a median needs")
    args.threads = capped_threads(args.threads)
    for out, suffix in ((args.json, None), (args.plot, ".png")):
        if out is not None:  # refused now, not after the benchmark ("" is no file name either)
            check_output(out, [args.packed, args.float_source, *args.also], suffix)
    settings = Settings(args.threads, args.prompt_tokens, args.decode_tokens, args.repeats)
    result = bench(args.packed, args.float_source, args.llama_cpp, args.reference, settings,
                   progress=lambda m: print(m, file=sys.stderr), also=tuple(args.also))
    print(table(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)
    return 0

"""`pocketquant eval MODEL [MODEL ...]`: the first model is the reference."""

from __future__ import annotations


def register(p):
    from pocketquant.cli.common import DTYPES

    p.add_argument("models", nargs="+", metavar="MODEL", help="the reference first, then the models to compare")
    p.add_argument("--data", default=None,
                   help="text to score: a .txt file, JSONL with a 'text' field, or a wikitext-2-raw directory "
                        "(default: the shipped evaluation text)")
    p.add_argument("--tasks", nargs="*", default=None, metavar="JSONL",
                   help="multiple-choice task files (default: the shipped basic-mc); give none to skip")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per scoring window (default 1024, or the models' context if shorter)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: the context)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--fake-quant", default=None, metavar="SCHEME",
                   help="also score the reference fake-quantized with SCHEME (e.g. int4-eo8)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="float32 (default) or bfloat16")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--runtime", default="fast", choices=["fast", "reference"],
                   help="for packed files: the native kernels (default) or the reference definition")
    p.add_argument("--reference-cache", default=None, metavar="DIR",
                   help="keep the first model's pass over the text in DIR and reuse it when the same model, text "
                        "and settings come again (its model is then not run); KL is then the exact sum over the "
                        "reference's top 64 tokens plus an unbiased estimate of the rest from 16 drawn tokens")
    p.add_argument("--llama-cpp", default=None, metavar="TYPES",
                   help="also score llama.cpp's own quantizations of the reference (a float model), comma-separated "
                        "types such as Q4_0,Q4_K_M,IQ4_XS,Q8_0: made by llama.cpp's quantizer (no importance matrix) "
                        "and run by llama.cpp (needs llama-cpp-python: pip install 'pocketquant[llama-cpp]')")
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure as JSON")
    p.add_argument("--report", default=None, metavar="DIR", help="write report.md and plot.png")
    p.set_defaults(run=run)


def _cache_directory(cache: str | None, inputs: list):
    """Refuse a --reference-cache that cannot be a directory of ours, before any work; create it. Returns the
    directory if this call created it (else None)."""
    from pathlib import Path

    from pocketquant.errors import PocketQuantError

    if cache is None:
        return None
    if not cache:
        raise PocketQuantError("--reference-cache needs the name of a directory")
    path = Path(cache)
    try:
        if path.exists() and not path.is_dir():
            raise PocketQuantError(f"--reference-cache {cache}: not a directory")
        for src in inputs:
            if src and Path(src).is_dir() and Path(src).resolve() in (path.resolve(), *path.resolve().parents):
                raise PocketQuantError(f"--reference-cache {cache}: would write inside the input {src}")
        if path.is_dir():
            return None
        path.mkdir(parents=True)
    except OSError as e:
        raise PocketQuantError(f"--reference-cache {cache:.200}: cannot use it ({e.strerror or e})") from e
    return path


def run(args) -> int:
    from pathlib import Path

    from pocketquant.cli.common import set_threads
    from pocketquant.eval.report import table, write_json, write_report
    from pocketquant.eval.run import evaluate
    from pocketquant.errors import PocketQuantError
    from pocketquant.files import check_output

    inputs = [*args.models, args.data, *(args.tasks or [])]
    if args.report == "":
        raise PocketQuantError("--report needs the name of a directory to write the report in")
    outputs = [args.json] + ([Path(args.report) / "report.md", Path(args.report) / "plot.png"] if args.report else [])
    for out in outputs:  # refused now, not after the evaluation ("" is no file name either)
        if out is not None:
            check_output(out, inputs)
    set_threads(args.threads)
    made = _cache_directory(args.reference_cache, inputs)
    try:
        result = evaluate(args.models, args.data, args.tasks, args.context, args.stride, args.limit,
                          args.fake_quant, args.dtype, runtime=args.runtime, reference_cache=args.reference_cache,
                          llama_cpp=[t for t in args.llama_cpp.split(",") if t] if args.llama_cpp else None)
    finally:
        if made and not any(made.iterdir()):  # a run that failed leaves no empty cache directory behind
            made.rmdir()
    print(table(result))
    if args.json:
        write_json(result, args.json)
    if args.report:
        print(f"report: {write_report(result, args.report)}")
    return 0

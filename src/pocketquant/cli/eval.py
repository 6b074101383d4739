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
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure as JSON")
    p.add_argument("--report", default=None, metavar="DIR", help="write report.md and plot.png")
    p.set_defaults(run=run)


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
    result = evaluate(args.models, args.data, args.tasks, args.context, args.stride, args.limit,
                      args.fake_quant, args.dtype, runtime=args.runtime)
    print(table(result))
    if args.json:
        write_json(result, args.json)
    if args.report:
        print(f"report: {write_report(result, args.report)}")
    return 0

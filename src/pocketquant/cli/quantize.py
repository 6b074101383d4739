"""`pocketquant quantize MODEL [--method hadamard|spinquant|gptq|rtn] [--recipe FILE] -o OUT.safetensors`."""

from __future__ import annotations


DEFAULT_METHOD = "hadamard"


def register(p):
    from pocketquant.cli.common import schemes
    from pocketquant.scheme import SCALE_RULES

    p.add_argument("model", metavar="MODEL", help="a float model: path or known name (smollm2-135m); with --method "
                   "import, a prequantized checkpoint (Meta INT4_EO8 directory, GGUF file)")
    p.add_argument("-o", "--output", required=True, help="the packed file to write (.safetensors)")
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="run the steps of a recipe file (.json) or replay the recipe stored in a packed file; "
                        "instead of --method and --scheme")
    p.add_argument("--method", default=None, choices=["rtn", "gptq", "signround", "hadamard", "spinquant", "import"],
                   help="hadamard (default: random Hadamard rotations R1/R2 + online R4, then GPTQ with GPTAQ's pull, "
                        "--asymmetry), spinquant "
                        "(learned rotations, then --then gptq|signround|rtn), gptq (calibrated; resumes after a "
                        "kill), signround (tuned rounding per layer by signed gradient descent; resumes), rtn "
                        "(no data, seconds, least accurate), or import (keep a prequantized checkpoint's integers: "
                        "Meta's INT4_EO8 layout, or a GGUF's Q4_0/Q8_0 blocks; other GGUF types are requantized)")
    p.add_argument("--scheme", default=None, choices=schemes(), help="the quantization scheme (default int4-eo8)")
    p.add_argument("--scale-rule", default=None, choices=SCALE_RULES,
                   help="how weight scales are chosen (default: the scheme's, signed-max; search and absmax give "
                        "positive scales only, which ExecuTorch's kernels need for an exact export)")
    p.add_argument("--search-clip", action="store_true",
                   help="rtn: search a clipping ratio per group that minimizes the weight error")
    p.add_argument("--share-embedding-output", action="store_true",
                   help="for a tied model: one int8 table for embedding and output (smaller, same numbers)")
    p.add_argument("--kv-cache", default=None, choices=["float", "int8"],
                   help="KV-cache precision at run time (default: the scheme's, float); int8 is per token and head")
    b = p.add_argument_group("mixed precision")
    b.add_argument("--budget", default=None, metavar="SIZE",
                   help="spend extra bytes on the block linears whose quantization costs the most KL (measured "
                        "after the rotations): they get int8 per-channel weights. +10%% (of the file the scheme "
                        "alone makes), 1.1 (the same as a ratio) or the size of the file's tensors (110MB; the "
                        "header adds a little, mostly the tokenizer)")
    b.add_argument("--budget-samples", type=int, default=4, help="calibration blocks for the sensitivity (default 4)")
    g = p.add_argument_group("gptq and signround")
    g.add_argument("--calib-samples", type=int, default=None,
                   help="calibration blocks (default 128 for gptq, 64 for signround)")
    g.add_argument("--calib-len", type=int, default=512, help="tokens per calibration block (default 512)")
    g.add_argument("--calib-text", default=None, metavar="FILE",
                   help="calibration text (default: the shipped Python HOWTOs and FAQ)")
    g.add_argument("--damp", type=float, default=0.01, help="Hessian damping, fraction of its mean diagonal")
    g.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="quantize columns in their natural order, each group's scale from its weights as updated "
                        "(default: by decreasing Hessian diagonal, scales fixed up front)")
    g.add_argument("--asymmetry", type=float, default=None, metavar="A",
                   help="gptq: GPTAQ's pull toward the float model's outputs on its own inputs, 0 to 1 "
                        "(default 0.25; 0: plain GPTQ)")
    g.add_argument("--sr-iterations", type=int, default=100, help="signround: steps per layer (default 100)")
    g.add_argument("--sr-batch", type=int, default=1, help="signround: blocks per step (default 1)")
    g.add_argument("--sr-lr", type=float, default=0.0,
                   help="signround: step size, decayed linearly (default 0: 1 / iterations)")
    g.add_argument("--sr-min-scale", type=float, default=0.5,
                   help="signround: lowest factor a group's scale may shrink to (default 0.5; 1 keeps the scheme's)")
    g.add_argument("--seed", type=int, default=0, help="signround: seed of the order blocks are drawn in")
    s = p.add_argument_group("hadamard and spinquant")
    s.add_argument("--then", default="gptq", choices=["gptq", "signround", "rtn"], help="quantizer after the rotations")
    s.add_argument("--rotations", default=None, metavar="FILE",
                   help="reuse rotations saved by an earlier run (OUT.rotations.safetensors) instead of learning")
    s.add_argument("--spin-iterations", type=int, default=40, help="Cayley SGD steps (default 40)")
    s.add_argument("--spin-samples", type=int, default=40, help="calibration blocks for the search (default 40)")
    s.add_argument("--spin-len", type=int, default=256, help="tokens per search block (default 256)")
    s.add_argument("--spin-lr", type=float, default=1.5, help="Cayley SGD learning rate, cosine-decayed")
    s.add_argument("--spin-loss", default="ce", choices=["ce", "kl"],
                   help="search loss: next-token cross-entropy (default) or KL from the float model")
    s.add_argument("--spin-int4-weights", action="store_true",
                   help="fake-quantize the weights to int4 in the search too (default: 16-bit weights, as Meta)")
    s.add_argument("--spin-seed", type=int, default=0, help="seed of the random Hadamard start (default 0)")
    s.add_argument("--no-learn", action="store_true", help="spinquant: random Hadamard rotations only (= hadamard)")
    p.set_defaults(run=run)


def steps_from(args) -> tuple:
    """The recipe the arguments give: a --recipe file, or the one the options describe."""
    from pocketquant.errors import PocketQuantError
    from pocketquant.quant import recipe

    if args.recipe:
        if args.method or args.scheme or args.budget:
            raise PocketQuantError("--recipe already says the method, the scheme and any budget; drop --method / "
                                   "--scheme / --budget")
        return recipe.read(args.recipe)
    def samples(default: int) -> int:
        return default if args.calib_samples is None else args.calib_samples
    gptq = {"samples": samples(128), "seq_len": args.calib_len, "damp": args.damp, "act_order": args.act_order,
            "text": args.calib_text, **({} if args.asymmetry is None else {"asymmetry": args.asymmetry})}
    signround = {"samples": samples(64), "seq_len": args.calib_len, "iterations": args.sr_iterations,
                 "batch": args.sr_batch, "lr": args.sr_lr, "min_scale": args.sr_min_scale, "seed": args.seed,
                 "text": args.calib_text}
    spin = {"iterations": args.spin_iterations, "samples": args.spin_samples, "seq_len": args.spin_len,
            "lr": args.spin_lr, "learn": not args.no_learn, "loss": args.spin_loss,
            "fake_quant_weights": args.spin_int4_weights, "seed": args.spin_seed, "rotations": args.rotations,
            "text": args.calib_text}
    return recipe.from_options(args.method or DEFAULT_METHOD, args.scheme or "int4-eo8", search_clip=args.search_clip,
                               scale_rule=args.scale_rule, share_embedding_output=args.share_embedding_output,
                               kv_cache_bits={None: None, "float": None, "int8": 8}[args.kv_cache], gptq=gptq,
                               spin=spin, then=args.then, signround=signround,
                               budget=args.budget and {"budget": args.budget, "samples": args.budget_samples,
                                                       "seq_len": args.calib_len, "text": args.calib_text})


def run(args) -> int:
    from pocketquant.quant.recipe import quantize

    r = quantize(args.model, steps_from(args), args.output, inputs=[args.recipe])
    if r is None:  # a torchrun helper process: the first process writes the files
        return 0
    print(f"wrote {r.path} ({r.file_bytes:,} bytes) by {' -> '.join(s.to_dict()['method'] for s in r.recipe)}")
    for kind, names in r.report.get("requantized", {}).items():
        print(f"requantized {len(names)} {kind} tensor(s) by round-to-nearest to the scheme (their blocks are not "
              f"its numbers), e.g. {names[0]}")
    losses, heldout = r.report.get("rotation_losses"), r.report.get("rotation_heldout")
    if losses:
        n = len(losses)
        print(f"rotation search: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {n} steps "
              f"(mean of the first / last 5: {sum(losses[:5]) / min(5, n):.4f} / "
              f"{sum(losses[-5:]) / min(5, n):.4f}); rotations in {r.report['rotations']}")
    if heldout:
        print("rotation search, held-out calibration blocks: loss {:.4f} -> {:.4f}".format(*heldout))
    if r.report.get("sensitivity") is not None:
        kept = next(s.upgraded for s in r.recipe if s.to_dict()["method"] == "budget")
        print(f"budget: {len(kept)} of {len(r.report['sensitivity'])} block linears kept at int8 per channel, "
              f"e.g. {', '.join(kept[:3])}" if kept else "budget: too small for any linear at int8")
    if r.can_share and r.shared:
        print(f"embedding and output share one int8 table; separate tables would add "
              f"{r.output_table_bytes:,} bytes ({r.file_bytes + r.output_table_bytes:,} in all)")
    elif r.can_share:
        print(f"output layer has its own int8 table ({r.output_table_bytes:,} bytes); "
              f"--share-embedding-output would write {r.file_bytes - r.output_table_bytes:,} bytes")
    return 0

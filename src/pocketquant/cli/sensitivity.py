"""`pocketquant sensitivity MODEL [--png FILE] [--json FILE] [--budget SIZE]`: the KL each block linear adds when
it alone is quantized, as the default recipe sees the model (after random Hadamard rotations)."""

from __future__ import annotations

SHORT = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
         "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}


def register(p):
    from pocketquant.cli.common import schemes

    p.add_argument("model", metavar="MODEL", help="a float model: path or known name (smollm2-135m)")
    p.add_argument("--scheme", default="int4-eo8", choices=schemes(), help="the quantization scheme (default int4-eo8)")
    p.add_argument("--rotation", default="hadamard", choices=["hadamard", "none"],
                   help="measure after random Hadamard rotations, as the default recipe quantizes (default), or on "
                        "the model as it is")
    p.add_argument("--samples", type=int, default=4, help="calibration blocks (default 4)")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per block (default 512)")
    p.add_argument("--calib-text", default=None, metavar="FILE",
                   help="calibration text (default: the shipped Python HOWTOs and FAQ)")
    p.add_argument("--exact", action="store_true",
                   help="measure each linear's KL by a pass of its own instead of the second-order estimate that "
                        "`quantize --budget` uses (minutes per layer rather than seconds)")
    p.add_argument("--budget", default=None, metavar="SIZE",
                   help="also say which linears `quantize --budget SIZE` would keep at int8 (+10%%, 1.1, 110MB)")
    p.add_argument("--top", type=int, default=10, help="linears listed, most sensitive first (default 10)")
    p.add_argument("--png", default=None, metavar="FILE", help="plot the KL of every linear (layers x modules)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every linear's KL as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from pocketquant.checkpoints import load_float_model
    from pocketquant.files import check_output
    from pocketquant.progress import bar, note
    from pocketquant.quant.context import Context
    from pocketquant.quant.sensitivity import BudgetConfig, choose, estimated_kl, file_bytes, linear_kl
    from pocketquant.quant.spinquant import SpinQuantConfig
    from pocketquant.scheme import get_scheme

    scheme = get_scheme(args.scheme)
    inputs = [args.model, args.calib_text]
    outputs = {k: check_output(v, inputs, suffix=s) for k, v, s in (("png", args.png, ".png"),
                                                                     ("json", args.json, ".json")) if v}
    budget = BudgetConfig(scheme, args.budget) if args.budget else None  # a bad budget is refused before work
    note(f"loading {args.model}")
    loaded = load_float_model(args.model, torch.float32)
    model, ctx = loaded.model, Context(loaded.tokenizer, bar)
    tokens = ctx.blocks(args.calib_text, args.samples, args.calib_len, at_most=True)
    if args.rotation == "hadamard":
        model = SpinQuantConfig(scheme, learn=False).apply(model, ctx)
    kl = linear_kl(model, tokens, scheme, bar) if args.exact else estimated_kl(model, tokens, scheme, progress=bar)
    how = "measured" if args.exact else "estimated to second order"
    print(f"KL (nats per token, {how}) that each block linear adds when it alone is quantized ({scheme.name}, "
          f"{args.rotation} rotation, {tokens.numel():,} calibration tokens); all of them quantized add about "
          f"the sum, {sum(kl.values()):.4f}")
    print(family_table(kl))
    print(f"\nmost sensitive {min(args.top, len(kl))}:")
    for name in sorted(kl, key=kl.get, reverse=True)[:args.top]:
        print(f"  {name:32s} {kl[name]:.5f}")
    if budget:
        kept = choose(model, scheme, kl, budget.budget)
        base, mixed = file_bytes(model, scheme), file_bytes(model, budget.mixed(kept))
        print(f"\n--budget {budget.budget}: {len(kept)} linears at int8 per channel, {base:,} -> {mixed:,} tensor "
              f"bytes; their KL here {sum(kl[n] for n in kept):.4f} of {sum(kl.values()):.4f}")
    if "json" in outputs:
        import json

        from pocketquant.files import atomic_write

        text = json.dumps({"scheme": scheme.name, "rotation": args.rotation, "tokens": tokens.numel(), "kl": kl},
                          indent=1)
        atomic_write(outputs["json"], lambda tmp: tmp.write_text(text))
    if "png" in outputs:
        plot(kl, outputs["png"], f"{args.model}: KL added by each linear alone ({scheme.name})")
    return 0


def grid(kl: dict[str, float]) -> tuple[list[int], list[str], list[list[float]]]:
    """Layers, module columns and the KL [layer][module] (nan where a linear is not quantized)."""
    layers = sorted({int(n.split(".")[1]) for n in kl})
    columns = [s for s in SHORT if any(n.endswith(s) for n in kl)]
    return layers, columns, [[kl.get(f"layers.{i}.{s}", float("nan")) for s in columns] for i in layers]


def family_table(kl: dict[str, float]) -> str:
    layers, columns, values = grid(kl)
    rows = [f"{'module':8s} {'sum':>8s} {'max':>8s}  at layer"]
    for j, s in enumerate(columns):
        col = [(v[j], i) for i, v in zip(layers, values) if v[j] == v[j]]
        top = max(col)
        rows.append(f"{SHORT[s]:8s} {sum(v for v, _ in col):8.4f} {top[0]:8.4f}  {top[1]}")
    return "\n".join(rows)


def plot(kl: dict[str, float], path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    from pocketquant.files import atomic_write

    layers, columns, values = grid(kl)
    positive = [v for row in values for v in row if v == v and v > 0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(columns), 1.2 + 0.22 * len(layers)))
    image = ax.imshow(values, aspect="auto", cmap="viridis",
                      norm=LogNorm(min(positive), max(positive)) if positive else None)
    ax.set_xticks(range(len(columns)), [SHORT[s] for s in columns])
    ax.set_yticks(range(len(layers)), layers)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, label="KL (nats per token)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)

"""`pocketquant train MODEL --qat [--lora] [--data FILE] -o OUT.safetensors`."""

from __future__ import annotations

import argparse


# TrainConfig's defaults (a test checks they agree), so that --help needs no torch
d = argparse.Namespace(steps=120, lora_steps=30, seq_len=512, batch=1, grad_accum=2, lr=5e-5, lora_lr=1e-4, warmup=10,
                       weight_decay=0.0, distill=1.0, rank=16, lora_scale=2.0, checkpoint_every=25, seed=0)


def register(p):
    from pocketquant.cli.common import schemes

    p.add_argument("model", metavar="MODEL", help="a float model: path or known name (smollm2-135m)")
    p.add_argument("-o", "--output", required=True, help="the packed file to write (.safetensors)")
    p.add_argument("--qat", action="store_true", help="train the whole model with the quantization in the loop")
    p.add_argument("--lora", action="store_true",
                   help="then (or, without --qat, only) train LoRA adapters on the frozen fake-quantized model")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="plain text, or chat .jsonl ({\"messages\": [...]} per line; loss on the assistant's "
                        "tokens) (default: the shipped calibration text)")
    p.add_argument("--scheme", default="int4-eo8", choices=schemes(), help="the quantization scheme (default int4-eo8)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"QAT optimizer steps (default {d.steps})")
    p.add_argument("--lora-steps", type=int, default=d.lora_steps,
                   help=f"LoRA optimizer steps (default {d.lora_steps})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"sequences per forward (default {d.batch})")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help=f"forwards per optimizer step and process (default {d.grad_accum})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"QAT peak learning rate (default {d.lr})")
    p.add_argument("--lora-lr", type=float, default=d.lora_lr, help=f"LoRA peak learning rate (default {d.lora_lr})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"warmup steps per phase (default {d.warmup})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)")
    p.add_argument("--distill", type=float, default=d.distill,
                   help="weight of the KL loss against the float model; the rest is cross-entropy "
                        f"(default {d.distill}: pure distillation; 0: cross-entropy only, no teacher)")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    p.add_argument("--lora-scale", type=float, default=d.lora_scale, help=f"LoRA scale (default {d.lora_scale})")
    p.add_argument("--targets", default="*", help="comma-separated block linears that get adapters, fnmatch "
                   "patterns such as q_proj,v_proj or mlp.* (default: all)")
    p.add_argument("--merge-lora", action="store_true",
                   help="fold the adapters into the weights and quantize them (default: keep them in 16-bit)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute layers in backward (less memory)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"steps between saved states in OUT.train-state/ (default {d.checkpoint_every})")
    p.add_argument("--rotations", default="hadamard", metavar="hadamard|none|FILE",
                   help="rotate the model before training, as SpinQuant does: random Hadamard R1/R2 + online R4 "
                        "(hadamard, the default), the rotations file of a `quantize --method spinquant` run, "
                        "or none")
    p.add_argument("--init", default="gptq", choices=["gptq", "float"],
                   help="start the weights from GPTQ's quantized ones (default) or from the float model's")
    p.add_argument("--gptq-samples", type=int, default=128,
                   help="training sequences GPTQ calibrates on (default 128)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(run=run)


def steps_from(args) -> tuple:
    """The recipe of a training run: rotate (unless --rotations none), GPTQ (unless --init float), train."""
    from pocketquant.errors import PocketQuantError
    from pocketquant.quant.gptq import GPTQConfig
    from pocketquant.quant.spinquant import SpinQuantConfig
    from pocketquant.quant.train import TrainConfig
    from pocketquant.scheme import get_scheme

    if not (args.qat or args.lora):
        raise PocketQuantError("say what to train: --qat, --lora, or both")
    scheme = get_scheme(args.scheme)
    train = TrainConfig(
        scheme=scheme, qat=args.qat, lora=args.lora, steps=args.steps, lora_steps=args.lora_steps,
        seq_len=args.seq_len, batch=args.batch, grad_accum=args.grad_accum, lr=args.lr, lora_lr=args.lora_lr,
        warmup=args.warmup, weight_decay=args.weight_decay, distill=args.distill, rank=args.rank,
        lora_scale=args.lora_scale, targets=tuple(t for t in args.targets.split(",") if t),
        merge_lora=args.merge_lora, grad_checkpointing=args.grad_checkpointing,
        checkpoint_every=args.checkpoint_every, seed=args.seed, data=args.data)
    steps = []
    if args.rotations != "none":
        rotations = None if args.rotations == "hadamard" else args.rotations
        steps.append(SpinQuantConfig(scheme, learn=False, seed=args.seed, rotations=rotations))
    if args.init == "gptq":
        if args.gptq_samples < 1:
            raise PocketQuantError(f"gptq_samples must be at least 1, got {args.gptq_samples}")
        steps.append(GPTQConfig(scheme, args.gptq_samples, args.seq_len, text=args.data))
    return (*steps, train)


def run(args) -> int:
    from pocketquant.quant.recipe import quantize

    r = quantize(args.model, steps_from(args), args.output)
    if r is None:  # a torchrun helper process: the first process writes the file
        return 0
    losses = r.report["losses"]
    n = len(losses)
    print(f"wrote {r.path} ({r.file_bytes:,} bytes)")
    print(f"trained {n} steps on {r.report['tokens']:,} tokens ({r.report['examples']} sequences available); loss "
          f"{losses[0]:.4f} -> {losses[-1]:.4f} (mean of the first / last 10: "
          f"{sum(losses[:10]) / min(10, n):.4f} / {sum(losses[-10:]) / min(10, n):.4f})")
    return 0

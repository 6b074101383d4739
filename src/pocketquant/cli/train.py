"""`pocketquant train MODEL --qat [--lora] [--data FILE] -o OUT.safetensors`."""

from __future__ import annotations


def register(p):
    from pocketquant.quant.train import TrainConfig

    d = TrainConfig()
    p.add_argument("model", metavar="MODEL", help="a float model: path or known name (smollm2-135m)")
    p.add_argument("-o", "--output", required=True, help="the packed file to write (.safetensors)")
    p.add_argument("--qat", action="store_true", help="train the whole model with the quantization in the loop")
    p.add_argument("--lora", action="store_true",
                   help="then (or, without --qat, only) train LoRA adapters on the frozen fake-quantized model")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="plain text, or chat .jsonl ({\"messages\": [...]} per line; loss on the assistant's "
                        "tokens) (default: the shipped calibration text)")
    p.add_argument("--scheme", default="int4-eo8", help="int4-eo8 (default), int4-eo8-g128, int8, w4-g32")
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
    p.add_argument("--rotations", default=d.rotations, metavar="hadamard|none|FILE",
                   help="rotate the model before training, as SpinQuant does: random Hadamard R1/R2 + online R4 "
                        "(hadamard, the default), the rotations file of a `quantize --method spinquant` run, "
                        "or none")
    p.add_argument("--init", default=d.init, choices=["gptq", "float"],
                   help="start the weights from GPTQ's quantized ones (default) or from the float model's")
    p.add_argument("--gptq-samples", type=int, default=d.gptq_samples,
                   help=f"training sequences GPTQ calibrates on (default {d.gptq_samples})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(run=run)


def run(args) -> int:
    from pocketquant.errors import PocketQuantError
    from pocketquant.quant.train import TrainConfig, train_model
    from pocketquant.scheme import get_scheme

    if not (args.qat or args.lora):
        raise PocketQuantError("say what to train: --qat, --lora, or both")
    config = TrainConfig(
        scheme=get_scheme(args.scheme), qat=args.qat, lora=args.lora, steps=args.steps, lora_steps=args.lora_steps,
        seq_len=args.seq_len, batch=args.batch, grad_accum=args.grad_accum, lr=args.lr, lora_lr=args.lora_lr,
        warmup=args.warmup, weight_decay=args.weight_decay, distill=args.distill, rank=args.rank,
        lora_scale=args.lora_scale, targets=tuple(t for t in args.targets.split(",") if t),
        grad_checkpointing=args.grad_checkpointing, checkpoint_every=args.checkpoint_every, seed=args.seed,
        rotations=None if args.rotations == "none" else args.rotations, init=args.init,
        gptq_samples=args.gptq_samples)
    r = train_model(args.model, args.output, config, args.data, args.merge_lora)
    if r is None:  # a torchrun helper process: the first process writes the file
        return 0
    n = len(r.losses)
    print(f"wrote {r.path} ({r.file_bytes:,} bytes)")
    print(f"trained {n} steps on {r.tokens:,} tokens ({r.examples} sequences available); loss "
          f"{r.losses[0]:.4f} -> {r.losses[-1]:.4f} (mean of the first / last 10: "
          f"{sum(r.losses[:10]) / min(10, n):.4f} / {sum(r.losses[-10:]) / min(10, n):.4f})")
    return 0

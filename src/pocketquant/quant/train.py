"""Quantization-aware training (QAT) and LoRA adapters on the fake-quantized model (`pocketquant train`).

Two phases, as in Meta's recipe: "qat" trains every weight of the fake-quantized model (int4/int8
numerics of the scheme in the forward, straight-through gradients); "lora" freezes that backbone and
trains low-rank adapters beside the block linears. Either may run alone. The loss mixes the KL
divergence from the float model's next-token distribution (`distill`; the teacher is the original float
model) with the next-token cross-entropy on the target tokens. AdamW, linear warmup then cosine decay
per phase, gradient accumulation, gradient clipping at 1, optional gradient checkpointing. Each phase reads
sequences the earlier one did not. In a recipe (quant/recipe.py) the step starts from whatever the steps
before it made: `pocketquant train` first rotates the float model as SpinQuant does (random Hadamard R1/R2,
online R4) and runs GPTQ, so training starts from its dequantized weights.

Every `checkpoint_every` steps the whole state (weights, adapters, optimizer, loss curve) is committed to
STATE_DIR (a `files.StateDir`), from which the same run resumes. The examples of a step are fixed by the step number,
so a resumed run computes what an uninterrupted one would. Under torchrun, DDP averages the gradients and
each process reads its own examples."""

from __future__ import annotations

import hashlib
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from pocketquant.errors import PocketQuantError
from pocketquant.files import StateDir, tensors_digest
from pocketquant.model import Transformer
from pocketquant.quant import qat
from pocketquant.quant.context import (MAX_SEQ_LEN, MAX_STEPS, config_dict, config_from_dict, distillation_kl,
                                       in_range)
from pocketquant.quant.distributed import world_and_rank
from pocketquant.quant.lora import add_lora, lora_parameters
from pocketquant.scheme import PRESETS, QuantScheme


@dataclass(frozen=True)
class TrainConfig:
    scheme: QuantScheme = field(default_factory=lambda: PRESETS["int4-eo8"])
    qat: bool = True  # phase 1: train the whole fake-quantized model
    lora: bool = False  # phase 2: adapters on the frozen fake-quantized model
    steps: int = 120  # optimizer steps of the QAT phase
    lora_steps: int = 30  # optimizer steps of the LoRA phase
    seq_len: int = 512
    batch: int = 1  # sequences per forward
    grad_accum: int = 2  # forwards per optimizer step (per process)
    lr: float = 5e-5
    lora_lr: float = 1e-4
    warmup: int = 10  # steps of linear warmup, per phase
    weight_decay: float = 0.0
    distill: float = 1.0  # loss = distill * KL(float || quantized) + (1 - distill) * cross-entropy
    rank: int = 16
    lora_scale: float = 2.0
    targets: tuple[str, ...] = ("*",)  # block linears that get adapters
    merge_lora: bool = False  # fold the adapters into the weights before they are quantized
    grad_checkpointing: bool = False
    checkpoint_every: int = 25
    seed: int = 0
    data: str | None = None  # plain text or chat .jsonl (data.training_examples); None: the shipped text
    VERSION: ClassVar[int] = 1

    def __post_init__(self):
        if not (self.qat or self.lora):
            raise PocketQuantError("nothing to train: choose QAT, LoRA or both")
        if self.merge_lora and not self.lora:
            raise PocketQuantError("merging LoRA adapters needs LoRA training")
        if not 0.0 <= self.distill <= 1.0:
            raise PocketQuantError(f"distill is a weight in [0, 1], got {self.distill}")
        for name in ("steps", "lora_steps", "seq_len", "batch", "grad_accum", "checkpoint_every", "rank"):
            if getattr(self, name) < 1:
                raise PocketQuantError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "lora_lr", "lora_scale", "weight_decay"):
            if not 0 <= getattr(self, name) < math.inf:  # also refuses NaN
                raise PocketQuantError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.warmup < 0 or not 0 <= self.seed < 2 ** 63:
            raise PocketQuantError(f"warmup must be >= 0 and seed in [0, 2**63), got {self.warmup} and {self.seed}")
        in_range("training", steps=(self.steps, 1, MAX_STEPS), lora_steps=(self.lora_steps, 1, MAX_STEPS),
                 seq_len=(self.seq_len, 2, MAX_SEQ_LEN), batch=(self.batch, 1, 1024),
                 grad_accum=(self.grad_accum, 1, 1024), rank=(self.rank, 1, 4096),
                 warmup=(self.warmup, 0, MAX_STEPS), checkpoint_every=(self.checkpoint_every, 1, MAX_STEPS))

    @property
    def method(self) -> str:
        return "qat+lora" if self.qat and self.lora else "qat" if self.qat else "lora"

    def phases(self) -> list[tuple[str, int, float]]:
        """(name, steps, peak learning rate) of each phase, in order."""
        return [p for p, on in ((("qat", self.steps, self.lr), self.qat),
                                (("lora", self.lora_steps, self.lora_lr), self.lora)) if on]

    def to_dict(self) -> dict:
        return config_dict(self, self.method)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return config_from_dict(cls, d, str(d.get("method")) if isinstance(d, dict) else "qat")

    def check(self, model: Transformer, ctx):
        from pocketquant.checkpoints import check_length

        check_length(model.config, self.seq_len, "--seq-len")
        ctx.examples(self.data, self.seq_len)

    def apply(self, model: Transformer, ctx) -> Transformer:
        """Train the model (a quantized one starts from its dequantized weights) with its state checkpointed
        in OUT.train-state/, then quantize it (adapters kept beside their linears, or merged first)."""
        from pocketquant.quant.lora import merge_lora

        ids, mask = ctx.examples(self.data, self.seq_len)
        state_dir = ctx.beside_out(".train-state", every_rank=True)
        qat.dequantize(model)
        try:
            model, losses = train(model, ctx.teacher, self, ids, mask, state_dir, ctx.progress)
        except PocketQuantError:
            if state_dir and not ctx.rank:  # a refused run leaves nothing behind
                training_state(state_dir).remove(only_if_uncommitted=True)
            raise
        if self.merge_lora:
            merge_lora(model)
        qat.convert(model, self.scheme)
        world = world_and_rank()[0]
        ctx.report.update(losses=losses, examples=len(ids),
                          tokens=len(losses) * self.batch * self.grad_accum * world * self.seq_len)
        return model


def learning_rate(peak: float, step: int, steps: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to zero at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def loss_of(model, teacher, ids: torch.Tensor, mask: torch.Tensor, distill: float) -> torch.Tensor:
    """The training loss of one batch: targets are ids[:, 1:] where mask[:, 1:]."""
    logits = model(ids[:, :-1])
    m = mask[:, 1:]
    if not m.any():
        return logits.sum() * 0.0
    student = logits[m].float()
    loss = 0.0
    if distill < 1:
        loss = (1 - distill) * F.cross_entropy(student, ids[:, 1:][m])
    if distill > 0:
        with torch.no_grad():
            target = teacher(ids[:, :-1])[m]
        loss = loss + distill * distillation_kl(student, target)
    return loss


def train(model: Transformer, teacher: Transformer | None, config: TrainConfig, ids: torch.Tensor,
          mask: torch.Tensor, state_dir: str | Path | None = None, progress=None, source_id: str | None = None
          ) -> tuple[Transformer, list[float]]:
    """Fake-quantize `model` (float) and train it as `config` says; returns it (still fake-quantized,
    with its adapters; `qat.convert` packs it) and the loss of every optimizer step, phase after phase.
    With `state_dir` the state is committed there every `checkpoint_every` steps, and a run with the same
    settings, data and `source_id` (what identifies the starting weights; default: the digest of `model`'s)
    resumes from it."""
    if config.distill > 0 and teacher is None:
        raise PocketQuantError("distillation needs the float model as teacher")
    world, rank = world_and_rank()
    dev = model.device
    qat.prepare(model, config.scheme)
    if config.lora:
        add_lora(model, config.rank, config.lora_scale, config.targets, seed=config.seed)
    model.gradient_checkpointing = config.grad_checkpointing
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    if state_dir and source_id is None:
        source_id = tensors_digest(model.state_dict())
    saved = _state_dir(state_dir, config, _data_id(ids, mask), source_id) if state_dir else None
    state = _load_state(saved, rank)
    if state:
        model.load_state_dict(state["model"])
    losses = state["losses"] if state else []
    per_step = config.batch * config.grad_accum * world
    adapters = set(lora_parameters(model))
    seen = 0  # sequences read by the earlier phases: each phase starts on the next unseen ones
    for index, (phase, steps, peak) in enumerate(config.phases()):
        offset, seen = seen, seen + steps * per_step
        if state and (state["phase"], state["step"]) >= (index, steps):
            continue  # finished before the interruption
        for p in model.parameters():
            p.requires_grad_((p in adapters) == (phase == "lora"))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=peak, betas=(0.9, 0.95), weight_decay=config.weight_decay)
        start = 0
        if state and state["phase"] == index:
            optimizer.load_state_dict(state["optimizer"])
            start = state["step"]
            if progress and rank == 0:
                from pocketquant.progress import note

                note(f"{phase}: resuming from {state_dir}: {start} of {steps} steps were done by an earlier run")
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        model.train()
        steps_iter = range(start, steps)
        if progress and rank == 0:
            steps_iter = progress(steps_iter, desc=phase, unit="step", initial=start, total=steps)
        for step in steps_iter:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(peak, step, steps, config.warmup)
            total = 0.0
            for micro in range(config.grad_accum):
                first = (offset + ((step * config.grad_accum + micro) * world + rank) * config.batch) % len(ids)
                rows = torch.arange(first, first + config.batch) % len(ids)
                loss = loss_of(net, teacher, ids[rows].to(dev), mask[rows].to(dev), config.distill)
                (loss / config.grad_accum).backward()
                total += loss.item() / config.grad_accum
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            if hasattr(steps_iter, "set_postfix"):
                steps_iter.set_postfix(loss=f"{total:.4f}", tokens=f"{(step + 1) * per_step * config.seq_len:,}")
            if saved and rank == 0 and ((step + 1) % config.checkpoint_every == 0 or step + 1 == steps):
                _save_state(saved, index, step + 1, model, optimizer, losses)
        model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing = False
    return model, losses


def training_state(state_dir: str | Path) -> StateDir:
    """The checkpoint directory `train` keeps (whatever its key), to `.remove()` once the result is saved."""
    return StateDir(state_dir, "training", {})


def _data_id(ids: torch.Tensor, mask: torch.Tensor) -> str:
    """What identifies the training examples in a state's key."""
    return hashlib.sha256(ids.numpy().tobytes() + mask.numpy().tobytes()).hexdigest()[:16]


def _state_dir(path: str | Path, config: TrainConfig, data_id: str, source_id: str) -> StateDir:
    return StateDir(path, "training", {**config.to_dict(), "data": data_id, "source": source_id})


def _save_state(saved: StateDir, phase: int, step: int, model, optimizer, losses):
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "losses": list(losses)}
    name = f"state-{phase}-{step}.pt"
    saved.commit({"phase": phase, "step": step}, {name: lambda tmp: torch.save(state, tmp)}, drop=list(saved.files))


def _load_state(saved: StateDir | None, rank: int) -> dict | None:
    """The last committed training state (None when there is none); only the first process writes."""
    info = (saved.open() if rank == 0 else saved.read()) if saved else None
    if not info:
        return None
    try:
        (name,) = saved.files  # the one file of the last committed step
        state = torch.load(saved.file(name), map_location="cpu", weights_only=True)
        return {**state, "phase": int(info["phase"]), "step": int(info["step"])}
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, KeyError, TypeError, ValueError) as e:
        # ValueError: also a manifest naming other than one file
        raise PocketQuantError(f"{saved.path}: damaged training state ({e!r}); delete it to start over") from e

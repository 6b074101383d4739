"""Export a packed model to an ExecuTorch program (.pte, XNNPACK, 8da4w groups of 32 with an int8 output layer
and embedding), the way Meta's own INT4_EO8 checkpoints reach phones: the model is written in Meta's layout
(export.meta) and lowered by ExecuTorch's `export_llama` with its pre-quantized flags. Needs the optional
`executorch` (1.5) and `torchao` (0.18) packages: `pip install 'pocketquant[executorch]'`."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from pocketquant.errors import PocketQuantError
from pocketquant.export.meta import export_meta

LOWERING = "executorch.examples.models.llama.export_llama"


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("executorch", "torchao"))


def export_flags(model, context: int) -> list[str]:
    """`export_llama`'s flags for this model: Meta's pre-quantized 8da4w layout, R4 for a rotated model,
    LoRA adaptors, a float32 program with a KV cache of `context` positions."""
    c = model.config
    adapters = [m.lora for m in model.modules() if getattr(m, "lora", None) is not None]
    specs = [m.spec.weight.group_for(m.in_features) for m in model.layers[0].modules() if hasattr(m, "spec")]
    group = specs[0] if specs else 0
    if group not in (32, 64, 128, 256):
        raise PocketQuantError(f"ExecuTorch's pre-quantized linears take groups of 32, 64, 128 or 256, not {group}")
    if context < 16:
        raise PocketQuantError(f"the program's context must be at least 16 positions, got {context}")
    if adapters and {(a.rank, a.scale, a.dtype) for a in adapters} != {(adapters[0].rank, 2.0, torch.bfloat16)}:
        raise PocketQuantError("ExecuTorch's adaptors are bf16 with one rank and scale 2.0; this model's are "
                               f"{sorted({(a.rank, a.scale, str(a.dtype)) for a in adapters})}")
    flags = ["-kv", "--use_sdpa_with_kv_cache", "-X", "-d", "fp32", "--preq_mode", "8da4w_output_8da8w",
             "--preq_group_size", str(group), "--preq_embedding_quantize", "8,0",
             "--max_seq_length", str(context), "--max_context_length", str(context)]
    if c.hadamard_down:
        n = c.ffn_dim
        if adapters:
            raise PocketQuantError("ExecuTorch loads LoRA adaptors only into models without online rotations")
        if n & (n - 1):  # other widths: ExecuTorch's Hadamard matrix is not ours
            raise PocketQuantError(f"ExecuTorch's online Hadamard (R4) equals ours for power-of-two widths only, not "
                                   f"the FFN width {n}")
        return flags + ["--use_spin_quant", "native"]
    flags.append("--use_qat")  # ExecuTorch's switch for a pre-quantized checkpoint without rotations
    return flags + (["--use_lora", str(adapters[0].rank)] if adapters else [])


def export_executorch(model, out: str | Path, context: int = 2048):
    """Lower the quantized `model` to the ExecuTorch program `out` (written atomically) -> (out, (groups
    changed to make scales positive, groups), the model as exported: read back from the Meta layout that was
    lowered, which differs from `model` only in those groups; see `export.meta.positive_scales`)."""
    from pocketquant.checkpoints.meta_int4 import load_meta_quantized

    if not available():
        raise PocketQuantError("ExecuTorch export needs the executorch and torchao packages: "
                               "pip install 'pocketquant[executorch]'")
    from pocketquant.files import PARTIAL, remove_stale_partials

    out = Path(out).resolve()  # export_llama runs in the temporary directory
    context = min(context, model.config.max_seq_len)
    flags = export_flags(model, context)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out.parent, [out.name])  # what a killed export left
    with tempfile.TemporaryDirectory(prefix=f".{out.name}{PARTIAL}{os.getpid()}-", dir=out.parent) as tmp:
        folder, requantized = export_meta(model, None, Path(tmp) / "meta")
        program = Path(tmp) / "model.pte"
        command = [sys.executable, "-m", LOWERING, "--checkpoint", str(folder / "consolidated.00.pth"),
                   "--params", str(folder / "params.json"), *flags, "--output_name", str(program)]
        log = Path(tmp) / "export.log"
        with open(log, "w") as f:
            done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=tmp)
        if done.returncode or not program.exists():
            tail = [line for line in log.read_text(errors="replace").splitlines() if "Warning" not in line][-15:]
            raise PocketQuantError("ExecuTorch's export_llama failed:\n  " + "\n  ".join(tail))
        exported = load_meta_quantized(folder)[0]
        os.replace(program, out)
    return out, requantized, exported


def _forward(path: str | Path):
    """The `forward` method of an exported program, with the operators it calls registered."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers SDPA and Hadamard operators)
    import executorch.kernels.quantized  # noqa: F401  (registers the quantized embedding operators)
    from executorch.runtime import Runtime

    return Runtime.get().load_program(str(path)).load_method("forward")


def pte_logits(path: str | Path, tokens: list[int]) -> torch.Tensor:
    """Logits [T, V] of an exported program for `tokens`, fed one at a time through its KV cache."""
    method = _forward(path)
    rows = [method.execute([torch.tensor([[t]]), torch.tensor([i])])[0].reshape(-1) for i, t in enumerate(tokens)]
    return torch.stack(rows)


def pte_greedy(path: str | Path, prompt: list[int], max_tokens: int, stop_ids=frozenset()) -> list[int]:
    """The tokens an exported program writes after `prompt`, greedily (its KV cache, one token at a time)."""
    method = _forward(path)
    out, logits = [], None
    for i, t in enumerate(prompt):
        logits = method.execute([torch.tensor([[t]]), torch.tensor([i])])[0]
    while len(out) < max_tokens:
        out.append(int(logits.reshape(-1).argmax()))
        if out[-1] in stop_ids:
            break
        logits = method.execute([torch.tensor([[out[-1]]]), torch.tensor([len(prompt) + len(out) - 1])])[0]
    return out

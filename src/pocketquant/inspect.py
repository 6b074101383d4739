"""`inspect`: what a packed file holds, and where its bytes go."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pocketquant.checkpoints.packed import read_header
from pocketquant.layers import family_of

FAMILIES = ("embedding", "attention", "mlp", "output", "norms")
BYTES = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8}


@dataclass
class FamilySize:
    bytes: int = 0
    weights: int = 0  # logical weights (an int4 byte holds two)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.weights if self.weights else 0.0


def tensor_table(path: Path) -> list[tuple[str, str, list[int]]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return [(k, f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()]


def sizes(path: Path, int4_names: set[str]) -> dict[str, FamilySize]:
    out = {f: FamilySize() for f in FAMILIES}
    for name, dtype, shape in tensor_table(path):
        n = 1
        for d in shape:
            n *= d
        fam = out[family_of(name)]
        fam.bytes += n * BYTES[dtype]
        if name.endswith((".qweight", ".weight")):
            fam.weights += 2 * n if name in int4_names else n
    return out


def kernel_paths(h) -> dict[str, str]:
    """What the fast runtime runs each module family of a packed file's model on (no weights read)."""
    import torch

    from pocketquant.layers import quantized_skeleton
    from pocketquant.model import Transformer
    from pocketquant.runtime.engine import kernel_paths as paths_of

    with torch.device("meta"):
        return paths_of(quantized_skeleton(Transformer(h.config), h.scheme))


def report(path: Path, tensors: bool = False) -> str:
    """A human-readable description of a packed file: what it is, where its bytes go, what runs it; with
    `tensors`, every tensor's dtype and shape too."""
    from pocketquant.runtime.engine import paths_lines

    h = read_header(path)
    table = tensor_table(path)
    int4 = {n for n, dtype, _ in table if n.endswith(".qweight") and dtype == "U8"}
    fam = sizes(path, int4)
    c = h.config
    shape = (f"{c.n_layers} layers, dim {c.dim}, {c.n_heads} heads ({c.n_kv_heads} KV), ffn {c.ffn_dim}, "
             f"vocabulary {c.vocab_size:,}, context {c.max_seq_len:,}"
             + ", tied" * c.tie_embeddings + ", R4" * c.hadamard_down + ", R3" * c.hadamard_qk)
    lines = [f"{path}  (pocketquant packed format {h.version}, {path.stat().st_size:,} bytes)", "",
             f"model: {c.name or 'unnamed'}: {shape}", "config: " + json.dumps(c.to_dict()),
             "scheme: " + _scheme(h.scheme), *_overrides(h.scheme),
             "recipe: " + " -> ".join(_step(s) for s in h.recipe),
             "tokenizer: " + (h.tokenizer["kind"] if h.tokenizer else "none"), "",
             f"{'family':<10} {'bytes':>14} {'weights':>14} {'bits/weight':>12}"]
    total = FamilySize()
    for name in FAMILIES:
        f = fam[name]
        total.bytes, total.weights = total.bytes + f.bytes, total.weights + f.weights
        note = "  (shares the embedding table)" if name == "output" and h.scheme.share_embedding_output else ""
        if name == "output" and not f.bytes and h.config.tie_embeddings and not note:
            note = "  (tied to the embedding)"
        lines.append(f"{name:<10} {f.bytes:>14,} {f.weights:>14,} {f.bits_per_weight:>12.3f}{note}")
    lines.append(f"{'total':<10} {total.bytes:>14,} {total.weights:>14,} {total.bits_per_weight:>12.3f}")
    lines += ["", "on this CPU's fast runtime:"] + paths_lines(kernel_paths(h))
    if not tensors:
        return "\n".join(lines + ["", f"{len(table)} tensors (--tensors lists them)"])
    lines += ["", f"{'tensor':<44} {'dtype':<5} shape"]
    lines += [f"{n:<44} {d:<5} {list(s)}" for n, d, s in table]
    return "\n".join(lines)


def _scheme(scheme) -> str:
    """The scheme as JSON, its overrides as a count (listed by `_overrides`)."""
    d = scheme.to_dict()
    n = len(d.pop("overrides"))
    return json.dumps(d, sort_keys=True) + (f" + {n} override{'s' * (n > 1)} (below)" if n else "")


def _overrides(scheme) -> list[str]:
    """One line per distinct spec the overrides give: how many patterns, by the module they name."""
    by_spec = {}
    for pattern, spec in scheme.overrides:
        w = spec and spec.weight
        what = "float" if spec is None else (f"w{w.bits} " + (f"g{w.group_size}" if w.group_size else "per channel")
                                             + (f" a{spec.act.bits}" if spec.act else " float activations"))
        by_spec.setdefault(what, []).append(pattern.rsplit(".", 1)[-1])
    return [f"  {what}: {len(names)} ({', '.join(f'{m} {names.count(m)}' for m in dict.fromkeys(names))})"
            for what, names in by_spec.items()]


def _step(step: dict) -> str:
    """A recipe step without the scheme (the header shows it once): `gptq {"samples": 128, ...}`; a budget's
    chosen linears as a count."""
    options = {k: v for k, v in step.items() if k not in ("method", "version", "scheme")}
    if isinstance(options.get("upgraded"), list):
        options["upgraded"] = f"{len(options['upgraded'])} linears (the scheme's overrides)"
    return f"{step.get('method')} {json.dumps(options)}" if options else str(step.get("method"))


def verify(path: Path) -> str:
    """Check a packed file's header and every tensor against their checksums -> a line saying so."""
    from pocketquant.checkpoints import integrity
    from pocketquant.errors import PocketQuantError

    h = read_header(path)  # verifies the header's digest
    if not h.checksummed:
        raise PocketQuantError(f"{path}: format {h.version} files have no checksums to verify; quantize again "
                               "(or replay its recipe with --recipe) to write one that has")
    n = integrity.verify_tensors(path)
    return f"verified: the header (SHA-256) and all {n} tensors (CRC-32) match their checksums"

"""The packed model file: one safetensors file holding integer weights, scales, float norms and a
self-describing header (format + version, model config, scheme, recipe, tokenizer), with checksums of the
header and of every tensor (integrity.py). No pickle."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pocketquant.checkpoints import integrity
from pocketquant.config import ModelConfig
from pocketquant.errors import PocketQuantError
from pocketquant.files import atomic_write
from pocketquant.scheme import QuantScheme

FORMAT_NAME = "pocketquant.packed"
FORMAT_VERSION = "1.1"  # major.minor: a reader refuses another major version; 1.1 added the checksums


@dataclass
class PackedHeader:
    config: ModelConfig
    scheme: QuantScheme
    recipe: list[dict]
    tokenizer: dict | None
    version: str
    lora: dict | None = None  # {"rank", "scale", "dtype"} of the LoRA adapters the file holds
    checksummed: bool = False  # the file carries checksums (format 1.1 on); the header's were verified


def is_packed(path: Path, if_unreadable: bool = True) -> bool:
    """Whether `path` is a packed file; `if_unreadable` is the answer for an unreadable .safetensors file."""
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    try:
        return _raw_metadata(path).get("format") == FORMAT_NAME
    except PocketQuantError:
        return if_unreadable


def _raw_metadata(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise PocketQuantError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def read_header(path: Path) -> PackedHeader:
    """The header of a packed file, its checksum verified (files of format 1.0 have none) and its parts checked
    against each other."""
    meta = _raw_metadata(path)
    if meta.get("format") != FORMAT_NAME:
        raise PocketQuantError(f"{path}: not a pocketquant packed file (format {meta.get('format')!r})")
    version = meta.get("format_version", "")
    major = version.split(".")[0]
    if major != FORMAT_VERSION.split(".")[0]:
        raise PocketQuantError(f"{path}: packed format version {version!r} is not supported; this "
                               f"pocketquant reads version {FORMAT_VERSION.split('.')[0]}.x (upgrade pocketquant)")
    if has_checksums(meta):
        integrity.verify_header(path)
    try:
        header = PackedHeader(ModelConfig.from_json(meta["config"]), QuantScheme.from_json(meta["scheme"]),
                              json.loads(meta["recipe"]),
                              json.loads(meta["tokenizer"]) if meta.get("tokenizer") else None, version,
                              json.loads(meta["lora"]) if meta.get("lora") else None, has_checksums(meta))
        lora = header.lora
        if lora is not None and not (isinstance(lora.get("rank"), int) and 0 < lora["rank"] <= 4096
                                     and isinstance(lora.get("scale"), (int, float))
                                     and lora.get("dtype") in ("bfloat16", "float16", "float32")):
            raise ValueError(f"lora {lora}")
        _check_consistent(header)
        return header
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise PocketQuantError(f"{path}: damaged packed header ({type(e).__name__}: {str(e)[:200]})") from e
    except PocketQuantError as e:
        raise PocketQuantError(f"{path}: {e}") from e


def has_checksums(meta: dict) -> bool:
    """Whether a packed file's metadata says it has checksums: format 1.1 and later (or the digest is there,
    whatever the version says: one flipped bit turns "1.1" into "1.0")."""
    version = meta.get("format_version", "")
    return integrity.HEADER_KEY in meta or version.split(".")[-1] not in ("", "0")


def _check_consistent(h: PackedHeader):
    """Refuse a header whose parts contradict each other: the scheme its recipe used, and the online rotations
    only a rotation step (or an imported checkpoint) can have made."""
    if not isinstance(h.recipe, list) or not all(isinstance(step, dict) for step in h.recipe):
        raise ValueError("the recipe is not a list of steps")
    c, methods = h.config, [step.get("method") for step in h.recipe]
    upgraded = next((step.get("upgraded") for step in h.recipe if step.get("method") == "budget"), None) or []
    base = h.scheme  # the scheme the recipe names; a budget step put its chosen linears first in the overrides
    if isinstance(upgraded, list) and [p for p, _ in h.scheme.overrides[:len(upgraded)]] == upgraded:
        base = h.scheme.replace(overrides=h.scheme.overrides[len(upgraded):])
    for step in h.recipe:
        if "scheme" in step and QuantScheme.from_dict(step["scheme"]) != base:
            raise ValueError(f"the scheme {h.scheme.name!r} is not the one its recipe's {step.get('method')} step "
                             "used")
    if c.hadamard_qk != (c.hadamard_down and h.scheme.kv_cache_bits == 8):
        raise ValueError(f"hadamard_qk={c.hadamard_qk} contradicts hadamard_down={c.hadamard_down} with "
                         f"{'an int8' if h.scheme.kv_cache_bits else 'a float'} KV cache")
    if c.hadamard_down != ("spinquant" in methods) and "import" not in methods:
        raise ValueError(f"hadamard_down={c.hadamard_down} contradicts the recipe ({' -> '.join(map(str, methods))})")


def packed_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors a packed file stores: the state dict less what a tied output layer shares."""
    from pocketquant.checkpoints.common import tied_output_names

    state = model.state_dict()
    for name in tied_output_names(model):
        state.pop(name)
    return {k: v.contiguous() for k, v in state.items()}


def save_packed(path: Path, model, scheme: QuantScheme, recipe: list[dict], tokenizer=None) -> Path:
    """Write the packed file atomically: a temporary file beside `path`, then a rename."""
    path = Path(path)
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": model.config.to_json(),
                "scheme": scheme.to_json(), "recipe": json.dumps(recipe),
                "tokenizer": json.dumps(tokenizer.to_spec()) if tokenizer is not None else ""}
    adapters = [m.lora for m in model.modules() if getattr(m, "lora", None) is not None]
    if adapters:
        a = adapters[0]
        metadata["lora"] = json.dumps({"rank": a.rank, "scale": a.scale, "dtype": str(a.dtype).split(".")[1]})
    tensors = packed_tensors(model)
    if adapters:  # stored in the adapters' own precision, which their forward rounds to anyway
        tensors = {k: v.to(adapters[0].dtype) if ".lora." in k else v for k, v in tensors.items()}
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, metadata))
    return path


_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float32: "F32", torch.int32: "I32", torch.int64: "I64"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """Stream tensors into a safetensors file at `path`, sealed with checksums (integrity.seal). We write it
    ourselves so that no temporary file other than our own exists: the library's writer keeps one of its own."""
    table, crcs, offset = {}, {}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        table[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        crcs[name] = integrity.crc32_hex(_bytes(t))
        offset += size
    blob = integrity.header_bytes({"__metadata__": integrity.seal(metadata, table, crcs), **table})
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            f.write(_bytes(t))


def _bytes(t: torch.Tensor):
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data


def load_packed(path: Path, dtype: torch.dtype = torch.float32, verify: bool = True):
    """Load a packed file -> (model with QuantLinear modules, tokenizer or None, header). With `verify`, every
    tensor's bytes are checked against their checksum first (files of format 1.0 have none)."""
    from safetensors import SafetensorError, safe_open

    from pocketquant.checkpoints.common import assemble_quantized
    from pocketquant.tokenizer import Tokenizer

    header = read_header(path)
    if verify and header.checksummed:
        integrity.verify_tensors(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise PocketQuantError(f"{path}: damaged tensor data: {e}") from e
    if header.lora and not any(".lora." in k for k in handle.keys()):
        raise PocketQuantError(f"{path}: the header says the file holds LoRA adapters, but it has none")
    try:
        tensors = {k: (lambda k=k: handle.get_tensor(k)) for k in handle.keys()}
        model = assemble_quantized(header.config, header.scheme, tensors, dtype, str(path), header.lora)
    except SafetensorError as e:
        raise PocketQuantError(f"{path}: damaged tensor data: {e}") from e
    try:
        tokenizer = Tokenizer.from_spec(header.tokenizer) if header.tokenizer else None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PocketQuantError(f"{path}: damaged tokenizer in the packed header ({e!r})") from e
    return model, tokenizer, header

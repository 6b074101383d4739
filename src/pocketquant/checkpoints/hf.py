"""Hugging Face layout: `config.json` + `model.safetensors` (or shards with an index)."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from pocketquant.checkpoints.common import TensorSource, assemble
from pocketquant.config import ModelConfig
from pocketquant.errors import PocketQuantError
from pocketquant.files import read_json

SKIPPED = ("rotary_emb.inv_freq",)


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def read_config(path: Path) -> ModelConfig:
    f = path / "config.json"
    hf = read_json(f)
    try:
        return ModelConfig.from_hf(hf, name=path.name)
    except KeyError as e:
        raise PocketQuantError(f"{f} lacks the field {e}") from e
    except PocketQuantError as e:
        raise PocketQuantError(f"{f}: {e}") from e


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        contents = read_json(index)
        weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise PocketQuantError(f"{index}: expected {{\"weight_map\": {{tensor name: shard file}}}}")
        shards = sorted(set(weight_map.values()))
        outside = [s for s in shards if Path(s).name != s or s in (".", "..")]
        if outside:  # an index may only name files beside it
            raise PocketQuantError(f"{index} names shards outside the model directory: {outside[:3]}")
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise PocketQuantError(f"{path}: shards named in {index.name} are missing: {missing}")
        return [path / s for s in shards]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if found:
        return [path / f for f in found]
    hint = " (PyTorch .bin weights are not read: convert them to safetensors)" if any(path.glob("*.bin")) else ""
    raise PocketQuantError(f"{path}: no model.safetensors or safetensors shards found{hint}")


def tensor_source(files: list[Path]) -> TensorSource:
    """Lazy getters for every tensor in the safetensors files (memory-mapped), names without `model.`."""
    source = {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
        except (SafetensorError, OSError) as e:
            raise PocketQuantError(f"{f}: not a readable safetensors file (truncated or corrupt?): {e}") from e
        for key in handle.keys():
            if key.endswith(SKIPPED):
                continue
            name = key.removeprefix("model.")
            source[name] = _getter(handle, key, f)
    return source


def _getter(handle, key: str, f: Path):
    def get():
        try:
            return handle.get_tensor(key)
        except SafetensorError as e:
            raise PocketQuantError(f"{f}: cannot read tensor {key}: {e}") from e
    return get


def load_hf(path: Path, dtype):
    from pocketquant.checkpoints.packed import is_packed

    config = read_config(path)
    files = weight_files(path)
    packed = [f.name for f in files if is_packed(f, if_unreadable=False)]
    if packed:
        raise PocketQuantError(f"{path}: {packed[0]} is a pocketquant packed file, not Hugging Face weights; "
                               "give its path on its own")
    return assemble(config, tensor_source(files), dtype, str(path))

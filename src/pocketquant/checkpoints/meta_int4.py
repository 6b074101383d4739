"""Meta's prequantized layout (the `..._INT4_EO8` checkpoints): `consolidated.00.pth` + `params.json`.

Block linears hold int4 values unpacked in int8 tensors `[out, in]` with `.scales` `[out, in / group]`
(symmetric, no zeros; the group in `quantization_args.group_size`); `tok_embeddings` and `output` hold int8
rows with one scale each (`.scales` `[rows]`); QLoRA checkpoints add bf16 `.adaptor.A.weight` `[rank, in]` /
`.adaptor.B.weight` `[out, rank]` (rank and scale in `lora_args`); SpinQuant ones need R4, a normalized
Hadamard transform of down_proj's input (`quantization_args.spinquant`). q/k rows are in Meta's interleaved
RoPE order, as in the float layout. The integers are taken as they are: nothing goes through float."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pocketquant.checkpoints.common import assemble_quantized, interleaved_to_half
from pocketquant.checkpoints.meta import config_from_params, hf_name, read_state, shard_of
from pocketquant.errors import PocketQuantError
from pocketquant.files import drop_file_pages, read_json
from pocketquant.packing import pack_int4
from pocketquant.scheme import ActSpec, LinearSpec, QuantScheme, WeightSpec

SCHEME = "int4_weight_int8_dynamic_activation"  # quantization_args.scheme of Meta's checkpoints


def load_meta_quantized(path: Path, dtype: torch.dtype = torch.float32):
    """A Meta prequantized directory -> (quantized `Transformer`, the `QuantScheme` its integers follow)."""
    params = read_json(path / "params.json")
    config = config_from_params(params, path)
    shard = shard_of(path)
    state = read_state(shard)
    try:
        return _load(path, params, config, shard, state, dtype)
    except (KeyError, IndexError, ValueError, TypeError, StopIteration) as e:  # shapes the layout cannot have
        raise PocketQuantError(f"{shard}: not a valid prequantized checkpoint ({type(e).__name__}: "
                               f"{str(e)[:200]})") from e


def _load(path: Path, params: dict, config, shard: Path, state: dict, dtype):
    q_args = params.get("quantization_args") or {}
    if not isinstance(q_args, dict):
        raise PocketQuantError(f"{path / 'params.json'}: quantization_args must be an object")
    if q_args.get("scheme", SCHEME) != SCHEME:
        raise PocketQuantError(f"{path / 'params.json'}: quantization scheme {q_args['scheme']!r} is not supported; "
                               f"pocketquant reads {SCHEME!r} (int4 weights on int8 dynamic activations)")
    scheme = scheme_of(state, q_args.get("group_size"), shard)
    shared = _same_table(state)
    config = dataclasses.replace(config, hadamard_down=bool(q_args.get("spinquant")), tie_embeddings=shared)
    scheme = scheme.replace(share_embedding_output=shared)
    tensors, unknown = {}, []
    for key, t in state.items():
        if key.endswith("rope.freqs") or shared and key.startswith("output."):  # one table serves both
            continue
        if key.endswith(".zeros"):  # written by some tools, always zero: the weights are symmetric
            if bool(t.any()):
                raise PocketQuantError(f"{shard}: {key} holds nonzero zero points; only symmetric int4 is supported")
            continue
        name = _our_name(key, integer=not t.is_floating_point())
        if name is None:
            unknown.append(key)
        else:
            tensors[name] = _getter(t, name, config, scheme, f"{shard}: {key}")
    if unknown:
        raise PocketQuantError(f"{shard}: unrecognized tensors {unknown[:5]}")
    lora = _lora_args(params, state, path) if any(".adaptor." in k for k in state) else None
    model = assemble_quantized(config, scheme, tensors, dtype, str(path), lora)
    return model, scheme


def scheme_of(state: dict, group_size, where) -> QuantScheme:
    """The scheme a checkpoint's integers follow: int4 block linears in groups of `group_size` (or of the width
    the scales imply) on int8 per-token activations; int8 per-channel output and embedding where they have
    scales. Scales are kept as float16 when every one of a family is exactly a float16, else as float32."""
    act = ActSpec(8, symmetric=False)
    linear_scales = [t for k, t in state.items() if k.endswith(".scales") and k.startswith("layers.")]
    if not linear_scales:
        raise PocketQuantError(f"{where}: no quantized block linears (no layers.*.scales tensors)")
    first = next(k for k in state if k.endswith(".scales") and k.startswith("layers."))
    in_f = state[first.removesuffix(".scales") + ".weight"].shape[-1]
    implied = in_f // max(1, state[first].shape[-1])
    group = group_size if group_size is not None else implied
    if not isinstance(group, int) or isinstance(group, bool) or group != implied:
        raise PocketQuantError(f"{where}: quantization_args.group_size {group_size!r} does not match the scales "
                               f"({first}: {in_f} inputs in {state[first].shape[-1]} groups)")
    linear = LinearSpec(WeightSpec(4, group, scale_dtype=_scale_dtype(linear_scales)), act)
    output = embedding = None
    if "output.scales" in state:
        output = LinearSpec(WeightSpec(8, 0, scale_dtype=_scale_dtype([state["output.scales"]])), act)
    if "tok_embeddings.scales" in state:
        embedding = WeightSpec(8, 0, scale_dtype=_scale_dtype([state["tok_embeddings.scales"]]))
    return QuantScheme("int4-eo8" if group == 32 else f"int4-eo8-g{group}", linear, output, embedding)


def _scale_dtype(scales: list[torch.Tensor]) -> str:
    exact = all(bool((s.float().to(torch.float16).float() == s.float()).all()) for s in scales)
    return "float16" if exact else "float32"


def _same_table(state: dict) -> bool:
    """Whether the int8 output layer is the int8 embedding table (then the model keeps one table)."""
    keys = ("weight", "scales")
    if not all(f"{t}.{k}" in state for t in ("output", "tok_embeddings") for k in keys):
        return False
    return all(torch.equal(state[f"output.{k}"].reshape(-1), state[f"tok_embeddings.{k}"].reshape(-1))
               and state[f"output.{k}"].dtype == state[f"tok_embeddings.{k}"].dtype for k in keys)


def _our_name(key: str, integer: bool) -> str | None:
    """Our state name for a Meta key (integer weights become `.qweight`, adaptors `.lora.A/B.weight`)."""
    base, _, kind = key.rpartition(".")
    if integer:
        ours = hf_name(key)
        return None if ours is None else ours.removesuffix(".weight") + ".qweight"
    if ".adaptor." in key:
        module, _, ab = key.removesuffix(".weight").rpartition(".adaptor.")
        ours = hf_name(module + ".weight")
        return None if ours is None or ab not in ("A", "B") else ours.removesuffix(".weight") + f".lora.{ab}.weight"
    if kind == "scales":
        ours = hf_name(base + ".weight")
        return None if ours is None else ours.removesuffix(".weight") + ".scales"
    return hf_name(key)


def _getter(t: torch.Tensor, name: str, config, scheme: QuantScheme, where: str):
    heads = config.n_heads if ".q_proj." in name else config.n_kv_heads if ".k_proj." in name else None
    integer = not t.is_floating_point()

    def get():
        x = t
        if name.endswith(".scales"):
            spec = scheme.embedding if name.startswith("embed_tokens") else \
                scheme.output.weight if name.startswith("lm_head") else scheme.linear.weight
            x = x.float().reshape(x.shape[0], -1)
            _check_scales(x, where)
            x = x.to(getattr(torch, spec.scale_dtype))
            if x.data_ptr() != t.data_ptr():  # a copy in another precision: the file's pages can go
                drop_file_pages(t)
        elif integer:
            x = _checked_ints(x, 4 if name.startswith("layers.") else 8, where)
        if ".lora." not in name and x.numel() and not bool(x.any()):  # (an adaptor's B may be 0: untrained)
            raise PocketQuantError(f"{where}: every value is 0 (a damaged checkpoint?); refusing to import it")
        if heads and not name.endswith(".lora.A.weight"):  # rows of q/k outputs: Meta's order -> ours
            x = interleaved_to_half(x, heads)
        if integer and name.startswith("layers."):
            x = pack_int4(x)
            drop_file_pages(t)  # the unpacked values, read in place from the .pth: no longer needed
        return x
    return get


def _check_scales(scales: torch.Tensor, where: str):
    """Refuse a scale of 0 (or NaN, or infinite): Meta's quantizer keeps every scale at least float32's epsilon,
    so a 0 is a zeroed region of a damaged file, and it would make its whole group of weights 0."""
    bad = ~(torch.isfinite(scales) & (scales != 0))
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        raise PocketQuantError(f"{where}: {int(bad.sum()):,} scales are 0 or not finite (the first at row {row}, "
                               f"group {group}): a damaged checkpoint; refusing to import it")


def _checked_ints(t: torch.Tensor, bits: int, where: str) -> torch.Tensor:
    if t.dtype != torch.int8:
        raise PocketQuantError(f"{where}: integer weights must be int8 tensors, got {t.dtype}")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise PocketQuantError(f"{where}: values {int(t.min())}..{int(t.max())} outside int{bits} [{lo}, {hi}]")
    return t


def _lora_args(params: dict, state: dict, path: Path) -> dict:
    args = params.get("lora_args")
    if not isinstance(args, dict) or type(args.get("rank")) is not int or \
            type(args.get("scale")) not in (int, float):
        raise PocketQuantError(f"{path / 'params.json'}: the checkpoint has LoRA adaptors but no valid "
                               "lora_args {\"rank\": int, \"scale\": number}")
    a = next(t for k, t in state.items() if k.endswith(".adaptor.A.weight"))
    if a.shape[0] != args["rank"]:
        raise PocketQuantError(f"{path}: lora_args.rank is {args['rank']} but the adaptors have rank {a.shape[0]}")
    return {"rank": args["rank"], "scale": float(args["scale"]), "dtype": str(a.dtype).removeprefix("torch.")}

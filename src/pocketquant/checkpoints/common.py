"""What every loader shares: building the model from named tensors, with shape checks."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from pocketquant.config import ModelConfig
from pocketquant.errors import PocketQuantError
from pocketquant.model import Transformer
from pocketquant.numerics import check_finite

TensorSource = Mapping[str, Callable[[], torch.Tensor]]  # name -> lazy tensor getter


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Meta/GGUF interleaved RoPE pairs to HF's half-split layout."""
    out_dim, in_dim = w.shape
    _check_heads(w, n_heads)
    # [H, D/2, 2, in] -> [H, 2, D/2, in]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half`."""
    out_dim, in_dim = w.shape
    _check_heads(w, n_heads)
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _check_heads(w: torch.Tensor, n_heads: int):
    if w.ndim != 2 or w.shape[0] % (2 * n_heads):
        raise PocketQuantError(f"a q/k projection of shape {list(w.shape)} cannot hold {n_heads} heads "
                               "of even size: the config does not match the weights")


def assemble(config: ModelConfig, tensors: TensorSource, dtype: torch.dtype, source: str) -> Transformer:
    """Build a float `Transformer` from named tensors (HF names without `model.`), checking every shape.

    Tensors are read one at a time, so peak memory is about the model in `dtype` plus one tensor.
    """
    check_layer_count(config, tensors, source)
    with torch.device("meta"):
        model = Transformer(config)
    return fill_model(model, tensors, dtype, source)


def assemble_quantized(config: ModelConfig, scheme, tensors: TensorSource, dtype: torch.dtype, source: str,
                       lora: dict | None = None) -> Transformer:
    """Build a quantized `Transformer` (the scheme's modules) from named integer tensors, scales and norms,
    checking every shape and dtype. `lora` ({"rank", "scale", "dtype"}) adds an adapter to every module
    whose `.lora.A.weight` the tensors hold."""
    from pocketquant.layers import LoRA, quantized_skeleton

    check_layer_count(config, tensors, source)
    with torch.device("meta"):
        model = quantized_skeleton(Transformer(config), scheme, dtype)
        for key in tensors if lora else ():
            if key.endswith(".lora.A.weight"):
                try:
                    base = model.get_submodule(key[: -len(".lora.A.weight")])
                except AttributeError as e:
                    raise PocketQuantError(f"{source}: an adapter for no module ({key})") from e
                base.lora = LoRA(base.in_features, base.out_features, lora["rank"], lora["scale"],
                                 getattr(torch, lora["dtype"]))
    return fill_model(model, tensors, dtype, source)


def check_layer_count(config: ModelConfig, names, source: str):
    """Refuse a config whose number of layers the tensor names do not bear out, before a model is built."""
    found = {int(m.group(1)) for n in names if (m := re.match(r"layers\.(\d{1,9})\.", n))}
    if found != set(range(config.n_layers)):
        raise PocketQuantError(f"{source}: the config says {config.n_layers} layers, but the weights hold "
                               f"{len(found)} (numbered up to {max(found, default=-1)})")


def fill_model(model: Transformer, tensors: TensorSource, dtype: torch.dtype, source: str) -> Transformer:
    """Give a meta-device model (float or quantized modules) its tensors, checking names and shapes.

    Parameters are cast to `dtype`; buffers (integer weights, scales) must arrive in their own dtype.
    A tied output layer is not read: it is the embedding (or, quantized, the shared int8 table)."""
    expected = model.state_dict()
    tied = tied_output_names(model)
    for name in tied:
        expected.pop(name)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - set(tied))
    if missing or unexpected:
        raise PocketQuantError(
            f"{source}: weights do not match the config: "
            + "; ".join(filter(None, [_listing("missing", missing), _listing("unexpected", unexpected)])))
    params = {n for n, _ in model.named_parameters()}
    state = {}
    for name, want in expected.items():
        t = tensors[name]()
        if t.shape != want.shape:
            raise PocketQuantError(f"{source}: tensor {name} has shape {list(t.shape)}, "
                                   f"the config expects {list(want.shape)}")
        if name not in params and t.dtype != want.dtype:
            raise PocketQuantError(f"{source}: tensor {name} is {t.dtype}, expected {want.dtype}")
        if name in params and not t.is_floating_point():
            raise PocketQuantError(f"{source}: tensor {name} is {t.dtype}, expected floating-point weights")
        if t.is_floating_point():
            check_finite(t, f"{source}: tensor {name}", "refusing to load it (a damaged file?)")
        state[name] = t.to(dtype) if name in params else t
    model.load_state_dict(state, strict=False, assign=True)
    tie_output(model)
    model.reset_rope()
    return model.eval()


def tied_output_names(model: Transformer) -> list[str]:
    """State names of the output layer that a tied model does not store on its own."""
    if not model.config.tie_embeddings:
        return []
    if isinstance(model.lm_head, torch.nn.Linear) and isinstance(model.embed_tokens, torch.nn.Embedding):
        return ["lm_head.weight"]
    if getattr(model, "shares_embedding_output", False):
        return ["lm_head.qweight", "lm_head.scales"]
    return []


def tie_output(model: Transformer):
    if tied_output_names(model) == ["lm_head.weight"]:
        model.lm_head.weight = model.embed_tokens.weight
    elif tied_output_names(model):
        model.lm_head.qweight = model.embed_tokens.qweight
        model.lm_head.scales = model.embed_tokens.scales


def random_model(config: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    """A model of `config`'s shape with random weights (normal, std 0.02; norms at one)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    model.to_empty(device="cpu")
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)
    tie_output(model)
    model.reset_rope()
    return model.eval()


def _listing(kind: str, names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{kind} {shown}"

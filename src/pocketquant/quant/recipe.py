"""`quantize`: load a float model, run a method under a scheme, write the packed file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from pocketquant.errors import PocketQuantError
from pocketquant.scheme import QuantScheme, get_scheme

METHODS = ("rtn", "gptq")


@dataclass
class QuantizeResult:
    path: Path
    file_bytes: int
    output_table_bytes: int  # bytes of a separate int8 output table (0 when the output stays float)
    shared: bool  # embedding and output share one int8 table
    can_share: bool  # the model is tied and both are int8 per channel


def quantize(source: str | Path, out: str | Path, method: str = "rtn", scheme: str | QuantScheme = "int4-eo8",
             search_clip: bool = False, share_embedding_output: bool = False, scale_rule: str | None = None,
             kv_cache_bits: int | None = None, progress=True, calib_samples: int = 128, calib_len: int = 512,
             damp: float = 0.01, act_order: bool = False, calib_text: str | None = None) -> QuantizeResult:
    """Quantize `source` (path or known name) with `method` under `scheme`; write the packed file `out`.
    GPTQ calibrates on `calib_samples` blocks of `calib_len` tokens of `calib_text` (default: the shipped
    calibration text) and checkpoints each layer in OUT.gptq-state/, from which a rerun resumes."""
    from pocketquant.checkpoints import load_model
    from pocketquant.layers import check_plan
    from pocketquant.packed import save_packed
    from pocketquant.progress import bar
    from pocketquant.quant import gptq, rtn

    if method not in METHODS:
        raise PocketQuantError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise PocketQuantError(f"the output file must end in .safetensors, got {out.name}")
    scheme = get_scheme(scheme)
    if scale_rule is not None:  # the int4/int8 scale rule of the block linears
        weight = dataclasses.replace(scheme.linear.weight, scale_rule=scale_rule)
        scheme = scheme.replace(linear=dataclasses.replace(scheme.linear, weight=weight))
    if share_embedding_output:
        scheme = scheme.replace(share_embedding_output=True)
    if kv_cache_bits is not None:
        scheme = scheme.replace(kv_cache_bits=kv_cache_bits)
    loaded = load_model(source, torch.float32)
    model = loaded.model
    check_plan(model, scheme)  # refuse before any work
    if method == "rtn":
        config = rtn.RTNConfig(scheme, search_clip)
        model = rtn.apply(model, config, progress=bar if progress else None)
    else:
        from pocketquant.data import read_text, shipped_text, token_blocks

        if loaded.tokenizer is None:
            raise PocketQuantError(f"{source} has no tokenizer: GPTQ needs calibration text")
        text = read_text(calib_text) if calib_text else shipped_text("calibration")
        tokens = token_blocks(loaded.tokenizer.encode(text), calib_samples, calib_len)
        config = gptq.GPTQConfig(scheme, calib_samples, calib_len, damp, act_order)
        model = gptq.apply(model, config, tokens, progress=bar if progress else None,
                           state_dir=out.with_name(out.name + ".gptq-state"))
    save_packed(out, model, scheme, [config.to_dict()], loaded.tokenizer)
    lm = model.lm_head
    table = lm.qweight.numel() * lm.qweight.element_size() + lm.scales.numel() * lm.scales.element_size() \
        if hasattr(lm, "qweight") else 0
    can_share = (model.config.tie_embeddings and scheme.embedding is not None and scheme.output is not None
                 and scheme.output.weight == scheme.embedding)
    return QuantizeResult(out, out.stat().st_size, table, scheme.share_embedding_output, can_share)

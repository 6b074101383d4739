"""`quantize`: load a float model, run a method under a scheme, write the packed file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from pocketquant.errors import PocketQuantError
from pocketquant.scheme import QuantScheme, get_scheme

METHODS = ("rtn", "gptq", "spinquant")


@dataclass
class QuantizeResult:
    path: Path
    file_bytes: int
    output_table_bytes: int  # bytes of a separate int8 output table (0 when the output stays float)
    shared: bool  # embedding and output share one int8 table
    can_share: bool  # the model is tied and both are int8 per channel
    rotation_losses: list[float] = dataclasses.field(default_factory=list)  # SpinQuant's search, per step
    rotations: Path | None = None  # the learned rotations (SpinQuant)
    rotation_heldout: tuple[float, float] | None = None  # search loss on held-out blocks, before and after


def quantize(source: str | Path, out: str | Path, method: str = "rtn", scheme: str | QuantScheme = "int4-eo8",
             search_clip: bool = False, share_embedding_output: bool = False, scale_rule: str | None = None,
             kv_cache_bits: int | None = None, progress=True, calib_samples: int = 128, calib_len: int = 512,
             damp: float = 0.01, act_order: bool = True, calib_text: str | None = None,
             spin: dict | None = None, rotations: str | Path | None = None, then: str = "gptq") -> QuantizeResult:
    """Quantize `source` (path or known name) with `method` under `scheme`; write the packed file `out`.

    GPTQ calibrates on `calib_samples` blocks of `calib_len` tokens of `calib_text` (default: the shipped
    calibration text) and checkpoints each layer in OUT.gptq-state/, from which a rerun resumes.
    SpinQuant learns rotations (`spin`: SpinQuantConfig fields; or reuses the file `rotations`), writes
    them to OUT.rotations.safetensors, merges them, then quantizes with `then` (gptq or rtn). Under
    torchrun every process shares the rotation search; the first one quantizes and writes the files,
    the others return None."""
    from pocketquant.checkpoints import check_length, load_float_model
    from pocketquant.files import check_output
    from pocketquant.layers import check_plan
    from pocketquant.packed import save_packed
    from pocketquant.progress import bar
    from pocketquant.quant import gptq, rtn, spinquant
    from pocketquant.quant.distributed import join_torchrun

    if method not in METHODS:
        raise PocketQuantError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if then not in ("gptq", "rtn"):
        raise PocketQuantError(f"SpinQuant quantizes with gptq or rtn, not {then!r}")
    out = check_output(out, [source, calib_text, rotations], suffix=".safetensors")
    scheme = get_scheme(scheme)
    if scale_rule is not None:  # the int4/int8 scale rule of the block linears
        weight = dataclasses.replace(scheme.linear.weight, scale_rule=scale_rule)
        scheme = scheme.replace(linear=dataclasses.replace(scheme.linear, weight=weight))
    if share_embedding_output:
        if method == "spinquant":
            raise PocketQuantError("--share-embedding-output does not apply to SpinQuant: the rotated embedding "
                                   "and output layer differ")
        scheme = scheme.replace(share_embedding_output=True)
    if kv_cache_bits is not None:
        scheme = scheme.replace(kv_cache_bits=kv_cache_bits)
    loaded = load_float_model(source, torch.float32)
    model = loaded.model
    check_plan(model, scheme)  # refuse before any work
    show = bar if progress else None
    calibration = None
    if method != "rtn" and not (method == "spinquant" and rotations and then == "rtn"):
        check_length(model.config, calib_len, "--calib-len")
        check_length(model.config, (spin or {}).get("seq_len", 0), "--spin-len")
        from pocketquant.data import read_text, shipped_text

        if loaded.tokenizer is None:
            raise PocketQuantError(f"{source} has no tokenizer: {method} needs calibration text")
        calibration = loaded.tokenizer.encode(read_text(calib_text) if calib_text else shipped_text("calibration"))
    recipe, result_extra = [], {}
    if method == "spinquant":
        from pocketquant.data import token_blocks

        rank = join_torchrun(model.device)
        config = spinquant.SpinQuantConfig(scheme, **(spin or {}))
        tokens = heldout = None
        if not rotations:
            tokens = token_blocks(calibration, config.samples, config.seq_len)
            if len(calibration) >= (config.samples + 2) * config.seq_len:  # the text's last two blocks
                heldout = token_blocks(calibration[-2 * config.seq_len:], 2, config.seq_len)
        saved = check_output(out.with_name(out.stem + ".rotations.safetensors"), [source, calib_text])
        model, losses, held = spinquant.prepare(model, config, tokens, show if rank == 0 else None,
                                                rotations=rotations, save_to=None if rotations or rank else saved,
                                                heldout=heldout)
        if rank:
            return None
        recipe.append({**config.to_dict(), "rotations": str(rotations) if rotations else saved.name})
        result_extra = {"rotation_losses": losses, "rotations": Path(rotations) if rotations else saved,
                        "rotation_heldout": held}
    if method == "rtn" or (method == "spinquant" and then == "rtn"):
        config = rtn.RTNConfig(scheme, search_clip)
        model = rtn.apply(model, config, progress=show)
    else:
        from pocketquant.data import token_blocks

        config = gptq.GPTQConfig(scheme, calib_samples, calib_len, damp, act_order)
        model = gptq.apply(model, config, token_blocks(calibration, calib_samples, calib_len), progress=show,
                           state_dir=out.with_name(out.name + ".gptq-state"))
    recipe.append(config.to_dict())
    save_packed(out, model, scheme, recipe, loaded.tokenizer)
    gptq.gptq_state(out.with_name(out.name + ".gptq-state")).remove()  # kept until the file was written
    lm = model.lm_head
    table = lm.qweight.numel() * lm.qweight.element_size() + lm.scales.numel() * lm.scales.element_size() \
        if hasattr(lm, "qweight") else 0
    can_share = (model.config.tie_embeddings and scheme.embedding is not None and scheme.output is not None
                 and scheme.output.weight == scheme.embedding)
    return QuantizeResult(out, out.stat().st_size, table, scheme.share_embedding_output, can_share, **result_extra)


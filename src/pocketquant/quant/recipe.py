"""Recipes: a quantization is an ordered list of steps, each a frozen config with a version that
round-trips through JSON (`to_dict` / `from_dict`), applied in turn by `apply(model, *steps)`:

    spinquant  rotate (learned R1/R2, or random Hadamard with learn=False; R4, and R3 for an int8 KV cache)
    budget     measure each linear's sensitivity, keep the most sensitive at int8 within a byte budget
    rtn | gptq | signround   quantize the float linears
    qat / lora train with the quantization in the loop (one step, one or both phases), then quantize
    import     keep the integers of a prequantized checkpoint (Meta's INT4_EO8 layout, GGUF Q4_0 / Q8_0)

The packed file stores the recipe it was made by, so `quantize --recipe OLD.safetensors` makes it again.
`quantize` (and the `quantize` / `train` verbs) are drivers: load, apply, write."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from pocketquant.errors import PocketQuantError
from pocketquant.quant.context import Context, config_dict, config_from_dict
from pocketquant.quant.gptq import GPTQConfig, gptq_state
from pocketquant.quant.rtn import RTNConfig
from pocketquant.quant.sensitivity import BudgetConfig
from pocketquant.quant.signround import SignRoundConfig, signround_state
from pocketquant.quant.spinquant import SpinQuantConfig
from pocketquant.quant.train import TrainConfig, training_state
from pocketquant.scheme import PRESETS, QuantScheme, get_scheme


@dataclass(frozen=True)
class ImportConfig:
    """Take the integers a prequantized checkpoint holds instead of quantizing float weights: Meta's INT4_EO8
    layout (which brings its own scheme) or a GGUF file (Q4_0 / Q8_0 blocks kept where they are `scheme`'s
    numbers; other tensors requantized to `scheme`). It reads the source itself, so it is a recipe's only step."""

    scheme: QuantScheme = field(default_factory=lambda: PRESETS["int4-eo8"])
    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict:
        return config_dict(self, "import")

    @classmethod
    def from_dict(cls, d: dict) -> "ImportConfig":
        return config_from_dict(cls, d, "import")

    def apply(self, model, ctx):
        raise PocketQuantError("an import step reads a prequantized checkpoint, not a model in memory; "
                               "use recipe.quantize(SOURCE, [ImportConfig()])")


STEPS = {"spinquant": SpinQuantConfig, "budget": BudgetConfig, "rtn": RTNConfig, "gptq": GPTQConfig,
         "signround": SignRoundConfig, "qat": TrainConfig, "lora": TrainConfig, "qat+lora": TrainConfig,
         "import": ImportConfig}
CALIBRATED = (RTNConfig, GPTQConfig, SignRoundConfig, TrainConfig)  # quantize a model in memory (a budget's next step)
QUANTIZERS = (*CALIBRATED, ImportConfig)
METHODS = ("rtn", "gptq", "signround", "hadamard", "spinquant", "import")  # the quantize verb's --method (from_options)
QUANTIZER_STEPS = {"gptq": GPTQConfig, "signround": SignRoundConfig, "rtn": RTNConfig}  # what rotations end with
FORMAT, VERSION = "pocketquant.recipe", 1
MAX_BYTES, MAX_DEPTH = 1 << 20, 32  # a recipe file larger or deeper than this is refused before it is parsed


def check(steps) -> tuple:
    """The steps as a valid recipe: one scheme; a rotation only first; a budget only right before the quantizer;
    at most one of rtn, gptq and signround; training only last; and it ends by quantizing."""
    steps = tuple(steps)
    if not steps:
        raise PocketQuantError("a recipe needs at least one step")
    for s in steps:
        if not isinstance(s, tuple(set(STEPS.values()))):
            raise PocketQuantError(f"not a recipe step: {s!r}")
    if len({json.dumps(s.scheme.to_dict(), sort_keys=True) for s in steps}) > 1:
        raise PocketQuantError("every step of a recipe must use the same scheme")
    kinds = [type(s) for s in steps]
    if ImportConfig in kinds and len(steps) > 1:
        raise PocketQuantError("an import step takes a checkpoint's integers as they are: it is a recipe's only step")
    if SpinQuantConfig in kinds[1:]:
        raise PocketQuantError("a spinquant step can only come first")
    if BudgetConfig in kinds and (kinds.count(BudgetConfig) > 1 or kinds.index(BudgetConfig) + 1 == len(kinds) or
                                  kinds[kinds.index(BudgetConfig) + 1] not in CALIBRATED):
        raise PocketQuantError("a budget step comes once, right before the step that quantizes (rtn, gptq, "
                               "signround, qat or lora)")
    if sum(kinds.count(k) for k in (RTNConfig, GPTQConfig, SignRoundConfig)) > 1:
        raise PocketQuantError("a recipe quantizes with rtn, gptq or signround once")
    if TrainConfig in kinds[:-1]:
        raise PocketQuantError("training (qat, lora) can only be the last step")
    if not isinstance(steps[-1], QUANTIZERS):
        raise PocketQuantError("a recipe must end by quantizing: rtn, gptq, signround, qat, lora or import")
    return steps


def apply(model, *steps, ctx: Context | None = None):
    """Apply the steps in order to the float `model` (in place) and return the quantized model. Every step
    first checks what it needs (context length, enough text), so a bad recipe is refused before any work.
    `ctx.record` lists, after the run, the configs the packed file should store."""
    steps, ctx = check(steps), ctx or Context()
    from pocketquant.layers import check_plan, linear_plan

    check_plan(model, steps[0].scheme)
    if all(spec is None for name, spec in linear_plan(model, steps[0].scheme).items() if name != "lm_head"):
        raise PocketQuantError(f"scheme {steps[0].scheme.name!r} quantizes no block linear (every one would stay "
                               "in float)")
    for s in steps:
        if hasattr(s, "check"):
            s.check(model, ctx)
    if ctx.teacher is None and any(isinstance(s, TrainConfig) and s.distill > 0 for s in steps):
        ctx.teacher = copy.deepcopy(model)  # the float model, before any step
    recorded, ctx.scheme = [], steps[0].scheme
    for s in steps:  # after a budget step, the steps quantize with its mixed scheme (and record the recipe's)
        ctx.record = s
        model = (s if s.scheme == ctx.scheme else dataclasses.replace(s, scheme=ctx.scheme)).apply(model, ctx)
        recorded.append(dataclasses.replace(ctx.record, scheme=s.scheme))
    ctx.record = recorded
    return model


def step_from_dict(d: dict):
    """One step from its JSON data (its "method" names its kind)."""
    method = d.get("method") if isinstance(d, dict) else None
    if not isinstance(method, str) or method not in STEPS:
        raise PocketQuantError(f"unknown recipe step {method!r:.100}; known: {', '.join(STEPS)}")
    return STEPS[method].from_dict(d)


def to_json(steps) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, "steps": [s.to_dict() for s in check(steps)]},
                      indent=2)


def read(path: str | Path) -> tuple:
    """The steps of a recipe file (.json: what `to_json` writes, or a bare list of steps) or of the packed
    file a recipe made (its stored recipe; a rotations file it names is looked up beside it)."""
    from pocketquant.checkpoints.packed import is_packed, read_header
    from pocketquant.files import read_json

    path = Path(path)
    if not path.is_file():
        raise PocketQuantError(f"no such recipe file: {path}")
    if is_packed(path):
        steps = [step_from_dict(d) for d in read_header(path).recipe]
        return check(_beside(s, path.parent) for s in steps)
    data = read_json(path, MAX_BYTES, MAX_DEPTH)
    if isinstance(data, dict):
        if data.get("format") != FORMAT or not isinstance(data.get("steps"), list):
            raise PocketQuantError(f"{path}: not a recipe (expected {{\"format\": \"{FORMAT}\", \"steps\": [...]}})")
        if unknown := sorted(set(data) - {"format", "version", "steps"}):
            raise PocketQuantError(f"{path}: unknown recipe field(s) {', '.join(map(repr, unknown))[:200]}; known: "
                                   "format, version, steps")
        version = data.get("version")
        if type(version) is not int or not 1 <= version <= VERSION:
            raise PocketQuantError(f"{path}: recipe version {version!r:.40}; this pocketquant reads versions 1 to "
                                   f"{VERSION}")
        data = data["steps"]
    if not isinstance(data, list):
        raise PocketQuantError(f"{path}: a recipe is a list of steps")
    try:
        return check(step_from_dict(d) for d in data)
    except PocketQuantError as e:
        raise PocketQuantError(f"{path}: {e}") from e


def _beside(step, folder: Path):
    """A spinquant step naming its rotations file by a relative name: the file beside the packed file."""
    if isinstance(step, SpinQuantConfig) and step.rotations and not Path(step.rotations).is_absolute():
        return dataclasses.replace(step, rotations=str(folder / step.rotations))
    return step


def from_options(method: str = "rtn", scheme: str | QuantScheme = "int4-eo8", *, search_clip: bool = False,
                 scale_rule: str | None = None, share_embedding_output: bool = False,
                 kv_cache_bits: int | None = None, gptq: dict | None = None, spin: dict | None = None,
                 then: str = "gptq", signround: dict | None = None, budget: dict | None = None) -> tuple:
    """The recipe the `quantize` verb's options describe. method: rtn, gptq, signround, hadamard (random
    Hadamard rotations, then `then`), spinquant (learned rotations, then `then`); gptq / signround / spin /
    budget: GPTQConfig / SignRoundConfig / SpinQuantConfig / BudgetConfig fields (a budget step, with `budget`,
    right before the quantizer)."""
    if method not in METHODS:
        raise PocketQuantError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if method == "import" and (search_clip or scale_rule or share_embedding_output or kv_cache_bits or budget):
        raise PocketQuantError("import keeps the checkpoint's own numbers: --search-clip, --scale-rule, "
                               "--share-embedding-output, --kv-cache and --budget do not apply")
    if then not in QUANTIZER_STEPS:
        raise PocketQuantError(f"rotations are followed by {', '.join(QUANTIZER_STEPS)}, not {then!r}")
    scheme = get_scheme(scheme)
    if scale_rule is not None:  # of every quantized weight: block linears, output layer, embedding
        def ruled(weight):
            return dataclasses.replace(weight, scale_rule=scale_rule)
        scheme = scheme.replace(
            linear=dataclasses.replace(scheme.linear, weight=ruled(scheme.linear.weight)),
            output=scheme.output and dataclasses.replace(scheme.output, weight=ruled(scheme.output.weight)),
            embedding=scheme.embedding and ruled(scheme.embedding))
    if share_embedding_output:
        if method in ("spinquant", "hadamard"):
            raise PocketQuantError("--share-embedding-output does not apply to rotated models: the rotated "
                                   "embedding and output layer differ")
        scheme = scheme.replace(share_embedding_output=True)
    if kv_cache_bits is not None:
        scheme = scheme.replace(kv_cache_bits=kv_cache_bits)
    if method == "import":
        return check([ImportConfig(scheme)])
    steps = []
    if method in ("spinquant", "hadamard"):
        spin = dict(spin or {})
        if method == "hadamard":
            spin["learn"] = False
        steps.append(SpinQuantConfig(scheme, **spin))
        method = then
    if budget:
        steps.append(BudgetConfig(scheme, **budget))
    if method == "rtn":
        return check([*steps, RTNConfig(scheme, search_clip)])
    return check([*steps, QUANTIZER_STEPS[method](scheme, **({"gptq": gptq, "signround": signround}[method] or {}))])


@dataclass
class QuantizeResult:
    path: Path | None
    model: torch.nn.Module  # the quantized model (reference modules)
    file_bytes: int
    output_table_bytes: int  # bytes of a separate int8 output table (0 when the output stays float)
    shared: bool  # embedding and output share one int8 table
    can_share: bool  # the model is tied and both are int8 per channel
    recipe: tuple = ()  # the steps as the packed file records them
    tokenizer: object = None
    report: dict = field(default_factory=dict)  # what the steps measured (rotation_losses, losses, ...)


def quantize(source, steps, out: str | Path | None = None, progress: bool = True, tokenizer=None,
             inputs=()) -> QuantizeResult | None:
    """Load the float model `source` (a path or known name, or a model object with `tokenizer`), apply the
    recipe `steps`, and write the packed file `out` (atomically; long steps checkpoint beside it, and a
    rerun of a killed command resumes there); `out` may be none of the files the run reads (the model, the
    steps' text and rotations files, and `inputs`, such as the recipe file). Under torchrun every process shares
    the work; the first one writes the files, the others return None."""
    from pocketquant.checkpoints.packed import save_packed
    from pocketquant.files import check_output
    from pocketquant.progress import bar
    from pocketquant.quant.distributed import join_torchrun

    steps = check(steps)
    scheme = steps[0].scheme
    given = isinstance(source, torch.nn.Module)
    if out is not None:  # refused before any work
        inputs = [*inputs, *(getattr(s, a, None) for s in steps for a in ("text", "data", "rotations"))]
        out = check_output(out, inputs if given else [source, *inputs], suffix=".safetensors")
    if isinstance(steps[0], ImportConfig):
        return _import(source, steps[0], out)
    if given:
        model = source
    else:
        from pocketquant.checkpoints import load_float_model

        if progress:
            from pocketquant.progress import note

            note(f"loading {source}")
        loaded = load_float_model(source, torch.float32)
        model, tokenizer = loaded.model, loaded.tokenizer
    rank = join_torchrun(model.device) if any(isinstance(s, (SpinQuantConfig, TrainConfig)) for s in steps) else 0
    ctx = Context(tokenizer, bar if progress else None, Path(out) if out else None, rank=rank)
    model = apply(model, *steps, ctx=ctx)
    if rank:
        return None
    recipe, scheme = tuple(ctx.record), ctx.scheme
    if out is not None:
        save_packed(out, model, scheme, [s.to_dict() for s in recipe], tokenizer)
        _remove_states(out)
    return _result(model, scheme, out, recipe, tokenizer, ctx.report)


def _import(source, step: ImportConfig, out: Path | None) -> QuantizeResult:
    from pocketquant.checkpoints import import_quantized
    from pocketquant.checkpoints.packed import save_packed

    if isinstance(source, torch.nn.Module):
        raise PocketQuantError("an import step reads a checkpoint: give its path, not a model")
    loaded, scheme, requantized = import_quantized(source, step.scheme)
    recipe = (ImportConfig(scheme),)
    if out is not None:
        save_packed(out, loaded.model, scheme, [s.to_dict() for s in recipe], loaded.tokenizer)
    return _result(loaded.model, scheme, out, recipe, loaded.tokenizer, {"requantized": requantized})


def _result(model, scheme: QuantScheme, out, recipe: tuple, tokenizer, report: dict) -> QuantizeResult:
    lm = model.lm_head
    table = lm.qweight.numel() * lm.qweight.element_size() + lm.scales.numel() * lm.scales.element_size() \
        if hasattr(lm, "qweight") else 0
    can_share = (model.config.tie_embeddings and scheme.embedding is not None and scheme.output is not None
                 and scheme.output.weight == scheme.embedding)
    return QuantizeResult(Path(out) if out else None, model, Path(out).stat().st_size if out else 0, table,
                          scheme.share_embedding_output, can_share, recipe, tokenizer, report)


def _remove_states(out: Path):
    """The checkpoints of the steps, kept until the packed file was written."""
    gptq_state(out.with_name(out.name + ".gptq-state")).remove()
    signround_state(out.with_name(out.name + ".signround-state")).remove()
    training_state(out.with_name(out.name + ".train-state")).remove()

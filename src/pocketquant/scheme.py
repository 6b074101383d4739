"""`QuantScheme`: what precision each module family gets, and the presets (Meta's INT4 EO8 first).

No heavy imports here: a scheme is plain data that round-trips through JSON and is stored in every
packed file."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass

from pocketquant.config import wrong_types
from pocketquant.errors import PocketQuantError

# signed-max (llama.cpp Q4_0): scale = w / -2^(b-1) for the largest-magnitude w, which lands on the -8 level;
#   on SmolLM2-135M it scores perplexity 14.9 where absmax scores 17.1 (float 11.6).
# absmax (torchao): scale = max|w| / (2^(b-1) - 0.5), i.e. max|w| / 7.5 for int4.
# search: a positive scale per group, max|w| / 7 times the ratio from 1 down to 0.7 with the least (weighted)
#   error; with the default recipe on SmolLM2-135M perplexity 10.768 where signed-max scores 10.760 (float 10.066),
#   and, its scales positive, an exact ExecuTorch export (signed-max's flipped groups: 11.878).
SCALE_RULES = ("signed-max", "absmax", "search")


@dataclass(frozen=True)
class WeightSpec:
    """Integer weights, symmetric (no zero point). group_size 0 = one scale per output channel."""

    bits: int = 4
    group_size: int = 32
    scale_rule: str = "signed-max"
    scale_dtype: str = "float16"

    def __post_init__(self):
        if problems := wrong_types(self):
            raise PocketQuantError("invalid weight spec: " + "; ".join(problems))
        if self.bits not in (4, 8):
            raise PocketQuantError(f"weight bits must be 4 or 8, got {self.bits}")
        if self.group_size < 0:
            raise PocketQuantError(f"group_size must be >= 0 (0 = per channel), got {self.group_size}")
        if self.scale_rule not in SCALE_RULES:
            raise PocketQuantError(f"scale_rule must be one of {SCALE_RULES}, got {self.scale_rule!r}")
        if self.scale_dtype not in ("float16", "float32"):
            raise PocketQuantError(f"scale_dtype must be float16 or float32, got {self.scale_dtype!r}")

    def group_for(self, in_features: int) -> int:
        return self.group_size or in_features


@dataclass(frozen=True)
class ActSpec:
    """Activations quantized dynamically, one scale (and zero point if asymmetric) per token."""

    bits: int = 8
    symmetric: bool = False

    def __post_init__(self):
        if problems := wrong_types(self):
            raise PocketQuantError("invalid activation spec: " + "; ".join(problems))
        if self.bits != 8:
            raise PocketQuantError(f"activation bits must be 8, got {self.bits}")


@dataclass(frozen=True)
class LinearSpec:
    weight: WeightSpec
    act: ActSpec | None = None  # None: float activations (weight-only)


@dataclass(frozen=True)
class QuantScheme:
    """Per module family: block linears, output layer, embedding, KV cache; plus overrides by name.

    `overrides` maps a module-name pattern (fnmatch, e.g. "layers.0.*" or "*.down_proj") to a
    LinearSpec or to None (keep that module in float). The first matching pattern wins."""

    name: str
    linear: LinearSpec
    output: LinearSpec | None  # None: float output layer
    embedding: WeightSpec | None  # None: float embedding
    kv_cache_bits: int | None = None  # None: float KV cache
    overrides: tuple[tuple[str, LinearSpec | None], ...] = ()
    share_embedding_output: bool = False  # one int8 table for a tied embedding and output

    def __post_init__(self):
        if problems := wrong_types(self):
            raise PocketQuantError("invalid scheme: " + "; ".join(problems))
        if not (isinstance(self.linear, LinearSpec) and isinstance(self.output, (LinearSpec, type(None)))
                and isinstance(self.embedding, (WeightSpec, type(None)))):
            raise PocketQuantError("invalid scheme: linear must be a linear spec; output a linear spec or None; "
                                   "embedding a weight spec or None")
        if not all(isinstance(p, str) and isinstance(s, (LinearSpec, type(None))) for p, s in self.overrides):
            raise PocketQuantError("invalid scheme: overrides must be [pattern, spec or null] pairs")
        if self.kv_cache_bits not in (None, 8):
            raise PocketQuantError(f"kv_cache_bits must be None or 8, got {self.kv_cache_bits}")
        if self.embedding is not None and self.embedding.group_size != 0:
            raise PocketQuantError("the embedding is quantized per channel (group_size 0)")

    def spec_for(self, module_name: str) -> LinearSpec | None:
        """The spec of a block linear (e.g. 'layers.3.mlp.down_proj'), after overrides."""
        for pattern, spec in self.overrides:
            if fnmatch.fnmatchcase(module_name, pattern):
                return spec
        return self.linear

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["overrides"] = [[p, None if s is None else dataclasses.asdict(s)] for p, s in self.overrides]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantScheme":
        """The scheme `to_dict` wrote; an unknown or missing field at any level is refused, naming it."""
        try:
            _known(d, "scheme", {f.name for f in dataclasses.fields(cls)}, {"name", "linear"})
            overrides = d.get("overrides", ())
            if not isinstance(overrides, (list, tuple)) or not all(
                    isinstance(o, (list, tuple)) and len(o) == 2 for o in overrides):
                raise ValueError("overrides must be a list of [pattern, spec or null] pairs")
            return cls(
                name=d["name"], linear=_linear(d["linear"]), output=_linear(d.get("output")),
                embedding=None if d.get("embedding") is None else _weight(d["embedding"]),
                kv_cache_bits=d.get("kv_cache_bits"),
                overrides=tuple((p, _linear(s)) for p, s in overrides),
                share_embedding_output=d.get("share_embedding_output", False))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PocketQuantError(f"not a valid quantization scheme: {str(e)[:300]}") from e

    @classmethod
    def from_json(cls, text: str) -> "QuantScheme":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> "QuantScheme":
        return dataclasses.replace(self, **changes)


def _known(d, what: str, fields: set[str], required: set[str] = frozenset()):
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be an object, got {type(d).__name__}")
    if unknown := sorted(set(d) - fields):
        raise ValueError(f"{what}: unknown field(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(sorted(fields))}")
    if missing := sorted(required - set(d)):
        raise ValueError(f"{what}: missing field(s) {', '.join(missing)}")


def _weight(d: dict) -> WeightSpec:
    _known(d, "weight spec", {f.name for f in dataclasses.fields(WeightSpec)})
    return WeightSpec(**d)


def _linear(d: dict | None) -> LinearSpec | None:
    if d is None:
        return None
    _known(d, "linear spec", {"weight", "act"}, {"weight"})
    if d.get("act") is not None:
        _known(d["act"], "activation spec", {f.name for f in dataclasses.fields(ActSpec)})
    return LinearSpec(_weight(d["weight"]), None if d.get("act") is None else ActSpec(**d["act"]))


_A8 = ActSpec(bits=8, symmetric=False)
_W8_CHANNEL = WeightSpec(bits=8, group_size=0)

PRESETS: dict[str, QuantScheme] = {
    # Meta's INT4 EO8: int4 g32 symmetric block linears on int8 per-token asymmetric activations;
    # int8 per-channel output layer on int8 activations; int8 per-channel embedding.
    "int4-eo8": QuantScheme("int4-eo8", LinearSpec(WeightSpec(4, 32), _A8), LinearSpec(_W8_CHANNEL, _A8),
                            _W8_CHANNEL),
    "int4-eo8-g128": QuantScheme("int4-eo8-g128", LinearSpec(WeightSpec(4, 128), _A8),
                                 LinearSpec(_W8_CHANNEL, _A8), _W8_CHANNEL),
    "int8": QuantScheme("int8", LinearSpec(_W8_CHANNEL, _A8), LinearSpec(_W8_CHANNEL, _A8), _W8_CHANNEL),
    "w4-g32": QuantScheme("w4-g32", LinearSpec(WeightSpec(4, 32), None), None, None),
}


def get_scheme(name_or_scheme: str | QuantScheme) -> QuantScheme:
    if isinstance(name_or_scheme, QuantScheme):
        return name_or_scheme
    if name_or_scheme not in PRESETS:
        raise PocketQuantError(f"unknown scheme {name_or_scheme!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name_or_scheme]

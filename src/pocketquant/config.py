"""Model configuration: one dataclass for every Llama-family shape, and named presets."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field

from pocketquant.errors import PocketQuantError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 ("llama3") RoPE frequency scaling."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        problems = wrong_types(self)
        if not problems and not (0 < self.low_freq_factor < self.high_freq_factor and self.factor > 0
                                 and self.original_max_position_embeddings > 0):
            problems = [f"factors {self.factor}, {self.low_freq_factor}, {self.high_freq_factor} and original "
                        f"context {self.original_max_position_embeddings} must be positive, low < high"]
        if problems:
            raise PocketQuantError("invalid RoPE scaling: " + "; ".join(problems))


# Sizes beyond these come from a damaged or hostile file, not from a model this project can run.
LIMITS = {"dim": 1 << 16, "n_layers": 1 << 10, "n_heads": 1 << 10, "n_kv_heads": 1 << 10, "ffn_dim": 1 << 18,
          "vocab_size": 1 << 22, "head_dim": 1 << 10, "max_seq_len": 1 << 22}


def _fields_of(cls, d, what: str) -> dict:
    """A copy of `d` (a JSON object) with only the dataclass `cls`'s fields, or a clear error."""
    if not isinstance(d, dict):
        raise PocketQuantError(f"invalid {what}: expected a JSON object, got {type(d).__name__}")
    fields = dataclasses.fields(cls)
    unknown = set(d) - {f.name for f in fields}
    missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if unknown or missing:
        raise PocketQuantError(f"invalid {what}: unknown fields {sorted(unknown)}, missing fields {missing}")
    return dict(d)


def wrong_types(obj) -> list[str]:
    """Fields of a config dataclass whose value has the wrong type (ints: no bools or floats; floats: finite
    numbers; bools: true/false). Integral numbers of other kinds (NumPy's) become plain ints."""
    problems = []
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), f.type  # a string: config.py and scheme.py postpone annotations
        if kind == "int" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            object.__setattr__(obj, f.name, int(value))
        elif kind == "float" and isinstance(value, numbers.Real) and not isinstance(value, bool) \
                and math.isfinite(value):
            object.__setattr__(obj, f.name, float(value))
        elif kind in ("int", "float", "bool", "str"):
            ok = isinstance(value, bool) if kind == "bool" else isinstance(value, str) if kind == "str" else False
            if not ok:
                problems.append(f"{f.name} must be {'an' if kind == 'int' else 'a'} {kind}, got {value!r}"[:200])
    return problems


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-architecture model."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    head_dim: int = 0  # 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # online rotations of a rotated (SpinQuant) model: a Hadamard transform of down_proj's input (R4) and
    # of queries and keys after RoPE (R3)
    hadamard_down: bool = False
    hadamard_qk: bool = False
    name: str = field(default="", compare=False)

    def __post_init__(self):
        problems = wrong_types(self)
        if problems:  # e.g. a string or null in a config file where a number goes
            raise PocketQuantError("invalid model config: " + "; ".join(problems))
        if self.head_dim == 0 and self.n_heads > 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value <= 0:
                problems.append(f"{name}={value} must be positive")
            elif value > limit:  # a damaged or hostile file: refuse before anything is allocated
                problems.append(f"{name}={value} is beyond any supported model (at most {limit:,})")
        if not (0 < self.norm_eps < 1 and 0 < self.rope_theta < 1e12):
            problems.append(f"norm_eps={self.norm_eps} and rope_theta={self.rope_theta} must be positive and finite")
        if self.n_heads > 0 and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if problems:
            raise PocketQuantError("invalid model config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = _fields_of(cls, d, "model config")
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**_fields_of(RopeScaling, d["rope_scaling"], "RoPE scaling"))
        elif not isinstance(d.get("rope_scaling"), (RopeScaling, type(None))):
            raise PocketQuantError(f"invalid model config: rope_scaling must be an object, got {d['rope_scaling']!r}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_hf(cls, hf: dict, name: str = "") -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict (transformers 4 or 5 spelling)."""
        if not isinstance(hf, dict):
            raise PocketQuantError(f"a config must be a JSON object, got {type(hf).__name__}")
        arch = hf.get("model_type")
        if arch != "llama":
            archs = hf.get("architectures") or []
            raise PocketQuantError(
                f"unsupported architecture: model_type={arch!r} architectures={archs}; "
                "only Llama-architecture models (model_type 'llama') are supported")
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise PocketQuantError(f"rope_scaling must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise PocketQuantError(f"unsupported RoPE scaling type {rope_type!r}; expected 'llama3' or none")
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                high_freq_factor=rope["high_freq_factor"],
                original_max_position_embeddings=rope["original_max_position_embeddings"])
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise PocketQuantError("unsupported: Llama variants with attention or MLP biases")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise PocketQuantError(f"unsupported hidden_act {act!r}; expected 'silu'")
        n_heads = hf["num_attention_heads"]
        return cls(
            dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
            head_dim=hf.get("head_dim") or 0,  # 0: dim // n_heads
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling, max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=hf.get("tie_word_embeddings") or False, name=name)

    @classmethod
    def from_meta(cls, params: dict, name: str = "") -> "ModelConfig":
        """Build from Meta's `params.json` (llama-models layout)."""
        if not isinstance(params, dict):
            raise PocketQuantError(f"params must be a JSON object, got {type(params).__name__}")
        dim, multiple_of = params["dim"], params.get("multiple_of", 256)
        multiplier = params.get("ffn_dim_multiplier") or 1.0
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= LIMITS["dim"]
                   for v in (dim, multiple_of)) or not isinstance(multiplier, (int, float)) or not 0 < multiplier < 64:
            raise PocketQuantError(f"invalid model config: dim={dim!r}, multiple_of={multiple_of!r} and "
                                   f"ffn_dim_multiplier={multiplier!r} must be positive numbers of sane size")
        hidden = int(2 * 4 * dim / 3)
        if params.get("ffn_dim_multiplier") is not None:
            hidden = int(multiplier * hidden)
        hidden = multiple_of * math.ceil(hidden / multiple_of)
        scaling = None
        if params.get("use_scaled_rope"):
            factor = params.get("rope_scale_factor") or params.get("rope_scaling_factor") or _llama3_factor(params)
            scaling = RopeScaling(factor=factor, high_freq_factor=params.get("rope_high_freq_factor") or 4.0)
        n_heads = params["n_heads"]
        return cls(
            dim=dim, n_layers=params["n_layers"], n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads, ffn_dim=hidden,
            vocab_size=params["vocab_size"], norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 10000.0), rope_scaling=scaling,
            max_seq_len=params.get("max_seq_len", 8192), tie_embeddings=False, name=name)


def _llama3_factor(params: dict) -> float:
    """The RoPE scaling factor of a Meta params.json that names none. Llama 3.2 1B and 3B were trained with 32
    (their Hugging Face configs say so, and ExecuTorch uses 32 for `--model llama3_2`), Llama 3.1 with 8;
    Meta's own params.json for both say only `use_scaled_rope`, and llama-models applies 8 to every model."""
    llama32 = (params.get("dim"), params.get("n_layers")) in ((2048, 16), (3072, 28))
    return 32.0 if llama32 and params.get("vocab_size") == 128256 else 8.0


_LLAMA32_ROPE = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)

SHAPES: dict[str, ModelConfig] = {
    "llama-3.2-1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                                vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0,
                                rope_scaling=_LLAMA32_ROPE, max_seq_len=8192, tie_embeddings=True,
                                name="llama-3.2-1b"),
    "llama-3.2-3b": ModelConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192,
                                vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0,
                                rope_scaling=_LLAMA32_ROPE, max_seq_len=8192, tie_embeddings=True,
                                name="llama-3.2-3b"),
    "smollm2-135m": ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                                vocab_size=49152, norm_eps=1e-5, rope_theta=100000.0,
                                max_seq_len=8192, tie_embeddings=True, name="smollm2-135m"),
    "tinyllama-1.1b": ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                                  vocab_size=32000, norm_eps=1e-5, rope_theta=10000.0,
                                  max_seq_len=2048, tie_embeddings=False, name="tinyllama-1.1b"),
}

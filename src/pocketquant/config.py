"""Model configuration: one dataclass for every Llama-family shape, and named presets."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from pocketquant.errors import PocketQuantError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 ("llama3") RoPE frequency scaling."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        problems = []
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PocketQuantError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_hf(cls, hf: dict, name: str = "") -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict (transformers 4 or 5 spelling)."""
        arch = hf.get("model_type")
        if arch != "llama":
            archs = hf.get("architectures") or []
            raise PocketQuantError(
                f"unsupported architecture: model_type={arch!r} architectures={archs}; "
                "only Llama-architecture models (model_type 'llama') are supported")
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise PocketQuantError(f"unsupported RoPE scaling type {rope_type!r}; expected 'llama3' or none")
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
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
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=scaling, max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), name=name)

    @classmethod
    def from_meta(cls, params: dict, name: str = "") -> "ModelConfig":
        """Build from Meta's `params.json` (llama-models layout)."""
        dim = params["dim"]
        hidden = int(2 * 4 * dim / 3)
        if params.get("ffn_dim_multiplier") is not None:
            hidden = int(params["ffn_dim_multiplier"] * hidden)
        multiple_of = params.get("multiple_of", 256)
        hidden = multiple_of * math.ceil(hidden / multiple_of)
        scaling = None
        if params.get("use_scaled_rope"):
            # Meta's reference code (llama-models) scales by 8 for every Llama 3 checkpoint.
            scaling = RopeScaling(factor=float(params.get("rope_scaling_factor") or 8.0),
                                  high_freq_factor=float(params.get("rope_high_freq_factor") or 4.0))
        n_heads = params["n_heads"]
        return cls(
            dim=dim, n_layers=params["n_layers"], n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads, ffn_dim=hidden,
            vocab_size=params["vocab_size"], norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=scaling,
            max_seq_len=params.get("max_seq_len", 8192), tie_embeddings=False, name=name)


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

"""Model configuration: one dataclass that derives every dependent size and validates it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from llama3.errors import ConfigError

ATTENTIONS = ("softmax", "softplus")
MIXERS = ("swiglu", "combinator")
SOFTPLUS_SCALES = ("length", "constant")
CORE_OUTPUT_SCALES = ("width", "none")
INITS = ("normal", "fan_in", "depth")
DEFAULT_MIXER = {"softmax": "swiglu", "softplus": "combinator"}
# Settings added after checkpoints were first written, with the value that reproduces a model
# saved before each existed (a record without the key is such a model).
LEGACY = {"core_output_scale": "none"}


def heuristic_core_dim(dim: int) -> int:
    """Core width for softplus attention when none is given.

    The multiple of 8 nearest to 5·dim − 216 (a linear fit of the published points: dim 128 → 424),
    never below 8.
    """
    if dim <= 0:
        raise ConfigError("{dim} must be positive, got {}", dim)
    return max(8, 8 * round((5 * dim - 216) / 8))


def swiglu_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU hidden width: 2/3 of 4·dim, scaled, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelArgs:
    """Every size that defines a model. Field names follow Meta's ``params.json`` where one exists.

    ``mixer=None`` follows the attention (softmax → swiglu, softplus → combinator);
    ``core_dim=None`` takes :func:`heuristic_core_dim`; ``n_kv_heads=None`` means ``n_heads``.

    ``core_output_scale`` (softplus): "width" multiplies the core's output by min(1, dim/core_dim)
    before the output projection, so that no core drives the residual stream harder than one of
    width ``dim`` (see :attr:`core_output_multiplier`); "none" leaves it as models saved before the
    setting existed; a number (as a string, "0.3") is the factor itself. ``init`` names the
    initialisation scheme (:meth:`Transformer.init_weights`).

    An invalid value raises :class:`ConfigError` naming the fields at fault (the command line
    names their flags instead).
    """

    dim: int = 128
    n_layers: int = 3
    n_heads: int = 4
    n_kv_heads: int | None = None
    vocab_size: int = 2048
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    max_seq_len: int = 4096
    attention: str = "softplus"
    mixer: str | None = None
    core_dim: int | None = None
    softplus_scale: str = "length"
    core_output_scale: str = "width"
    init: str = "normal"
    dropout: float = 0.0
    # Derived in __post_init__; not constructor arguments.
    head_dim: int = field(init=False)
    hidden_dim: int = field(init=False)

    def __post_init__(self) -> None:
        self._check_choice("attention", self.attention, ATTENTIONS)
        if self.mixer is None:
            self.mixer = DEFAULT_MIXER[self.attention]
        self._check_choice("mixer", self.mixer, MIXERS)
        self._check_choice("softplus_scale", self.softplus_scale, SOFTPLUS_SCALES)
        self._check_core_output_scale()
        self._check_choice("init", self.init, INITS)
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            self._check_positive(name, getattr(self, name))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self._check_positive("n_kv_heads", self.n_kv_heads)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("{dropout} must be in [0, 1), got {}", self.dropout)
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("{norm_eps} and {rope_theta} must be positive")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ConfigError(
                "{ffn_dim_multiplier} must be positive, got {}", self.ffn_dim_multiplier
            )
        if self.attention == "softmax":
            self._validate_heads()
        else:
            self._validate_core()
        self.head_dim = self.dim // self.n_heads
        self.hidden_dim = swiglu_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def _validate_heads(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(
                "{dim} ({}) must be divisible by {n_heads} ({})", self.dim, self.n_heads
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                "{n_heads} ({}) must be divisible by {n_kv_heads} ({})",
                self.n_heads,
                self.n_kv_heads,
            )
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(
                "head_dim = {dim} / {n_heads} = {} must be even for RoPE", self.dim // self.n_heads
            )

    def _validate_core(self) -> None:
        if self.core_dim is None:
            self.core_dim = heuristic_core_dim(self.dim)
        self._check_positive("core_dim", self.core_dim)
        if self.core_dim % 8:
            raise ConfigError("{core_dim} must be a multiple of 8, got {}", self.core_dim)

    def _check_core_output_scale(self) -> None:
        value = self.core_output_scale
        if value in CORE_OUTPUT_SCALES:
            return
        try:
            factor = float(value)
        except (TypeError, ValueError):
            factor = math.nan
        if not 0 < factor < math.inf:
            raise ConfigError(
                "{core_output_scale} must be one of {} or a positive number; got {!r}",
                ", ".join(CORE_OUTPUT_SCALES),
                value,
            )

    @staticmethod
    def _check_positive(name: str, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError("{" + name + "} must be a positive integer, got {!r}", value)

    @staticmethod
    def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
        if value not in choices:
            raise ConfigError(
                "{" + name + "} must be one of {}; got {!r}", ", ".join(choices), value
            )

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def rope_dim(self) -> int:
        """Width of the features RoPE rotates: head_dim (softmax) or core_dim (softplus)."""
        return self.head_dim if self.attention == "softmax" else self.core_dim

    @property
    def core_output_multiplier(self) -> float:
        """Factor on the softplus core's output before ``wo``: min(1, dim/core_dim) for "width".

        Under AdamW each of ``wo``'s core_dim inputs (and each output of ``wv``) moves by about the
        learning rate per step, so the attention branch's update grows with core_dim; the factor
        holds it to that of a core of width ``dim`` (the width every softmax model has), and is 1
        for cores no wider than that.
        """
        if self.attention != "softplus" or self.core_output_scale == "none":
            return 1.0
        if self.core_output_scale == "width":
            return min(1.0, self.dim / self.core_dim)
        return float(self.core_output_scale)

    def to_dict(self) -> dict[str, Any]:
        """Constructor arguments only (derived sizes are recomputed on load)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelArgs":
        """Rebuild from :meth:`to_dict`; unknown keys are an error that names them, and a setting
        the record predates takes its :data:`LEGACY` value (the model it was saved from)."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError("unknown model arguments: {}", ", ".join(unknown))
        return cls(**{**LEGACY, **values})

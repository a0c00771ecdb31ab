"""Typed model configs that round-trip through YAML and JSON.

The defaults are the SaShiMi YouTubeMix model of Goel et al. (2022): 4,751,072 parameters.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class _Yaml12Loader(yaml.SafeLoader):
    """safe_load with YAML 1.2 booleans: only true/false, so `precision: no` stays the string "no"."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml(text: str) -> Any:
    """Parse YAML safely (no object construction), reading yes/no/on/off as strings."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)


MAX_WEIGHTS = 2e9  # a config beyond this is a typo (d_model: 1000000000), not a model to allocate


def _check_ints(config, prefix: str, **ranges: tuple[int, int]) -> None:
    """ValueError naming the field when one of `ranges` is not an int within its (low, high)."""
    for name, (low, high) in ranges.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{prefix}{name}={value!r}: must be a whole number from {low} to {high}")


@dataclass
class S4Config:
    """One S4 layer's state-space parameterization.

    mode: "dplr" is S4 as SaShiMi uses it (Lambda - P P^H, bilinear, Cauchy kernel);
          "diag" is S4D (diagonal Lambda, zero-order hold, Vandermonde kernel).
    d_state: the real state size N; stored as N/2 conjugate pairs.
    n_ssm: copies of (Lambda, P, B); the H channels share them in turn. SaShiMi ties them (1).
    lambda_copies: copies of Lambda alone, when `reparam` unties it from P and B (0: n_ssm).
    dt_per_state: a step size per channel and state entry, not just per channel.
    dt_transform: how the stored `inv_dt` maps to the step size ("softplus", or "exp" for V3 imports).
    """

    mode: str = "dplr"
    d_state: int = 64
    n_ssm: int = 1
    lambda_copies: int = 0
    dt_per_state: bool = False
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_transform: str = "softplus"

    def __post_init__(self) -> None:
        if self.mode not in ("dplr", "diag"):
            raise ValueError(f"s4.mode must be 'dplr' or 'diag', not {self.mode!r}")
        if not isinstance(self.d_state, int) or self.d_state % 2 or not 2 <= self.d_state <= 4096:
            raise ValueError(f"s4.d_state={self.d_state!r}: must be an even number from 2 to 4096 (conjugate pairs)")
        _check_ints(self, "s4.", n_ssm=(1, 1 << 16), lambda_copies=(0, 1 << 16))
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"s4.dt_min={self.dt_min!r}, s4.dt_max={self.dt_max!r}: need 0 < dt_min <= dt_max")
        if self.dt_transform not in ("softplus", "exp"):
            raise ValueError(f"s4.dt_transform must be 'softplus' or 'exp', not {self.dt_transform!r}")


@dataclass
class SaShiMiConfig:
    """The multi-scale model: tiers of residual (S4, FF) blocks joined by pooling.

    d_model: width of the full-rate tier; each pooling multiplies it by `expand`.
    n_layers: (S4, FF) pairs per tier.
    pool: the down-sampling factor between consecutive tiers.
    """

    d_model: int = 64
    n_layers: int = 8
    pool: list[int] = field(default_factory=lambda: [4, 4])
    expand: int = 2
    ff_expand: int = 2
    n_codes: int = 256
    dropout: float = 0.0
    s4: S4Config = field(default_factory=S4Config)

    def __post_init__(self) -> None:
        if isinstance(self.s4, dict):
            self.s4 = S4Config(**self.s4)
        if not isinstance(self.pool, list) or not all(isinstance(p, int) and 1 <= p <= 64 for p in self.pool) \
                or len(self.pool) > 8:
            raise ValueError(f"pool={self.pool!r}: must be a list of at most 8 factors from 1 to 64")
        _check_ints(self, "", d_model=(1, 16384), n_layers=(1, 256), expand=(1, 16), ff_expand=(1, 16),
                    n_codes=(2, 65536))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r}: must be in [0, 1)")
        widths = [self.d_model * self.expand**i for i in range(len(self.pool) + 1)]
        weights = sum(2 * self.n_layers * (2 + 2 * self.ff_expand) * h * h for h in widths)  # S4 and FF linears
        if weights > MAX_WEIGHTS:
            raise ValueError(f"d_model={self.d_model}, n_layers={self.n_layers}, pool={self.pool}, expand={self.expand}: "
                             f"about {weights:.2g} weights, more than the {MAX_WEIGHTS:.0e} this toolkit allows")

    @property
    def total_pool(self) -> int:
        """Samples per step of the deepest tier."""
        out = 1
        for p in self.pool:
            out *= p
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SaShiMiConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        s4 = dict(data.get("s4") or {})
        s4_known = {f.name for f in dataclasses.fields(S4Config)}
        if set(s4) - s4_known:
            raise ValueError(f"unknown s4 config keys: {sorted(set(s4) - s4_known)}")
        return cls(**{**data, "s4": S4Config(**s4)})

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | Path) -> SaShiMiConfig:
        data = read_yaml(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a model config must be a YAML mapping")
        return cls.from_dict(data)


@dataclass
class AudioFormat:
    """How a model's codes relate to sound; stored in every checkpoint and dataset.

    quantization: "mulaw-official" (the SaShiMi data pipeline), "mulaw" (plain mu-law rounding)
                  or "linear".
    """

    sample_rate: int = 16000
    quantization: str = "mulaw-official"
    bits: int = 8

    QUANTIZATIONS = ("mulaw-official", "mulaw", "linear")

    def __post_init__(self) -> None:
        rate = self.sample_rate
        if isinstance(rate, bool) or not isinstance(rate, int) or not 1000 <= rate <= 384000:
            raise ValueError(f"audio.sample_rate={rate!r}: must be a whole number of Hz from 1000 to 384000")
        if self.quantization not in self.QUANTIZATIONS:
            raise ValueError(f"audio.quantization={self.quantization!r}: must be one of {', '.join(self.QUANTIZATIONS)}")
        if isinstance(self.bits, bool) or self.bits != 8 or not isinstance(self.bits, int):
            raise ValueError(f"audio.bits={self.bits!r}: must be 8 (the codes are bytes)")

    def mismatch(self, sample_rate: int, quantization: str) -> str | None:
        """Why codes at `sample_rate` in `quantization` are not what this model reads; None if they are."""
        if (self.sample_rate, self.quantization) == (sample_rate, quantization):
            return None
        return (f"trained on {self.sample_rate} Hz {self.quantization} codes, but the data is {sample_rate} Hz "
                f"{quantization}; prepare it with `s4music prepare --quantization {self.quantization} "
                f"--sample-rate {self.sample_rate}`")

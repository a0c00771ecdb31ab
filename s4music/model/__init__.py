"""The SaShiMi model: configs, S4 layers, the multi-scale network, its checkpoints and named models.

Each name is imported from its module on first use, so importing a light member (`model.config`,
`model.registry`'s names) does not import torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from s4music.model.checkpoint import CheckpointError, import_official, load_checkpoint, save_model
    from s4music.model.config import AudioFormat, S4Config, SaShiMiConfig
    from s4music.model.registry import DEFAULT_MODEL, load_model, resolve_model
    from s4music.model.sashimi import SaShiMi, SaShiMiState

_HOMES = {
    "checkpoint": ("CheckpointError", "import_official", "load_checkpoint", "save_model"),
    "config": ("AudioFormat", "S4Config", "SaShiMiConfig"),
    "registry": ("DEFAULT_MODEL", "load_model", "resolve_model"),
    "sashimi": ("SaShiMi", "SaShiMiState"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = [
    "DEFAULT_MODEL", "AudioFormat", "CheckpointError", "S4Config", "SaShiMi", "SaShiMiConfig", "SaShiMiState",
    "import_official", "load_checkpoint", "load_model", "resolve_model", "save_model",
]


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"s4music.model.{_HOME[name]}"), name)
    raise AttributeError(f"module 's4music.model' has no attribute {name!r}")

"""The SaShiMi model: configs, S4 layers, the multi-scale network, its checkpoints and named models."""

from s4music.model.checkpoint import CheckpointError, import_official, load_checkpoint, save_model
from s4music.model.config import AudioFormat, S4Config, SaShiMiConfig
from s4music.model.registry import DEFAULT_MODEL, load_model, resolve_model
from s4music.model.sashimi import SaShiMi, SaShiMiState

__all__ = [
    "DEFAULT_MODEL", "AudioFormat", "CheckpointError", "S4Config", "SaShiMi", "SaShiMiConfig", "SaShiMiState",
    "import_official", "load_checkpoint", "load_model", "resolve_model", "save_model",
]

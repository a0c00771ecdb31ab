"""The SaShiMi model: configs, S4 layers, the multi-scale network and its checkpoints."""

from s4music.model.checkpoint import CheckpointError, import_official, load_model, save_model
from s4music.model.config import AudioFormat, S4Config, SaShiMiConfig
from s4music.model.sashimi import SaShiMi, SaShiMiState

__all__ = [
    "AudioFormat", "CheckpointError", "S4Config", "SaShiMi", "SaShiMiConfig", "SaShiMiState",
    "import_official", "load_model", "save_model",
]

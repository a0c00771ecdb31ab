"""s4music: continue music with SaShiMi, a multi-scale S4 state-space model over raw audio."""

from s4music.model import DEFAULT_MODEL, SaShiMi, SaShiMiConfig, load_model, save_model

__version__ = "0.1.0"
__all__ = ["DEFAULT_MODEL", "SaShiMi", "SaShiMiConfig", "load_model", "save_model", "__version__"]

"""s4music: continue music with SaShiMi, a multi-scale S4 state-space model over raw audio."""

from s4music.model import SaShiMi, SaShiMiConfig, load_model

__version__ = "0.1.0"
__all__ = ["SaShiMi", "SaShiMiConfig", "load_model", "__version__"]

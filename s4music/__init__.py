"""s4music: continue music with SaShiMi, a multi-scale S4 state-space model over raw audio.

The model's names are imported on first use, so `import s4music` (and the command line's start-up,
its `--help`) does not wait for torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from s4music.model import DEFAULT_MODEL, SaShiMi, SaShiMiConfig, load_model, save_model

__version__ = "0.1.0"
__all__ = ["DEFAULT_MODEL", "SaShiMi", "SaShiMiConfig", "load_model", "save_model", "__version__"]


def __getattr__(name: str):
    if name in __all__:  # __version__ is set above, so only the model's names come here
        import s4music.model

        return getattr(s4music.model, name)
    raise AttributeError(f"module 's4music' has no attribute {name!r}")

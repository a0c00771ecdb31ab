"""Models by name: `default` (the bundled model), or a path to a checkpoint.

    load_model("default")               # the bundled 4.75M SaShiMi
    load_model("runs/mine/best")        # an s4music checkpoint directory
    load_model("sashimi_youtubemix.pt") # an official SaShiMi checkpoint, imported

Every command that takes a model takes what `resolve_model` understands; omitting it means
`default`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from s4music.model.checkpoint import CheckpointError, load_checkpoint
from s4music.model.sashimi import SaShiMi

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "default-model"
DEFAULT_NAME = "default"


def resolve_model(spec: str | Path | None) -> Path:
    """The checkpoint a model name or path stands for: None or "default" is the bundled model."""
    if spec is None or str(spec) == DEFAULT_NAME:
        if not (DEFAULT_MODEL / "config.json").exists():
            raise CheckpointError(f"{DEFAULT_MODEL}: the bundled model is missing from this installation")
        return DEFAULT_MODEL
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"{spec}: no such file or directory, and not a model name (known: {DEFAULT_NAME})")
    return path


def load_model(spec: str | Path | None = None, device: str | torch.device = "cpu") -> SaShiMi:
    """Load a model by name or path (see `resolve_model`), in eval mode, float32."""
    return load_checkpoint(resolve_model(spec), device=device)

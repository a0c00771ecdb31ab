"""What `s4music eval` is asked to do (`EvalOptions`), apart from `s4music.evaluate`, so the command
line reads its defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalOptions:
    split: str = "test"  # train, val or test
    context: int | None = None  # samples scored from rest at a time; None: the whole window
    batch_size: int = 4  # windows scored together
    bootstrap: int = 1000  # resamplings of the source files for the 95% interval
    seed: int = 0  # of the bootstrap
    device: str = "cpu"
    max_windows: int | None = None  # score only the first N windows (quick checks)

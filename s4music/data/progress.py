"""Progress through a batch of files, as `prepare` and `render-midi` report it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

FileProgress = Callable[[Path, str, int, int], None]  # (file, status, files done, files in all)


class FileCounter:
    """Call it once per file as the batch goes; it passes each on to `on_file` with the count so far."""

    def __init__(self, on_file: FileProgress | None, total: int):
        self.on_file, self.total, self.done = on_file, total, 0

    def __call__(self, path: Path, status: str) -> None:
        self.done += 1
        if self.on_file is not None:
            self.on_file(path, status, self.done, self.total)


def time_left(seconds: float) -> str:
    """A duration as H:MM:SS, hours past 24 included."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

"""What `fetch`, `render-midi` and `prepare` are asked to do, apart from the modules that do it, so
the command line reads their defaults without importing torch.

    FetchOptions(sample_rate=16000, start=30)
    RenderOptions(instruments=["piano"], vary=True, shard="2/8")
    PrepareOptions(seconds=8.192, tags=["genre=piano"])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from s4music.data.format import DatasetError
from s4music.options import Shard, parse_shard, split_assignment


@dataclass
class FetchOptions:
    sample_rate: int = 16000
    start: float | None = None  # seconds, applied locally after download
    end: float | None = None
    playlist_items: str | None = None  # yt-dlp syntax, e.g. "1-3,7"
    timeout: float = 30.0
    max_mb: float | None = 1000.0  # the largest download (each item of a playlist); None or 0: no limit
    max_minutes: float | None = 180.0  # the longest audio; None or 0: no limit
    # which addresses (ip, port) may be connected to, at every hop; None: any (as curl does)
    allow_address: Callable[[str, int], bool] | None = None


@dataclass
class RenderOptions:
    instruments: list[str] | None = None  # family names, program numbers 0-127, or "drums"; None: all
    drums: bool = True
    soundfont: str | Path | None = None  # a file or installed name (system.SOUNDFONTS), or several "a,b"; None: the best
    sample_rate: int = 16000
    max_seconds: float | None = 600.0
    workers: int = 2
    gain: float = 0.5
    silence_db: float = -60.0  # trim threshold, relative to the rendered file's peak
    program: str | int | None = None  # play every melodic part on this GM program; "piano": one of PIANO_PROGRAMS
    vary: bool = False  # a seeded Variation per file (see the module docstring)
    seed: int = 0
    timeout: float = 300.0  # seconds FluidSynth may take for one file
    shard: Shard | str | None = None  # render only this shard of the files, "i/n" (1-based); None: all


@dataclass
class PrepareOptions:
    seconds: float = 8.192  # the official window: 131,072 samples at 16 kHz
    sample_rate: int = 16000
    quantization: str = "mulaw-official"  # see s4music.audio.SCHEMES
    val_fraction: float = 0.06
    test_fraction: float = 0.06
    seed: int = 0
    tags: dict[str, str] | list[str] = field(default_factory=dict)  # stratum tags; "key=value" strings are parsed
    pinned: dict[str, str] = field(default_factory=dict)  # file name (as find_audio gives it) -> split, kept as given
    shard: Shard | str | None = None  # read only this shard of the files, "i/n" (1-based); None: all

    def __post_init__(self) -> None:
        """Check every option before anything is created, so a bad one leaves nothing behind."""
        from s4music.audio import SCHEMES  # here: the options are read by the command line, which starts without torch

        if not isinstance(self.tags, dict):
            self.tags = dict(split_assignment(t, "--tag") for t in self.tags)
        if self.shard is not None:
            self.shard = parse_shard(self.shard)
        problems = {
            "quantization": (self.quantization not in SCHEMES, f"use one of {', '.join(SCHEMES)}"),
            "seconds": (not self.seconds > 0, "must be positive"),
            "sample_rate": (not self.sample_rate > 0, "must be positive"),
            "val_fraction": (not 0 <= self.val_fraction < 1, "must be in [0, 1)"),
            "test_fraction": (not 0 <= self.test_fraction < 1, "must be in [0, 1)"),
        }
        for name, (bad, rule) in problems.items():
            if bad:
                raise DatasetError(f"{name}={getattr(self, name)!r}: {rule}")
        if self.val_fraction + self.test_fraction >= 1:
            raise DatasetError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g}: "
                               "leaves nothing to train on")
        if self.window < 1:
            raise DatasetError(f"seconds={self.seconds}: shorter than one sample at {self.sample_rate} Hz")

    @property
    def window(self) -> int:
        return int(round(self.seconds * self.sample_rate))

"""What a jam is asked to do (`JamOptions`), apart from `s4music.jam`, so the command line reads its
defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from s4music.errors import S4MusicError
from s4music.generate.options import Sampling, StepOptions


class JamError(S4MusicError):
    pass


@dataclass
class JamOptions:
    wait: float = 1.0  # seconds of quiet before the model answers
    max_answer: float = 10.0  # the longest answer, seconds
    quiet_db: float = 20.0  # quiet: this far below the recent playing level
    guidance_after: float = 3.0  # seconds of playing before the first live verdict
    match_level: bool = True  # answer at the loudness (RMS) of the player's last LEVEL_S seconds
    seed: int | None = None  # answer k uses seed + k; None: a fresh random seed
    sampling: Sampling = field(default_factory=Sampling)
    step: StepOptions = field(default_factory=lambda: StepOptions(device="cpu"))

    def check(self) -> None:
        problems = [f"{name} {value:g}: {rule}" for name, value, bad, rule in (
            ("--wait", self.wait, not 0 < self.wait <= 60, "must be more than 0 and at most 60 seconds"),
            ("--max-answer", self.max_answer, not 0 < self.max_answer <= 600, "must be more than 0 and at most 600"),
            ("--quiet-db", self.quiet_db, not 3 <= self.quiet_db <= 80, "must be 3 to 80 dB"),
        ) if bad] + self.sampling.problems()
        if self.step.device != "cpu":  # live blocks are too short for a GPU to win; the state lives on the CPU
            problems.append(f"step device {self.step.device}: a jam runs on the CPU")
        if problems:
            raise JamError("; ".join(problems))

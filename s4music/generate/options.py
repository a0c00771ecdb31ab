"""What a generation run is asked to do, in small typed pieces.

    GenerateOptions(seconds=10, variations=4, seed=1, rank=True,
                    sampling=Sampling(temperature=0.9), prompt=PromptSelection(seconds=6),
                    output=Output(normalize="peak"), step=StepOptions(device="cpu"))

Every check of a value happens in `check()`, before any model or file is touched, and names the
command-line option it comes from.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from dataclasses import dataclass, field

from s4music.errors import S4MusicError

log = logging.getLogger(__name__)

MAX_SECONDS = 3600.0  # one take; longer runs would hold hours of codes for the degeneracy checks
MAX_VARIATIONS = 1024


def new_seed() -> int:
    """A fresh random seed, for a run given none (reported, so that the run can be made again)."""
    return secrets.randbelow(2**31)


class GenerationError(S4MusicError):
    pass


class PromptRefused(GenerationError):
    """--strict and a prompt judged far from what the model knows: exit code 2, as `check` gives."""

    exit_code = 2


@dataclass
class Sampling:
    """How a code is drawn from the model's distribution. None takes the checkpoint's recommendation
    (its summary's "sampling"), else the neutral value: every rule below off."""

    temperature: float | None = None  # 0: greedy
    top_k: int | None = None  # keep the k likeliest codes; 0: off
    top_p: float | None = None  # keep the likeliest codes up to this probability; 1: off
    temperature_end: float | None = None  # a schedule: from `temperature` at the seam to this at the end
    # Re-anchoring: every context_seconds / 2 of a take, the state is read afresh from the last
    # context_seconds of audio alone, so the model hears between 1 and 1.5 times that. 0: off.
    context_seconds: float | None = None
    typical: float | None = None  # locally typical: the codes nearest the entropy, up to this probability; 1: off
    # Guidance by the prompt: a second row hears the take without the prompt (only its last
    # guidance_seconds) and each code is drawn from free + guidance (prompt - free). 1: off.
    guidance: float | None = None
    guidance_seconds: float | None = None
    # Mirostat: the running surprise of the drawn codes held near this many bits/sample ("auto":
    # the prompt's own, as the model read it; from nothing, the model's test figure). 0: off.
    surprise: float | str | None = None

    NEUTRAL = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "temperature_end": None, "context_seconds": 0.0,
               "typical": 1.0, "guidance": 1.0, "guidance_seconds": 0.25, "surprise": 0.0}

    def resolved(self, summary: dict, unfamiliar: bool = False) -> Sampling:
        """Unset values from the checkpoint's recommendation, then the neutral ones. For a prompt the
        model finds surprising (`unfamiliar`), its summary's "sampling_unfamiliar" overrides
        "sampling" (the long-form benchmark chooses both on validation prompts). Guidance and
        re-anchoring exclude each other (`problems`): a recommended one gives way to the other set here."""
        recommended = {**(summary.get("sampling") or {}), **((summary.get("sampling_unfamiliar") or {})
                                                             if unfamiliar else {})}
        if self.context_seconds and recommended.pop("guidance", 1) != 1:
            log.info("the model's recommended guidance is off: --context-seconds excludes it")
        if self.guidance not in (None, 1):
            recommended.pop("context_seconds", None)
        return Sampling(**{k: v if (v := getattr(self, k)) is not None else recommended.get(k, neutral)
                           for k, neutral in self.NEUTRAL.items()})

    def with_surprise_of(self, bits: float | None) -> Sampling:
        """--surprise auto made a number: `bits`, the prompt's (or, from nothing, the model's) bits/sample."""
        if self.surprise != "auto":
            return self
        return dataclasses.replace(self, surprise=float(bits) if bits else 0.0)

    def at(self, progress: float) -> Sampling:
        """The rule at `progress` (0 at the seam, 1 at the end) of a take: the scheduled temperature."""
        if self.temperature_end is None:
            return self
        t = self.temperature + (self.temperature_end - self.temperature) * progress
        return dataclasses.replace(self, temperature=t, temperature_end=None)

    def rule(self):
        """The resolved rule as the steps take it, a fast.Rule (surprise made a number first:
        `with_surprise_of`). Imported here: these options stay light to import without torch."""
        from s4music.model.fast import Rule

        s = self.resolved({})
        if isinstance(s.surprise, str):
            raise GenerationError("--surprise auto must be resolved against a prompt before sampling")
        return Rule(s.temperature, s.top_k, s.top_p, s.typical, s.guidance, s.surprise)

    def problems(self) -> list[str]:
        t, k, p, e, c = self.temperature, self.top_k, self.top_p, self.temperature_end, self.context_seconds
        y, g, gs, s = self.typical, self.guidance, self.guidance_seconds, self.surprise
        bad_surprise = s is not None and not (s == "auto" or (not isinstance(s, str) and 0 <= s <= 8))
        out = [f"{name} {value:g}: {rule}" for name, value, bad, rule in (
            ("--temperature", t, t is not None and not t >= 0, "must be 0 (greedy) or more"),
            ("--temperature-end", e, e is not None and not e >= 0, "must be 0 or more"),
            ("--top-k", k, k is not None and k < 0, "must be 0 (off) or more"),
            ("--top-p", p, p is not None and not 0 < p <= 1, "must be in (0, 1]; 1 is off"),
            ("--context-seconds", c, c is not None and not (c == 0 or 0.5 <= c <= 60), "must be 0 (off) or 0.5 to 60"),
            ("--typical", y, y is not None and not 0 < y <= 1, "must be in (0, 1]; 1 is off"),
            ("--guidance", g, g is not None and not 0 <= g <= 10, "must be 0 to 10; 1 is off"),
            ("--guidance-seconds", gs, gs is not None and not 0 <= gs <= 10, "must be 0 to 10"),
        ) if bad]
        if bad_surprise:
            out.append(f"--surprise {s}: use auto, or bits/sample from 0 (off) to 8")
        if g not in (None, 1) and c:
            out.append("--guidance with --context-seconds: use one or the other (re-anchoring would read "
                       "the prompt back into the row that must not hear it)")
        return out


@dataclass
class PromptSelection:
    """Which part of the prompt file is read: [start, end] seconds, then its last `seconds`."""

    seconds: float = 8.0
    start: float | None = None
    end: float | None = None

    def problems(self) -> list[str]:
        out = []
        if not self.seconds > 0:
            out.append(f"--prompt-seconds {self.seconds:g}: must be positive")
        if self.start is not None and not self.start >= 0:
            out.append(f"--prompt-start {self.start:g}: must be 0 or more")
        if self.end is not None and not self.end > (self.start or 0):
            out.append(f"--prompt-end {self.end:g}: must be after --prompt-start ({self.start or 0:g})")
        return out


@dataclass
class Output:
    """What is written and how loud. `normalize` fixes one gain before the first sample is written:
    loudness puts the prompt (for `generate`, the model's test audio) at -16 LUFS, peak puts its peak
    at -1 dBFS; a true-peak limiter keeps the result under -1 dBTP. none writes the model's level."""

    include_prompt: bool = True
    normalize: str = "loudness"
    format: str | None = None  # None: from the file name; for "-" (standard output) wav unless given
    plot: bool = False
    sidecar: str | None = None  # the settings and timings (JSON); None: OUT.json beside a file, none for "-"

    NORMALIZE = ("loudness", "peak", "none")

    def problems(self) -> list[str]:
        if self.normalize not in self.NORMALIZE:
            return [f"--normalize {self.normalize}: use one of {', '.join(self.NORMALIZE)}"]
        return []


@dataclass
class StepOptions:
    """Where and how the model steps. device auto: read the prompt on a GPU when there is one and
    generate on the fused CPU step (which outruns a GPU's step at small batches; see
    benchmarks/RESULTS.md); cuda: generate on the GPU too (CUDA graphs of the plain step)."""

    device: str = "auto"
    fused: bool = True  # the fused C++ step on a CPU where it builds, CUDA graphs on a GPU
    half_weights: bool = True  # fused CPU step in half precision: fp16 weights, bf16 prompt reads where the CPU has it

    DEVICES = ("auto", "cpu", "cuda")

    def problems(self) -> list[str]:
        return [f"--device {self.device}: use one of {', '.join(self.DEVICES)}"] if self.device not in self.DEVICES else []


@dataclass
class GenerateOptions:
    seconds: float = 5.0  # length of the continuation
    variations: int = 1  # each with its own seed: seed, seed + 1, ...
    seed: int | None = None  # None: a fresh random seed (always reported and saved)
    rank: bool = False  # order the variations by the model's likelihood, best first
    retry_degenerate: int = 0  # resample a variation that collapses, turns to noise or sticks at an offset
    strict: bool = False  # refuse a prompt judged far from what the model knows (default: warn, continue)
    sampling: Sampling = field(default_factory=Sampling)
    prompt: PromptSelection = field(default_factory=PromptSelection)
    output: Output = field(default_factory=Output)
    step: StepOptions = field(default_factory=StepOptions)

    def check(self) -> None:
        """A GenerationError naming every bad option, with its allowed range."""
        problems = []
        if not 0 < self.seconds <= MAX_SECONDS:
            problems.append(f"--seconds {self.seconds:g}: must be more than 0 and at most {MAX_SECONDS:g} (one hour)")
        if not 1 <= self.variations <= MAX_VARIATIONS:
            problems.append(f"--variations {self.variations}: must be 1 to {MAX_VARIATIONS}")
        if self.retry_degenerate < 0:
            problems.append(f"--retry-degenerate {self.retry_degenerate}: must be 0 or more")
        for part in (self.sampling, self.prompt, self.output, self.step):
            problems += part.problems()
        if problems:
            raise GenerationError("; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

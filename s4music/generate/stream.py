"""Stages 4 and 5: post-processing and the stream of audio that every sink consumes.

    generation = Generation(net, stepper, options, sampling, seeds, prompt=read)   # prompt=None: from rest
    for chunk in generation:                                        # Chunk(start, samples (V, n) float32)
        ...                                                         # the prompt first, then the continuation
    takes = generation.takes()                                      # bits, degeneracy, seeds

The stream runs over the whole piece, prompt then continuation, so the filters carry the prompt's
state into the seam; `first_frame` says where the output begins (after the prompt, with
include_prompt off). Post-processing is causal and fixed before the first chunk: decode, a 10 Hz
high-pass for the model's slow drift, one gain (from the prompt's level, or for improvisation the
model's recorded test level), and a true-peak limiter. So a file written from the stream and the
same stream sent to a pipe are the same samples, and a seed fixes them.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from s4music.audio import decode
from s4music.dsp import HighPass, Limiter, dbfs, loudness_lufs
from s4music.generate.options import GenerateOptions, Sampling
from s4music.generate.prompt import ReadPrompt
from s4music.generate.sampler import Stepper
from s4music.guidance import PromptReport, degeneracy
from s4music.model.sashimi import SaShiMi

log = logging.getLogger(__name__)

FIRST_CHUNK = 1000  # samples: small, so the first continued audio comes quickly
CHUNK = 2000  # samples per chunk after it (and per fused-step call)
TARGET_LUFS = -16.0
TARGET_PEAK_DBFS = -1.0

ProgressFn = Callable[[int, int, float], None]  # (samples done, total, live speed: × real time)


@dataclass
class Chunk:
    start: int  # index of the first sample in the whole stream (prompt, then continuation)
    samples: torch.Tensor  # (V, n) float32, ready to write

    def after(self, frame: int) -> torch.Tensor:
        """The part of the samples at or after stream index `frame`."""
        return self.samples[:, max(0, frame - self.start):]


@dataclass
class Take:
    """One variation as sampled."""

    seed: int
    bits: float  # mean NLL of its codes under the model, bits/sample
    degenerate: str | None  # see guidance.degeneracy
    dc_offset: float  # its mean level over the last second, as sampled (the high-pass removes it)
    retries: int = 0
    path: Path | None = None  # where it was written (None: standard output, or not written)


@dataclass
class Level:
    """The one gain of the output, fixed before its first sample."""

    mode: str  # loudness, peak or none
    gain_db: float
    reference: str | None  # what the gain was measured on

    @staticmethod
    def choose(mode: str, net: SaShiMi, prompt_wave: torch.Tensor | None) -> Level:
        sr = net.audio.sample_rate
        if mode == "none":
            return Level(mode, 0.0, None)
        if prompt_wave is not None:
            lufs = loudness_lufs(prompt_wave, sr) if mode == "loudness" else None
            if lufs is not None:
                return Level(mode, TARGET_LUFS - lufs, "prompt loudness")
            peak = float(prompt_wave.abs().max()) if prompt_wave.numel() else 0.0
            return Level(mode, TARGET_PEAK_DBFS - dbfs(peak) if peak > 0 else 0.0, "prompt peak")
        recorded = (net.summary.get("eval") or {}).get("level") or {}
        if mode == "loudness" and recorded.get("lufs") is not None:
            return Level(mode, TARGET_LUFS - recorded["lufs"], "model's test audio (loudness)")
        if recorded.get("peak_dbfs") is not None:
            return Level(mode, TARGET_PEAK_DBFS - recorded["peak_dbfs"], "model's test audio (peak)")
        log.info("%s has no recorded level of its test audio (`s4music eval --record` keeps one): --normalize %s "
                 "leaves the takes at the model's own level", net.name or "the model", mode)
        return Level(mode, 0.0, None)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "gain_db": self.gain_db, "reference": self.reference}


class PostProcess:
    """decode -> high-pass -> gain -> limiter, for V variations at once, causal. The limiter's
    look-ahead holds back its last `delay` samples until `flush()`; nothing else is added or lost."""

    def __init__(self, net: SaShiMi, level: Level, batch: int = 1):
        sr = net.audio.sample_rate
        self.scheme = net.audio.quantization
        self.highpass = HighPass(sr, batch)
        self.gain = 10 ** (level.gain_db / 20)
        self.limiter = Limiter(sr, batch) if level.mode != "none" else None
        self.held_back = self.limiter.delay if self.limiter else 0  # the limiter's start-up samples, not yet dropped

    def copy(self, batch: int) -> PostProcess:
        out = copy.copy(self)
        out.highpass = self.highpass.copy(batch)
        out.limiter = self.limiter.copy(batch) if self.limiter else None
        return out

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (V, n) -> the samples (V, <= n) float32 that are final now."""
        x = self.highpass(decode(codes, self.scheme)) * self.gain
        if self.limiter is None:
            return x.float()
        y = self.limiter(x)
        drop = min(self.held_back, y.shape[1])  # what the limiter's delay line held before the first sample
        self.held_back -= drop
        return y[:, drop:].float()

    def flush(self) -> torch.Tensor:
        return self.limiter.flush().float() if self.limiter else torch.zeros(self.highpass.state.shape[0], 0)

    @property
    def max_reduction_db(self) -> float:
        return self.limiter.max_reduction_db if self.limiter else 0.0


@dataclass
class Timings:
    load_s: float = 0.0
    prefill_s: float = 0.0
    first_chunk_s: float | None = None  # from the start of sampling to the first continued audio
    generate_s: float = 0.0
    total_s: float = 0.0
    samples: int = 0  # generated, all variations and retries

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class Generation:
    """The stream of one run: the prompt (if any), then `seconds` of each variation, post-processed.

    Iterate it once. `first_frame` is where the output starts in the stream; `frames` is the
    output's length, known before the first chunk."""

    net: SaShiMi
    stepper: Stepper
    options: GenerateOptions
    sampling: Sampling  # resolved: the checkpoint's recommendation filled in
    seeds: list[int]
    prompt: ReadPrompt | None = None
    on_progress: ProgressFn | None = None
    timings: Timings = field(default_factory=Timings)
    started: float = field(default_factory=time.perf_counter)  # when the run began (model loading)
    level: Level = field(init=False)

    def __post_init__(self) -> None:
        sr = self.net.audio.sample_rate
        heard_bits = self.prompt.report.bits if self.prompt else self.net.summary.get("test_bits")
        self.sampling = self.sampling.with_surprise_of(heard_bits)
        self.samples = max(1, int(round(self.options.seconds * sr)))  # per variation
        self.prompt_frames = self.prompt.codes.numel() if self.prompt else 0
        self.first_frame = 0 if self.options.output.include_prompt else self.prompt_frames
        self.frames = self.prompt_frames + self.samples - self.first_frame
        lead = decode(self.prompt.codes, self.net.audio.quantization) if self.prompt else None
        self.level = Level.choose(self.options.output.normalize, self.net, lead)
        self._after_prompt = PostProcess(self.net, self.level)  # batch 1, fed the prompt by __iter__
        self._codes: list[list[torch.Tensor]] = [[] for _ in self.seeds]
        self._logprob = torch.zeros(len(self.seeds), dtype=torch.float64)
        self._block_logprobs: list[torch.Tensor] = []  # (V,) sums of each FIRST_CHUNK samples, in order
        self._prompt_chunk: torch.Tensor | None = None
        self.limiter_reduction_db = 0.0

    @property
    def sample_rate(self) -> int:
        return self.net.audio.sample_rate

    @property
    def step(self) -> str:
        return self.stepper.name

    @property
    def guidance(self) -> PromptReport | None:
        return self.prompt.report if self.prompt else None

    def _start(self) -> tuple[torch.Tensor, object, torch.Tensor]:
        """The first input, the state before it, and the codes that state was read from."""
        if self.prompt is not None:
            return self.prompt.codes[-1:], self.prompt.state, self.prompt.codes
        return torch.tensor([self.net.config.n_codes // 2]), self.net.initial_state(1), torch.zeros(0, dtype=torch.long)

    def __iter__(self) -> Iterator[Chunk]:
        if self.prompt is not None and self._prompt_chunk is None:
            self._prompt_chunk = self._after_prompt(self.prompt.codes.unsqueeze(0))
        post = self._after_prompt.copy(len(self.seeds))
        if self._prompt_chunk is not None and self._prompt_chunk.shape[1]:
            yield Chunk(0, self._prompt_chunk.expand(len(self.seeds), -1))
        position = self._prompt_chunk.shape[1] if self._prompt_chunk is not None else 0
        first, state, heard = self._start()
        sampler = self.stepper.sampler(state, first, self.seeds, self.sampling, heard)
        started = time.perf_counter()
        done = 0
        while done < self.samples:
            n = min(self.samples - done, FIRST_CHUNK if done == 0 else CHUNK)
            sampler.sampling = self.sampling.at(done / self.samples)  # a temperature schedule moves per chunk
            codes, logprobs = sampler.take(n)
            for i in range(len(self.seeds)):
                self._codes[i].append(codes[i].to(torch.uint8))
            self._logprob += logprobs.double().sum(dim=1)
            sums = F.pad(logprobs.double(), (0, -n % FIRST_CHUNK)).view(len(self.seeds), -1, FIRST_CHUNK).sum(-1)
            self._block_logprobs += list(sums.T)
            done += n
            out = post(codes)
            if self.timings.first_chunk_s is None:
                self.timings.first_chunk_s = time.perf_counter() - started
            yield Chunk(position, out)
            position += out.shape[1]
            if self.on_progress is not None:
                elapsed = time.perf_counter() - started
                self.on_progress(done, self.samples, len(self.seeds) * done / self.sample_rate / elapsed)
        yield Chunk(position, post.flush())
        self.timings.generate_s += time.perf_counter() - started
        self.timings.samples += len(self.seeds) * self.samples
        self.limiter_reduction_db = max(self.limiter_reduction_db, post.max_reduction_db)

    def takes(self) -> list[Take]:
        """Each variation's likelihood and degeneracy, after the stream has been read to its end."""
        sr, scheme = self.sample_rate, self.net.audio.quantization
        band = (self.net.summary.get("eval") or {}).get("flatness")
        out = []
        for i, seed in enumerate(self.seeds):
            raw = decode(torch.cat(self._codes[i]), scheme)  # as sampled, before the high-pass
            bits = float(-self._logprob[i] / self.samples / math.log(2))
            out.append(Take(seed, bits, degeneracy(raw, sr, band), float(raw[-sr:].mean())))
        return out

    def sampled(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Variation i as sampled: its codes (L,) uint8, and its bits/sample over each run of
        FIRST_CHUNK samples (the last run may be shorter), after the stream has been read."""
        codes = torch.cat(self._codes[i])
        sums = torch.stack([b[i] for b in self._block_logprobs])
        sizes = torch.full((len(sums),), float(FIRST_CHUNK), dtype=torch.float64)
        sizes[-1] = len(codes) - FIRST_CHUNK * (len(sums) - 1)
        return codes, -sums / sizes / math.log(2)

    def retake(self, seed: int) -> Generation:
        """One more variation from the same prompt and settings, with another seed (a retry)."""
        again = Generation(self.net, self.stepper, self.options, self.sampling, [seed], self.prompt,
                           self.on_progress, self.timings, self.started)
        again._prompt_chunk, again._after_prompt = self._prompt_chunk, self._after_prompt
        return again

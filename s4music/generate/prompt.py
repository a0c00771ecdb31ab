"""Stage 1 and 2: read the prompt and judge it.

The prompt goes through the same conversion as training data (decode, mono, resample, quantize with
the checkpoint's scheme). One parallel pass of the model over it gives both the state to continue
from and its likelihood, which guidance places against the model's recorded test figure.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from s4music.audio import Audio, encode, load_audio
from s4music.data.fetch import FetchOptions, fetch
from s4music.generate.options import GenerationError, PromptSelection, StepOptions
from s4music.generate.sampler import prompt_reader
from s4music.guidance import PromptReport, describe_signal, judge
from s4music.model.sashimi import SaShiMi, SaShiMiState

log = logging.getLogger(__name__)


@dataclass
class ReadPrompt:
    """A prompt as the model has read it."""

    audio: Audio  # the selection at the model's rate
    codes: torch.Tensor  # (L,) int64, on the CPU
    state: SaShiMiState  # after the whole prompt, batch 1
    report: PromptReport  # guidance: the verdict, its reasons and advice
    seconds: float  # wall time of the model's pass


def load_prompt(prompt: str | Path, sample_rate: int, selection: PromptSelection) -> tuple[Audio, float | None]:
    """The selection at `sample_rate`, cut to its last `selection.seconds`, and the selection's length
    before that cut (None if uncut). A URL (anything with "://") is fetched with yt-dlp first."""
    source = str(prompt)
    if "://" in source:
        with tempfile.TemporaryDirectory(prefix="s4music-prompt-") as tmp:
            report = fetch([source], tmp, FetchOptions(sample_rate=sample_rate))
            if report.failed:
                raise GenerationError(report.failed[0][1])
            audio = load_audio(report.fetched[0].audio, sample_rate, selection.start, selection.end)
    else:
        audio = load_audio(source, sample_rate, selection.start, selection.end)
    keep = int(round(selection.seconds * sample_rate))
    if 0 < keep < audio.samples.numel():
        return dataclasses.replace(audio, samples=audio.samples[-keep:].contiguous()), audio.seconds
    return audio, None


@torch.no_grad()
def read_prompt(net: SaShiMi, prompt: str | Path, selection: PromptSelection,
                step: StepOptions | None = None) -> ReadPrompt:
    """Load `prompt`, read it with `net` in one parallel pass (see `prompt_reader`), and judge it."""
    audio, full = load_prompt(prompt, net.audio.sample_rate, selection)
    codes = encode(audio.samples, net.audio.quantization).long()
    started = time.perf_counter()
    targets = codes.unsqueeze(0).to(net.device)
    reader = prompt_reader(net, step or StepOptions())
    bits, state = reader.prefill_bits(net.shift_right(targets), targets)
    seconds = time.perf_counter() - started
    bits = bits.mean().item()
    log.debug("read %.2f s of prompt in %.2f s (%s, %s): %.3f bits/sample", audio.seconds, seconds,
              type(reader).__name__, getattr(reader, "precision", "float32"), bits)
    report = judge(describe_signal(audio, str(prompt), full), bits, net.summary, net.name)
    return ReadPrompt(audio, codes, state, report, seconds)

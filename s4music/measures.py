"""Measures that tell music from a drone and from hiss, for takes and their prompts.

    spectrum = long_term_spectrum(wave, 16000)          # (BANDS,) dB, level removed
    spectral_distance(spectrum, long_term_spectrum(prompt, 16000))   # RMS dB between the shapes
    adherence(take, prompt, improvisation, 16000)       # > 0: the take is nearer its prompt
    liveliness(wave, 16000)                             # Liveliness(onsets_per_s, level_spread_db)

Spectral flatness (`audio.spectral_flatness`) sees hiss but not a drone: a drone is tonal, so its
flatness is low. A drone has neither onsets nor changes of loudness, which `liveliness` counts. A
take that forgets its prompt sounds like the model's own improvisation, which `adherence` sets
against the prompt by the long-term average spectrum. These only judge: no sampling rule reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

N_FFT, HOP = 1024, 256
BANDS = 40  # mel bands, 60 Hz to the Nyquist frequency
LEVEL_FRAME_S = 0.05  # the loudness contour's frames
SILENT_DB = -60.0  # frames quieter than this (dBFS) are left out of the loudness spread
# An onset: a spectral-flux peak above ONSET_RATIO times the window's median flux and above ONSET_MIN
# (a 10% rise of the magnitude spectrum). Measured here: notes of rendered chorales and of the corpus
# recordings peak at 0.65-0.99 over medians of 0.05-0.13; a steady drone stays under 0.03 (mu-law
# quantized), white noise at 0.22-0.27 with no peaks.
ONSET_RATIO = 1.5
ONSET_MIN = 0.1
ONSET_GAP_S = 0.05  # onsets closer than this are one


def _power(wave: torch.Tensor) -> torch.Tensor:
    """Short-time power spectra (frames, N_FFT // 2 + 1) of a mono wave, Hann-windowed."""
    wave = wave.reshape(-1).double()
    if wave.numel() < N_FFT:
        wave = torch.nn.functional.pad(wave, (0, N_FFT - wave.numel()))
    frames = wave.unfold(0, N_FFT, HOP) * torch.hann_window(N_FFT, periodic=True, dtype=torch.float64)
    return torch.fft.rfft(frames).abs().square()


def _mel_filters(sample_rate: int) -> torch.Tensor:
    """Triangular mel filters (BANDS, N_FFT // 2 + 1)."""
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    edges_mel = torch.linspace(mel(60.0), mel(sample_rate / 2), BANDS + 2, dtype=torch.float64)
    edges = 700 * (10 ** (edges_mel / 2595) - 1)
    freqs = torch.linspace(0, sample_rate / 2, N_FFT // 2 + 1, dtype=torch.float64)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return torch.clamp(torch.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), min=0)


def long_term_spectrum(wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """The long-term average spectrum in mel bands, dB, with its mean level removed (BANDS,): its
    shape, whatever the loudness. Silence gives zeros."""
    power = _power(wave).mean(0)
    bands = _mel_filters(sample_rate) @ power
    db = 10 * torch.log10(bands + 1e-12)
    return (db - db.mean()).float()


def spectral_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS difference in dB between two long-term spectra."""
    return float((a - b).square().mean().sqrt())


def adherence(take: torch.Tensor, prompt: torch.Tensor, improvisation: torch.Tensor, sample_rate: int) -> float:
    """How much nearer (in dB, RMS over bands) the take's long-term spectrum is to its prompt's than
    to the model's own improvisation: > 0 when the take sounds more like its prompt."""
    spectrum = long_term_spectrum(take, sample_rate)
    return (spectral_distance(spectrum, long_term_spectrum(improvisation, sample_rate))
            - spectral_distance(spectrum, long_term_spectrum(prompt, sample_rate)))


@dataclass
class Liveliness:
    onsets_per_s: float  # spectral-flux peaks a second
    level_spread_db: float  # standard deviation of the loudness contour (50 ms frames), dB

    def to_dict(self) -> dict:
        return {"onsets_per_s": self.onsets_per_s, "level_spread_db": self.level_spread_db}


def onset_strength(wave: torch.Tensor) -> torch.Tensor:
    """Spectral flux per frame (frames - 1,): the rise of the magnitude spectrum from the frame
    before, as a share of the frame's magnitude (a steady sound, tonal or noisy, keeps it flat)."""
    magnitude = _power(wave).sqrt()
    rise = (magnitude[1:] - magnitude[:-1]).clamp(min=0).sum(-1)
    return rise / (magnitude[1:].sum(-1) + 1e-9)


def liveliness(wave: torch.Tensor, sample_rate: int) -> Liveliness:
    """Onsets a second and the spread of the loudness. A drone and steady noise have neither;
    silence has neither and is reported as zeros."""
    wave = wave.reshape(-1).double()
    seconds = max(wave.numel() / sample_rate, 1e-9)
    size = max(1, int(LEVEL_FRAME_S * sample_rate))
    frames = wave[: wave.numel() // size * size].reshape(-1, size)
    level = 10 * torch.log10(frames.square().mean(-1) + 1e-20)
    loud = level[level > SILENT_DB]
    spread = float(loud.std()) if loud.numel() > 1 else 0.0
    if loud.numel() == 0:
        return Liveliness(0.0, 0.0)
    flux = onset_strength(wave)
    if flux.numel() < 3:
        return Liveliness(0.0, spread)
    floor = max(ONSET_MIN, ONSET_RATIO * float(flux.median()))
    peak = (flux[1:-1] > flux[:-2]) & (flux[1:-1] >= flux[2:]) & (flux[1:-1] > floor)
    gap = max(1, int(ONSET_GAP_S * sample_rate / HOP))
    count, last = 0, -gap
    for i in peak.nonzero().flatten().tolist():
        if i - last >= gap:
            count, last = count + 1, i
    return Liveliness(count / seconds, spread)

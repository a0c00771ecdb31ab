"""The one path for sound: every prompt, fetched track, rendered MIDI file and training file goes
through `load_audio` and `encode`, so prompts are converted exactly as training data is.

    load_audio(path, rate) -> Audio (float32 mono at `rate`)     soundfile, else ffmpeg; then resample
    encode(wave, scheme) -> uint8 codes;  decode(codes, scheme) -> wave

Schemes (recorded in every dataset and checkpoint):
    mulaw-official  the SaShiMi data pipeline: min-max scale the clip to [-1, 1], mu-law (mu 255),
                    map to [0, 1], quantize as floor(x * (256 - 0.01) + 0.005)
    mulaw           plain mu-law on the clip as it is, rounded to the nearest level
    linear          uniform 8-bit levels over [-1, 1]
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from s4music.errors import S4MusicError, first_line
from s4music.files import atomic_path

SCHEMES = ("mulaw-official", "mulaw", "linear")
MU = 255
# libsndfile reads MP3 through mpg123, which prints its complaints about a bad file straight to
# standard error; ffmpeg (-v error) says one line, which becomes the error message.
FFMPEG_FIRST = {".mp3"}
AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff", ".aif", ".wma", ".webm"}


class AudioError(S4MusicError):
    """A file that cannot be used as audio; the message names the file and the reason."""


@dataclass
class Audio:
    """Mono float32 samples at `sample_rate`, and what the source was."""

    samples: torch.Tensor  # (L,)
    sample_rate: int
    source_rate: int
    source_channels: int

    @property
    def seconds(self) -> float:
        return self.samples.numel() / self.sample_rate


# ------------------------------------------------------------------------------------------- decode


def _decode_soundfile(path: Path) -> tuple[np.ndarray, int]:
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return data, rate


def _decode_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        raise AudioError(f"{path}: format needs ffmpeg, which is not installed (run `make install`)")
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=sample_rate,channels",
         "-of", "json", str(path)],
        capture_output=True, text=True,
    )
    streams = json.loads(probe.stdout or "{}").get("streams", []) if probe.returncode == 0 else []
    if not streams:
        reason = first_line(probe.stderr, "no audio stream", last=True)
        raise AudioError(f"{path}: not audio ({reason.replace(str(path) + ': ', '')})")
    rate, channels = int(streams[0]["sample_rate"]), int(streams[0]["channels"])
    out = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "f32le", "-acodec", "pcm_f32le", "-"],
        capture_output=True,
    )
    if out.returncode != 0:
        reason = first_line(out.stderr, "decoding failed", last=True)
        raise AudioError(f"{path}: cannot decode ({reason})")
    data = np.frombuffer(out.stdout, dtype=np.float32)
    return data[: data.size // channels * channels].reshape(-1, channels), rate


def declared_seconds(path: str | Path) -> float | None:
    """How long a file says it is, read from its header, without decoding it; None where it does not
    say. Works on the first bytes of a download: WAV by its data chunk's size, FLAC by STREAMINFO,
    anything else by what ffprobe reads of the container (a header's duration, else an estimate of
    what the bytes so far hold, never more than the whole file)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        seconds = _wav_header_seconds(head)
        if seconds is not None:
            return seconds
    if head[:4] == b"fLaC" and len(head) >= 26 and head[4] & 0x7F == 0:  # STREAMINFO is the first block
        info = int.from_bytes(head[18:26], "big")
        rate, frames = info >> 44, info & ((1 << 36) - 1)
        if rate and frames:
            return frames / rate
    if shutil.which("ffprobe") is None:
        return None
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of",
                            "default=noprint_wrappers=1:nokey=1", str(path)], capture_output=True, text=True)
    try:
        seconds = float(probe.stdout.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _wav_header_seconds(head: bytes) -> float | None:
    """The length a RIFF/WAVE header gives: its data chunk's size over the byte rate (None for a
    stream's header, whose size is 0 or 0xFFFFFFFF)."""
    at, byte_rate = 12, None
    while at + 8 <= len(head):
        kind, size = head[at : at + 4], int.from_bytes(head[at + 4 : at + 8], "little")
        if kind == b"fmt " and at + 20 <= len(head):
            byte_rate = int.from_bytes(head[at + 16 : at + 20], "little")
        elif kind == b"data":
            if not byte_rate or size in (0, 0xFFFFFFFF):
                return None
            return size / byte_rate
        at += 8 + size + (size & 1)
    return None


def load_audio(path: str | Path, sample_rate: int = 16000, start: float | None = None,
               end: float | None = None) -> Audio:
    """Decode any common format, mix down to mono and resample to `sample_rate`.

    `start`/`end` (seconds) select a part of the file. Raises AudioError for a missing, empty
    or undecodable file (silence is left for the caller to judge).
    """
    path = Path(path)
    if not path.is_file():
        why = "a directory, not an audio file" if path.is_dir() else "not a regular file" if path.exists() else "no such file"
        raise AudioError(f"{path}: {why}")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file")
    if path.suffix.lower() in FFMPEG_FIRST and shutil.which("ffmpeg") is not None:
        data, rate = _decode_ffmpeg(path)
    else:
        try:
            data, rate = _decode_soundfile(path)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
            data, rate = _decode_ffmpeg(path)
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no samples")
    channels = data.shape[1]
    lo = int(round((start or 0.0) * rate))
    hi = data.shape[0] if end is None else min(data.shape[0], int(round(end * rate)))
    if lo >= hi:
        until = "the end" if end is None else f"{end:g} s"
        raise AudioError(f"{path}: the selection {start or 0:g} s to {until} is empty (the file is "
                         f"{data.shape[0] / rate:.1f} s long)")
    mono = torch.from_numpy(np.ascontiguousarray(data[lo:hi].mean(axis=1)))
    if not torch.isfinite(mono).all():
        raise AudioError(f"{path}: contains NaN or infinite samples")
    if rate != sample_rate:
        mono = AF.resample(mono, rate, sample_rate)
    return Audio(mono.float().contiguous(), sample_rate, rate, channels)


# ------------------------------------------------------------------------------------------- codes


def encode(wave: torch.Tensor, scheme: str = "mulaw-official", peak: float | None = None) -> torch.Tensor:
    """Float samples (..., L) -> uint8 codes (..., L). 'mulaw-official' scales each clip (the last
    axis) from its min and max to [-1, 1] (a clip that swings by under 1e-6 to zero, code 128, where
    the official formula gives -1: full-scale negative); with `peak` (a live stream, whose clip never
    ends), by `peak` instead, so the scale holds from one chunk to the next and zero stays zero."""
    wave = wave.float()
    if scheme == "mulaw-official":
        if peak is None:
            lo = wave.amin(dim=-1, keepdim=True)
            hi = wave.amax(dim=-1, keepdim=True)
            x = (2 * (wave - lo) / (hi - lo + 1e-6) - 1).clamp(-1, 1)
            # a clip with no swing (digital silence, a dither) holds no signal: zero, not -1
            x = torch.where(hi - lo > 1e-6, x, 0.0)
        else:  # the official formula's 1e-6 would pull silence under zero, the more the lower the peak
            x = (wave / peak).clamp(-1, 1)
        x = torch.sign(x) * torch.log1p(MU * x.abs()) / math.log1p(MU)
        return torch.floor((x + 1) / 2 * (256 - 0.01) + 0.005).clamp(0, 255).to(torch.uint8)
    if scheme == "mulaw":
        return AF.mu_law_encoding(wave.clamp(-1, 1), 256).to(torch.uint8)
    if scheme == "linear":
        return torch.round((wave.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)
    raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {SCHEMES}")


def decode(codes: torch.Tensor, scheme: str = "mulaw-official") -> torch.Tensor:
    """uint8 (or int64) codes -> float32 samples in [-1, 1]."""
    codes = codes.long()
    if scheme == "mulaw-official":
        x = codes.float() / 128 - 1
        return torch.sign(x) * ((1 + MU) ** x.abs() - 1) / MU
    if scheme == "mulaw":
        return AF.mu_law_decoding(codes, 256)
    if scheme == "linear":
        return codes.float() / 255 * 2 - 1
    raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {SCHEMES}")


# ------------------------------------------------------------------------------------------- write


def write_audio(path: str | Path, wave: torch.Tensor, sample_rate: int) -> Path:
    """Write mono float samples as 16-bit WAV or FLAC (by suffix), atomically."""
    path = Path(path)
    fmt = {".wav": "WAV", ".flac": "FLAC"}.get(path.suffix.lower())
    if fmt is None:
        raise AudioError(f"{path}: output must end in .wav or .flac")
    with atomic_path(path) as tmp:
        sf.write(str(tmp), wave.detach().cpu().clamp(-1, 1).numpy(), sample_rate, format=fmt, subtype="PCM_16")
    return path


# ------------------------------------------------------------------------------------------- measures


def spectral_flatness(wave: torch.Tensor, n_fft: int = 1024) -> float:
    """Mean over non-silent frames of geometric / arithmetic mean power: ~0.56 for white noise,
    usually below 0.1 for music; 0 for silence.

    Each frame's mean is removed before the window: a DC offset would otherwise leak through the
    window into the lowest bins and make any signal with an offset look tonal."""
    if wave.numel() < n_fft:
        return 0.0
    frames = wave.float().unfold(0, n_fft, n_fft // 2)  # (frames, n_fft)
    frames = (frames - frames.mean(-1, keepdim=True)) * torch.hann_window(n_fft, periodic=True)
    power = torch.fft.rfft(frames).abs().square()[:, 1:]  # DC bin dropped
    power = power[power.mean(-1) > 1e-10] + 1e-20
    if not power.numel():
        return 0.0
    return float((power.log().mean(-1).exp() / power.mean(-1)).mean())

"""Causal signal processing for audio that is written while it is made.

    highpass = HighPass(16000, batch=2)        # drift and DC removal, state carried across chunks
    limiter = Limiter(16000, batch=2)          # true-peak-safe, with a short look-ahead
    out = limiter(highpass(chunk) * gain)      # chunk (B, n) float64 -> (B, n) delayed by limiter.delay
    tail = limiter.flush()                     # the last limiter.delay samples

Each processor keeps its state between calls, so a signal cut into chunks of any sizes gives the
same samples as in one piece; `copy(batch)` starts several variations from one shared history.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from scipy import signal

DEFAULT_CEILING_DBTP = -1.0  # the limiter's true-peak ceiling, as EBU R128 asks of distribution masters


def dbfs(x: float) -> float:
    return 20 * math.log10(max(x, 1e-10))


def loudness_lufs(wave: torch.Tensor, sample_rate: int) -> float | None:
    """Integrated loudness (ITU-R BS.1770) of a mono wave (L,), or None when it is shorter than one
    400 ms gate or silent."""
    if wave.numel() < 0.4 * sample_rate or not wave.abs().max() > 0:
        return None
    value = AF.loudness(wave.float().unsqueeze(0), sample_rate).item()
    return value if math.isfinite(value) else None


class HighPass:
    """A second-order Butterworth high-pass at `cutoff` Hz: removes a DC offset and slow drift, far
    below any musical pitch (the piano's lowest note is 27.5 Hz). Float64: its poles sit close to 1."""

    def __init__(self, sample_rate: int, batch: int = 1, cutoff: float = 10.0):
        self.sos = signal.butter(2, cutoff, "highpass", fs=sample_rate, output="sos")
        self.state = np.zeros((batch, self.sos.shape[0], 2))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, n) -> (B, n) float64."""
        y, self.state = signal.sosfilt(self.sos, x.double().numpy(), axis=-1, zi=self.state.transpose(1, 0, 2))
        self.state = self.state.transpose(1, 0, 2)
        return torch.from_numpy(y)

    def copy(self, batch: int) -> HighPass:
        """This filter's state for each of `batch` variations (from a batch of one)."""
        out = copy.copy(self)
        out.state = np.repeat(self.state[:1], batch, axis=0)
        return out


def _interpolator(factor: int = 8, half_width: int = 8) -> torch.Tensor:
    """Polyphase taps (factor, 2 half_width) of a Kaiser-windowed sinc: phase k estimates the signal
    k / factor of a sample after each input sample, from the half_width samples on either side."""
    n = torch.arange(-half_width + 1, half_width + 1, dtype=torch.float64)
    phases = torch.arange(factor, dtype=torch.float64).unsqueeze(1) / factor
    t = phases - n.flip(0)  # distance from each tap's sample to the point being estimated
    window = torch.kaiser_window(2 * half_width + 1, periodic=False, beta=8.0, dtype=torch.float64)
    w = torch.from_numpy(np.interp(t.numpy(), np.arange(-half_width, half_width + 1), window.numpy()))
    return torch.sinc(t) * w


class Limiter:
    """A look-ahead peak limiter that keeps the true peak under `ceiling_dbtp` (estimated from 8x
    oversampling, with MARGIN_DB in hand).

    For each sample, the gain its true peak needs is held over the look-ahead window before it and
    smoothed over the same window, so the gain has fallen to what a peak needs by the time the peak
    arrives; afterwards it recovers by at most `release_db_per_s`. A signal that stays under the
    ceiling passes unchanged (gain exactly 1). The output lags the input by `delay` samples;
    `flush()` returns the last of them at the end.
    """

    HALF_WIDTH = 32  # samples on either side that a true-peak estimate reads
    MARGIN_DB = 0.5  # kept in hand for what 8x oversampling misses (up to ~0.4 dB on white noise)

    def __init__(self, sample_rate: int, batch: int = 1, ceiling_dbtp: float = DEFAULT_CEILING_DBTP,
                 lookahead_s: float = 0.005, release_db_per_s: float = 20.0):
        self.ceiling = 10 ** ((ceiling_dbtp - self.MARGIN_DB) / 20)
        self.taps = _interpolator(half_width=self.HALF_WIDTH)
        self.context = self.taps.shape[1]
        # the peak estimate needs HALF_WIDTH samples after a sample; the rest of the delay is look-ahead
        self.ahead = max(1, int(round(lookahead_s * sample_rate)))
        self.delay = self.ahead + self.HALF_WIDTH
        self.release_db = release_db_per_s / sample_rate  # per sample
        self.history = torch.zeros(batch, self.context + self.delay, dtype=torch.float64)
        self.needs = torch.zeros(batch, 2 * self.ahead, dtype=torch.float64)  # the gain (dB) recent samples need
        self.gain_db = torch.zeros(batch, dtype=torch.float64)  # the last gain applied
        self.max_reduction_db = 0.0

    def copy(self, batch: int) -> Limiter:
        """This limiter's state for each of `batch` variations (from a batch of one)."""
        out = copy.copy(self)
        out.history, out.needs = (t[:1].repeat(batch, 1) for t in (self.history, self.needs))
        out.gain_db = self.gain_db[:1].repeat(batch)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, n) -> (B, n) float64: the input of `delay` samples ago, limited."""
        n, a = x.shape[1], self.ahead
        if n == 0:
            return x.double()
        buf = torch.cat([self.history, x.double()], dim=1)  # (B, context + delay + n)
        # the true peak of the n samples whose estimates have all their taps now (HALF_WIDTH behind the newest)
        phases = F.conv1d(buf[:, self.delay + 1:].unsqueeze(1), self.taps.flip(-1).unsqueeze(1))  # (B, 8, n)
        peak = phases.abs().amax(1)
        need = torch.clamp(20 * torch.log10(self.ceiling / peak.clamp_min(1e-12)), max=0.0)
        needs = torch.cat([self.needs, need], dim=1)  # (B, 2a + n)
        # lowest need over each look-ahead window, then its mean over the `a + 1` windows that hold a
        # sample: under every peak's need, and a ramp down to it rather than a step
        lowest = -F.max_pool1d(-needs.unsqueeze(1), a + 1, stride=1)  # (B, 1, a + n)
        ramp = F.avg_pool1d(lowest, a + 1, stride=1).squeeze(1)  # (B, n), for the n delayed samples
        # release: g[t] = min(ramp[t], g[t-1] + r), i.e. t r + cummin(ramp[u] - u r), from the last gain
        steps = torch.arange(1, n + 1, dtype=torch.float64) * self.release_db
        gain_db = torch.minimum(torch.cummin(ramp - steps, dim=1).values + steps,
                                self.gain_db.unsqueeze(1) + steps).clamp(max=0.0)
        self.gain_db = gain_db[:, -1].clone()
        self.needs = needs[:, -2 * a:]
        self.max_reduction_db = max(self.max_reduction_db, float(-gain_db.min()))
        delayed = buf[:, self.context : self.context + n]
        self.history = buf[:, -(self.context + self.delay):]
        return delayed * torch.pow(10.0, gain_db / 20)

    def flush(self) -> torch.Tensor:
        """The last `delay` samples (B, delay), limited as if the signal went on in silence."""
        return self(torch.zeros(self.history.shape[0], self.delay, dtype=torch.float64))


class Resampler:
    """Sample-rate conversion for a stream: a Kaiser-windowed sinc at each output instant, with the
    input's history carried between calls, so chunks of any size give the same output as one piece
    (up to rounding). The output lags the input by `HALF_WIDTH` input samples; `flush()` ends it."""

    HALF_WIDTH = 16  # input samples on either side of an output instant (at the lower of the two rates)

    def __init__(self, rate_in: int, rate_out: int):
        self.rate_in, self.rate_out = rate_in, rate_out
        self.cutoff = min(1.0, rate_out / rate_in) * 0.97  # of the input's Nyquist, a little inside it
        self.width = int(math.ceil(self.HALF_WIDTH / self.cutoff))
        self.buffer = np.zeros(self.width, dtype=np.float64)  # input before the next output's window
        self.start = 0  # input index of buffer[0]
        self.next_out = 0  # index of the next output sample

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (n,) float -> the output samples (m,) whose windows the input now covers."""
        if self.rate_in == self.rate_out:
            return np.asarray(x, dtype=np.float32)
        self.buffer = np.concatenate([self.buffer, np.asarray(x, dtype=np.float64)])
        end = self.start + len(self.buffer) - self.width  # an output at input time t needs input to t + width
        times = []
        while True:  # output k sits at input time k * rate_in / rate_out (+ width, the lag)
            t = self.next_out * self.rate_in / self.rate_out
            if t >= end - self.width:  # its window's last input, floor(t) + width, must be in the buffer
                break
            times.append(t)
            self.next_out += 1
        out = self._at(np.asarray(times)) if times else np.zeros(0)
        keep_from = int(math.floor(self.next_out * self.rate_in / self.rate_out)) - self.start
        keep_from = max(0, min(keep_from, len(self.buffer) - 2 * self.width))
        self.buffer, self.start = self.buffer[keep_from:], self.start + keep_from
        return out.astype(np.float32)

    def _at(self, times: np.ndarray) -> np.ndarray:
        """The band-limited input at (lagged) input times."""
        base = np.floor(times).astype(np.int64)
        offsets = np.arange(-self.width + 1, self.width + 1)
        idx = base[:, None] + offsets[None, :]  # (m, 2 width) input indices, relative to the stream
        dist = times[:, None] - idx
        window = np.kaiser(2 * self.width + 1, 8.0)
        w = self.cutoff * np.sinc(self.cutoff * dist) * np.interp(dist, np.arange(-self.width, self.width + 1), window)
        return (self.buffer[idx + self.width - self.start] * w).sum(axis=1)

    def flush(self) -> np.ndarray:
        """The outputs the lag still holds, as if the input went on in silence."""
        return self(np.zeros(2 * self.width))

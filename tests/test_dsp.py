"""Causal post-processing: the drift high-pass and the true-peak limiter, in chunks as generation runs."""

import math

import pytest
import torch
import torchaudio.functional as AF

from s4music.dsp import HighPass, Limiter, loudness_lufs

SR = 16000


def chunked(process, x, sizes):
    """Run `process` over x (B, L) in chunks of the given sizes, cycling them."""
    out, i, k = [], 0, 0
    while i < x.shape[1]:
        n = sizes[k % len(sizes)]
        out.append(process(x[:, i:i + n]))
        i, k = i + n, k + 1
    return torch.cat(out, dim=1)


def true_peak_dbtp(x: torch.Tensor) -> float:
    """A fine reference: 16x oversampling with a long filter."""
    return 20 * math.log10(AF.resample(x, SR, 16 * SR, lowpass_filter_width=64).abs().max().item())


def test_highpass_takes_offset_and_drift_and_keeps_the_music():
    t = torch.arange(48000, dtype=torch.float64) / SR
    tone = 0.3 * torch.sin(2 * torch.pi * 55 * t)  # A1, low in the piano's range
    drifting = (tone + 0.1 + 0.05 * t).unsqueeze(0)  # an offset and a slow drift, as sampled codes make
    out = chunked(HighPass(SR), drifting, [1000, 2000, 777])[0]
    settled = slice(8000, None)  # after the filter's start (a few tens of ms)
    assert abs(out[settled].mean().item()) < 2e-3 and abs(drifting[0, settled].mean().item()) > 0.02
    assert abs(out[settled].std().item() / tone[settled].std().item() - 1) < 0.02
    # chunks of any size give what one piece gives
    assert torch.allclose(out, HighPass(SR)(drifting)[0], atol=1e-12)


def test_highpass_copies_share_one_history():
    x = torch.randn(1, 3000, dtype=torch.float64)
    shared = HighPass(SR)
    shared(x[:, :2000])
    two = shared.copy(2)
    tail = two(x[:, 2000:].repeat(2, 1))
    assert torch.equal(tail[0], tail[1]) and torch.allclose(tail[0], HighPass(SR)(x)[0, 2000:], atol=1e-12)


def test_limiter_leaves_a_quiet_signal_exactly_alone_and_only_delays_it():
    x = 0.5 * torch.sin(2 * torch.pi * 440 * torch.arange(4000, dtype=torch.float64) / SR).unsqueeze(0)
    limiter = Limiter(SR)
    out = torch.cat([chunked(limiter, x, [333]), limiter.flush()], dim=1)
    assert torch.equal(out[:, limiter.delay:], x) and limiter.max_reduction_db == 0


@pytest.mark.parametrize("kind", ["tones", "noise"])
def test_limiter_keeps_the_true_peak_under_the_ceiling(kind):
    g = torch.Generator().manual_seed(0)
    t = torch.arange(32000, dtype=torch.float64) / SR
    if kind == "tones":  # near Nyquist too, where sample peaks hide the true peak
        x = sum(torch.sin(2 * torch.pi * f * t + 1.0) for f in (440.0, 3100.0, 7900.0)).unsqueeze(0)
    else:
        x = torch.randn(1, 32000, generator=g, dtype=torch.float64)
    assert true_peak_dbtp(x) > 3  # far over the ceiling before
    limiter = Limiter(SR)
    out = torch.cat([chunked(limiter, x, [700, 2000]), limiter.flush()], dim=1)[:, limiter.delay:]
    assert true_peak_dbtp(out[:, 2000:-2000]) <= -1.0
    assert limiter.max_reduction_db > 3
    # and it is a gain, not a clip: the limited signal keeps the shape of the input
    assert torch.corrcoef(torch.stack([out[0], x[0]]))[0, 1] > 0.9


def test_limiter_chunking_changes_nothing_but_rounding():
    x = 2 * torch.randn(2, 9000, dtype=torch.float64)
    a, b = Limiter(SR, batch=2), Limiter(SR, batch=2)
    one = torch.cat([a(x), a.flush()], dim=1)
    many = torch.cat([chunked(b, x, [1, 500, 1999, 64]), b.flush()], dim=1)
    assert (one - many).abs().max() < 1e-12


def test_loudness_is_none_for_silence_and_short_clips():
    tone = 0.1 * torch.sin(2 * torch.pi * 440 * torch.arange(16000) / SR)
    assert loudness_lufs(tone, SR) == pytest.approx(-23.0, abs=1.0)  # a -20 dBFS sine reads about -23 LUFS
    assert loudness_lufs(torch.zeros(16000), SR) is None and loudness_lufs(tone[:1000], SR) is None

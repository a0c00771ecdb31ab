"""The one sound path: decoding real recordings in common formats, and the quantization schemes."""

import math
import subprocess

import numpy as np
import pytest
import torch

from s4music.audio import (AudioError, decode, encode, load_audio, spectral_flatness,
                           write_audio)


def _official_mulaw(clip: torch.Tensor) -> torch.Tensor:
    """The formula from the official SaShiMi data pipeline, written out step by step."""
    lo, hi = clip.min(), clip.max()
    x = -1 + 2 * (clip - lo) / (hi - lo + 1e-6)
    x = torch.sign(x) * torch.log1p(255 * x.abs()) / math.log1p(255)
    x = (x + 1) / 2
    return (x * (256 - 0.01) + 0.01 / 2).long()


def test_official_mulaw_matches_the_formula_and_differs_from_torchaudio():
    clip = torch.randn(20000) * 0.3
    ours = encode(clip, "mulaw-official").long()
    assert torch.equal(ours, _official_mulaw(clip))
    scaled = -1 + 2 * (clip - clip.min()) / (clip.max() - clip.min() + 1e-6)
    plain = encode(scaled, "mulaw").long()
    differ = (plain != ours).float().mean().item()
    assert 0.2 < differ < 0.6  # about a third land in a neighbouring bin


def test_a_constant_clip_is_silence_not_the_lowest_level():
    """The official formula maps a constant clip to -1, full scale: a silent prompt came back as a thump."""
    dither = 2e-7 * torch.randn(100, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)  # 24-bit LSBs
    clips = torch.stack([torch.zeros(100), torch.full((100,), 0.3), dither, torch.linspace(-0.5, 0.5, 100)])
    codes = encode(clips, "mulaw-official")
    assert codes[:3].eq(128).all() and decode(codes[:3]).abs().max() == 0  # 128: zero
    assert torch.equal(codes[3].long(), _official_mulaw(clips[3]))  # a clip that moves is as before


@pytest.mark.parametrize("scheme", ["mulaw-official", "mulaw", "linear"])
def test_decode_inverts_encode_within_one_level(scheme):
    clip = torch.linspace(-1, 1, 5001)
    back = decode(encode(clip, scheme), scheme)
    assert back.abs().max() <= 1.0 + 1e-6
    step = 2 / 255 if scheme == "linear" else 0.05
    assert (back - clip).abs().max() < step


@pytest.mark.parametrize("ext,codec", [("flac", []), ("mp3", ["-b:a", "128k"]), ("opus", []),
                                       ("m4a", ["-c:a", "aac"]), ("wav", ["-ar", "48000"])])
def test_common_formats_decode_to_16k_mono(tmp_path, short_recording, ext, codec):
    path = tmp_path / f"clip.{ext}"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(short_recording), "-t", "3", *codec, str(path)],
                   check=True)
    audio = load_audio(path, 16000)
    assert audio.sample_rate == 16000 and audio.source_channels == 2
    assert audio.seconds == pytest.approx(3.0, abs=0.06)
    assert audio.samples.abs().max() > 0.01


def test_ogg_recording_resamples_from_44k_stereo(short_recording):
    audio = load_audio(short_recording, 16000, start=1.0, end=3.5)
    assert (audio.source_rate, audio.source_channels) == (44100, 2)
    assert audio.samples.numel() == pytest.approx(2.5 * 16000, abs=2)


@pytest.mark.parametrize("content,reason", [(b"", "empty file"), (b"hello, I am text\n" * 50, "not audio"),
                                            (b"RIFF\x00\x00\x00\x00WAVEfmt ", "not audio")])
def test_bad_files_are_clear_errors(tmp_path, content, reason):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=f"bad.wav: {reason}"):
        load_audio(path)
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "absent.wav")
    with pytest.raises(AudioError, match="a directory, not an audio file"):
        load_audio(tmp_path)
    with pytest.raises(AudioError, match="/dev/null: not a regular file"):
        load_audio("/dev/null")


def test_write_is_atomic(tmp_path):
    wave = torch.sin(torch.linspace(0, 2000, 16000)) * 0.5
    out = write_audio(tmp_path / "x.flac", wave, 16000)
    assert (load_audio(out, 16000).samples - wave).abs().max() < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.flac"]


def test_spectral_flatness_tells_tone_from_noise_and_ignores_a_dc_offset():
    t = torch.arange(32000) / 16000
    tone = 0.01 * torch.sin(2 * torch.pi * 440 * t)
    noise = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, 32000)).float()
    assert spectral_flatness(tone) < 0.01 and 0.4 < spectral_flatness(noise) < 0.7
    # an offset leaks through the window into the low bins unless each frame's mean is removed
    assert spectral_flatness(tone + 0.2) == pytest.approx(spectral_flatness(tone), rel=0.01)  # was 260x off
    assert spectral_flatness(torch.zeros(32000)) == 0.0

"""The measures that judge takes: adherence to the prompt and liveliness, on synthetic cases
(a drone, white noise, a copy of the prompt, silence) and a take that turns into a drone."""

import math

import numpy as np
import pytest
import torch
from conftest import synthesized_music

from s4music.guidance import degeneracy
from s4music.measures import BANDS, adherence, liveliness, long_term_spectrum, spectral_distance

SR = 16000


def notes(seconds: float = 6.0) -> torch.Tensor:
    """Piano-like notes repeated: onsets and decays, as music has."""
    one = synthesized_music(3.0)[:, 0]
    return torch.from_numpy(np.tile(one, int(math.ceil(seconds / 3.0)))[: int(seconds * SR)])


def drone(seconds: float = 6.0, pitch: float = 110.0) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    return 0.3 * torch.sin(2 * math.pi * pitch * t) + 0.1 * torch.sin(2 * math.pi * 2 * pitch * t)


def noise(seconds: float = 6.0) -> torch.Tensor:
    return 0.1 * torch.randn(int(seconds * SR), generator=torch.Generator().manual_seed(0))


def test_liveliness_tells_music_from_a_drone_noise_and_silence():
    music = liveliness(notes(), SR)
    assert music.onsets_per_s >= 1.5 and music.level_spread_db > 3  # two onsets a second, each a decay
    for steady in (drone(), noise()):
        alive = liveliness(steady, SR)
        assert alive.onsets_per_s == 0 and alive.level_spread_db < 0.5
    assert liveliness(torch.zeros(6 * SR), SR).to_dict() == {"onsets_per_s": 0.0, "level_spread_db": 0.0}
    assert liveliness(0.25 * notes(), SR).onsets_per_s == music.onsets_per_s  # loudness does not count


def test_adherence_puts_a_copy_of_the_prompt_nearest_and_a_drone_nearer_the_improvisation():
    prompt, improvisation = notes(), drone()
    spectrum = long_term_spectrum(prompt, SR)
    assert spectrum.shape == (BANDS,) and abs(float(spectrum.mean())) < 1e-4  # the shape, not the level
    assert spectral_distance(spectrum, long_term_spectrum(0.1 * prompt, SR)) < 1e-3
    assert adherence(prompt.clone(), prompt, improvisation, SR) > 10  # a copy: distance 0 to its prompt
    assert adherence(drone(pitch=111.0), prompt, improvisation, SR) < 0  # the model's own texture
    assert adherence(noise(), prompt, improvisation, SR) != pytest.approx(0, abs=0.5)
    assert long_term_spectrum(torch.zeros(SR), SR).abs().max() == 0  # silence: a flat shape


def test_a_take_that_settles_into_a_drone_is_degenerate_and_music_is_not():
    assert degeneracy(notes(8.0), SR) is None
    assert degeneracy(torch.cat([notes(3.0), drone(5.0)]), SR) == "drone"
    assert degeneracy(0.05 * drone(8.0) + 0.3, SR) == "offset"  # stuck at an offset is named as such
    assert degeneracy(torch.zeros(8 * SR), SR) == "silence"

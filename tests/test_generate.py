import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import DATA, need, perturbed

from s4music.generate import (
    GenerateOptions,
    GenerationError,
    _sample,
    check_prompt,
    continue_prompt,
    improvise,
    with_sampling,
)
from s4music.guidance import FAR, TYPICAL, degeneracy
from s4music.model import S4Config, SaShiMi, SaShiMiConfig, import_official
from s4music.model.fast import FusedStep, fused_available, sample_codes
from s4music.model.sashimi import WeightNormLinear
from s4music.model.reparam import untie

S4MUSIC = [sys.executable, "-m", "s4music.cli"]


@pytest.fixture(scope="module")
def fused():
    need(fused_available(), "a C++ compiler for the fused CPU step")


def _models():
    yield "official-v4", perturbed(import_official(DATA / "official" / "small_v4.pt"))
    for mode in ("dplr", "diag"):
        cfg = SaShiMiConfig(d_model=16, n_layers=2, pool=[4, 4], s4=S4Config(mode=mode, d_state=16))
        model = perturbed(SaShiMi(cfg))
        yield mode, model
        yield f"{mode}-reparam", perturbed(untie(model, groups=4, untie_pb=True, dt_per_state=True)[0])
    # widths 12, 24, 48: the kernel packs channels in vectors of 8, so the first tier ends in a padded one
    yield "dplr-width-12", perturbed(SaShiMi(SaShiMiConfig(d_model=12, n_layers=2, pool=[2, 2], s4=S4Config(d_state=8))))


def test_fused_step_matches_the_model(fused):
    torch.manual_seed(0)
    for name, model in _models():
        for batch in (3, 1):  # with fewer rows than threads, a team of threads shares each row
            x = torch.randint(0, 256, (batch, 333))
            full = model(x)
            _, state = model.prefill(x[:, :101])  # not a multiple of the pooling
            fused = FusedStep(model)
            # two calls: the state goes back to Python and returns in between
            _, _, first = fused.run(x[:, 101], state, torch.rand(batch, 100), forced=x[:, 102:202])
            _, _, second = fused.run(x[:, 201], state, torch.rand(batch, 131), forced=x[:, 202:])
            logits = torch.cat([first, second], dim=1)
            assert (logits - full[:, 101:-1]).abs().max() < 1e-4, (name, batch)


def _half_weights(model: SaShiMi) -> SaShiMi:
    """A copy of the model whose linear-layer weights are rounded to half precision (what FusedStep(half=True) stores)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(m.weight.half().float())
            elif isinstance(m, WeightNormLinear):
                w = m.weight.half().float()
                m.weight_v.copy_(w)
                m.weight_g.copy_(w.norm(dim=1, keepdim=True))
    return model


def test_fused_step_with_half_weights_matches_the_rounded_model(fused):
    torch.manual_seed(0)
    model = perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=2, pool=[4, 4], s4=S4Config(d_state=16))))
    rounded = _half_weights(model)
    x = torch.randint(0, 256, (2, 300))
    _, state = rounded.prefill(x[:, :100])
    _, _, logits = FusedStep(model, half=True).run(x[:, 100], state, torch.rand(2, 199), forced=x[:, 101:])
    assert (logits - rounded(x)[:, 100:-1]).abs().max() < 1e-4
    assert (logits - model(x)[:, 100:-1]).abs().max() > 1e-4  # the weights really were rounded


def test_fused_and_plain_paths_sample_the_same_codes(fused):
    torch.manual_seed(0)
    model = perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=2, pool=[4], s4=S4Config(d_state=16))))
    _, state = model.prefill(torch.randint(0, 256, (1, 50)))
    first = torch.tensor([77])
    for opts in (with_sampling(GenerateOptions(), {}), with_sampling(GenerateOptions(temperature=0.8, top_k=20), {}),
                 with_sampling(GenerateOptions(top_p=0.9), {})):
        a = _sample(model, FusedStep(model), state, first, [5, 6], 300, opts, None)
        b = _sample(model, None, state, first, [5, 6], 300, opts, None)
        assert torch.equal(a[0], b[0]), opts
        assert torch.allclose(a[1], b[1], atol=1e-4)


def test_sampling_rules():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    pick = lambda u, **kw: sample_codes(logits, torch.tensor([u]), **kw)[0].item()  # noqa: E731
    assert [pick(u) for u in (0.05, 0.25, 0.5, 0.95)] == [0, 1, 2, 3]
    assert pick(0.0, temperature=0) == 3
    assert {pick(u, top_k=2) for u in np.linspace(0, 0.999, 20)} == {2, 3}
    assert {pick(u, top_p=0.5) for u in np.linspace(0, 0.999, 20)} == {2, 3}  # 0.4 < 0.5, then 0.3 crosses it
    assert {pick(u, top_p=0.3) for u in np.linspace(0, 0.999, 20)} == {3}


@pytest.mark.slow
def test_continue_real_recordings_in_common_formats(trained_model, short_recording, tmp_path):
    need(__import__("shutil").which("ffmpeg") is not None, "ffmpeg")
    prompts = [short_recording]
    for ext, rate in ((".mp3", 48000), (".flac", 48000)):
        dest = tmp_path / f"prompt{ext}"
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(short_recording), "-ar", str(rate), "-ac", "2", str(dest)],
                       check=True)
        prompts.append(dest)
    for prompt in prompts:
        out = tmp_path / f"{prompt.stem}-{prompt.suffix[1:]}.wav"
        result = continue_prompt(prompt, out, trained_model,
                                 GenerateOptions(seconds=1.0, prompt_seconds=2.0, seed=3, force=True))
        info = sf.info(str(out))
        assert info.samplerate == 16000 and info.channels == 1
        assert abs(info.duration - 3.0) < 1e-3
        meta = json.loads(result.sidecar.read_text())
        assert meta["seed"] == 3 and meta["rtf"] > 0 and meta["guidance"]["source_channels"] == 2
        assert "resampled" in " ".join(meta["guidance"]["conversions"])


def test_seed_fixes_the_output_bit_for_bit(trained_model, tmp_path):
    opts = dict(seconds=0.5, variations=2)
    a = improvise(tmp_path / "a.wav", trained_model, GenerateOptions(seed=11, **opts))
    b = improvise(tmp_path / "b.wav", trained_model, GenerateOptions(seed=11, **opts))
    c = improvise(tmp_path / "c.wav", trained_model, GenerateOptions(seed=12, **opts))
    for x, y in zip(a.takes, b.takes, strict=True):
        assert x.path.read_bytes() == y.path.read_bytes()
    assert a.takes[0].path.read_bytes() != c.takes[0].path.read_bytes()
    assert [t.seed for t in a.takes] == [11, 12]


def test_full_weights_give_the_plain_steps_codes(fused, trained_model, tmp_path):
    opts = dict(seconds=0.1, seed=5, normalize="none")
    runs = {name: improvise(tmp_path / f"{name}.wav", trained_model, GenerateOptions(**extra, **opts))
            for name, extra in (("half", {}), ("full", {"half_weights": False}), ("plain", {"fused": False}))}
    assert {k: json.loads(r.sidecar.read_text())["step"] for k, r in runs.items()} == {
        "half": "fused-cpu-fp16", "full": "fused-cpu", "plain": "plain-cpu"}
    assert runs["full"].takes[0].path.read_bytes() == runs["plain"].takes[0].path.read_bytes()


def test_rank_orders_variations_by_likelihood(trained_model, tmp_path):
    result = improvise(tmp_path / "r.flac", trained_model, GenerateOptions(seconds=0.3, variations=3, seed=1, rank=True))
    bits = [t.bits for t in result.takes]
    assert bits == sorted(bits)
    assert [t.path.name for t in result.takes] == ["r-1.flac", "r-2.flac", "r-3.flac"]


def test_guidance_verdicts(trained_model, music_dataset, tmp_path):
    rows = [json.loads(line) for line in (music_dataset / "manifest.jsonl").read_text().splitlines()]
    in_domain = next(r["path"] for r in rows if r["split"] == "test")
    report = check_prompt(in_domain, trained_model, GenerateOptions(prompt_seconds=4.0))
    assert report.verdict == TYPICAL, report
    assert report.reference_bits is not None

    rng = np.random.default_rng(0)
    sf.write(str(tmp_path / "noise.wav"), rng.uniform(-0.5, 0.5, 48000).astype(np.float32), 48000)
    sf.write(str(tmp_path / "silence.wav"), np.zeros(32000, dtype=np.float32), 16000)
    for name, word in (("noise.wav", "noise"), ("silence.wav", "silent")):
        report = check_prompt(tmp_path / name, trained_model)
        assert report.verdict == FAR and word in " ".join(report.reasons), report
        with pytest.raises(GenerationError, match="--force"):
            continue_prompt(tmp_path / name, tmp_path / "x.wav", trained_model, GenerateOptions(seconds=0.1))
    forced = continue_prompt(tmp_path / "noise.wav", tmp_path / "x.wav", trained_model,
                             GenerateOptions(seconds=0.1, force=True))
    assert forced.takes[0].path.exists()
    out = subprocess.run([*S4MUSIC, "check", str(tmp_path / "noise.wav"), "--model", str(trained_model)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "far from what this model knows" in out.stderr


def test_degeneracy_detection():
    rng = np.random.default_rng(0)
    t = torch.arange(32000) / 16000
    music = 0.3 * torch.sin(2 * torch.pi * 220 * t) * torch.exp(-3 * (t % 0.5)) + 0.2 * torch.sin(2 * torch.pi * 330 * t)
    assert degeneracy(music, 16000) is None
    assert degeneracy(torch.from_numpy(rng.uniform(-1, 1, 32000)).float(), 16000) == "noise"
    assert degeneracy(torch.cat([music[:16000], torch.zeros(16000)]), 16000) == "silence"
    assert degeneracy(torch.cat([music[:16000], torch.full((16000,), 0.2)]), 16000) == "silence"
    drift = music.clone()
    drift[16000:] = 0.2 + 0.05 * music[16000:]  # a faint texture over an offset, as a stuck model makes
    assert degeneracy(drift, 16000) == "offset"
    assert degeneracy(music + 0.01, 16000) is None
    wander = 0.5 * music + torch.linspace(0, -0.2, 32000)  # a slow drift under a lively signal: not stuck
    assert degeneracy(wander, 16000) is None


def test_continue_from_a_url_and_bad_inputs(trained_model, short_recording, http_server, tmp_path):
    root, base = http_server
    (root / "song.ogg").write_bytes(short_recording.read_bytes())
    out = subprocess.run([*S4MUSIC, "continue", f"{base}/song.ogg", "-o", str(tmp_path / "u.wav"), "--model",
                          str(trained_model), "--seconds", "0.25", "--seed", "4", "--force"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "seed 4" in out.stderr and (tmp_path / "u.wav").exists() and (tmp_path / "u.json").exists()

    (tmp_path / "corrupt.ogg").write_bytes(b"OggS" + bytes(200))
    for prompt, reason in ((str(tmp_path / "missing.ogg"), "no such file"), (f"{base}/nothing.ogg", "404"),
                           (str(tmp_path / "corrupt.ogg"), "not audio")):
        bad = subprocess.run([*S4MUSIC, "continue", prompt, "-o", str(tmp_path / "b.wav"), "--model",
                              str(trained_model)], capture_output=True, text=True)
        assert bad.returncode == 1
        assert reason in bad.stderr.lower() and prompt.split("/")[-1] in bad.stderr
        assert len([ln for ln in bad.stderr.splitlines() if ln.strip()]) == 1, bad.stderr
        assert not (tmp_path / "b.wav").exists() and not (tmp_path / "b.json").exists()

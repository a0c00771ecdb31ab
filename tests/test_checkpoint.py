"""Our checkpoint format, and import of the official SaShiMi checkpoints against official outputs."""

import json
import os
import pickle

import pytest
import torch

from conftest import DATA, perturbed
from s4music.model import CheckpointError, S4Config, SaShiMi, SaShiMiConfig, import_official, load_model, save_model

OFFICIAL = DATA / "official"


def _official_input():
    expected = torch.load(OFFICIAL / "small_expected.pt", weights_only=True)
    x = torch.roll(expected["codes"], 1, dims=1)
    x[:, 0] = 128
    return x, expected


@pytest.mark.parametrize("layout", ["v4", "v3"])
def test_import_reproduces_official_logits(layout):
    x, expected = _official_input()
    model = import_official(OFFICIAL / f"small_{layout}.pt")
    assert model.num_parameters() == expected["params"] == 390_808
    with torch.no_grad():
        logits = model(x)
    assert (logits - expected["logits"]).abs().max() < 1e-4


def test_imported_model_generates_consistently_with_its_forward():
    # C holds C-tilde at l_kernel = 2048; stepping must undo it exactly.
    x, expected = _official_input()
    model = import_official(OFFICIAL / "small_v4.pt")
    _, state = model.prefill(x[:, :300])
    outs = []
    for t in range(300, 512):
        y, state = model.step(x[:, t], state)
        outs.append(y)
    assert (torch.stack(outs, 1) - expected["logits"][:, 300:]).abs().max() < 1e-4


def _youtubemix_state_dict():
    sd = {}
    for line in (OFFICIAL / "official_sashimi_keys.tsv").read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        sd[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
    return sd


def test_every_key_of_the_released_youtubemix_layout_maps_onto_the_default_model(tmp_path):
    sd = _youtubemix_state_dict()
    torch.save(sd, tmp_path / "sashimi_youtubemix.pt")
    model = import_official(tmp_path / "sashimi_youtubemix.pt")
    assert model.config == SaShiMiConfig()
    assert model.num_parameters() == 4_751_072


def test_unknown_and_missing_official_keys_are_listed(tmp_path):
    sd = torch.load(OFFICIAL / "small_v4.pt", weights_only=True)
    sd["model.c_layers.0.layer.layer.kernel.mystery"] = torch.zeros(1)
    del sd["model.norm.bias"]
    torch.save(sd, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"odd\.pt.*kernel\.mystery"):
        import_official(tmp_path / "odd.pt")
    del sd["model.c_layers.0.layer.layer.kernel.mystery"]
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match=r"short\.pt.*missing \[norm\.bias\]"):
        import_official(tmp_path / "short.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/s4music-pwned",))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"encoder.0.weight": _Evil()}, f)
    if os.path.exists("/tmp/s4music-pwned"):
        os.remove("/tmp/s4music-pwned")
    with pytest.raises(CheckpointError, match="evil.pt: not a plain tensor checkpoint") as refused:
        import_official(path)
    assert not os.path.exists("/tmp/s4music-pwned")
    # never the loader's own advice to switch the safety off for a file that may be hostile
    assert "weights_only" not in str(refused.value) and "will likely succeed" not in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_garbage_official_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pt"):
        import_official(path)


def test_a_file_that_is_no_model_is_named_itself(tmp_path):
    """Not its folder: `--model song.mp3` said ".: no config.json" where the folder was the cwd."""
    (tmp_path / "song.mp3").write_bytes(b"ID3")
    with pytest.raises(CheckpointError, match=r"song\.mp3: not a model"):
        load_model(tmp_path / "song.mp3")


def test_non_sashimi_state_dict_is_rejected(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt.*not an official SaShiMi"):
        import_official(tmp_path / "other.pt")


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_save_load_round_trip(tmp_path, mode):
    model = perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=1, s4=S4Config(mode=mode))))
    x = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        ref = model(x)
    save_model(model, tmp_path / "ckpt", summary={"steps": 3})
    loaded = load_model(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    assert loaded.summary == {"steps": 3} and loaded.audio == model.audio
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["parameters"] == model.num_parameters() and meta["audio"]["quantization"] == "mulaw-official"
    assert load_model(tmp_path / "ckpt" / "model.safetensors").config == model.config


def test_bf16_checkpoint_is_half_the_size_and_close(tmp_path):
    model = perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=1)))
    save_model(model, tmp_path / "f32")
    save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "bf16") < 0.65 * size(tmp_path / "f32")
    x = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        diff = (load_model(tmp_path / "bf16")(x) - model(x)).abs().max()
    assert diff < 0.5
    # the S4 layers' own parameters stay float32 (their rounding costs bits); the rest is halved
    from safetensors.torch import load_file

    from s4music.model.checkpoint import KEEP_FLOAT32

    stored = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    kept = {k for k, v in stored.items() if v.dtype == torch.float32}
    assert kept and kept == {k for k in stored if k.rsplit(".", 1)[-1] in KEEP_FLOAT32}
    assert all(v.dtype == torch.bfloat16 for k, v in stored.items() if k not in kept and v.is_floating_point())


def test_save_replaces_an_old_checkpoint_and_leaves_no_temporaries(tmp_path):
    a = SaShiMi(SaShiMiConfig(d_model=8, n_layers=1))
    b = SaShiMi(SaShiMiConfig(d_model=16, n_layers=1))
    save_model(a, tmp_path / "ckpt")
    save_model(b, tmp_path / "ckpt")
    assert load_model(tmp_path / "ckpt").config.d_model == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "music").mkdir()
    (tmp_path / "music" / "song.wav").write_bytes(b"RIFF")
    with pytest.raises(CheckpointError, match="not an s4music checkpoint"):
        save_model(SaShiMi(SaShiMiConfig(d_model=8, n_layers=1)), tmp_path / "music")
    assert (tmp_path / "music" / "song.wav").exists()


def test_damaged_checkpoints_are_clear_errors(tmp_path):
    save_model(SaShiMi(SaShiMiConfig(d_model=8, n_layers=1)), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing")


def test_the_model_config_knows_the_quantizations_the_audio_path_has():
    from s4music import audio
    from s4music.model.config import AudioFormat

    assert AudioFormat.QUANTIZATIONS == audio.SCHEMES  # two lists (the model must not import soundfile)

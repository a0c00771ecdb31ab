"""Named models and datasets from the Hugging Face Hub, against a local Hub on 127.0.0.1 (these
machines reach no hub): download, convert once, cache, and every way that can go wrong."""

import io
import json
import logging
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import DATA, synthesized_music

from s4music import hub
from s4music.data.format import DatasetError
from s4music.data.named import ArchiveDamaged, natural_key, official_split, unpack
from s4music.hub import HubError
from s4music.model import load_checkpoint

S4MUSIC = [sys.executable, "-m", "s4music.cli"]
RELEASE, CKPT = "krandiash/sashimi-release", "checkpoints/sashimi_youtubemix.pt"


def cli(env, *args):
    return subprocess.run([*S4MUSIC, *map(str, args)], capture_output=True, text=True, env=env)


def converted(env) -> list[Path]:
    return sorted((Path(env["S4MUSIC_CACHE"]) / "models").glob("youtubemix-*"))


@pytest.mark.slow  # subprocesses against the local Hub
def test_a_named_model_downloads_converts_once_and_then_comes_from_the_cache(local_hub, synth_prompt, tmp_path):
    hub, env = local_hub
    hub.add("model", RELEASE, CKPT, (DATA / "official" / "small_v4.pt").read_bytes())
    args = ["continue", synth_prompt, "--model", "youtubemix", "--seconds", "0.1", "--seed", "1"]
    first = cli(env, *args, "-o", tmp_path / "a.wav")
    assert first.returncode == 0, first.stderr
    assert "converting youtubemix" in first.stderr and len(converted(env)) == 1
    # the conversion is the official model: its logits are the official code's
    expected = torch.load(DATA / "official" / "small_expected.pt", weights_only=True)
    model = load_checkpoint(converted(env)[0])
    x = torch.roll(expected["codes"], 1, 1)
    x[:, 0] = 128
    assert (model(x) - expected["logits"]).abs().max() < 1e-3
    assert model.summary["test_bits"] == 1.294 and model.summary["hub"].startswith(RELEASE)
    # again: the cached conversion, after at most a freshness check of the download
    gets = len([r for r in hub.requests if r[0] == "GET"])
    again = cli(env, *args, "-o", tmp_path / "b.wav")
    assert again.returncode == 0 and "converting" not in again.stderr
    assert len([r for r in hub.requests if r[0] == "GET"]) == gets
    # offline: not a single request
    seen = len(hub.requests)
    offline = cli({**env, "HF_HUB_OFFLINE": "1"}, *args, "-o", tmp_path / "c.wav")
    assert offline.returncode == 0, offline.stderr
    assert len(hub.requests) == seen
    listed = cli(env, "models")
    assert "youtubemix" in listed.stdout and "converted" in listed.stdout


@pytest.mark.slow  # subprocesses against the local Hub
def test_eval_and_finetune_take_the_name(local_hub, synth_dataset, tmp_path):
    hub, env = local_hub
    hub.add("model", RELEASE, CKPT, (DATA / "official" / "small_v4.pt").read_bytes())
    out = cli(env, "eval", "youtubemix", "--data", synth_dataset, "--max-windows", "1", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["overall"]["model_bits"] > 0
    out = cli(env, "train", "--mode", "finetune", "--from", "youtubemix", "--data", synth_dataset, "--steps", "1",
              "--seq-len", "1024", "--batch-size", "1", "--out", tmp_path / "ft")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "ft" / "model" / "model.safetensors").exists()


@pytest.mark.slow  # subprocesses against the local Hub
def test_a_download_cut_off_fails_in_one_line_keeps_no_half_file_and_completes_next_time(local_hub, synth_prompt,
                                                                                         tmp_path):
    hub, env = local_hub
    data = (DATA / "official" / "small_v4.pt").read_bytes()
    hub.add("model", RELEASE, CKPT, data)
    hub.cut[CKPT] = 50  # more often than huggingface_hub retries within one run
    args = ["continue", synth_prompt, "-o", tmp_path / "r.wav", "--seconds", "0.1", "--model", "youtubemix"]
    cut = cli(env, *args)
    lines = [ln for ln in cut.stderr.splitlines() if ln.strip()]
    assert cut.returncode == 1 and len(lines) == 1, cut.stderr
    assert f"{RELEASE}/{CKPT}: download failed" in lines[0] and "run again to resume" in lines[0]
    snapshots = Path(env["HF_HOME"]) / "hub" / "models--krandiash--sashimi-release" / "snapshots"
    assert not list(snapshots.rglob("*.pt")) and not converted(env)  # no half file where a whole one goes
    hub.cut.clear()
    resumed = cli(env, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert list(snapshots.rglob("*.pt"))[0].read_bytes() == data
    # within a run, huggingface_hub itself retries a cut-off transfer
    hub.cut[CKPT] = 1
    env2 = {**env, "HF_HOME": str(tmp_path / "hf2")}
    assert cli(env2, *args).returncode == 0


@pytest.mark.slow  # subprocesses against the local Hub
def test_missing_files_offline_and_unknown_names_are_one_line_each(local_hub, synth_prompt):
    hub, env = local_hub
    hub.add("model", RELEASE, "checkpoints/other.pt", b"x")
    for extra_env, args, reason in (
        ({}, ["check", synth_prompt, "--model", "sc09"],
         f"{RELEASE}/checkpoints/sashimi_sc09.pt: no such file in the repository"),
        ({"HF_HUB_OFFLINE": "1"}, ["check", synth_prompt, "--model", "youtubemix"],
         f"{RELEASE}/{CKPT}: not downloaded yet, and the Hub cannot be reached"),
        ({}, ["check", synth_prompt, "--model", "youtubemx"], "youtubemx: no such file or directory, and not a model "
         "name; did you mean youtubemix?"),
        ({}, ["fetch-dataset", "youtubemx", "-o", "x"], "youtubemx: not a dataset name; did you mean youtubemix?"),
    ):
        out = cli({**env, **extra_env}, *args)
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert out.returncode == 1 and len(lines) == 1 and reason in " ".join(out.stderr.split()), out.stderr


@pytest.mark.slow  # subprocesses against the local Hub
def test_a_file_that_is_not_a_checkpoint_is_not_kept(local_hub, synth_prompt):
    hub, env = local_hub
    hub.add("model", RELEASE, CKPT, b"this is not a torch checkpoint" * 100)
    out = cli(env, "check", synth_prompt, "--model", "youtubemix")
    assert out.returncode == 1 and f"{RELEASE}/{CKPT}: not a loadable tensor-only checkpoint" in out.stderr
    assert not list((Path(env["HF_HOME"]) / "hub").rglob("*.pt")) and not converted(env)


@pytest.mark.slow  # subprocesses against the local Hub
def test_the_speech_model_says_it_knows_speech(local_hub, synth_prompt):
    hub, env = local_hub
    hub.add("model", RELEASE, "checkpoints/sashimi_sc09.pt", (DATA / "official" / "small_v4.pt").read_bytes())
    out = cli(env, "check", synth_prompt, "--model", "sc09")
    assert out.returncode == 2 and "this model knows speech" in " ".join(out.stdout.split())


def test_the_official_split_is_natural_order_88_6_6():
    names = [f"out{i}.wav" for i in (10, 9, 100, 1, 2, 11, 20, 3, 4, 5, 6, 7, 8, 12, 13, 14, 15, 16, 17, 18, 19, 21,
                                     22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34)]
    assert sorted(["out10.wav", "out9.wav", "out100.wav"], key=natural_key) == ["out9.wav", "out10.wav", "out100.wav"]
    split = official_split(names)
    n = len(names)  # 35: int(0.88 * 35) = 30 train, int(0.94 * 35) = 32, so 2 val and 3 test
    assert sum(v == "train" for v in split.values()) == int(0.88 * n) == 30
    assert [k for k, v in split.items() if v == "val"] == ["out31.wav", "out32.wav"]
    assert [k for k, v in split.items() if v == "test"] == ["out33.wav", "out34.wav", "out100.wav"]


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_archives_cannot_write_outside_or_explode(tmp_path):
    wav = io.BytesIO()
    sf.write(wav, synthesized_music(1.0)[:, 0], 16000, format="WAV")
    for name in ("../escape.wav", "/abs.wav", "a/../../b.wav"):
        (tmp_path / "x.zip").write_bytes(_zip({"ok.wav": wav.getvalue(), name: wav.getvalue()}))
        with pytest.raises(DatasetError, match="would be written outside the dataset"):
            unpack(tmp_path / "x.zip", tmp_path / "out")
        assert not (tmp_path / "out").exists() and not (tmp_path / "escape.wav").exists()
    (tmp_path / "bomb.zip").write_bytes(_zip({"bomb.wav": bytes(50_000_000)}))
    with pytest.raises(DatasetError, match="refused as a zip bomb"):
        unpack(tmp_path / "bomb.zip", tmp_path / "out")
    (tmp_path / "x.zip").write_bytes(_zip({"music/a.wav": wav.getvalue(), "notes.txt": b"hello"}))
    assert unpack(tmp_path / "x.zip", tmp_path / "out") == [tmp_path / "out" / "music" / "a.wav"]


def test_a_damaged_archive_is_told_apart_from_a_destination_that_cannot_be_written(tmp_path):
    # only a damaged download is forgotten (fetched again); a full disk or a bad destination keeps it
    wav = io.BytesIO()
    sf.write(wav, synthesized_music(1.0)[:, 0], 16000, format="WAV")
    good = _zip({"a.wav": wav.getvalue()})
    (tmp_path / "x.zip").write_bytes(good)
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(DatasetError, match="cannot write the unpacked audio") as refused:
        unpack(tmp_path / "x.zip", tmp_path / "a-file" / "out")
    assert not isinstance(refused.value, ArchiveDamaged)
    data = 30 + len("a.wav") + 100  # past the local header, inside the deflated member
    (tmp_path / "bad.zip").write_bytes(good[:data] + bytes([good[data] ^ 0xFF]) + good[data + 1:])
    with pytest.raises(ArchiveDamaged, match="member 'a.wav' is damaged"):
        unpack(tmp_path / "bad.zip", tmp_path / "out")
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # nothing half-written stays


def test_fetch_dataset_prepares_real_recordings_with_the_official_split(local_hub, recordings, tmp_path):
    hub, env = local_hub
    members = {f"youtubemix/out{i + 1}.ogg": p.read_bytes() for i, p in enumerate(sorted(recordings)[:8])}
    hub.add("dataset", "krandiash/youtubemix", "youtubemix.zip", _zip(members))
    out = cli(env, "fetch-dataset", "youtubemix", "-o", tmp_path / "data")
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "data" / "dataset.json").read_text())
    assert meta["window"] == 131072 and meta["quantization"] == "mulaw-official"
    by_name = {s["name"]: s["split"] for s in meta["sources"]}
    # 8 files: int(0.88 * 8) = 7 train, int(0.94 * 8) = 7, so no val and the last one test
    assert by_name == {**{f"youtubemix/out{i}.ogg": "train" for i in range(1, 8)}, "youtubemix/out8.ogg": "test"}
    again = cli(env, "fetch-dataset", "youtubemix", "-o", tmp_path / "data")  # cached, unpacked once
    assert again.returncode == 0 and "8 files" in again.stderr
    assert json.loads((tmp_path / "data" / "source.json").read_text())["files"] == {"train": 7, "val": 0, "test": 1}


def test_an_unreachable_hub_is_told_at_once_and_a_cached_file_still_serves(monkeypatch, tmp_path, caplog):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    snapshot = tmp_path / "models--krandiash--sashimi-release" / "snapshots" / "abc"
    (snapshot / "checkpoints").mkdir(parents=True)
    (snapshot / "checkpoints" / "kept.pt").write_bytes(b"x")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    with caplog.at_level(logging.WARNING, logger="huggingface_hub"):
        with pytest.raises(HubError, match=f"{CKPT}: not downloaded yet, and the Hub cannot be reached"):
            hub.download(RELEASE, CKPT)
        with pytest.raises(HubError, match="krandiash/youtubemix: not downloaded yet, and the Hub cannot be reached"):
            hub.list_files("krandiash/youtubemix", repo_type="dataset")
        assert hub.download(RELEASE, "checkpoints/kept.pt") == snapshot / "checkpoints" / "kept.pt"
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]  # its client retries for 23 s

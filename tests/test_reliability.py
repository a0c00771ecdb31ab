"""No silent corruption, no traceback, no wasted run: each case a careful user hit, with the clear
error it must give and a check that nothing else was lost or left behind."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import need, synthesized_music

from s4music.data.fetch import FetchOptions, fetch, ydl_params
from s4music.data.format import verify_dataset
from s4music.data.prepare import PrepareOptions, prepare
from s4music.errors import S4MusicError
from s4music.model import CheckpointError, load_model
from s4music.model.checkpoint import verify_checkpoint
from s4music.train import TrainConfig, train

S4MUSIC = [sys.executable, "-m", "s4music.cli"]
TINY = {"d_model": 16, "n_layers": 1, "pool": [4], "s4": {"d_state": 16}}


def _sources(root: Path, n: int, seconds: float = 1.5) -> Path:
    """n files of notes, each its own audio (prepare refuses copies of a file it has): a gain drawn by folder."""
    root.mkdir(parents=True, exist_ok=True)
    gain = 0.3 + zlib.crc32(root.name.encode()) % 1000 * 1e-4
    for k in range(n):
        sf.write(str(root / f"n{k}.wav"), synthesized_music(seconds)[:, 0] * (gain + 0.05 * k), 16000)
    return root


HOLD = "import sys, time; from s4music.files import DirectoryLock\nwith DirectoryLock(sys.argv[1], 'prepare'):\n" \
       "    print('held', flush=True); time.sleep(600)\n"


def test_a_second_prepare_into_the_same_dataset_fails_at_once_and_a_killed_one_leaves_no_lock(tmp_path):
    src = _sources(tmp_path / "src", 2)
    prepare([src], tmp_path / "ds", PrepareOptions(seconds=0.5))
    before = (tmp_path / "ds" / "dataset.json").read_text()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "ds")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(S4MusicError, match=rf"ds: another prepare is writing here \(pid {holder.pid}\)"):
        prepare([_sources(tmp_path / "more", 3)], tmp_path / "ds", PrepareOptions(seconds=0.5))
    assert (tmp_path / "ds" / "dataset.json").read_text() == before  # untouched
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    report = prepare([tmp_path / "more"], tmp_path / "ds", PrepareOptions(seconds=0.5))  # not stuck
    assert len(report.added) == 3 and verify_dataset(tmp_path / "ds") == []


@pytest.mark.slow
def test_prepare_stress_concurrent_runs_and_kill_9_never_corrupt_the_dataset(tmp_path):
    """Three prepares at once into one dataset, one of them killed at a random moment, 24 rounds."""
    rng = random.Random(0)
    ds = tmp_path / "ds"
    code = ("import sys; from s4music.data.prepare import PrepareOptions, prepare\n"
            "prepare([sys.argv[1]], sys.argv[2], PrepareOptions(seconds=0.25))")
    for r in range(24):
        batches = [_sources(tmp_path / f"src{r}-{k}", 3, seconds=0.6) for k in range(3)]
        runs = [subprocess.Popen([sys.executable, "-c", code, str(b), str(ds)], stderr=subprocess.PIPE)
                for b in batches]
        time.sleep(rng.uniform(0.0, 2.5))
        runs[rng.randrange(3)].send_signal(signal.SIGKILL)
        for run in runs:
            run.wait()
        problems = verify_dataset(ds)
        assert problems == [], (r, problems)
    rows = [json.loads(line) for line in (ds / "manifest.jsonl").read_text().splitlines()]
    meta = json.loads((ds / "dataset.json").read_text())
    assert sum(meta["splits"].values()) == len(rows) > 0


def test_verify_names_what_does_not_agree(synth_dataset, tmp_path, cli):
    ds = tmp_path / "ds"
    shutil.copytree(synth_dataset, ds)
    assert verify_dataset(ds) == []
    code, out, err = cli("prepare", "--verify", ds)
    assert code == 0 and "whole" in err and "hours of audio" in out and re.search(r"\d+ files; windows: \d+ train", err)
    with open(ds / "train.u8", "r+b") as f:
        f.truncate(1000)
    (ds / "manifest.jsonl").write_text("".join((ds / "manifest.jsonl").read_text().splitlines(True)[1:]))
    problems = verify_dataset(ds)
    assert any("train.u8: 1000 bytes, but dataset.json counts" in p for p in problems)
    assert any("manifest.jsonl" in p for p in problems)
    code, _, err = cli("prepare", "--verify", ds)
    assert code == 1 and "damaged:" in err


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory on a read-only file system (a tmpfs mounted ro), where the machine lets us mount."""
    target = tmp_path / "ro"
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only file system here (needs root)")
    yield target
    subprocess.run(["umount", str(target)], check=True)


def test_an_output_on_a_read_only_file_system_is_one_line_before_any_work(read_only_dir, tiny_model, synth_prompt,
                                                                          synth_dataset, cli):
    code, _, err = cli("continue", synth_prompt, "-o", read_only_dir / "x.wav", "--model", tiny_model)
    assert code == 1 and f"{read_only_dir / 'x.wav'}: cannot write here (Read-only file system)" in err.replace("\n", "")
    assert "verdict" not in err  # refused before the prompt was read
    code, _, err = cli("prepare", synth_prompt.parent, "-o", read_only_dir / "ds")
    assert code == 1 and "Read-only file system" in err and "Traceback" not in err
    code, _, err = cli("train", "--data", synth_dataset, "--out", read_only_dir / "run", "--steps", "1",
                       "--seq-len", "1024")
    assert code == 1 and "Read-only file system" in err and "Traceback" not in err


@pytest.mark.parametrize("field,value,message", [
    ("d_model", 1_000_000_000, "d_model=1000000000: must be a whole number from 1 to 16384"),
    ("n_layers", -1, "n_layers=-1: must be a whole number from 1 to 256"),
    ("pool", [4, 0], "pool=[4, 0]: must be a list of at most 8 factors from 1 to 64"),
    ("audio.sample_rate", "x", "audio.sample_rate='x': must be a whole number of Hz from 1000 to 384000"),
    ("audio.sample_rate", 0, "audio.sample_rate=0: must be a whole number of Hz from 1000 to 384000"),
    ("audio.quantization", "bogus", "audio.quantization='bogus': must be one of mulaw-official, mulaw, linear"),
    ("audio.bits", "eight", "audio.bits='eight': must be 8 (the codes are bytes)"),
])
def test_a_config_json_out_of_range_names_the_file_and_the_field(tiny_model, tmp_path, field, value, message, cli):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    meta = json.loads((broken / "config.json").read_text())
    group, _, key = field.rpartition(".")
    meta[group or "model"][key] = value
    (broken / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as caught:
        load_model(broken)
    assert str(caught.value) == f"{broken / 'config.json'}: bad model config ({message})"
    code, _, err = cli("generate", "-o", tmp_path / "g.wav", "--model", broken)
    assert code == 1 and message in err.replace("\n", "") and "Traceback" not in err


def test_resume_skips_a_torn_checkpoint_for_the_newest_that_verifies(synth_dataset, tmp_path, caplog):
    out = tmp_path / "run"
    config = TrainConfig(data=[str(synth_dataset)], out=str(out), model=TINY, seq_len=1024, batch_size=2, steps=3,
                         save_every=1, keep_last=3, eval_every=3, eval_windows=1)
    train(config)
    newest = out / "checkpoints" / "step-0000003" / "model.safetensors"
    with open(newest, "r+b") as f:  # cut in half, as a full disk or a kill mid-copy leaves it
        f.truncate(newest.stat().st_size // 2)
    with caplog.at_level("WARNING", logger="s4music.train"):
        result = train(TrainConfig.load(out=str(out), resume=True, steps=4), resume=True)
    assert result.step == 4
    assert any("skipping step-0000003" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    log = (out / "log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["1", "2", "3", "4"]  # step 3 trained again from step 2


def test_pruning_never_keeps_a_skipped_damaged_checkpoint_over_the_one_just_saved(synth_dataset, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=[str(synth_dataset)], out=str(out), model=TINY, seq_len=1024, batch_size=2, steps=4,
                      save_every=2, keep_last=2, eval_every=4, eval_windows=1))
    newest = out / "checkpoints" / "step-0000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    # resumed from step 2, saving every step, keeping one: step 3 is the one to keep
    train(TrainConfig.load(out=str(out), resume=True, steps=3, save_every=1, keep_last=1), resume=True)
    verify_checkpoint(out / "checkpoints" / "step-0000003")
    assert not (out / "checkpoints" / "step-0000002").exists()


def test_a_flipped_bit_in_a_checkpoint_is_detected_and_named(tiny_model, tmp_path):
    damaged = tmp_path / "model"
    shutil.copytree(tiny_model, damaged)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: damaged: its checksum differs"):
        load_model(damaged)


def test_temporaries_a_killed_checkpoint_writer_left_are_removed_by_the_next_run(synth_dataset, tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(data=[str(synth_dataset)], out=str(out), model=TINY, seq_len=1024, batch_size=2, steps=2,
                         save_every=1, eval_every=2, eval_windows=1)
    train(config)
    stale = [out / "checkpoints" / ".step-0000003.tmp-x1y2", out / ".best.old-abc", out / ".log.k3.tmp.csv"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"half")
    stale[1].mkdir()
    stale[2].write_text("step\n")
    train(TrainConfig.load(out=str(out), resume=True, steps=3), resume=True)
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]


def test_two_trainings_into_one_run_directory_cannot_run_at_once(synth_dataset, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD.replace("'prepare'", "'training run'"), str(out)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    try:
        with pytest.raises(S4MusicError, match="another training run is writing here"):
            train(TrainConfig(data=[str(synth_dataset)], out=str(out), model=TINY, seq_len=1024, steps=1))
    finally:
        holder.kill()
        holder.wait()


def test_an_unsafe_pickle_is_refused_without_advice_to_switch_the_safety_off(tmp_path, cli):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"encoder.0.weight": Evil()}, tmp_path / "evil.pt")
    for args in (["convert", tmp_path / "evil.pt", "-o", tmp_path / "m"],
                 ["generate", "-o", tmp_path / "g.wav", "--model", tmp_path / "evil.pt"]):
        code, _, err = cli(*args)
        text = err.replace("\n", "")
        assert code == 1 and "evil.pt: not a plain tensor checkpoint" in text and "posix.system" in text
        assert "weights_only" not in text and "likely succeed" not in text
    assert not (tmp_path / "m").exists()


@pytest.mark.slow  # a subprocess
def test_a_text_file_named_mp3_gives_only_the_one_line_error(tmp_path):
    (tmp_path / "song.mp3").write_text("hello, I am text\n" * 50)
    out = subprocess.run([*S4MUSIC, "check", str(tmp_path / "song.mp3")], capture_output=True, text=True)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and "song.mp3: not audio" in lines[0]


def test_a_failed_fetch_leaves_nothing(http_server, tmp_path):
    _, base = http_server
    report = fetch([f"{base}/nothing.ogg"], tmp_path / "new", FetchOptions())
    assert report.failed and not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "www" / "text.ogg").write_text("not audio")
    report = fetch([f"{base}/nothing.ogg", f"{base}/text.ogg"], tmp_path / "old", FetchOptions())
    assert len(report.failed) == 2 and list((tmp_path / "old").iterdir()) == []


def test_a_selection_past_the_end_says_where_it_starts_and_where_it_ends(synth_prompt, tiny_model, cli):
    code, _, err = cli("continue", synth_prompt, "-o", "-", "--model", tiny_model, "--prompt-start", "100")
    assert code == 1 and "the selection 100 s to the end is empty (the file is 3.0 s long)" in err.replace("\n", "")


@pytest.mark.slow  # a subprocess
def test_yt_dlp_as_the_toolkit_configures_it_has_a_supported_javascript_runtime(tmp_path):
    import yt_dlp  # noqa: F401
    from yt_dlp.globals import supported_js_runtimes

    runtimes = ydl_params(tmp_path, FetchOptions())["js_runtimes"]
    infos = {name: supported_js_runtimes.value[name](path=config.get("path")).info for name, config in runtimes.items()}
    usable = {name: info.path for name, info in infos.items() if info is not None and info.supported}
    assert usable, infos
    assert all(Path(p).is_absolute() for p in usable.values())  # handed over by path: no PATH needed
    doctor = subprocess.run([*S4MUSIC, "doctor"], capture_output=True, text=True)
    row = next(line for line in doctor.stdout.splitlines() if "js runtime" in line)
    assert " ok " in row and "deno" in row


def test_doctor_reports_the_fused_step_its_instruction_sets_and_its_build():
    from s4music.model.fast import fused_available, fused_report, instruction_sets

    need(fused_available(), "a C++ compiler for the fused CPU step")
    built, detail = fused_report()
    assert built and ", ".join(instruction_sets()) in detail and "/extensions/s4music_fast_step-" in detail
    doctor = subprocess.run([*S4MUSIC, "doctor"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    row = next(line for line in doctor.stdout.splitlines() if "fused cpu step" in line)
    assert "built; runs" in row


# A step and a header it includes, as the fused step's csrc/ holds them.
# pybind11 alone, not torch's headers: the build's caching is under test, and it compiles in seconds.
TINY_STEP = ("#include <pybind11/pybind11.h>\n#include \"answer.h\"\n"
             "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def(\"answer\", &answer); }\n")
TINY_HEADER = "#pragma once\ninline int answer() { return 42; }\n"
BUILD = ("import logging, sys; from pathlib import Path; "
         "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s'); "
         "from s4music.model import fast; print(fast.build_extension(Path(sys.argv[1])).answer())")


@pytest.mark.slow
def test_two_checkouts_share_one_build_and_a_build_says_why(tmp_path):
    """Two checkouts of one source, each run twice in turn: one build in all, said once with its
    reason; a changed header builds beside it and says what changed; a second process that finds
    a build under way says once that it waits, and builds nothing."""
    checkouts = [tmp_path / "a", tmp_path / "b"]
    for checkout in checkouts:
        checkout.mkdir()
        (checkout / "tiny_step.cpp").write_text(TINY_STEP)
        (checkout / "answer.h").write_text(TINY_HEADER)
    env = {**os.environ, "S4MUSIC_CACHE": str(tmp_path / "cache")}

    def start(checkout):
        return subprocess.Popen([sys.executable, "-c", BUILD, str(checkout / "tiny_step.cpp")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def said(process) -> tuple[str, list[str]]:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        return out.strip(), [line for line in err.splitlines() if line.startswith("s4music.extensions")]

    runs = [said(start(checkout)) for _ in range(2) for checkout in checkouts]
    assert [answer for answer, _ in runs] == ["42"] * 4
    first = runs[0][1]
    assert len(first) == 2 and "building the fused CPU step" in first[0] and "no build of it here yet" in first[0]
    assert "built the fused CPU step" in first[1]
    assert [lines for _, lines in runs[1:]] == [[], [], []]  # the other checkout, then both again: the cache
    assert len(list((tmp_path / "cache" / "extensions").glob("s4music_fast_step-*"))) == 1

    (checkouts[1] / "answer.h").write_text(TINY_HEADER.replace("42", "43"))
    builder = start(checkouts[1])
    building = next(line for line in builder.stderr if line.startswith("s4music.extensions"))
    assert "building" in building and "sources changed since the build in s4music_fast_step-" in building
    waiter = start(checkouts[1])  # while the first holds the build: it waits, says so once, builds nothing
    built, waited = said(builder), said(waiter)
    assert built[0] == waited[0] == "43"
    assert len(built[1]) == 1 and "built the fused CPU step" in built[1][0]
    assert len(waited[1]) == 1 and "waiting for another process's build" in waited[1][0]
    assert said(start(checkouts[0])) == ("42", [])  # the first checkout's build is still there, untouched


def _ninjas() -> dict[str, Path]:
    """The folders holding a ninja, one for each version: this environment's and the system's."""
    found: dict[str, Path] = {}
    for folder in (Path(sys.executable).parent, *map(Path, os.environ["PATH"].split(os.pathsep))):
        ninja = folder / "ninja"
        if ninja.is_file() and os.access(ninja, os.X_OK):
            version = subprocess.run([ninja, "--version"], capture_output=True, text=True).stdout.strip()
            found.setdefault(version, folder)
    return found


@pytest.mark.slow
def test_two_versions_of_ninja_taking_turns_build_once_each(tmp_path):
    """ninja 1.11 and 1.13 hash a command differently: taking turns on one build, each rebuilt it."""
    ninjas = _ninjas()
    if len(ninjas) < 2:
        pytest.skip(f"one version of ninja here ({', '.join(ninjas) or 'none'})")
    (tmp_path / "tiny_step.cpp").write_text(TINY_STEP)
    (tmp_path / "answer.h").write_text(TINY_HEADER)
    for folder in [*ninjas.values()] * 2:
        env = {**os.environ, "S4MUSIC_CACHE": str(tmp_path / "cache"),
               "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}
        done = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path / "tiny_step.cpp")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and done.stdout.strip() == "42", done.stderr
    logs = list((tmp_path / "cache" / "extensions").glob("s4music_fast_step-*/.ninja_log"))
    commands = [ln for log in logs for ln in log.read_text().splitlines() if not ln.startswith("#")]
    assert len(logs) == len(ninjas) and len(commands) == 2 * len(ninjas)  # a compile and a link each


def test_no_empty_original_directory_is_left(http_server, tmp_path, synth_prompt):
    root, base = http_server
    (root / "good.wav").write_bytes(synth_prompt.read_bytes())
    report = fetch([f"{base}/good.wav"], tmp_path / "f", FetchOptions())
    assert len(report.fetched) == 1 and (tmp_path / "f" / "original").is_dir()
    assert np.isfinite(sf.read(str(report.fetched[0].audio))[0]).all()

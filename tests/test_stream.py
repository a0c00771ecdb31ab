"""Continuation you hear as it is made: standard output, the sound device, a closed pipe, Ctrl-C.
Each runs the command in a process of its own (pipes and signals are the point), so all are slow."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from s4music.audio import load_audio

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
S4MUSIC = [sys.executable, "-m", "s4music.cli"]


def _wait_for(predicate, seconds: float = 120.0) -> None:
    deadline = time.time() + seconds
    while not predicate():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_standard_output_carries_the_same_bytes_as_the_file(tiny_model, synth_prompt, tmp_path):
    args = [str(synth_prompt), "--model", str(tiny_model), "--seconds", "1", "--seed", "1"]
    to_file = subprocess.run([*S4MUSIC, "continue", *args, "-o", str(tmp_path / "b.wav")], capture_output=True)
    streamed = subprocess.run([*S4MUSIC, "continue", *args, "-o", "-"], capture_output=True)
    assert to_file.returncode == 0 and streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == (tmp_path / "b.wav").read_bytes()
    assert b"verdict" in streamed.stderr  # guidance and logs go to standard error


def test_a_stream_writes_its_sidecar_where_asked(tiny_model, synth_prompt, tmp_path):
    args = [*S4MUSIC, "continue", str(synth_prompt), "--model", str(tiny_model), "--seconds", "0.5", "--seed", "3",
            "-o", "-", "--sidecar"]
    streamed = subprocess.run([*args, str(tmp_path / "run.json")], capture_output=True)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout[:4] == b"RIFF" and f"settings and timings: {tmp_path / 'run.json'}".encode() in streamed.stderr
    sidecar = json.loads((tmp_path / "run.json").read_text())
    assert sidecar["seed"] == 3 and sidecar["outputs"][0]["file"] == "-"
    # what else the seed's codes depend on: the build, the vector instructions, the prompt's read
    software = sidecar["software"]
    assert software["s4music"] and software["torch"] and software["instruction_set"] and software["prompt_read"]
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # written atomically: no temporary left
    nowhere = subprocess.run([*args, str(tmp_path / "run.json" / "inside-a-file.json")], capture_output=True)
    assert nowhere.returncode == 1 and b"--sidecar" in nowhere.stderr and b"cannot write here" in nowhere.stderr
    assert nowhere.stdout == b""  # refused before any work


def test_the_bundled_model_streams_what_it_writes(tmp_path):
    # the issue's own check: -o - > a.wav and -o b.wav give identical bytes
    args = ["continue", str(ROOT / "examples" / "prompt.wav"), "--seconds", "5", "--seed", "1"]
    with open(tmp_path / "a.wav", "wb") as a:
        assert subprocess.run([*S4MUSIC, *args, "-o", "-"], stdout=a, stderr=subprocess.DEVNULL).returncode == 0
    assert subprocess.run([*S4MUSIC, *args, "-o", str(tmp_path / "b.wav")], capture_output=True).returncode == 0
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    assert sf.info(str(tmp_path / "a.wav")).duration == pytest.approx(10.0)


@pytest.mark.parametrize("fmt", ["flac", "ogg", "mp3"])
def test_other_formats_stream_through_ffmpeg(tiny_model, synth_prompt, tmp_path, fmt):
    out = subprocess.run([*S4MUSIC, "continue", str(synth_prompt), "--model", str(tiny_model), "--seconds", "1",
                          "-o", "-", "--format", fmt], capture_output=True)
    assert out.returncode == 0, out.stderr
    (tmp_path / f"s.{fmt}").write_bytes(out.stdout)
    # decoded, not read from the header: a streamed FLAC cannot go back to write its length
    audio = load_audio(tmp_path / f"s.{fmt}")
    assert audio.source_rate == 16000 and abs(audio.seconds - 4.0) < 0.15  # a streamed mp3 has no gapless tag


def test_a_reader_that_closes_the_pipe_ends_the_run_cleanly(tiny_model, synth_prompt, tmp_path):
    producer = subprocess.Popen([*S4MUSIC, "continue", str(synth_prompt), "--model", str(tiny_model), "--seconds",
                                 "600", "-o", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    head = producer.stdout.read(20000)
    producer.stdout.close()  # the player went away
    _, err = producer.communicate(timeout=120)
    assert head[:4] == b"RIFF" and len(head) == 20000
    assert producer.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"Exception ignored" not in err
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_ctrl_c_during_a_file_run_leaves_no_partial_file(tiny_model, synth_prompt, tmp_path):
    run = subprocess.Popen([*S4MUSIC, "continue", str(synth_prompt), "--model", str(tiny_model), "--seconds", "600",
                            "-o", str(tmp_path / "x.wav")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: any(p.name.startswith(".x.") for p in tmp_path.iterdir()))  # writing has begun
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err.decode()
    assert b"Traceback" not in err and list(tmp_path.iterdir()) == []
    # the random seed was said before the cut, so the run can be made again; then that it was cut
    lines = err.decode().splitlines()
    assert any(re.fullmatch(r"seed \d+", line) for line in lines) and lines[-1] == "interrupted", lines
    assert "" not in lines, lines  # no blank line from a progress display that was never drawn


def test_ctrl_c_during_a_stream_keeps_what_was_sent(tiny_model, synth_prompt, tmp_path):
    run = subprocess.Popen([*S4MUSIC, "continue", str(synth_prompt), "--model", str(tiny_model), "--seconds", "600",
                            "-o", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sent = run.stdout.read(200000)
    run.send_signal(signal.SIGINT)
    rest, err = run.communicate(timeout=120)
    assert run.returncode == 130, err.decode()
    assert sent[:4] == b"RIFF" and len(sent + rest) >= 200000 and b"Traceback" not in err


def test_play_sounds_on_the_device_while_writing_the_file(tiny_model, synth_prompt, tmp_path, null_sound_env):
    out = subprocess.run([*S4MUSIC, "continue", str(synth_prompt), "--model", str(tiny_model), "--seconds", "1",
                          "-o", str(tmp_path / "p.wav"), "--play"], capture_output=True, text=True, env=null_sound_env)
    assert out.returncode == 0, out.stderr
    assert sf.info(str(tmp_path / "p.wav")).duration == pytest.approx(4.0)


def test_play_without_a_device_is_one_line(tiny_model, synth_prompt, tmp_path, null_sound_env):
    (Path(null_sound_env["HOME"]) / ".asoundrc").write_text("pcm.!default { type hw card 17 }\n")  # no such card
    out = subprocess.run([*S4MUSIC, "continue", str(synth_prompt), "--model", str(tiny_model), "--seconds", "1",
                          "-o", str(tmp_path / "p.wav"), "--play"], capture_output=True, text=True, env=null_sound_env)
    assert out.returncode == 1 and "no sound output device" in out.stderr, out.stderr
    assert len([ln for ln in out.stderr.splitlines() if "error" in ln]) == 1 and "Traceback" not in out.stderr
    assert "verdict" not in out.stderr  # found before the prompt is read
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".p.")]  # no temporaries left
    assert not (tmp_path / "p.wav").exists()

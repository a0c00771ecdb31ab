"""Jam: the model follows live input and answers in the pauses; streams that go wrong end cleanly."""

import io
import json
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import need, synthesized_music

from s4music.audio import encode, load_audio
from s4music.generate import StepOptions
from s4music.jam import Jam, JamError, JamOptions, run_jam
from s4music.model import load_model
from s4music.sources import SourceError, wav_stream

S4MUSIC = [sys.executable, "-m", "s4music.cli"]
SR = 16000


def blocks_of(x: np.ndarray, n: int = 320):
    for i in range(0, len(x), n):
        yield x[i : i + n]


def wav_bytes(x: np.ndarray, rate: int, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_the_model_answers_in_the_pause_and_stops_when_the_player_returns(tiny_model, tmp_path):
    music = synthesized_music(seconds=3.0)[:, 0]
    x = np.concatenate([music, np.zeros(2 * SR, np.float32), music[: SR]])
    events = []
    result = run_jam(blocks_of(x), tiny_model, JamOptions(seed=5, wait=0.5), record=tmp_path / "j.wav",
                     log=tmp_path / "t.jsonl", play=False, on_event=events.append)
    (turn,) = result.turns
    assert turn.silence_s == pytest.approx(3.0, abs=0.021)
    assert turn.start_s == pytest.approx(3.5, abs=0.041)  # wait, to the block
    assert turn.end_s == pytest.approx(5.0, abs=0.041) and turn.ended == "player returned"
    assert [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()] == [turn.to_dict()]
    rec, rate = sf.read(str(tmp_path / "j.wav"))
    assert rate == SR and rec.shape == (len(x), 2)
    assert np.abs(rec[:, 0] - x).max() < 1e-4  # channel 1: the input as heard
    answer = rec[:, 1]
    assert not answer[: int(3.5 * SR)].any() and not answer[int(5.04 * SR):].any()
    assert np.sqrt(np.mean(answer[int(3.6 * SR): int(4.9 * SR)] ** 2)) > 1e-3
    assert [e.kind for e in events if e.kind != "verdict"] == ["listening", "answer", "turn"]
    # the answer plays at the loudness of the player's last 2 s, within 3 dB
    played = 20 * np.log10(np.sqrt(np.mean(music[-2 * SR:] ** 2)))
    answered = 20 * np.log10(np.sqrt(np.mean(answer[int(3.6 * SR): int(4.9 * SR)] ** 2)))
    assert abs(answered - played) < 3, (answered, played)



def test_an_answer_follows_the_players_recent_loudness_not_the_loudest_moment(tiny_model, tmp_path):
    music = synthesized_music(seconds=3.0)[:, 0] * np.repeat([1.0, 0.3, 0.3], SR).astype(np.float32)
    x = np.concatenate([music, np.zeros(2 * SR, np.float32)])
    played = 20 * np.log10(np.sqrt(np.mean(music[-2 * SR:] ** 2)))
    level = {}
    for match in (True, False):
        run_jam(blocks_of(x), tiny_model, JamOptions(seed=5, wait=0.5, match_level=match), record=tmp_path / "r.wav",
                play=False)
        answer = sf.read(str(tmp_path / "r.wav"))[0][int(3.6 * SR): int(4.9 * SR), 1]
        level[match] = 20 * np.log10(np.sqrt(np.mean(answer**2)))
    assert abs(level[True] - played) < 3, (level, played)
    assert abs(level[False] - played) > 3, (level, played)  # the model's own level, scaled by the loud start


def rms_db(x: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2))))


@pytest.mark.slow
def test_answers_to_a_real_recording_with_gaps_come_at_the_players_recent_loudness(recordings, tiny_model, tmp_path):
    """Each answer to a real recording with two 3 s gaps is within 3 dB of the player's last 2 s
    before its gap; the model's own level (--model-level) is not."""
    music = load_audio(recordings[0], SR).samples.numpy()
    silence = np.zeros(3 * SR, np.float32)
    piece = np.concatenate([music[: 4 * SR], silence, music[4 * SR : 8 * SR], silence, music[8 * SR : 11 * SR]])
    played = [rms_db(piece[2 * SR : 4 * SR]), rms_db(piece[9 * SR : 11 * SR])]
    misses = {}
    for match in (True, False):
        result = run_jam(blocks_of(piece), tiny_model, JamOptions(seed=0, match_level=match),
                         record=tmp_path / "jam.wav", play=False)
        answer = sf.read(str(tmp_path / "jam.wav"))[0][:, 1]
        assert len(result.turns) == 2, result.turns
        answered = [rms_db(answer[int(t.start_s * SR) : int(t.end_s * SR)]) for t in result.turns]
        misses[match] = [a - p for a, p in zip(answered, played, strict=True)]
    assert max(map(abs, misses[True])) < 3, misses
    assert max(map(abs, misses[False])) > 3, misses


def test_the_state_follows_the_input_as_one_prefill_would(tiny_model):
    # aligned blocks by prefill, the rest by teacher forcing (once an answer has left the state's time
    # unaligned): the state after the input is the state after one prefill of it, whatever the blocks
    net = load_model(tiny_model)
    codes = encode(torch.from_numpy(synthesized_music(seconds=1.2)[:, 0]), net.audio.quantization).long()
    _, want = net.prefill(net.shift_right(codes.unsqueeze(0)))
    jam = Jam(net, JamOptions(step=StepOptions(device="cpu", half_weights=False)))
    assert jam.align == 4096  # 256-sample scan chunks at the deepest tier, under pools [4, 4]
    first = 300  # taken by teacher forcing, as after an answer: the next ones re-align, then go by prefill
    jam._take(codes[:first], forced=True)
    for i in range(first, len(codes), 777):
        jam.pending.append(codes[i : i + 777])
        jam._absorb(everything=False)
    jam._absorb(everything=True)
    assert jam.state.t == len(codes) and int(jam.code) == int(codes[-1]) and not jam.pending
    for got, ref in zip(jam.state.s4, want.s4, strict=True):
        assert (got - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))


def test_silence_stays_the_middle_code_however_long_it_lasts(tiny_model):
    """The live encoding scales by the input's recent peak, which follows the input down 1 dB a
    second, not below -60 dBFS; with the official formula's offset, zeros were encoded as 125 from
    the start and as codes near 40 from a scale of 1e-6 (past 90 s of digital silence)."""
    jam = Jam(load_model(tiny_model), JamOptions(seed=1, step=StepOptions(device="cpu")))
    jam.peak = 1e-6
    jam._listen(np.zeros(SR // 10, np.float32), quiet=True)
    heard = torch.cat(jam.pending)  # under one aligned unit: waiting for the state, as encoded
    assert jam.peak == 1e-3 and len(heard) == SR // 10 and heard.eq(128).all()


def test_the_state_hears_the_block_the_player_returns_with(tiny_model):
    jam = Jam(load_model(tiny_model), JamOptions(seed=1, wait=0.1, step=StepOptions(device="cpu")))
    music = synthesized_music(seconds=1.0)[:, 0]
    for block in blocks_of(np.concatenate([music, np.zeros(SR // 2, np.float32)])):
        jam.feed(block)
    assert jam.answer is not None
    heard = jam.answer.state.t  # the input, then the answer so far
    jam.feed(music[:320])  # the player is back
    assert jam.answer is None and jam.turns[0].ended == "player returned"
    # the answer's last block, then the player's: both reach the state (or wait in pending)
    assert jam.state.t + sum(map(len, jam.pending)) == heard + 320 + 320
    assert jam.armed  # so the next pause is answered


def test_an_answer_is_guided_by_what_the_player_just_played(tiny_model):
    """--guidance in jam: the answer's free row hears only the end of what was played, and
    --surprise auto holds the answer near the bits of what was heard."""
    from s4music.generate import Sampling

    sampling = Sampling(guidance=2.0, guidance_seconds=0.1, surprise="auto")
    jam = Jam(load_model(tiny_model), JamOptions(seed=1, wait=0.1, sampling=sampling, step=StepOptions(device="cpu")))
    music = synthesized_music(seconds=1.0)[:, 0]
    for block in blocks_of(np.concatenate([music, np.zeros(SR // 2, np.float32)])):
        jam.feed(block)
    answer = jam.answer
    assert answer is not None and answer.pairs and answer.rows == 2
    heard = sum(n for n, _ in jam.heard_bits)
    assert answer.sampling.surprise == pytest.approx(sum(b for _, b in jam.heard_bits) / heard)
    assert jam.recent.numel() <= int(1.1 * SR) and jam.recent[-1] == jam.code[0]  # it ends with the next input


def test_a_guided_answer_hands_back_the_state_that_heard_it_and_the_jam_goes_on(tiny_model):
    """A guided answer steps two rows (prompt, free); when the player returns, the jam follows
    the input again from the prompt row alone, and answers the next pause too (it crashed the
    fused step with both rows)."""
    from s4music.generate import Sampling

    jam = Jam(load_model(tiny_model), JamOptions(seed=1, wait=0.1, sampling=Sampling(guidance=2.0, guidance_seconds=0.0),
                                                 step=StepOptions(device="cpu")))
    music = synthesized_music(seconds=1.0)[:, 0]
    pause = np.zeros(SR // 2, np.float32)
    for block in blocks_of(np.concatenate([music, pause, music, pause, music])):
        jam.feed(block)
        if jam.answer is not None:
            assert jam.answer.pairs and jam.answer.rows == 2
    assert [turn.ended for turn in jam.turns] == ["player returned", "player returned"]
    assert all(x.shape[0] == 1 for x in jam.state.s4) and jam.code.shape == (1,)


def test_a_ctrl_c_during_an_answer_logs_the_answer_as_stopped(tiny_model, tmp_path):
    music = synthesized_music(seconds=1.0)[:, 0]

    def played():
        yield from blocks_of(np.concatenate([music, np.zeros(SR, np.float32)]))  # the answer starts in the pause
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_jam(played(), tiny_model, JamOptions(seed=2, wait=0.2), record=tmp_path / "j.wav",
                log=tmp_path / "t.jsonl", play=False)
    (turn,) = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert turn["ended"] == "stopped" and turn["end_s"] == pytest.approx(2.0, abs=0.021)
    assert sf.info(str(tmp_path / "j.wav")).duration == pytest.approx(2.0, abs=0.021)


def test_input_the_model_finds_surprising_is_answered_with_its_rule_for_unfamiliar_prompts(tiny_model):
    music = synthesized_music(seconds=1.0)[:, 0]
    answers, heard = {}, None
    for name in ("familiar", "surprising"):  # first a test figure far above what it hears, then 1 bit under
        net = load_model(tiny_model)
        net.summary = {**net.summary, "test_bits": 100.0 if heard is None else heard - 1.0,
                       "sampling": {"temperature": 0.8}, "sampling_unfamiliar": {"typical": 0.9}}
        events = []
        jam = Jam(net, JamOptions(seed=1, wait=0.1, step=StepOptions(device="cpu")), on_event=events.append)
        for block in blocks_of(np.concatenate([music, np.zeros(SR // 2, np.float32)])):
            jam.feed(block)
            if jam.answer is not None:  # what it had heard when it began to answer
                break
        answers[name] = (jam.answer.sampling, [e.text for e in events if e.kind == "answer"])
        heard = sum(b for _, b in jam.heard_bits) / sum(n for n, _ in jam.heard_bits)
    assert answers["familiar"][0].typical == 1.0 and answers["surprising"][0].typical == 0.9
    assert answers["familiar"][0].temperature == answers["surprising"][0].temperature == 0.8
    assert "unfamiliar" in answers["surprising"][1][0] and "unfamiliar" not in answers["familiar"][1][0]


def test_a_jam_that_cannot_start_replaces_no_earlier_recording(tiny_model, tmp_path):
    (tmp_path / "jam.wav").write_bytes(b"last night's jam")
    (tmp_path / "turns.jsonl").write_text("{}\n")
    with pytest.raises(SourceError, match="not a WAV stream"):
        run_jam(wav_stream(io.BytesIO(b"not a wav stream at all"), SR), tiny_model, record=tmp_path / "jam.wav",
                log=tmp_path / "turns.jsonl", play=False)
    assert (tmp_path / "jam.wav").read_bytes() == b"last night's jam"
    assert (tmp_path / "turns.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jam.wav", "turns.jsonl"]  # no temporaries


def test_bad_jam_options_are_named(tiny_model):
    with pytest.raises(JamError, match="--wait 0: must be more than 0"):
        run_jam(iter([]), tiny_model, JamOptions(wait=0), play=False)


def test_a_wav_stream_at_any_rate_and_channel_count_is_read_as_prompts_are(tmp_path):
    x = synthesized_music(seconds=1.0, rate=44100, channels=2)
    got = np.concatenate(list(wav_stream(io.BytesIO(wav_bytes(x, 44100)), SR)))
    (tmp_path / "x.wav").write_bytes(wav_bytes(x, 44100))
    want = load_audio(tmp_path / "x.wav", SR).samples.numpy()
    assert abs(len(got) - len(want)) < 64  # the resampler's flush
    assert np.abs(got[: len(want)] - want).max() < 0.02
    with pytest.raises(SourceError, match="standard input: not a WAV stream"):
        list(wav_stream(io.BytesIO(b"ID3\x04 this is an mp3, or anything else"), SR))
    cut = wav_bytes(x, 44100)[:5001]  # mid-frame
    assert sum(map(len, wav_stream(io.BytesIO(cut), SR))) > 0  # what was whole is given, then it ends


@pytest.mark.slow  # jam in a subprocess
def test_jam_on_the_sound_device_until_ctrl_c_keeps_the_recording(tiny_model, tmp_path, null_sound_env):
    """Under load (the other core busy): once the jam says it is listening, Ctrl-C, and an impatient
    second and third, leave the recording closed and valid, and no temporary."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        run = subprocess.Popen([*S4MUSIC, "jam", "--model", str(tiny_model), "--record", str(tmp_path / "r.wav")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=null_sound_env, text=True)
        watchdog = threading.Timer(300, run.kill)  # a jam that never listens fails the test, not hangs it
        watchdog.start()
        said = ""
        while "listening" not in said:
            line = run.stderr.readline()
            assert line, said  # it ended before it listened
            said += line
        assert f"Ctrl-C ends the jam and keeps {tmp_path / 'r.wav'}" in said
        time.sleep(0.5)  # listening to the (null) device's silence
        for _ in range(3):
            run.send_signal(signal.SIGINT)
            time.sleep(0.01)
        _, err = run.communicate(timeout=60)
        watchdog.cancel()
    finally:
        busy.kill()
        busy.wait()
    # 130; or, for a Ctrl-C in the last moments of the interpreter's exit, when Python has given
    # SIGINT back to the system, death by SIGINT, which a shell reports as 130 too
    assert run.returncode in (130, -signal.SIGINT), said + err
    info = sf.info(str(tmp_path / "r.wav"))  # closed properly: a valid file
    assert info.channels == 2 and info.samplerate == SR and info.frames > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow  # jam in a subprocess
def test_ctrl_c_before_the_jam_hears_anything_keeps_the_last_recording_and_no_temporary(tiny_model, tmp_path):
    """Ctrl-C while the jam waits for its first block (its recording open, the stream silent so far)
    keeps the earlier recording of that name as it was and leaves no temporary."""
    (tmp_path / "r.wav").write_bytes(b"last night's jam")
    run = subprocess.Popen([*S4MUSIC, "jam", "--input", "-", "--no-play", "--model", str(tiny_model), "--record",
                            str(tmp_path / "r.wav")], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # a jam that never opens its recording fails, not hangs
        while not any(p.name.startswith(".r.") for p in tmp_path.iterdir()):
            assert run.poll() is None, run.stderr.read().decode()
            assert time.monotonic() < deadline, "the recording was never opened"
            time.sleep(0.01)
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=60) == 130, run.stderr.read().decode()
    finally:
        run.stdin.close()  # only now: an end of the stream before the Ctrl-C would end the jam another way
        run.wait()
    assert (tmp_path / "r.wav").read_bytes() == b"last night's jam"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.wav"]


@pytest.mark.slow  # jam in a subprocess
def test_bad_input_streams_end_with_one_line_or_a_clean_stop(tiny_model, tmp_path):
    cmd = [*S4MUSIC, "jam", "--input", "-", "--model", str(tiny_model), "--no-play", "--record"]
    text = subprocess.run([*cmd, str(tmp_path / "a.wav")], input=b"not a wav stream at all", capture_output=True)
    lines = [ln for ln in text.stderr.decode().splitlines() if ln.strip()]
    assert text.returncode == 1 and len(lines) == 1 and "not a WAV stream" in lines[0]
    music = synthesized_music(seconds=2.0)[:, 0]
    cut = wav_bytes(music, SR)[:30001]  # truncated mid-stream (and mid-frame)
    out = subprocess.run([*cmd, str(tmp_path / "b.wav")], input=cut, capture_output=True)
    assert out.returncode == 0, out.stderr.decode()
    info = sf.info(str(tmp_path / "b.wav"))
    assert info.channels == 2 and abs(info.frames - (30001 - 44) // 2) < 64
    # a writer that goes away: the pipe closes, the jam ends and keeps what it heard
    writer = subprocess.Popen([*cmd, str(tmp_path / "c.wav")], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    writer.stdin.write(wav_bytes(music, SR)[:20000])
    writer.stdin.close()
    assert writer.wait(timeout=120) == 0
    assert sf.info(str(tmp_path / "c.wav")).frames > 0


@pytest.mark.slow
def test_a_real_recording_at_real_time_pace_gets_two_answers_in_its_two_silences(recordings, tmp_path):
    need(shutil.which("ffmpeg") is not None, "ffmpeg")
    music = load_audio(recordings[0], 44100).samples.numpy()
    assert len(music) > 12 * 44100
    silence = np.zeros(3 * 44100, np.float32)
    # two 3 s silences, after 4 s and after 8 s of music
    piece = np.concatenate([music[: 4 * 44100], silence, music[4 * 44100 : 8 * 44100], silence,
                            music[8 * 44100 : 11 * 44100]])
    sf.write(str(tmp_path / "piece.wav"), np.stack([piece, piece], 1), 44100)  # stereo, 44.1 kHz
    ffmpeg = subprocess.Popen(["ffmpeg", "-v", "error", "-re", "-i", str(tmp_path / "piece.wav"), "-f", "wav", "-"],
                              stdout=subprocess.PIPE)
    # The chorale model's answers hold a steady level, which the loudness check needs: the bundled
    # model's often strike one chord and let it decay, and end below the player (README, jam).
    chorales = Path(__file__).resolve().parent.parent / "models" / "chorales"
    jam = subprocess.run([*S4MUSIC, "jam", "--input", "-", "--no-play", "--seed", "0", "--record",
                          str(tmp_path / "jam.wav"), "--log", str(tmp_path / "turns.jsonl"), "--model", str(chorales)],
                         stdin=ffmpeg.stdout, capture_output=True, text=True)
    ffmpeg.stdout.close()  # a jam that died early leaves ffmpeg writing to no one: it must not hang the test
    ffmpeg.wait()
    assert jam.returncode == 0, jam.stderr
    turns = [json.loads(line) for line in (tmp_path / "turns.jsonl").read_text().splitlines()]
    assert len(turns) == 2, turns
    for turn, (quiet, back) in zip(turns, [(4.0, 7.0), (11.0, 14.0)], strict=True):
        assert abs(turn["silence_s"] - quiet) < 0.05
        assert quiet < turn["start_s"] <= quiet + 1.0 + 0.5  # within --wait + 0.5 s of the silence
        assert abs(turn["end_s"] - back) <= 0.2 and turn["ended"] == "player returned"
    rec, rate = sf.read(str(tmp_path / "jam.wav"))
    answer = rec[:, 1]
    voiced = np.zeros(len(answer), bool)
    for turn in turns:
        voiced[int(turn["start_s"] * rate): int(turn["end_s"] * rate)] = True
    frames = answer[: len(answer) // 320 * 320].reshape(-1, 320)
    loud = np.sqrt((frames**2).mean(1)) > 1e-3
    inside = voiced[: len(loud) * 320].reshape(-1, 320).all(1)
    outside = ~voiced[: len(loud) * 320].reshape(-1, 320).any(1)
    assert loud[inside].mean() > 0.9 and not loud[outside].any()  # channel 2 sounds exactly there
    for turn, quiet in zip(turns, (4, 11), strict=True):  # at the loudness of the player's last 2 s
        played = rms_db(piece[(quiet - 2) * 44100 : quiet * 44100])
        assert abs(rms_db(answer[int(turn["start_s"] * rate) : int(turn["end_s"] * rate)]) - played) < 3


def test_the_wav_header_parser_takes_extensible_and_float_streams():
    x = synthesized_music(seconds=0.5)[:, 0]
    for subtype in ("FLOAT", "PCM_32"):
        buf = io.BytesIO()
        sf.write(buf, x, SR, format="WAV", subtype=subtype)
        got = np.concatenate(list(wav_stream(io.BytesIO(buf.getvalue()), SR)))
        assert np.abs(got[: len(x)] - x).max() < 1e-3
    header = b"RIFF" + struct.pack("<I", 0) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, SR, SR * 3, 3, 24)
    with pytest.raises(SourceError, match="24-bit samples is not supported"):
        list(wav_stream(io.BytesIO(header + b"data" + struct.pack("<I", 0)), SR))


def test_a_wav_stream_at_a_low_rate_is_resampled_as_a_file_is(tmp_path):
    for rate in (8000, 4000, 11025):
        x = synthesized_music(seconds=1.0, rate=rate, channels=1)[:, 0]
        got = np.concatenate(list(wav_stream(io.BytesIO(wav_bytes(x, rate)), SR)))
        (tmp_path / f"{rate}.wav").write_bytes(wav_bytes(x, rate))
        want = load_audio(tmp_path / f"{rate}.wav", SR).samples.numpy()
        assert abs(len(got) - len(want)) < 128, rate
        n = min(len(got), len(want)) - 64
        assert np.abs(got[64:n] - want[64:n]).max() < 0.05, rate


RATES = "the WAV header's sample rate is {} Hz; a stream's must be 1000-384000 Hz"
CHANNELS = "the WAV header gives {} channels; a stream may have 1-32"


@pytest.mark.parametrize(("rate", "channels", "message"), [
    (0, 1, RATES.format(0)),
    (4294967295, 1, RATES.format(4294967295)),
    (100_000_000, 2, RATES.format(100_000_000)),
    (SR, 0, CHANNELS.format(0)),
    (SR, 65535, CHANNELS.format(65535)),
])
def test_a_wav_header_out_of_range_is_refused_by_its_field(rate, channels, message):
    fmt = struct.pack("<HHIIHH", 1, channels, rate, 0, min(2 * max(channels, 1), 65535), 16)
    header = b"RIFF" + struct.pack("<I", 0) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
    with pytest.raises(SourceError) as e:
        list(wav_stream(io.BytesIO(header + b"data" + struct.pack("<I", 0) + bytes(4000)), SR))
    assert str(e.value) == f"standard input: {message}"  # one line: the field, its value and the range


def test_a_ctrl_c_while_a_file_is_opened_or_closed_comes_right_after():
    """The jam's files are opened and closed with Ctrl-C held back: the block runs to its end, then
    the handler that was in place gets the signal."""
    import os

    from s4music.files import interrupts_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal has been delivered by now
            done.append("closed")
    assert done == ["closed"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

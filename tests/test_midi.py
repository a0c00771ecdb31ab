"""`render-midi` on real MIDI (music21 corpus) with FluidSynth and a real General MIDI soundfont."""

import json
import os
import shutil

import mido
import pytest
import soundfile as sf

from conftest import need
from s4music.data.midi import RenderError, RenderOptions, filter_midi, parse_instruments, render_midi
from s4music.system import find_soundfont


@pytest.fixture(autouse=True)
def _tools():
    need(shutil.which("fluidsynth") is not None, "fluidsynth")
    need(find_soundfont() is not None, "a General MIDI soundfont")


def _notes(midi):
    return [(m.channel, m.note) for m in midi.tracks[0] if m.type == "note_on" and m.velocity > 0]


def test_instrument_filter_keeps_only_the_chosen_family(midi_corpus):
    piano, _ = parse_instruments(["piano"])
    only_piano, n_piano, _ = filter_midi(midi_corpus["mixed"], piano, keep_drums=False, max_seconds=None)
    assert n_piano > 100 and {c for c, _ in _notes(only_piano)} == {0}
    no_drums, _, _ = filter_midi(midi_corpus["mixed"], None, keep_drums=False, max_seconds=None)
    everything, _, _ = filter_midi(midi_corpus["mixed"], None, keep_drums=True, max_seconds=None)
    assert {c for c, _ in _notes(no_drums)} == {0, 1}
    assert {c for c, _ in _notes(everything)} == {0, 1, 9}
    strings, _ = parse_instruments(["48"])
    _, n_strings, _ = filter_midi(midi_corpus["mixed"], strings, keep_drums=False, max_seconds=None)
    assert 0 < n_strings


def test_render_a_collection_in_parallel_trimmed_and_capped(midi_corpus, tmp_path):
    src = tmp_path / "lmd" / "a" / "b"
    src.mkdir(parents=True)
    for key in ("piano", "mixed", "stray_tail", "strings"):
        shutil.copy(midi_corpus[key], src / f"{key}.mid")
    shutil.copy(midi_corpus["piano"], src / ".piano.1a2b.tmp.mid")  # an export in progress: not rendered
    report = render_midi([tmp_path / "lmd"], tmp_path / "out",
                         RenderOptions(instruments=["piano"], max_seconds=15, workers=2))
    rendered = {s.name: (o, secs) for s, o, secs in report.rendered}
    assert set(rendered) == {"piano.mid", "mixed.mid", "stray_tail.mid"}
    assert [s.name for s, _ in report.skipped] == ["strings.mid"]  # no piano in the quartet
    out, seconds = rendered["piano.mid"]
    assert out == tmp_path / "out" / "a" / "b" / "piano.wav"
    info = sf.info(str(out))
    assert info.samplerate == 16000 and info.channels == 1
    assert 12 < seconds < 18  # capped at 15 s of MIDI, plus the release tail
    # The chorale lasts about 23 s; the stray note 30 minutes later is cut by the cap.
    assert rendered["stray_tail.mid"][1] < 18


def test_stray_tail_is_trimmed_without_a_cap(midi_corpus, tmp_path):
    report = render_midi([midi_corpus["chorale"]], tmp_path / "out", RenderOptions(max_seconds=None))
    ((_, _, seconds),) = report.rendered
    assert 15 < seconds < 30


def test_bad_files_are_reported_and_the_batch_finishes_then_resumes(midi_corpus, tmp_path):
    src = tmp_path / "midi"
    src.mkdir()
    shutil.copy(midi_corpus["chorale"], src / "good.mid")
    (src / "empty.mid").write_bytes(b"")
    (src / "text.mid").write_text("this is not MIDI\n")
    data = midi_corpus["piano"].read_bytes()
    (src / "truncated.mid").write_bytes(data[: len(data) // 3])
    report = render_midi([src], tmp_path / "out", RenderOptions(max_seconds=10))
    assert [s.name for s, _, _ in report.rendered] == ["good.mid"]
    reasons = {s.name: r for s, r in report.failed}
    assert set(reasons) == {"empty.mid", "text.mid", "truncated.mid"}
    for name, reason in reasons.items():
        assert reason.startswith(str(src / name) + ": ") and "\n" not in reason
    listed = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert sorted(x["source"].rsplit("/", 1)[-1] for x in listed) == sorted(reasons)
    again = render_midi([src], tmp_path / "out", RenderOptions(max_seconds=10))
    assert [s.name for s in again.already] == ["good.mid"] and not again.rendered




def test_a_killed_render_s_temporaries_go_when_its_file_is_rendered_again(midi_corpus, tmp_path):
    src, out = tmp_path / "midi", tmp_path / "out"
    src.mkdir()
    shutil.copy(midi_corpus["chorale"], src / "bwv99.mid")
    # as a kill leaves them: the WAV and sidecar being written, the scratch folder; and another
    # file's (bwv99.6, rendered by another shard at the same time), which must stay
    out.mkdir()
    own = [out / ".bwv99.2e672253.tmp.wav", out / ".bwv99.0badc0de.tmp.json", out / ".bwv99.wav.tmp-scratch-k3x_9a0q"]
    other = [out / ".bwv99.6.1a2b3c4d.tmp.wav", out / ".bwv99.6.wav.tmp-scratch-abcdefgh"]
    for path in own + other:
        path.mkdir() if "scratch" in path.name else path.write_bytes(b"half")
    report = render_midi([src], out, RenderOptions(max_seconds=5, vary=True))
    assert [s.name for s, _, _ in report.rendered] == ["bwv99.mid"]
    assert not any(p.exists() for p in own) and all(p.exists() for p in other)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["bwv99.json", "bwv99.wav", "render.json"]


def test_two_files_that_would_render_to_one_wav_the_second_is_reported(midi_corpus, tmp_path):
    src = tmp_path / "midi"
    src.mkdir()
    shutil.copy(midi_corpus["chorale"], src / "tune.mid")
    shutil.copy(midi_corpus["chorale"], src / "tune.midi")
    report = render_midi([src], tmp_path / "out", RenderOptions(max_seconds=3))
    assert [s.name for s, _, _ in report.rendered] == ["tune.mid"]
    assert report.failed == [(src / "tune.midi", f"{src / 'tune.midi'}: renders to {tmp_path / 'out' / 'tune.wav'}, "
                                                 f"as {src / 'tune.mid'} does")]
    # one file listed twice renders once
    twice = render_midi([src / "tune.mid", src / "tune.mid"], tmp_path / "twice", RenderOptions(max_seconds=3, workers=2))
    assert len(twice.rendered) == 1 and [reason.split(": ", 1)[1] for _, reason in twice.failed] == [
        f"renders to {tmp_path / 'twice' / 'tune.wav'}, as {src / 'tune.mid'} does"]


def test_a_full_disk_stops_the_batch_and_another_os_error_is_reported(midi_corpus, tmp_path, monkeypatch):
    import errno

    from s4music.data import midi

    src = tmp_path / "midi"
    src.mkdir()
    for name in ("a", "b"):
        shutil.copy(midi_corpus["chorale"], src / f"{name}.mid")

    def failing(code):
        def write(path, *args, **kwargs):
            raise OSError(code, os.strerror(code), str(path))
        return write

    monkeypatch.setattr(midi, "write_audio", failing(errno.EACCES))
    report = render_midi([src], tmp_path / "out", RenderOptions(max_seconds=3))
    assert [s.name for s, _ in report.failed] == ["a.mid", "b.mid"] and "Permission denied" in report.failed[0][1]
    monkeypatch.setattr(midi, "write_audio", failing(errno.ENOSPC))
    with pytest.raises(RenderError, match=f"^{tmp_path / 'out'}: no space left for the renders"):
        render_midi([src], tmp_path / "out", RenderOptions(max_seconds=3))


def test_unknown_instrument_is_a_clear_error(tmp_path):
    with pytest.raises(RenderError, match="unknown instrument 'kazoo'"):
        render_midi([tmp_path], tmp_path / "out", RenderOptions(instruments=["kazoo"]))


def test_filtered_file_is_valid_midi(midi_corpus, tmp_path):
    midi, _, _ = filter_midi(midi_corpus["piano"], None, True, 5)
    midi.save(str(tmp_path / "x.mid"))
    assert mido.MidiFile(str(tmp_path / "x.mid")).length == pytest.approx(5, abs=0.01)


# ------------------------------------------------------------------ soundfonts by name, variations, time limit


def test_soundfonts_by_name_and_an_unknown_name_lists_the_installed_ones(midi_corpus, tmp_path):
    from s4music.system import SOUNDFONTS, SoundfontError, installed_soundfonts

    installed = installed_soundfonts()
    need({"timgm6mb", "fluidr3"} <= set(installed), "the timgm6mb and fluidr3 soundfonts (make test installs them)")
    assert find_soundfont("timgm6mb") == installed["timgm6mb"] and find_soundfont("FluidR3") == installed["fluidr3"]
    assert find_soundfont() == next(iter(installed.values()))  # the best installed, in SOUNDFONTS' order
    assert list(installed) == [n for n in SOUNDFONTS if n in installed]
    with pytest.raises(SoundfontError) as e:
        find_soundfont("kazoo")
    assert str(e.value).count("\n") == 0 and "timgm6mb" in str(e.value) and "fluidr3" in str(e.value)
    with pytest.raises(RenderError, match="kazoo: no such soundfont file or name; installed names: .*timgm6mb"):
        render_midi([midi_corpus["chorale"]], tmp_path / "out", RenderOptions(soundfont="kazoo"))
    bits = {}
    for name in ("timgm6mb", "fluidr3"):
        report = render_midi([midi_corpus["chorale"]], tmp_path / name, RenderOptions(soundfont=name, max_seconds=5))
        bits[name] = sf.read(str(report.rendered[0][1]))[0]
    assert bits["timgm6mb"].shape != bits["fluidr3"].shape or (bits["timgm6mb"] != bits["fluidr3"]).any()


def test_variations_are_seeded_recorded_and_within_their_ranges(midi_corpus, tmp_path):
    from s4music.data.midi import PIANO_PROGRAMS, PIANO_RANGE, Variation, draw_variation

    src = tmp_path / "midi"
    src.mkdir()
    for key in ("chorale", "piano"):
        shutil.copy(midi_corpus[key], src / f"{key}.mid")
    opts = dict(max_seconds=8, program="piano", vary=True, soundfont="timgm6mb,fluidr3")
    first = render_midi([src], tmp_path / "a", RenderOptions(seed=7, **opts))
    render_midi([src], tmp_path / "b", RenderOptions(seed=7, **opts))
    render_midi([src], tmp_path / "c", RenderOptions(seed=8, **opts))
    assert len(first.rendered) == 2
    for name in ("chorale", "piano"):
        a, b, c = ((tmp_path / d / f"{name}.wav").read_bytes() for d in "abc")
        assert a == b and a != c  # the same seed gives the same bytes; another seed, another take
        side = json.loads((tmp_path / "a" / f"{name}.json").read_text())
        v = Variation(**side["variation"])
        assert 0.92 <= v.tempo <= 1.08 and abs(v.transpose) <= 3 and v.program in PIANO_PROGRAMS
        assert v.timing_ms > 0 and v.velocity_gamma != 1 and v.reverb and side["soundfont"].endswith((".sf2", ".sf3"))
    # the transposition keeps every note on the keyboard: a piece spanning it all cannot move
    assert draw_variation(3, PIANO_RANGE, "piano").transpose == 0
    assert {draw_variation(s, (60, 72), None).transpose for s in range(40)} == set(range(-3, 4))
    # the tempo and the transposition are applied to the notes
    v = draw_variation(5, (40, 80), None)
    plain, _, _ = filter_midi(src / "chorale.mid", None, True, 8)
    varied, _, _ = filter_midi(src / "chorale.mid", None, True, 8, v)
    assert varied.length == pytest.approx(8 / v.tempo + 0.1, abs=0.05)
    assert min(m.note for _, m in _notes_of(varied)) == min(m.note for _, m in _notes_of(plain)) + v.transpose


def _notes_of(midi):
    return [(m.channel, m) for m in midi.tracks[0] if m.type == "note_on" and m.velocity > 0]


def test_a_file_that_hangs_fluidsynth_is_stopped_and_the_rest_finish(midi_corpus, tmp_path):
    src = tmp_path / "midi"
    src.mkdir()
    shutil.copy(midi_corpus["chorale"], src / "good.mid")
    hours = mido.MidiFile(str(midi_corpus["chorale"]))  # a note three hours on: minutes of FluidSynth work
    hours.tracks[-1].insert(len(hours.tracks[-1]) - 1, mido.Message(
        "note_on", note=60, velocity=80, time=int(3 * 3600 * 2 * hours.ticks_per_beat)))
    hours.save(str(src / "hangs.mid"))
    report = render_midi([src], tmp_path / "out", RenderOptions(max_seconds=None, timeout=3, soundfont="timgm6mb"))
    assert [s.name for s, _, _ in report.rendered] == ["good.mid"]
    ((bad, reason),) = report.failed
    assert bad.name == "hangs.mid" and reason == f"{bad}: FluidSynth took longer than 3 s; stopped"
    listed = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert [x["reason"] for x in listed] == [reason]
    assert not list((tmp_path / "out").glob(".render-*"))  # its temporary folder is gone


# ------------------------------------------------------------------ compressed soundfonts (SF3)


def _as_sf3(sf2, dest):
    """TimGM6mb written as MuseScore writes an SF3: each sample an Ogg Vorbis stream, its start and
    end byte offsets in the sample chunk (end at the next stream), loops counted from its start."""
    import io

    import numpy as np

    from s4music.data.soundfont import SHDR, VORBIS, _chunks, _span, rebuilt

    data = sf2.read_bytes()
    top = _chunks(data, 12, len(data))
    sdta, pdta = (_chunks(data, *_span(top[k])) for k in (b"sdta", b"pdta"))
    smpl_at = sdta[b"smpl"][0]
    shdr_at, shdr_size = pdta[b"shdr"]
    streams, headers, filled = [], [], 0
    for i in range(shdr_size // SHDR.size):
        name, start, end, loop_start, loop_end, rate, pitch, corr, link, kind = SHDR.unpack_from(data, shdr_at + i * SHDR.size)
        if i == shdr_size // SHDR.size - 1:
            headers.append(SHDR.pack(name, 0, 0, 0, 0, 0, 0, 0, 0, 0))
            break
        buf = io.BytesIO()
        words = np.frombuffer(data, "<i2", end - start, smpl_at + 2 * start)
        sf.write(buf, words, rate, format="OGG", subtype="VORBIS")
        streams.append(buf.getvalue())
        headers.append(SHDR.pack(name, filled, filled + len(streams[-1]), loop_start - start, loop_end - start,
                                 rate, pitch, corr, link, kind | VORBIS))
        filled += len(streams[-1])
    dest.write_bytes(rebuilt(data, (3, 1), b"".join(streams), b"".join(headers)))
    return dest


def _fluidsynth(soundfont, midi, wav):
    import subprocess

    subprocess.run(["fluidsynth", "-ni", "-q", "-r", "16000", "-o", "synth.dynamic-sample-loading=1", "-T", "wav",
                    "-F", str(wav), str(soundfont), str(midi)], check=True, capture_output=True)
    return sf.read(str(wav), dtype="int16")[0].astype(int)


def test_an_sf3_renders_as_the_sf2_decoded_from_it_once(midi_corpus, tmp_path, monkeypatch):
    from s4music.data.soundfont import is_compressed, playable
    from s4music.system import installed_soundfonts

    tim = installed_soundfonts().get("timgm6mb")
    need(tim is not None, "the timgm6mb soundfont (make test installs it)")
    sf3 = _as_sf3(tim, tmp_path / "tim.sf3")
    assert is_compressed(sf3) and not is_compressed(tim)
    monkeypatch.setenv("S4MUSIC_CACHE", str(tmp_path / "cache"))
    decoded = playable(sf3)
    assert decoded.parent == tmp_path / "cache" / "soundfonts" and not is_compressed(decoded)
    assert playable(sf3) == decoded and playable(tim) == tim  # decoded once; an SF2 is loaded as it is
    # FluidSynth plays the decoded SF2 as it plays the SF3 (within a step of 16-bit rounding)
    midi, _, _ = filter_midi(midi_corpus["chorale"], None, True, 6)
    midi.save(str(tmp_path / "six.mid"))
    from_sf3 = _fluidsynth(sf3, tmp_path / "six.mid", tmp_path / "sf3.wav")
    from_sf2 = _fluidsynth(decoded, tmp_path / "six.mid", tmp_path / "sf2.wav")
    assert from_sf3.shape == from_sf2.shape and abs(from_sf3).max() > 1000
    assert abs(from_sf3 - from_sf2).max() <= 2
    # render-midi loads it so, and records the soundfont it was asked for
    report = render_midi([tmp_path / "six.mid"], tmp_path / "out", RenderOptions(soundfont=str(sf3), vary=True))
    assert len(report.rendered) == 1
    assert json.loads((tmp_path / "out" / "six.json").read_text())["soundfont"] == "tim.sf3"
    # an SF3 whose sample lies past its data: one line naming the file, before any render
    broken = bytearray(sf3.read_bytes())
    at = broken.rindex(b"shdr") + 8 + 20 + 4  # the first sample's end
    broken[at : at + 4] = (2**31).to_bytes(4, "little")
    (tmp_path / "broken.sf3").write_bytes(bytes(broken))
    with pytest.raises(RenderError, match=r"broken\.sf3: cannot read it as a soundfont \(.*outside the sample data\)$"):
        render_midi([tmp_path / "six.mid"], tmp_path / "out2", RenderOptions(soundfont=str(tmp_path / "broken.sf3")))


def test_a_second_render_says_it_rendered_nothing_new(midi_corpus, tmp_path):
    from typer.testing import CliRunner

    from s4music.cli.app import app

    shutil.copy(midi_corpus["chorale"], tmp_path / "chorale.mid")
    (tmp_path / "broken.mid").write_bytes(b"MThd not really")
    args = ["render-midi", str(tmp_path), "-o", str(tmp_path / "out"), "--max-seconds", "3"]
    said = [" ".join(CliRunner().invoke(app, args).output.split()) for _ in range(2)]
    assert "1 rendered (1 this run), 1 failed" in said[0], said[0]
    assert "1 rendered (0 this run), 1 failed" in said[1], said[1]

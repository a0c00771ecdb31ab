"""`render-midi` on real MIDI (music21 corpus) with FluidSynth and a real General MIDI soundfont."""

import json
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




def test_unknown_instrument_is_a_clear_error(tmp_path):
    with pytest.raises(RenderError, match="unknown instrument 'kazoo'"):
        render_midi([tmp_path], tmp_path / "out", RenderOptions(instruments=["kazoo"]))


def test_filtered_file_is_valid_midi(midi_corpus, tmp_path):
    midi, _, _ = filter_midi(midi_corpus["piano"], None, True, 5)
    midi.save(str(tmp_path / "x.mid"))
    assert mido.MidiFile(str(tmp_path / "x.mid")).length == pytest.approx(5, abs=0.01)

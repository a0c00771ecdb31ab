"""Beyond one machine: `render-midi --shard i/n`."""

import json
import shutil
from pathlib import Path

import mido

from conftest import need


def _tune(path: Path, pitches: list[int]) -> None:
    """A short MIDI file: the pitches in turn, an eighth note each at 120 bpm."""
    midi = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    midi.tracks.append(track)
    for note in pitches:
        track.append(mido.Message("note_on", note=note, velocity=80, time=0))
        track.append(mido.Message("note_off", note=note, velocity=0, time=240))
    midi.save(str(path))


def test_render_shards_share_the_output_and_keep_their_own_failures(tmp_path):
    from s4music.data.midi import RenderOptions, render_midi
    from s4music.system import installed_soundfonts

    need(shutil.which("fluidsynth") is not None, "fluidsynth")
    need("timgm6mb" in installed_soundfonts(), "the timgm6mb soundfont")
    src = tmp_path / "midi"
    for k in range(7):
        folder = src / ("a" if k < 4 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        _tune(folder / f"tune{k}.mid", [60 + k, 64 + k, 67 + k])
    (src / "a" / "text.mid").write_text("not MIDI\n")
    (src / "b" / "empty.mid").write_bytes(b"")
    opts = dict(max_seconds=5, soundfont="timgm6mb", program="piano", vary=True, seed=3)
    single = render_midi([src], tmp_path / "single", RenderOptions(**opts))
    reports = [render_midi([src], tmp_path / "sharded", RenderOptions(**opts, shard=f"{i}/3")) for i in (1, 2, 3)]

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and not p.name.startswith("failures")}

    assert files(tmp_path / "sharded") == files(tmp_path / "single")  # the same renders, byte for byte, no merge
    assert len(single.rendered) == 7 and sum(len(r.rendered) for r in reports) == 7
    assert not (tmp_path / "sharded" / "failures.jsonl").exists()
    listed = {}
    for i, report in enumerate(reports, 1):
        path = tmp_path / "sharded" / f"failures.shard-{i}-of-3.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        assert sorted(r["source"] for r in rows) == sorted(str(s) for s, _ in report.failed)
        listed.update({r["source"]: r["reason"] for r in rows})
    assert len(listed) == 2 and listed == {str(s): r for s, r in single.failed}  # each shard kept its own
    again = render_midi([src], tmp_path / "sharded", RenderOptions(**opts, shard="2/3"))
    assert not again.rendered and len(again.already) == len(reports[1].rendered)

"""Beyond one machine: `render-midi --shard i/n` and `prepare --shard i/n`, then `prepare --merge`.

The merge of shards run as separate processes must be the dataset one run builds, byte for byte;
shards that do not belong together are refused in one line, and nothing is left half written.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mido
import numpy as np
import pytest
import soundfile as sf

from conftest import need, synthesized_music
from s4music.data import prepare as prepare_module
from s4music.data.format import DatasetError
from s4music.data.prepare import PrepareOptions, merge_shards, prepare
from s4music.options import OptionError, Shard, parse_shard

S4MUSIC = [sys.executable, "-m", "s4music.cli"]
OPTS = dict(seconds=0.256, val_fraction=0.2, test_fraction=0.2, seed=5)
ARGS = ["--seconds", "0.256", "--val", "0.2", "--test", "0.2", "--seed", "5"]


@pytest.fixture
def collection(tmp_path) -> Path:
    """12 short synthesized tracks in two folders (a third of them at 32 kHz), and one bad file."""
    root = tmp_path / "audio"
    for k in range(12):
        folder = root / ("low" if k < 6 else "high")
        folder.mkdir(parents=True, exist_ok=True)
        wave = synthesized_music(seconds=1.0 + 0.1 * k)[:, 0] * (0.4 + 0.04 * k)
        rate = 32000 if k % 3 == 0 else 16000
        sf.write(str(folder / f"notes{k:02d}.wav"), np.repeat(wave, 2) if rate == 32000 else wave, rate)
    (root / "low" / "broken.wav").write_text("not audio")
    return root


def dataset_files(root: Path) -> dict[str, bytes]:
    """Every file of a dataset directory but its lock (which holds the pid of the last writer)."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.name != ".lock"}


def test_three_shard_processes_merge_into_the_single_runs_dataset(collection, tmp_path, cli):
    shards = [tmp_path / "shards" / str(i) for i in (1, 2, 3)]
    runs = [subprocess.Popen([*S4MUSIC, "prepare", str(collection), "-o", str(d), *ARGS, "--shard", f"{i}/3"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i, d in enumerate(shards, 1)]
    for run in runs:  # three processes at once, as an array job runs them
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    code, _, err = cli("prepare", collection, "-o", tmp_path / "single", *ARGS)
    assert code == 0, err
    code, _, err = cli("prepare", "--merge", shards[2], shards[0], shards[1], "-o", tmp_path / "merged")
    assert code == 0, err
    assert "12 files merged from 3 shards" in err and "broken.wav: not audio" in err  # shard 1's failure, reported

    single, merged = dataset_files(tmp_path / "single"), dataset_files(tmp_path / "merged")
    assert set(single) == {"dataset.json", "manifest.jsonl", "train.u8", "val.u8", "test.u8"}
    assert set(merged) == set(single)
    for name in single:
        assert merged[name] == single[name], name
    assert not list((tmp_path / "merged").glob(".*")) and not list(tmp_path.glob(".merged*"))
    # not a trivial case: every split holds files, and every shard a part of them
    meta = json.loads(single["dataset.json"])
    assert all(meta["splits"][s] > 0 for s in ("train", "val", "test"))
    held = [json.loads((d / "dataset.json").read_text())["sources"] for d in shards]
    assert sorted(len(h) for h in held) == [4, 4, 4] and sum(len(h) for h in held) == len(meta["sources"])
    split_of = {s["name"]: s["split"] for s in meta["sources"]}
    assert all(s["split"] == split_of[s["name"]] for h in held for s in h)  # a file's split is the shard's too


def test_a_stopped_shard_is_refused_then_resumes_to_the_same_dataset(collection, tmp_path, monkeypatch):
    prepare([collection], tmp_path / "single", PrepareOptions(**OPTS))
    shards = [tmp_path / "shards" / str(i) for i in (1, 2, 3)]
    for i in (1, 3):
        prepare([collection], shards[i - 1], PrepareOptions(**OPTS, shard=f"{i}/3"))
    monkeypatch.setattr(prepare_module, "COMMIT_EVERY", 1)

    def stop_after_two(path, status, done, total):
        if done == 2:
            raise KeyboardInterrupt  # a preempted array task

    with pytest.raises(KeyboardInterrupt):
        prepare([collection], shards[1], PrepareOptions(**OPTS, shard="2/3"), on_file=stop_after_two)
    # the first file was committed; the second's windows were written but never counted
    assert len(json.loads((shards[1] / "dataset.json").read_text())["sources"]) == 1
    with pytest.raises(DatasetError, match=f"^{shards[1]}: shard 2/3 has not finished; run its prepare --shard again"):
        merge_shards(shards, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    again = prepare([collection], shards[1], PrepareOptions(**OPTS, shard="2/3"))
    assert again.unchanged == 1 and len(again.added) == 3
    merge_shards(shards, tmp_path / "merged")
    assert dataset_files(tmp_path / "merged") == dataset_files(tmp_path / "single")


def test_merge_refuses_shards_that_do_not_belong_together(collection, tmp_path, cli, monkeypatch):
    def build(name, spec, **changes):
        out = tmp_path / name
        prepare([collection], out, PrepareOptions(**{**OPTS, **changes}, shard=spec))
        return out

    one, two, three = (build(f"s{i}", f"{i}/3") for i in (1, 2, 3))
    halves = build("halves", "1/2")
    seeded = build("seeded", "3/3", seed=6)
    tagged = build("tagged", "3/3", tags=["genre=piano"])
    copy = shutil.copytree(two, tmp_path / "copy")
    whole = tmp_path / "whole"
    prepare([collection], whole, PrepareOptions(**OPTS))
    out = tmp_path / "merged"
    cases = [
        ((one, two), "shard 3/3 is missing: no directory given holds it"),
        ((one, two, two, three), f"{two}: given twice"),
        ((one, two, copy, three), f"{copy}: shard 2/3 again ({two} holds it too)"),
        ((one, two, halves), f"{halves}: shard 1/2, but {one} is a shard of 3"),
        ((one, two, seeded), f"{seeded}: shard 3/3 has seed=6, but {one} has seed=5"),
        ((one, two, tagged), f"{tagged}: shard 3/3 differs from {one} (other --tag)"),
        ((one, two, whole), f"{whole}: a whole dataset (prepared without --shard), not a shard"),
        ((one, two, tmp_path / "nothing"), f"{tmp_path / 'nothing'}: no dataset.json"),
    ]
    for dirs, reason in cases:
        code, _, err = cli("prepare", "--merge", *dirs, "-o", out)
        assert code == 1 and reason in err.replace("\n", ""), err
        assert len([ln for ln in err.splitlines() if "error" in ln]) == 1 and "Traceback" not in err
        assert not out.exists() and not (tmp_path / "nothing").exists()
    # a shard is continued only as itself
    with pytest.raises(DatasetError, match=f"{two}: holds shard 2/3, not shard 1/3"):
        prepare([collection], two, PrepareOptions(**OPTS, shard="1/3"))
    with pytest.raises(DatasetError, match=f"{two}: holds shard 2/3; continue it with --shard 2/3"):
        prepare([collection], two, PrepareOptions(**OPTS))
    with pytest.raises(DatasetError, match=f"{whole}: a whole dataset, not a shard"):
        prepare([collection], whole, PrepareOptions(**OPTS, shard="1/3"))
    with pytest.raises(DatasetError, match="the sources list other files"):
        prepare([collection / "low"], two, PrepareOptions(**OPTS, shard="2/3"))
    # nothing half written: a merge that fails while writing leaves neither the dataset nor a temporary
    calls = []

    def failing(meta, src, first):
        calls.append(src)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(meta, src, first)

    real = prepare_module._manifest_lines
    monkeypatch.setattr(prepare_module, "_manifest_lines", failing)
    with pytest.raises(OSError):
        merge_shards([one, two, three], out)
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    monkeypatch.undo()
    (out / "x").mkdir(parents=True)
    code, _, err = cli("prepare", "--merge", one, two, three, "-o", out)
    assert code == 1 and f"{out}: exists; merge the shards into a new directory" in err.replace("\n", "")


BAD_SPECS = {
    "3/2": "there is no shard 3 of 2",
    "0/0": "n, the number of shards, must be at least 1",
    "0/3": "shards count from 1 to 3",
    "a/b": "expected i/n",
    "-1/2": "expected i/n",
    "1/2/3": "expected i/n",
}


def test_bad_shard_specs_are_one_line_errors(tmp_path, cli):
    assert parse_shard("2/8") == Shard(2, 8) and parse_shard(" 8 / 8 ") == Shard(8, 8)
    assert [p for p in range(20) if Shard(2, 8).owns(p)] == [1, 9, 17] and Shard(2, 8).label == "shard-2-of-8"
    for spec, reason in BAD_SPECS.items():
        with pytest.raises(OptionError, match=reason):
            parse_shard(spec)
        for command in ("prepare", "render-midi"):
            code, _, err = cli(command, tmp_path, "-o", tmp_path / "out", "--shard", spec)
            assert code == 1 and f"--shard {spec!r}: {reason}" in err.replace("\n", ""), (command, spec, err)
            assert len([ln for ln in err.splitlines() if "error" in ln]) == 1 and "Traceback" not in err
            assert not (tmp_path / "out").exists()
    from typer.testing import CliRunner

    from s4music.cli.app import app

    for command in ("prepare", "render-midi"):  # the help says which numbering, and how a scheduler's maps to it
        result = CliRunner().invoke(app, [command, "--help"], terminal_width=120)
        text = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 0 and "Only shard i of n, 1-based (1/n to n/n)" in text
        assert "$SLURM_ARRAY_TASK_ID/N" in text and "JOB_COMPLETION_INDEX+1 of N" in text


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

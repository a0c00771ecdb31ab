"""The corpus's held-out set by work: every movement and every rendering of a work in one split."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

from s4music.data.corpus import split_by_work, work_of


def test_work_of_joins_movements_and_renderings():
    assert work_of("piano/bach/bwv66.6.wav") == work_of("ensemble/bach/bwv66.4.wav") == "bach/bwv66"
    assert work_of("piano/beethoven/opus18no1/movement3.wav") == "beethoven/opus18no1"
    assert work_of("ensemble/beethoven/opus18no1/movement1.wav") == "beethoven/opus18no1"
    assert work_of("piano/palestrina/Kyrie_57_b.wav") == work_of("piano/palestrina/Agnus_I_57.wav") == "palestrina/mass57"
    assert work_of("piano/monteverdi/madrigal.3.13.wav") != work_of("piano/monteverdi/madrigal.3.14.wav")
    assert work_of("recordings/hyperrogue/hr3-caves.ogg") == "hyperrogue/hr3-caves"


def _corpus() -> list[str]:
    names = []
    for rendering in ("piano", "ensemble"):
        for cantata in range(1, 41):
            names += [f"{rendering}/bach/bwv{cantata}.{m}.wav" for m in (1, 6)]
        for mass in range(1, 21):
            names += [f"{rendering}/palestrina/{part}_{mass:02d}.wav" for part in ("Kyrie", "Gloria", "Credo_b")]
        names += [f"{rendering}/mozart/k{k}/movement{m}.wav" for k in (80, 155, 156) for m in (1, 2, 3)]
    return names + [f"recordings/drascula/track{i}.ogg" for i in range(10)]


def test_split_by_work_keeps_each_work_whole_and_is_fixed_by_the_seed():
    names = _corpus()
    splits = split_by_work(names, val=0.1, test=0.1, seed=0)
    assert sorted(sum(splits.values(), [])) == sorted(names)
    where = {}
    for split, files in splits.items():
        for name in files:
            assert where.setdefault(work_of(name), split) == split, f"{work_of(name)} straddles two splits"
    works = len(where)  # 40 cantatas + 20 masses + 3 quartets + 10 tracks
    assert works == 73
    assert [sum(1 for s in where.values() if s == split) for split in ("val", "test")] == [7, 7]
    assert split_by_work(names, val=0.1, test=0.1, seed=0) == splits
    assert split_by_work(names, val=0.1, test=0.1, seed=1) != splits
    # adding files of new works moves no work already placed
    more = split_by_work([*names, *[f"piano/bach/bwv{c}.1.wav" for c in range(41, 45)]], 0.1, 0.1, seed=0,
                         pinned={n: s for s, files in splits.items() for n in files})
    assert all(set(files) <= set(more[s]) for s, files in splits.items())


def test_pinned_works_stay_where_the_split_file_put_them():
    names = _corpus()
    splits = split_by_work(names, 0.1, 0.1, seed=0, pinned={"bach/bwv3": "test", "piano/palestrina/Gloria_05.wav": "val"})
    assert {"piano/bach/bwv3.1.wav", "ensemble/bach/bwv3.6.wav"} <= set(splits["test"])
    assert {"piano/palestrina/Kyrie_05.wav", "ensemble/palestrina/Credo_b_05.wav"} <= set(splits["val"])
    with pytest.raises(ValueError, match="pinned to both"):
        split_by_work(names, pinned={"bach/bwv3": "test", "piano/bach/bwv3.1.wav": "val"})


def test_pins_of_works_outside_the_run_are_ignored():
    # work names read as file names lose their movement: bach/bwv18.5-lz and bach/bwv18.5-w are two works
    splits = split_by_work(["piano/bach/bwv3.1.wav"], pinned={"bach/bwv18.5-lz": "val", "bach/bwv18.5-w": "train",
                                                              "bach/bwv3": "test"})
    assert splits["test"] == ["piano/bach/bwv3.1.wav"]


def test_make_splits_on_part_of_the_corpus_keeps_the_committed_file(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    committed = repo / "examples" / "corpus" / "splits.json"
    listed = json.loads(committed.read_text())
    audio = tmp_path / "audio"
    part = [*listed["train"][:2], *listed["val"][:1], "piano/newcomposer/opus1.wav"]
    for name in part:
        (audio / name).parent.mkdir(parents=True, exist_ok=True)
        (audio / name).touch()
    # scores exported but not yet rendered are named by the WAV render-midi will make of each
    midi = tmp_path / "midi"
    for name in ("piano/newcomposer/opus2.mid", "ensemble/newcomposer/opus2.mid", "piano/newcomposer/.opus3.1a2b.tmp.mid"):
        (midi / name).parent.mkdir(parents=True, exist_ok=True)
        (midi / name).touch()
    out = tmp_path / "splits.json"
    shutil.copy(committed, out)
    subprocess.run([sys.executable, str(repo / "examples" / "corpus" / "make_splits.py"), str(midi), str(audio),
                    "-o", str(out)], check=True, capture_output=True)
    after = json.loads(out.read_text())
    for split, names in listed.items():
        assert set(names) <= set(after[split]), f"{split} lost names"
    assert sum(len(v) for v in after.values()) == sum(len(v) for v in listed.values()) + 3
    new = {"piano/newcomposer/opus1.wav", "piano/newcomposer/opus2.wav", "ensemble/newcomposer/opus2.wav"}
    assert new <= set(sum(after.values(), []))
    renderings = {"piano/newcomposer/opus2.wav", "ensemble/newcomposer/opus2.wav"}
    assert len({split for split, names in after.items() if renderings & set(names)}) == 1
    # a mistyped folder is a one-line error, and the split file is left as it was
    typo = subprocess.run([sys.executable, str(repo / "examples" / "corpus" / "make_splits.py"), str(tmp_path / "midl"),
                           "-o", str(out)], capture_output=True, text=True)
    assert typo.returncode == 2 and typo.stderr.strip().endswith(f"{tmp_path / 'midl'}: not a folder")
    assert json.loads(out.read_text()) == after


def test_export_lists_what_it_cannot_export_and_a_rerun_skips_it(tmp_path):
    pytest.importorskip("music21")
    script = Path(__file__).resolve().parents[1] / "examples" / "corpus" / "export_music21.py"

    def run(out: Path) -> str:
        done = subprocess.run([sys.executable, str(script), str(out), "--composers", "chopin,joplin", "--workers", "1"],
                              check=True, capture_output=True, text=True)
        return done.stderr

    run(tmp_path / "a")
    listed = {json.loads(line)["score"] for line in (tmp_path / "a" / "not_exported.jsonl").read_text().splitlines()}
    exported = {p.relative_to(tmp_path / "a" / "ensemble").as_posix() for p in (tmp_path / "a" / "ensemble").rglob("*.mid")}
    assert "joplin/maple_leaf_rag.mid" in exported
    assert listed.isdisjoint({Path(e).with_suffix("").as_posix() for e in exported})
    assert "scores done by an earlier run" in run(tmp_path / "a")
    # a score listed as not exported is not tried again
    (tmp_path / "b").mkdir()
    seeded = {"score": "joplin/maple_leaf_rag.mxl", "reason": "failed: x"}
    # and a line a kill cut short is passed over
    (tmp_path / "b" / "not_exported.jsonl").write_text(json.dumps(seeded) + "\n" + '{"score": "chopin/ma')
    run(tmp_path / "b")
    assert not (tmp_path / "b" / "piano" / "joplin").exists()
    lines = (tmp_path / "b" / "not_exported.jsonl").read_text().splitlines()
    assert lines[1] == '{"score": "chopin/ma' and all(json.loads(line)["score"] for line in lines[2:])


BOOK = """X:1
T:Long enough
M:4/4
L:1/4
Q:1/4=60
K:C
CDEF|GABc|cBAG|FEDC|CDEF|GABc|cBAG|FEDC|]

X:2
T:Too short
M:4/4
L:1/4
Q:1/4=120
K:C
CDEF|GABc|]
"""


def _exporter():
    return load_script(Path(__file__).resolve().parents[1] / "examples" / "corpus" / "export_music21.py")


def test_the_exports_time_left_goes_by_each_formats_seconds_per_byte(tmp_path):
    files = {"a.abc": 1000, "b.abc": 3000, "c.xml": 4000}
    for name, size in files.items():
        (tmp_path / name).write_bytes(b"x" * size)
    left = _exporter().TimeLeft([str(tmp_path / n) for n in files], workers=2)
    left.done(str(tmp_path / "a.abc"), 2.0)
    # ABC at 2 ms a byte; no MusicXML read yet, so it goes at the rate of all so far
    assert left() == pytest.approx((3000 * 0.002 + 4000 * 0.002) / 2)
    left.done(str(tmp_path / "c.xml"), 1.0)
    assert left() == pytest.approx(3000 * 0.002 / 2)


def test_a_work_the_corpus_holds_twice_is_exported_once_from_musicxml():
    corpus = ["bach/bwv277.krn", "bach/bwv277.mxl", "bach/bwv1.6.mxl", "bach/bwv1.krn", "trecento/k.xml",
              "trecento/k.mxl", "bach/bwv66.6.rntxt", "mozart/k80.mxl"]
    jobs = _exporter().corpus_jobs([f"/m21/corpus/{rel}" for rel in corpus[::-1]], "/out", {"bach", "trecento"})
    assert [rel for _, rel, _ in jobs] == ["bach/bwv1.6.mxl", "bach/bwv1.krn", "bach/bwv277.mxl", "trecento/k.mxl"]
    assert all(path == f"/m21/corpus/{rel}" and out == "/out" for path, rel, out in jobs)
    # shards of the export add up to it, each an even share of every folder
    from s4music.options import Shard
    shards = [_exporter().corpus_jobs([f"/m21/corpus/{rel}" for rel in corpus], "/out", {"bach", "trecento"}, Shard(i, 2))
              for i in (1, 2)]
    assert sorted(shards[0] + shards[1]) == jobs and len(shards[0]) == len(shards[1]) == 2


def test_export_shard_spec_errors_are_one_line():
    script = Path(__file__).resolve().parents[1] / "examples" / "corpus" / "export_music21.py"
    for spec in ("3/2", "0/0"):
        done = subprocess.run([sys.executable, str(script), "/nonexistent", "--shard", spec], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.startswith(f"--shard {spec!r}: ") and done.stderr.count("\n") == 1


def test_a_book_becomes_a_folder_of_tunes_and_repeats_music21_cannot_unfold_play_once(tmp_path):
    pytest.importorskip("music21")
    import mido
    from music21 import corpus

    exporter = _exporter()
    (tmp_path / "tunes.abc").write_text(BOOK)
    out = tmp_path / "out"
    assert exporter.export((str(tmp_path / "tunes.abc"), "folk/tunes.abc", str(out))) == ("folk/tunes.abc", "ok")
    assert json.loads((out / "ensemble" / "folk" / "tunes" / "book.json").read_text()) == {"scores": 2, "ok": 1, "short": 1}
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mid"))
    assert written == ["ensemble/folk/tunes/0001.mid", "piano/folk/tunes/0001.mid"]
    assert mido.MidiFile(str(out / "piano" / "folk" / "tunes" / "0001.mid")).length == pytest.approx(32, abs=1)
    assert work_of("piano/folk/tunes/0001.wav") == work_of("ensemble/folk/tunes/0002.wav") == "folk/tunes"
    # music21 cannot unfold this chorale's repeats: it is played once through, not lost
    chorale = next(str(p) for p in corpus.getPaths() if p.as_posix().endswith("bach/bwv277.krn"))
    assert exporter.export((chorale, "bach/bwv277.krn", str(out))) == ("bach/bwv277.krn", "once")
    assert mido.MidiFile(str(out / "ensemble" / "bach" / "bwv277.mid")).length >= exporter.MIN_SECONDS

    class FailsMidWrite:  # a tune music21 fails on after it began writing the file
        def write(self, fmt, fp):
            Path(fp).write_bytes(b"MThd")
            raise IndexError("list index out of range")

    before = sorted(out.rglob("*"))
    with pytest.raises(IndexError):
        exporter.export_score(FailsMidWrite(), "folk/tunes/0003.abc", str(out))
    assert sorted(out.rglob("*")) == before  # no temporary left for render-midi to find

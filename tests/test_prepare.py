"""`prepare` on real recordings, and training-window mixtures."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from s4music.audio import encode, load_audio
from s4music.data.dataset import PreparedDataset, WindowMixture
from s4music.data.format import DatasetError, verify_dataset
from s4music.data.prepare import PrepareOptions, assign_splits, prepare

OPTS = dict(seconds=2.0)


@pytest.fixture
def music(tmp_path, recordings):
    """12 real tracks in two strata folders (copies, so each is its own source)."""
    root = tmp_path / "music"
    import soundfile as sf

    shortest = sorted(recordings, key=lambda p: sf.info(str(p)).duration)[:12]
    for i, src in enumerate(sorted(shortest)):
        folder = root / ("calm" if i % 2 else "lively")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / src.name)
    return root


def test_prepare_splits_by_source_stratified_and_reproducible(music, tmp_path):
    report = prepare([music], tmp_path / "ds", PrepareOptions(**OPTS, seed=3))
    assert not report.failed and len(report.added) == 12
    ds = PreparedDataset(tmp_path / "ds")
    rows = ds.manifest()
    assert {"id", "source", "path", "duration", "sample_rate", "split", "strata"} <= set(rows[0])
    splits_of = {}
    for row in rows:
        splits_of.setdefault(row["source"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits_of.values())  # no file straddles two splits
    for folder in ("calm", "lively"):
        files = {r["source"]: r["split"] for r in rows if r["strata"]["folder"] == folder}
        assert sorted(files.values()).count("test") >= 1 and sorted(files.values()).count("val") >= 1
    again = prepare([music], tmp_path / "ds2", PrepareOptions(**OPTS, seed=3))
    assert [(p.name, s) for p, s, _ in again.added] == [(p.name, s) for p, s, _ in report.added]
    # A copy of the collection in another place splits the same way: the order comes from the
    # files' paths relative to the source directory, not from where it lies.
    moved = shutil.copytree(music, tmp_path / "elsewhere" / "deeper" / "collection")
    copied = prepare([moved], tmp_path / "ds3", PrepareOptions(**OPTS, seed=3))
    assert sorted((p.name, s) for p, s, _ in copied.added) == sorted((p.name, s) for p, s, _ in report.added)
    other_seed = prepare([music], tmp_path / "ds4", PrepareOptions(**OPTS, seed=4))
    assert sorted((p.name, s) for p, s, _ in other_seed.added) != sorted((p.name, s) for p, s, _ in report.added)
    hours = sum(report.summary.values())
    assert hours == pytest.approx(sum(ds.count(s) for s in ("train", "val", "test")) * 2 / 3600)


@pytest.mark.parametrize("files, test_fraction, pinned, before, warned", [
    (3, 0.06, 0, 0, "val and test take at least one file each; for more to train on, add files or give --test 0"),
    (3, 0.0, 0, 0, "val takes at least one file each; for more to train on, add files"),
    (20, 0.06, 0, 0, None),  # 6% of 20 rounds to a file: the fractions as asked
    (2, 0.06, 0, 0, None),  # under 3 files all train
    (3, 0.06, 1, 0, None),  # a split file decides
    (1, 0.06, 0, 3, None),  # said when the stratum was new, not again for each file added
])
def test_a_small_collection_is_told_how_much_val_and_test_take(files, test_fraction, pinned, before, warned, caplog):
    """Val and test take a file each however few there are: with 3 files, 2 of 3 are held out."""
    new = [{"name": f"{i}.wav", "strata": {"folder": "mine"}} for i in range(files)]
    existing = [{"name": f"old{i}.wav", "strata": {"folder": "mine"}, "split": s}
                for i, s in enumerate(["train", "val", "test"][:before])]
    options = PrepareOptions(test_fraction=test_fraction, pinned={f"{i}.wav": "test" for i in range(pinned)})
    with caplog.at_level("WARNING", logger="s4music"):
        assign_splits(existing, new, options)
    said = [r.getMessage() for r in caplog.records if "held out" in r.getMessage()]
    assert said == [] if warned is None else said[0].endswith(warned), said


def test_a_split_file_pins_the_files_it_lists(music, tmp_path):
    calm = sorted(p.relative_to(music).as_posix() for p in (music / "calm").iterdir())
    pinned = {"test": calm[:2], "val": calm[2:3], "train": calm[3:]}
    report = prepare([music], tmp_path / "ds", PrepareOptions(**OPTS, pinned={n: s for s, ns in pinned.items() for n in ns}))
    split_of = {p.relative_to(music).as_posix(): s for p, s, _ in report.added}
    assert {n: split_of[n] for n in calm} == {n: s for s, ns in pinned.items() for n in ns}
    lively = [s for n, s in split_of.items() if n.startswith("lively/")]
    assert lively.count("test") >= 1 and lively.count("val") >= 1  # unlisted files are split as usual


def test_windows_are_the_same_codes_as_the_prompt_path(music, tmp_path):
    prepare([music], tmp_path / "ds", PrepareOptions(**OPTS))
    ds = PreparedDataset(tmp_path / "ds")
    row = ds.manifest("train")[0]
    audio = load_audio(row["path"], 16000)
    k = int(row["id"].split(":")[1])
    expected = encode(audio.samples[k * 32000 : (k + 1) * 32000], "mulaw-official").numpy()
    assert np.array_equal(ds.windows("train")[row["offset"]], expected)


def test_incremental_run_keeps_old_data_and_adds_new(music, tmp_path, recordings):
    part = tmp_path / "part"
    shutil.copytree(music / "calm", part / "calm")
    first = prepare([part], tmp_path / "ds", PrepareOptions(**OPTS))
    before = {s: (tmp_path / "ds" / f"{s}.u8").read_bytes() for s in ("train", "val", "test")}
    old_split = {r["source"]: r["split"] for r in PreparedDataset(tmp_path / "ds").manifest()}
    shutil.copytree(music / "lively", part / "lively")
    second = prepare([part], tmp_path / "ds", PrepareOptions(**OPTS))
    assert second.unchanged == len(first.added) and len(second.added) == 6
    ds = PreparedDataset(tmp_path / "ds")
    for split, data in before.items():
        assert (tmp_path / "ds" / f"{split}.u8").read_bytes()[: len(data)] == data
    assert {r["source"]: r["split"] for r in ds.manifest() if r["source"] in old_split} == old_split
    third = prepare([part], tmp_path / "ds", PrepareOptions(**OPTS))
    assert not third.added and third.unchanged == 12


def test_bad_files_are_reported_and_the_rest_is_built(music, tmp_path, short_recording):
    bad = music / "lively"
    (bad / "empty.wav").write_bytes(b"")
    (bad / "notes.mp3").write_text("not audio at all\n" * 100)
    (bad / "cut.ogg").write_bytes(short_recording.read_bytes()[:3000])
    # writers' temporaries (a render or a download in progress) are not read at all
    (bad / ".song.1a2b.tmp.wav").write_bytes(b"")
    (bad / ".render-x").mkdir()
    (bad / ".render-x" / "out.wav").write_bytes(b"")
    import soundfile as sf

    sf.write(str(bad / "silence.wav"), np.zeros(48000, dtype=np.float32), 16000)
    sf.write(str(bad / "short.wav"), np.random.default_rng(0).normal(0, 0.1, 8000).astype(np.float32), 16000)
    report = prepare([music], tmp_path / "ds", PrepareOptions(**OPTS))
    reasons = {p.name: r for p, r in report.failed}
    assert set(reasons) == {"empty.wav", "notes.mp3", "cut.ogg", "silence.wav", "short.wav"}
    assert "empty file" in reasons["empty.wav"] and "silent" in reasons["silence.wav"]
    assert "shorter than one window" in reasons["short.wav"]
    for name, reason in reasons.items():
        assert reason.startswith(str(bad / name)) and "\n" not in reason
    assert len(report.added) == 12


def test_a_split_left_empty_by_files_that_failed_is_told(music, tmp_path, caplog):
    """A file's split is drawn before it is read, so failures can empty val or test: say so."""
    folder = tmp_path / "few"
    folder.mkdir()
    shutil.copy(next((music / "calm").iterdir()), folder / "good.ogg")
    (folder / "bad.wav").write_text("not audio\n")
    with caplog.at_level("WARNING", logger="s4music.data.prepare"):
        prepare([folder], tmp_path / "ds", PrepareOptions(**OPTS, pinned={"good.ogg": "train", "bad.wav": "val"}))
    splits = PreparedDataset(tmp_path / "ds").meta["splits"]
    assert splits["train"] > 0 and splits["val"] == splits["test"] == 0
    assert "the val split is empty (its files failed to read)" in caplog.text
    assert "the test split is empty (no file went to it)" in caplog.text


def test_a_copy_of_a_file_in_the_dataset_is_not_added_again(music, tmp_path, caplog):
    """Copies under another folder were added as new sources: the same music in train and in test."""
    prepare([music], tmp_path / "ds", PrepareOptions(**OPTS))
    first = next((music / "calm").iterdir())
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(first, again / "copy.ogg")
    shutil.copy(first, again / "second copy.ogg")
    with caplog.at_level("INFO", logger="s4music.data.prepare"):
        report = prepare([music, again], tmp_path / "ds", PrepareOptions(**OPTS))
    assert report.added == [] and report.failed == [] and (report.unchanged, report.copies) == (12 + 2, 2), report
    assert caplog.text.count(f": the same file as calm/{first.name}, already in the dataset") == 2
    # a file touched, or the whole folder moved: in already, not added again
    os.utime(first)
    moved = shutil.move(music, tmp_path / "moved")
    report = prepare([moved], tmp_path / "ds", PrepareOptions(**OPTS))
    assert report.added == [] and report.failed == [] and report.unchanged == 12, report
    assert verify_dataset(tmp_path / "ds") == []


def test_a_crashed_run_leaves_no_half_written_dataset(music, tmp_path):
    prepare([music / "calm"], tmp_path / "ds", PrepareOptions(**OPTS))
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    # What a run killed mid-way leaves: bytes and manifest rows that dataset.json never counted.
    with open(tmp_path / "ds" / "train.u8", "ab") as f:
        f.write(b"\x07" * 12345)
    with open(tmp_path / "ds" / "manifest.jsonl", "a") as f:
        f.write(json.dumps({"id": "x:0", "split": "train", "offset": meta["splits"]["train"]}) + "\n")
    prepare([music / "lively"], tmp_path / "ds", PrepareOptions(**OPTS))
    ds = PreparedDataset(tmp_path / "ds")
    assert (tmp_path / "ds" / "train.u8").stat().st_size == ds.count("train") * ds.window
    lines = (tmp_path / "ds" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == sum(ds.count(s) for s in ("train", "val", "test"))
    assert all(json.loads(ln)["id"] != "x:0" for ln in lines)


def test_existing_dataset_refuses_a_different_conversion(music, tmp_path):
    prepare([music / "calm"], tmp_path / "ds", PrepareOptions(**OPTS))
    with pytest.raises(DatasetError, match="quantization=mulaw-official, not linear"):
        prepare([music / "lively"], tmp_path / "ds", PrepareOptions(**OPTS, quantization="linear"))


def test_mixture_draws_in_proportion_and_resumes_exactly(music, tmp_path):
    prepare([music / "calm"], tmp_path / "piano", PrepareOptions(**OPTS))
    prepare([music / "lively"], tmp_path / "jazz", PrepareOptions(**OPTS))
    mix = WindowMixture.from_specs([f"{tmp_path / 'piano'}:0.7", f"{tmp_path / 'jazz'}:0.3"], length=8000, seed=1)
    for _ in range(100):
        batch = mix.sample(20)
    assert batch.shape == (20, 8000) and batch.dtype == torch.long and int(batch.max()) < 256
    shares = mix.proportions()
    assert shares["piano"] == pytest.approx(0.7, abs=0.04) and shares["jazz"] == pytest.approx(0.3, abs=0.04)
    state = mix.state_dict()
    expected = mix.sample(4)
    mix.load_state_dict(state)
    assert torch.equal(mix.sample(4), expected)


def test_mixture_rejects_datasets_with_different_conversions(music, tmp_path):
    prepare([music / "calm"], tmp_path / "a", PrepareOptions(**OPTS))
    prepare([music / "lively"], tmp_path / "b", PrepareOptions(**OPTS, quantization="linear"))
    with pytest.raises(DatasetError, match="needs one conversion"):
        WindowMixture.from_specs([str(tmp_path / "a"), str(tmp_path / "b")], length=8000)
    with pytest.raises(DatasetError, match="not a dataset"):
        WindowMixture.from_specs([str(tmp_path / "nothing")], length=8000)

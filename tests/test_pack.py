"""`pack` / `unpack`: a dataset as parts that travel, rebuilt exactly; damaged parts named."""

import json
import shutil

import numpy as np
import pytest

from s4music.data.dataset import PreparedDataset, WindowMixture
from s4music.data.format import verify_dataset
from s4music.data.pack import PackError, pack, unpack


def _windows(root):
    """{window id: bytes} of a dataset."""
    meta = json.loads((root / "dataset.json").read_text())
    arrays = {s: np.fromfile(root / f"{s}.u8", dtype=np.uint8).reshape(-1, meta["window"]) for s in meta["splits"]}
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    return {r["id"]: (r["split"], arrays[r["split"]][r["offset"]].tobytes()) for r in rows}


def test_pack_then_unpack_gives_every_window_back_in_parts_that_fit(music_dataset, tmp_path):
    size = sum((music_dataset / f"{s}.u8").stat().st_size for s in ("train", "val", "test"))
    limit = size / 4 / 2**20  # at least 3 parts, compressed
    parts = pack(music_dataset, tmp_path / "pack", part_mb=limit, seed=0, workers=2)
    assert len(parts) >= 3 and all(p.bytes <= limit * 2**20 for p in parts)
    assert sum(p.bytes for p in parts) < 0.85 * size  # lossless, and smaller
    done = unpack(tmp_path / "pack", tmp_path / "data", workers=2)
    assert [p.name for p in done] == [p.name for p in parts]
    got = {}
    for d in done:
        assert verify_dataset(d) == []
        got.update(_windows(d))
    assert got == _windows(music_dataset)
    # the same seed deals the same parts, whatever the number of workers; training reads them as a mixture
    again = pack(music_dataset, tmp_path / "again", part_mb=limit, seed=0, workers=1)
    assert [p.path.read_bytes() for p in again] == [p.path.read_bytes() for p in parts]
    mix = WindowMixture([(PreparedDataset(d), 1.0) for d in done], 1024, "train", 0)
    assert mix.sample(4).shape == (4, 1024)


def test_a_damaged_or_missing_part_is_named_and_nothing_half_written_is_left(music_dataset, tmp_path):
    size = sum((music_dataset / f"{s}.u8").stat().st_size for s in ("train", "val", "test"))
    parts = pack(music_dataset, tmp_path / "pack", part_mb=size / 3 / 2**20)
    data = bytearray(parts[1].path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    parts[1].path.write_bytes(bytes(data))
    with pytest.raises(PackError) as e:
        unpack(tmp_path / "pack", tmp_path / "data")
    assert str(e.value) == f"{parts[1].path}: checksum mismatch; the part is damaged or from another pack"
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
    parts[1].path.unlink()
    with pytest.raises(PackError, match=f"^{parts[1].path}: part missing"):
        unpack(tmp_path / "pack", tmp_path / "data")
    # a part whose checksum was rewritten to match its damage is caught by its own CRC
    shutil.copy(parts[0].path, parts[1].path)
    index = json.loads((tmp_path / "pack" / "pack.json").read_text())
    index["parts"][1].update(bytes=parts[0].bytes, sha256=index["parts"][0]["sha256"])
    broken = bytearray(parts[1].path.read_bytes())
    broken[len(broken) // 2] ^= 0xFF
    parts[1].path.write_bytes(bytes(broken))
    import hashlib
    index["parts"][1]["sha256"] = hashlib.sha256(bytes(broken)).hexdigest()
    (tmp_path / "pack" / "pack.json").write_text(json.dumps(index))
    with pytest.raises(PackError, match=f"^{parts[1].path}: damaged part"):
        unpack(tmp_path / "pack", tmp_path / "data", workers=1)
    leftovers = [p.name for p in (tmp_path / "data").iterdir()] if (tmp_path / "data").exists() else []
    assert not [n for n in leftovers if "unpacking" in n or n == "part-001"]


def test_a_pack_stopped_part_way_resumes_and_gives_the_same_parts(music_dataset, tmp_path):
    size = sum((music_dataset / f"{s}.u8").stat().st_size for s in ("train", "val", "test"))
    limit = size / 5 / 2**20
    whole = pack(music_dataset, tmp_path / "whole", part_mb=limit, seed=0)
    assert len(whole) >= 4
    shutil.copytree(tmp_path / "whole", tmp_path / "pack")
    # as if killed while its workers wrote parts 1 and 2: part 1 is missing, part 2 damaged, a temporary left
    (tmp_path / "pack" / "pack.json").unlink()
    (tmp_path / "pack" / "part-001.s4pack").unlink()
    damaged = bytearray((tmp_path / "pack" / "part-002.s4pack").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "pack" / "part-002.s4pack").write_bytes(bytes(damaged))
    (tmp_path / "pack" / ".part-003.1a2b3c4d.tmp.s4pack").write_bytes(b"half")  # as AtomicFile names it
    resumed = pack(music_dataset, tmp_path / "pack", part_mb=limit, seed=0, workers=2)
    assert [p.kept for p in resumed] == [True, False, False] + [True] * (len(whole) - 3)
    assert [p.path.read_bytes() for p in resumed] == [p.path.read_bytes() for p in whole]
    assert not list((tmp_path / "pack").glob(".*.tmp*"))
    assert resumed[-1].windows_left == 0
    # another --part-mb or seed deals other parts: nothing is kept
    assert not any(p.kept for p in pack(music_dataset, tmp_path / "pack", part_mb=limit * 0.9, seed=0))
    assert not any(p.kept for p in pack(music_dataset, tmp_path / "pack", part_mb=limit * 0.9, seed=1))
    # fewer, larger parts: the earlier pack's parts past them are removed
    fewer = pack(music_dataset, tmp_path / "pack", part_mb=limit * 3, seed=1)
    assert len(fewer) < len(whole)
    assert sorted(p.name for p in (tmp_path / "pack").glob("*.s4pack")) == [p.path.name for p in fewer]


def test_a_part_whose_sources_compress_worse_than_planned_still_fits(music_dataset, tmp_path):
    from s4music.data.format import read_meta
    from s4music.data.pack import _read_part, _rows_by_source, _write_part

    meta = read_meta(music_dataset)
    size = sum((music_dataset / f"{s}.u8").stat().st_size for s in ("train", "val", "test"))
    limit = size // 4
    # a planned ratio of 1%: the first sources look as if they fit, overshoot, and are encoded again
    held, written, kept = _write_part(str(music_dataset), meta, meta["sources"], _rows_by_source(music_dataset, meta),
                                      {}, limit, 0.01, str(tmp_path / "part.s4pack"))
    assert written == (tmp_path / "part.s4pack").stat().st_size <= limit and not kept
    assert 1 <= len(held) < len(meta["sources"])
    header, body = _read_part(tmp_path / "part.s4pack")
    assert [src["id"] for src in header["dataset"]["sources"]] == held
    assert len(body) == len(header["manifest"]) * meta["window"]


def test_pack_command_ends_with_the_hours_and_the_sizes(music_dataset, tmp_path, cli):
    size = sum((music_dataset / f"{s}.u8").stat().st_size for s in ("train", "val", "test"))
    code, out, err = cli("pack", music_dataset, "-o", tmp_path / "pack", "--part-mb", f"{size / 3 / 2**20:.3f}")
    assert code in (0, None)
    table = out.split("stratum", 1)[1]  # the table on stdout, the messages on stderr
    assert "train" in table and "test" in table
    parts = json.loads((tmp_path / "pack" / "pack.json").read_text())["parts"]
    summary = f"{len(parts)}parts,{sum(p['bytes'] for p in parts) / 2**20:.1f}MiB"
    flat = "".join(err.split())  # as rich wrapped it or not
    assert flat.rindex(summary) > flat.rindex(parts[-1]["file"])  # after the last part's line


def test_the_first_parts_of_a_pack_are_the_parts_of_a_shorter_one(music_dataset, tmp_path):
    size = sum((music_dataset / f"{s}.u8").stat().st_size for s in ("train", "val", "test"))
    whole = pack(music_dataset, tmp_path / "whole", part_mb=size / 5 / 2**20, seed=0)
    assert len(whole) >= 4
    for n in range(1, len(whole)):
        first = pack(music_dataset, tmp_path / f"first{n}", part_mb=size / 5 / 2**20, seed=0, max_parts=n)
        assert [p.path.read_bytes() for p in first] == [p.path.read_bytes() for p in whole[:n]]


def test_a_part_is_kept_only_for_the_offer_it_was_written_from(music_dataset, tmp_path):
    from s4music.data.format import read_meta
    from s4music.data.pack import _kept_part, _rows_by_source, _write_part

    meta = read_meta(music_dataset)
    size = sum((music_dataset / f"{s}.u8").stat().st_size for s in ("train", "val", "test"))
    limit, offer, path = size // 3, meta["sources"][:6], tmp_path / "part.s4pack"
    held, _, _ = _write_part(str(music_dataset), meta, offer, _rows_by_source(music_dataset, meta), {}, limit, 0.5,
                             str(path))
    assert [src["id"] for src in _kept_part(path, meta, offer, {}, limit)] == held
    assert _kept_part(path, meta, offer[::-1], {}, limit) is None  # another order
    assert _kept_part(path, meta, [src for src in offer if src["id"] != held[-1]], {}, limit) is None  # one held, missing
    assert _kept_part(path, meta, offer, {"seed": 1}, limit) is None  # dealt another way

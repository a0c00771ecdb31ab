"""The GPU lease script's choices that run on the CPU: which convolution the fast step trains with."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lease():
    return load_script(ROOT / "examples" / "gpu_lease.py")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # bench_gpu imports its sibling `common`
    yield load_script(ROOT / "benchmarks" / "bench_gpu.py")
    sys.modules.pop("common", None)


LOSSES = [8.0 - 0.1 * i for i in range(12)]


def _figures(fft_s: float, chunked_s: float, chunked_excess: float = 0.0, error: bool = False,
             steps: int = len(LOSSES)) -> dict:
    """bench_gpu.py's fast-step JSON, cut to what the choice reads."""
    chunked = {"error": "out of memory"} if error else {"seconds": chunked_s,
                                                         "losses": [x + chunked_excess for x in LOSSES[:steps]]}
    return {"runs": {"today's": {"seconds": 0.3, "losses": LOSSES}, "fast": {"seconds": fft_s, "losses": LOSSES},
                     "fast, chunked 256": chunked},
            "legs": {"today's": {"fast": False}, "fast": {"fast": True},
                     "fast, chunked 256": {"fast": True, "conv_chunk": 256}}}


def test_the_lease_trains_with_the_chunked_convolution_only_where_it_ran_faster_and_as_well(lease):
    assert lease.choose_conv_chunk(_figures(0.16, 0.08)) == 256
    assert lease.choose_conv_chunk(_figures(0.16, 0.20)) == 0  # slower there
    assert lease.choose_conv_chunk(_figures(0.16, 0.08, chunked_excess=0.2)) == 0  # a higher loss: a fault
    assert lease.choose_conv_chunk(_figures(0.16, 0.08, error=True)) == 0  # it failed to run
    assert lease.choose_conv_chunk(_figures(0.16, 0.08, steps=3)) == 0  # too few steps to judge
    noisy = _figures(0.16, 0.08, chunked_excess=0.08)
    assert lease.choose_conv_chunk(noisy) == 0
    noisy["blocks"] = {"noise": 0.1}  # two initialisations part by more than the chunked leg does
    assert lease.choose_conv_chunk(noisy) == 256
    failed = _figures(0.16, 0.08)
    failed["runs"]["fast"] = {"error": "the compiler failed"}
    assert lease.choose_conv_chunk(failed) is None  # nothing to compare with: no choice to record


def test_the_choice_reads_what_the_benchmark_writes(bench, lease, tmp_path, monkeypatch):
    """fast_table's JSON, from legs whose runs stand in for a GPU's, is what choose_conv_chunk reads."""
    speeds = {(False, 0): 0.30, (True, 0): 0.16, (True, 256): 0.08}

    def run(kind, env=None, fast=False, conv_chunk=0, **kw):
        return {"seconds": speeds[fast, conv_chunk], "losses": LOSSES, "first_s": 30.0, "peak_gb": 27.0,
                "profile": "GPU busy 100 ms of 200 ms wall (profiled)"}

    monkeypatch.setattr(bench, "_child", run)
    monkeypatch.setenv("S4MUSIC_BENCH_JSON", str(tmp_path / "bench_fast.json"))
    bench.fast_table(quick=True)
    assert lease.choose_conv_chunk(json.loads((tmp_path / "bench_fast.json").read_text())) == 256


def test_a_fast_step_is_within_noise_only_where_it_parts_from_today_s_by_no_more_than_two_seeds_do(bench):
    """The loss curves are judged by block: the noise is how far the fast step from a second seed runs
    from the first; a leg further from today's than that is outside it, and without a reference nothing
    is judged."""
    runs = {"today's": {"losses": LOSSES}, "fast": {"losses": [x + 0.01 for x in LOSSES]},
            "fast, chunked 256": {"losses": [x + 0.2 for x in LOSSES]},
            bench.NOISE_LEG: {"losses": [x + 0.01 + 0.05 for x in LOSSES]}}
    blocks = bench.loss_blocks(runs)
    assert blocks["block"] == 2 and len(blocks["means"]["today's"]) == 6
    assert blocks["noise"] == pytest.approx(0.05)
    assert blocks["differences"]["fast"] == pytest.approx(0.01)
    assert blocks["within_noise"] == {"fast": True, "fast, chunked 256": False}
    leaning = [0.04 * (-1) ** (i // 2) for i in range(len(LOSSES))]  # +0.04, -0.04 by block: no mean lean
    runs["fast"] = {"losses": [x + d for x, d in zip(LOSSES, leaning, strict=True)]}
    blocks = bench.loss_blocks(runs)
    assert abs(blocks["differences"]["fast"]) < 0.01 and blocks["apart"]["fast"] == pytest.approx(0.04)
    runs["fast, chunked 256"] = {"losses": LOSSES[:6]}  # a leg cut short: the blocks cover what all ran
    assert bench.loss_blocks(runs)["block"] == 1 and len(bench.loss_blocks(runs)["starts"]) == 6
    runs[bench.NOISE_LEG] = {"error": "out of memory"}
    blocks = bench.loss_blocks(runs)
    assert blocks["noise"] is None and set(blocks["within_noise"].values()) == {None}
    runs["fast"] = {"error": "the compiler failed"}
    assert bench.loss_blocks(runs) is None


def test_the_benchmark_s_seed_changes_the_start_and_not_the_windows(bench, monkeypatch):
    """The noise leg starts from another initialisation on the same windows; the same seed repeats."""
    import s4music.model.sashimi as sashimi

    monkeypatch.delenv("S4MUSIC_BENCH_DATA", raising=False)
    targets, code_bits = [], sashimi.code_bits

    def recording(logits, x):
        targets.append(x.clone())
        return code_bits(logits, x)

    monkeypatch.setattr(sashimi, "code_bits", recording)
    curve = dict(length=256, batch=1, steps=2, fast=False, max_seconds=60.0, device="cpu")
    first, again, other = (bench.train_curve(**curve, seed=s)["losses"] for s in (0, 0, 1))
    assert first == again
    assert first[0] != other[0]
    assert len(targets) == 6 and all(torch.equal(targets[i], targets[i + 4]) for i in range(2))


def test_a_recorded_choice_is_found_and_the_first_lease_marker_is_not_one(lease, tmp_path, monkeypatch):
    results = tmp_path / "benchmarks" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text("<!-- fast-train: NVIDIA H100 80GB HBM3 -->\n"  # lease 1's, before the chunked leg
                       + lease.MARKER.format(gpu="NVIDIA H200", chunk=256) + "\n| table |\n")
    monkeypatch.setattr(lease, "ROOT", tmp_path)
    assert lease.recorded_conv_chunk("NVIDIA H200") == 256
    assert lease.recorded_conv_chunk("NVIDIA H100 80GB HBM3") is None


def test_the_calls_of_one_lease_compare_once(lease, tmp_path, monkeypatch):
    """A comparison made by an earlier call on this (warm) machine is reused for the same GPU model;
    RESULTS.md, where a lease's record lands afterwards, comes first."""
    results = tmp_path / "benchmarks" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text(lease.MARKER.format(gpu="NVIDIA H200", chunk=0) + "\n")
    monkeypatch.setattr(lease, "ROOT", tmp_path)
    monkeypatch.setattr(lease, "COMPARED", tmp_path / "compared.json")
    assert lease.known_conv_chunk("NVIDIA H100 80GB HBM3") == (None, "")
    lease.COMPARED.write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "conv_chunk": 256}))
    assert lease.known_conv_chunk("NVIDIA H100 80GB HBM3")[0] == 256
    assert lease.known_conv_chunk("NVIDIA H200")[0] == 0  # recorded in RESULTS.md
    lease.COMPARED.write_text(json.dumps({"gpu": "NVIDIA H200", "conv_chunk": 256}))
    assert lease.known_conv_chunk("NVIDIA H200") == (0, "benchmarks/RESULTS.md")


def test_a_comparison_that_did_not_run_records_no_choice(lease, tmp_path):
    """Here there is no GPU: the benchmark says so and writes no figures, and no marker is written
    that would stop a later lease from comparing."""
    assert lease.compare("no GPU", tmp_path, [], 30.0) is None
    report = (tmp_path / "bench_fast.md").read_text()
    assert "No CUDA device" in report and "fast-train" not in report


def test_what_a_call_carried_is_unpacked_and_a_bad_carry_is_one_line(music_dataset, tmp_path):
    import os
    import shutil
    import subprocess

    from s4music.data.pack import pack

    size = sum((music_dataset / f"{s}.u8").stat().st_size for s in ("train", "val", "test"))
    parts = pack(music_dataset, tmp_path / "pack", part_mb=size / 3 / 2**20)
    carried = tmp_path / "carried"
    carried.mkdir()
    shutil.copy(tmp_path / "pack" / "pack.json", carried)
    env = {**os.environ, "S4MUSIC_LEASE_DATA": str(tmp_path / "data")}

    def unpack_carried():
        return subprocess.run([sys.executable, str(ROOT / "examples" / "gpu_lease.py"), "unpack", str(carried)],
                              capture_output=True, text=True, env=env)

    nothing = unpack_carried()
    assert nothing.returncode == 1 and nothing.stderr == f"error: {carried}: no part-*.s4pack here (a call carries " \
                                                          "its parts beside their pack.json)\n"
    shutil.copy(parts[1].path, carried)
    assert unpack_carried().returncode == 0 and [p.name for p in (tmp_path / "data").iterdir()] == [parts[1].name]
    damaged = bytearray(parts[1].path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (carried / parts[1].path.name).write_bytes(bytes(damaged))
    bad = unpack_carried()
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "checksum mismatch" in bad.stderr

"""The GPU lease script's choices that run on the CPU: which convolution the fast step trains with."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lease():
    spec = importlib.util.spec_from_file_location("gpu_lease", ROOT / "examples" / "gpu_lease.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _figures(fft_s: float, chunked_s: float, chunked_excess: float = 0.0, error: bool = False) -> dict:
    """bench_gpu.py's fast-step JSON, cut to what the choice reads."""
    losses = [8.0, 7.5, 7.0, 6.5]
    chunked = {"error": "out of memory"} if error else {"seconds": chunked_s,
                                                         "losses": [x + chunked_excess for x in losses]}
    return {"runs": {"today's": {"seconds": 0.3, "losses": losses}, "fast": {"seconds": fft_s, "losses": losses},
                     "fast, chunked 256": chunked},
            "legs": {"today's": {"fast": False}, "fast": {"fast": True},
                     "fast, chunked 256": {"fast": True, "conv_chunk": 256}}}


def test_the_lease_trains_with_the_chunked_convolution_only_where_it_ran_faster_and_as_well(lease):
    assert lease.choose_conv_chunk(_figures(0.16, 0.08)) == 256
    assert lease.choose_conv_chunk(_figures(0.16, 0.20)) == 0  # slower there
    assert lease.choose_conv_chunk(_figures(0.16, 0.08, chunked_excess=0.2)) == 0  # a higher loss: a fault
    assert lease.choose_conv_chunk(_figures(0.16, 0.08, error=True)) == 0  # it failed to run


def test_a_recorded_comparison_gives_its_choice_and_is_not_run_again(lease, tmp_path, monkeypatch):
    results = tmp_path / "benchmarks" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text("## leases\n" + lease.MARKER.format(gpu="NVIDIA H200", chunk=256) + "\n| table |\n")
    monkeypatch.setattr(lease, "ROOT", tmp_path)
    monkeypatch.setattr(lease.subprocess, "run", lambda *a, **kw: pytest.fail("ran the comparison again"))
    assert lease.compare("NVIDIA H200", tmp_path, [], 30.0) == 256
    assert not (tmp_path / "bench_fast.md").exists()

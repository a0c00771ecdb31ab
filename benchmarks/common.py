"""What every benchmarks/bench_*.py shares: each configuration runs in a fresh subprocess of the
script itself (`--child SPEC`), so that its peak memory is its own."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEATURES = [("avx2", "AVX2"), ("fma", "FMA"), ("f16c", "F16C"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
            ("avx512_vnni", "AVX512-VNNI"), ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8")]


def run_child(script: str, kind: str, env: dict | None = None, **kw) -> dict:
    """Run `kind` with keyword arguments `kw` in a fresh `script --child`; its JSON result, or {"error": ...}."""
    cmd = [sys.executable, script, "--child", json.dumps({"kind": kind, **kw})]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fused_speeds(legs: dict[str, tuple], seconds: float, rounds: int) -> dict[str, float]:
    """Each leg, (FusedStep, Rule, rows, state), stepped `seconds` of audio from a copy of its state,
    interleaved in one process (every other round in reverse order), best of `rounds`: × real time
    of one take (a guided rule's rows are a take's prompt and free rows)."""
    import time

    import torch

    best = dict.fromkeys(legs, 0.0)
    n = int(seconds * 16000)
    for r in range(rounds):
        for name in list(legs) if r % 2 == 0 else list(legs)[::-1]:
            step, rule, rows, state = legs[name]
            s = state.repeat(1)
            t0 = time.perf_counter()
            step.run(torch.full((rows,), 128), s, torch.rand(rows, n), rule, rule.first_mu(rows))
            best[name] = max(best[name], seconds / (time.perf_counter() - t0))
    return best


def parse_args(functions: dict[str, Callable[..., dict]], sections: list[str] | None = None) -> argparse.Namespace | None:
    """The command line of a benchmark script. In a child, run the function it names, print its
    result as JSON and return None; otherwise return the parsed arguments (`--quick`, and `--only`
    where the script has `sections`)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="short lengths, for a smoke run")
    if sections:
        parser.add_argument("--only", choices=sections, help="run this section alone")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(functions[spec.pop("kind")](**spec)))
        return None
    return args


# The soundfont the chorale model's data was rendered with (models/chorales): held-out pieces must be
# rendered with it too, or the model hears another piano (render-midi's default is the best installed).
CHORALE_SOUNDFONT = "timgm6mb"


def rendered_pieces(split: str, n: int) -> list[Path]:
    """The first n pieces of a split of the chorale model's data (examples/default_model_splits.json),
    rendered from the music21 corpus on the General MIDI piano of its soundfont, as its training data
    was: WAV files, rendered once into the cache."""
    from music21 import corpus

    from s4music.data.midi import RenderOptions, render_midi
    from s4music.extensions import cache_home

    cache = cache_home() / "bundled-split" / CHORALE_SOUNDFONT
    names = json.loads((ROOT / "examples" / "default_model_splits.json").read_text())[split][:n]
    out = []
    for name in names:
        stem = Path(name).stem
        audio = cache / "audio" / f"{stem}.wav"
        if not audio.exists():
            midi = cache / "midi" / f"{stem}.mid"
            midi.parent.mkdir(parents=True, exist_ok=True)
            if not midi.exists():
                corpus.parse(f"bach/{stem}").write("midi", fp=str(midi))
            render_midi([midi], cache / "audio", RenderOptions(instruments=["piano"], max_seconds=120.0,
                                                               soundfont=CHORALE_SOUNDFONT))
        out.append(audio)
    return out


def cpu() -> tuple[str, list[str]]:
    """The CPU's model name and the vector and matrix features the toolkit cares about."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, [label for flag, label in FEATURES if flag in flags]


def kind() -> str:
    """The machine kind a section is kept for: the CPU model and whether it has AVX-512 and AMX."""
    name, features = cpu()
    vendor = "AMD EPYC" if "EPYC" in name else "Intel Xeon" if "Xeon" in name else name
    widest = [f for f in ("AVX-512", "AMX-BF16") if f in features] or ["AVX2" if "AVX2" in features else "no AVX2"]
    return f"{vendor}, {' + '.join(widest)}"


def kind_slug() -> str:
    """kind() as a file name's part: "amd-epyc-avx-512"."""
    return re.sub(r"[^a-z0-9]+", "-", kind().lower()).strip("-")

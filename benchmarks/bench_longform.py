"""Long-form quality: do 30 s continuations stay within the music the model was tested on?

Prompts are the first 5 s of held-out chorales of the bundled model's own split
(examples/default_model_splits.json), rendered from the music21 corpus on the General MIDI piano as
its training data was, and examples/prompt.wav. Each is continued for 30 s with several seeds, and
each continuation is cut into 3 s windows on a 3 s grid from the seam; per window: spectral
flatness (1024-point frames, as the model card measures it), loudness, and the model's own bits per
sample on what it sampled. The headline figure is the share of the windows from 5 s to 30 s after
the seam (6-9 s, ..., 27-30 s: eight a take) whose flatness lies inside the test windows' 5th-95th
percentile band, which `eval --record` stored in the checkpoint.

Sampling rules are compared on the validation pieces (where a rule is chosen) and the test pieces
(where it is judged). The figures go to RESULTS.md with a picture.

    python benchmarks/bench_longform.py                 # all rules, val and test prompts
    python benchmarks/bench_longform.py --quick         # two prompts, two seeds, 12 s
    S4MUSIC_LONGFORM_MODEL=models/wip S4MUSIC_LONGFORM_RULES=1 python benchmarks/bench_longform.py
                                                        # another model, its first rule alone
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from common import kind_slug, parse_args, rendered_pieces, run_child

from s4music.extensions import cache_home

ROOT = Path(__file__).resolve().parent.parent
CACHE = cache_home() / "longform-prompts"
SR = 16000
WINDOW_S, FROM_S = 3.0, 5.0
# name -> the Sampling it stands for
RULES = {
    "t0.8 (recommended)": dict(temperature=0.8),
    "t0.7": dict(temperature=0.7),
    "t0.9": dict(temperature=0.9),
    "t0.8 -> 0.6 over the take": dict(temperature=0.8, temperature_end=0.6),
    "t0.8, top-p 0.98": dict(temperature=0.8, top_p=0.98),
    "t0.8, top-k 32": dict(temperature=0.8, top_k=32),
    "t0.8, re-anchored on the last 4 s every 2 s": dict(temperature=0.8, context_seconds=4.0),
}


def render_prompts(split: str, n: int) -> list[str]:
    """The first 5 s of the first n pieces of a split, rendered once into the cache."""
    import soundfile as sf

    from s4music.audio import load_audio
    from s4music.files import atomic_path

    out = []
    for piece in rendered_pieces(split, n):
        prompt = CACHE / split / piece.with_suffix(".prompt.wav").name
        if not prompt.exists():
            prompt.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(prompt) as tmp:
                sf.write(str(tmp), load_audio(piece, SR).samples[: int(5 * SR)].numpy(), SR, format="WAV",
                         subtype="PCM_16")
        out.append(str(prompt))
    return out


def continue_windows(prompt: str, rule: str, seeds: int, seconds: float) -> dict:
    """Per take, per 3 s window: flatness, loudness (LUFS), the model's bits/sample."""
    from s4music.audio import decode, spectral_flatness
    from s4music.dsp import loudness_lufs
    from s4music.generate import GenerateOptions, Output, Sampling, stream_continuation
    from s4music.generate.stream import FIRST_CHUNK
    from s4music.model import load_model

    net = load_model(os.environ.get("S4MUSIC_LONGFORM_MODEL", "default"))
    options = GenerateOptions(seconds=seconds, variations=seeds, seed=0,
                              sampling=Sampling(**{**Sampling.NEUTRAL, **RULES[rule]}),
                              output=Output(include_prompt=False, normalize="none"))
    generation = stream_continuation(prompt, net, options)
    for _ in generation:
        pass
    per_window = int(WINDOW_S * SR) // FIRST_CHUNK
    takes = []
    for i in range(seeds):
        codes, bits = generation.sampled(i)
        wave = decode(codes, net.audio.quantization)
        windows = []
        for k in range(int(seconds // WINDOW_S)):
            piece = wave[int(k * WINDOW_S * SR): int((k + 1) * WINDOW_S * SR)]
            windows.append({"start_s": k * WINDOW_S, "flatness": spectral_flatness(piece),
                            "lufs": loudness_lufs(piece, SR),
                            "bits": float(bits[k * per_window:(k + 1) * per_window].mean())})
        takes.append({"seed": i, "bits": float(bits.mean()), "windows": windows})
    return {"takes": takes, "band": net.summary["eval"]["flatness"]}


def in_band(result: dict) -> tuple[int, int]:
    band = result["band"]
    hits = total = 0
    for take in result["takes"]:
        for w in take["windows"]:
            if w["start_s"] >= FROM_S:
                total += 1
                hits += band["p5"] <= w["flatness"] <= band["p95"]
    return hits, total


def main() -> None:
    args = parse_args({"windows": continue_windows})
    if args is None:
        return
    quick = args.quick
    seconds, seeds = (12.0, 3) if quick else (30.0, 3)
    val = render_prompts("val", 2 if quick else 3)
    test = render_prompts("test", 2 if quick else 4)
    example = str(ROOT / "examples" / "prompt.wav")
    rules = list(RULES)[:2] if quick else list(RULES)
    rules = rules[: int(os.environ.get("S4MUSIC_LONGFORM_RULES", len(rules)))]
    model = os.environ.get("S4MUSIC_LONGFORM_MODEL", "the bundled model")
    print(f"## Long-form continuations, {model} ({seconds:g} s, {seeds} seeds a prompt)\n")
    print("Share of 3 s windows from 5 s to 30 s after the seam whose spectral flatness lies inside the test "
          "windows' 5th-95th percentile band, and the model's own bits/sample on what it sampled.\n")
    print("| sampling rule | validation prompts: in band | bits/sample | test prompts + example: in band | "
          "bits/sample |")
    print("|---|---|---|---|---|")
    curves: dict[str, list[float]] = {}
    band = None
    rows: dict[str, list[str]] = {}
    for rule in rules:
        for name in (rule, f"{rule}, the median-likelihood take of {seeds}") if rule == rules[0] else (rule,):
            rows[name] = [name]
        for prompts in (val, [*test, example]):
            tallies = {name: [0, 0, []] for name in rows if name.startswith(rule)}
            for prompt in prompts:
                r = run_child(__file__, "windows", prompt=prompt, rule=rule, seeds=seeds, seconds=seconds)
                if "error" in r:
                    raise SystemExit(f"{rule} on {prompt}: {r['error']}")
                band = r["band"]
                for name, tally in tallies.items():
                    takes = r["takes"]
                    if "median-likelihood" in name:  # the paper's practice: drop the least and most likely
                        takes = [sorted(takes, key=lambda t: t["bits"])[len(takes) // 2]]
                    h, t = in_band({"takes": takes, "band": band})
                    tally[0], tally[1] = tally[0] + h, tally[1] + t
                    tally[2] += [take["bits"] for take in takes]
                if prompts is not val:
                    for take in r["takes"]:
                        for k, w in enumerate(take["windows"]):
                            curves.setdefault(rule, []).append((k, w["flatness"]))
            for name, (hits, total, bits) in tallies.items():
                rows[name] += [f"{hits}/{total} = {hits / max(total, 1):.0%}", f"{statistics.mean(bits):.3f}"]
    for row in rows.values():
        print("| " + " | ".join(row) + " |")
    if band:
        print(f"\nTest windows' flatness (recorded by `eval --record`): 5th percentile {band['p5']:.4f}, median "
              f"{band['median']:.4f}, 95th {band['p95']:.4f}, max {band['max']:.4f}.")
        window_table(curves, seconds)
        picture(curves, band, seconds)


def medians(points: list[tuple[int, float]], seconds: float) -> list[float]:
    """Per window (index k), the median flatness over the takes."""
    return [statistics.median([f for k, f in points if k == i]) for i in range(int(seconds // WINDOW_S))]


def window_table(curves: dict, seconds: float) -> None:
    """The picture's figures: median flatness per window over the test prompts' takes."""
    n = int(seconds // WINDOW_S)
    print("\nMedian flatness per 3 s window after the seam, test prompts and the example:\n")
    print("| sampling rule | " + " | ".join(f"{WINDOW_S * i:g}-{WINDOW_S * (i + 1):g} s" for i in range(n)) + " |")
    print("|---|" + "---|" * n)
    for rule, points in curves.items():
        print(f"| {rule} | " + " | ".join(f"{m:.4f}" for m in medians(points, seconds)) + " |")


def picture(curves: dict, band: dict, seconds: float) -> None:
    """Median flatness per window over the test prompts' takes, per rule, against the band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=110)
    ax = fig.subplots()
    n = int(seconds // WINDOW_S)
    ax.axhspan(band["p5"], band["p95"], color="#9c9", alpha=0.4, label="test windows, 5th-95th percentile")
    ax.axhline(band["max"], color="#696", linewidth=0.8, linestyle="--", label="test windows, max")
    for rule, points in curves.items():
        ax.plot([WINDOW_S * (i + 0.5) for i in range(n)], medians(points, seconds), "o-", markersize=3, label=rule)
    ax.axvline(FROM_S, color="#999", linewidth=0.8)
    ax.set_xlabel("seconds after the seam (3 s windows)")
    ax.set_ylabel("spectral flatness (median over takes)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(__file__).with_name(f"longform-{kind_slug()}.png")  # one a machine kind, as its section
    fig.savefig(out, format="png")
    print(f"\n![flatness per window after the seam]({out.name})")


if __name__ == "__main__":
    main()

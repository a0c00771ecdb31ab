"""Long-form quality: do 30 s continuations keep the music, and which sampling rule keeps it best?

Prompts: 5 s of held-out chorales of the chorale model's split (examples/default_model_splits.json),
rendered from the music21 corpus on the General MIDI piano as its training data was, and real
recordings from the Debian packages the corpus allows, held out by examples/corpus/splits.json
(5 s from 20 s in). Each prompt is continued for 30 s with several seeds. Every continuation is
cut into 3 s windows on a 3 s grid from the seam, and the windows from 5 s on (6-9 s, ..., 27-30 s:
eight a take) are judged by measures no rule reads (s4music/measures.py):
  in band    spectral flatness inside the 5th-95th percentile band of the held-out chorale windows,
             as `eval --record` stored it for models/chorales: one band for every model judged
  lively     onsets or a moving level, as music has (not a drone: measures.liveliness)
  collapsed  silent (under -60 LUFS), hiss (flatness over guidance.HISS_FACTOR times that band's
             max), steady (no onsets and a steady level: a drone, or steady noise), or
             clipped (over 0.1% of samples at full scale)
and per take, adherence: the long-term spectrum from 5 s on nearer the prompt's than the model's own
improvisation's (30 s from nothing, at its recommended temperature), counted only for a take most
of whose windows did not collapse (hiss can be nearer a broad prompt's spectrum than the model's
music is).

A rule is chosen on the validation prompts only: the best mean of the in-band, lively and
adherence shares. The test prompts then judge the chosen rule against the baseline, temperature 0.8
(the chorale model's recommendation before this benchmark chose another).

    python benchmarks/bench_longform.py                 # validation: every rule; test: the two
    python benchmarks/bench_longform.py --quick         # two rules, two prompts a split, 12 s
    S4MUSIC_LONGFORM_MODEL=models/chorales python benchmarks/bench_longform.py   # another model
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

from common import fused_speeds, kind, kind_slug, parse_args, rendered_pieces, run_child

from s4music.extensions import cache_home

ROOT = Path(__file__).resolve().parent.parent
CACHE = cache_home() / "longform-prompts"
SR = 16000
WINDOW_S, FROM_S, PROMPT_S, RECORDING_FROM_S = 3.0, 5.0, 5.0, 20.0
BASELINE = "t0.8"  # the chorale model's recommendation before typical 0.9 for unfamiliar prompts
# The band every model's windows are judged by: a model's own (`eval --record` on its test split)
# would move with its data, and a broad one would make "in band" easy.
BAND_MODEL = ROOT / "models" / "chorales"
# name -> the Sampling it stands for; "unfamiliar": what replaces it for a prompt the model finds
# surprising (s4music.guidance.unfamiliar), as a model's "sampling_unfamiliar" does
RULES = {
    BASELINE: dict(temperature=0.8),
    "t0.8, guidance 2": dict(temperature=0.8, guidance=2.0),
    "t0.8, guidance 4": dict(temperature=0.8, guidance=4.0),
    "t0.8, guidance 2 from rest": dict(temperature=0.8, guidance=2.0, guidance_seconds=0.0),
    "t0.8, surprise auto": dict(temperature=0.8, surprise="auto"),
    "t0.8, typical 0.9": dict(temperature=0.8, typical=0.9),
    "t0.8; typical 0.9 for unfamiliar prompts": dict(temperature=0.8, unfamiliar=dict(typical=0.9)),
}


def as_summary(rule: str) -> dict:
    """The rule as a model summary's recommendation: its "sampling" and "sampling_unfamiliar"."""
    sampling = dict(RULES[rule])
    return {"sampling_unfamiliar": sampling.pop("unfamiliar", {}), "sampling": sampling}
RECORDINGS = {"val": ["drascula/track1.ogg", "ufoai/PsymongN1.ogg"],
              "test": ["drascula/track14.ogg", "ufoai/alBasrahM.ogg", "xblast/xbsng1.wav"]}


def render_prompts(split: str, n: int) -> list[str]:
    """The first 5 s of the first n pieces of a split, rendered once into the cache."""
    import soundfile as sf

    from s4music.audio import load_audio
    from s4music.files import atomic_path

    out = []
    for piece in rendered_pieces(split, n):
        prompt = CACHE / split / piece.parent.parent.name / piece.with_suffix(".prompt.wav").name  # by soundfont
        if not prompt.exists():
            prompt.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(prompt) as tmp:
                sf.write(str(tmp), load_audio(piece, SR).samples[: int(5 * SR)].numpy(), SR, format="WAV",
                         subtype="PCM_16")
        out.append(str(prompt))
    return out


def recording_prompts(split: str, n: int) -> list[str]:
    """5 s from RECORDING_FROM_S of the held-out recordings of a split, cut once into the cache."""
    import soundfile as sf

    sys.path.insert(0, str(ROOT / "examples" / "corpus"))
    from recordings import gather

    from s4music.audio import load_audio
    from s4music.files import atomic_path

    gathered = {f"{p.parent.name}/{p.name}": p for p in gather(CACHE / "recordings")}
    out = []
    for name in RECORDINGS[split][:n]:
        if name not in gathered:
            print(f"(skipped {name}: its package is not installed)")
            continue
        prompt = CACHE / split / (name.replace("/", "-").rsplit(".", 1)[0] + ".prompt.wav")
        if not prompt.exists():
            prompt.parent.mkdir(parents=True, exist_ok=True)
            audio = load_audio(gathered[name], SR).samples
            start = int(RECORDING_FROM_S * SR) if audio.numel() >= (RECORDING_FROM_S + PROMPT_S) * SR else 0
            with atomic_path(prompt) as tmp:
                sf.write(str(tmp), audio[start:start + int(PROMPT_S * SR)].numpy(), SR, format="WAV",
                         subtype="PCM_16")
        out.append(str(prompt))
    return out


def improvisation(seconds: float, seeds: int) -> dict:
    """The model's own music: `seeds` takes of `seconds` from nothing at its recommended sampling,
    written as one WAV (the takes end to end) for adherence to compare with."""
    import soundfile as sf
    import torch

    from s4music.audio import decode
    from s4music.generate import GenerateOptions, Output, stream_improvisation
    from s4music.model import load_model

    net = load_model(os.environ.get("S4MUSIC_LONGFORM_MODEL", "default"))
    generation = stream_improvisation(net, GenerateOptions(seconds=seconds, variations=seeds, seed=1000,
                                                           output=Output(normalize="none")))
    for _ in generation:
        pass
    wave = torch.cat([decode(generation.sampled(i)[0], net.audio.quantization) for i in range(seeds)])
    out = CACHE / f"improvisation-{Path(os.environ.get('S4MUSIC_LONGFORM_MODEL', 'default')).name}.wav"
    sf.write(str(out), wave.numpy(), SR, subtype="PCM_16")
    return {"path": str(out)}


def continue_windows(prompt: str, rule: str, seeds: int, seconds: float, improvised: str) -> dict:
    """Per take: adherence from FROM_S on; per 3 s window: flatness, loudness (LUFS), onsets a second,
    level spread, clipped share, the model's bits/sample."""
    from s4music.audio import decode, load_audio, spectral_flatness
    from s4music.dsp import loudness_lufs
    from s4music.generate import GenerateOptions, Output, Sampling, stream_continuation
    from s4music.generate.stream import FIRST_CHUNK
    from s4music.measures import adherence, liveliness
    from s4music.model import load_model

    net = load_model(os.environ.get("S4MUSIC_LONGFORM_MODEL", "default"))
    # the rule as the model's own recommendation, so that continue applies it as it would a shipped one
    net.summary = {**net.summary, **as_summary(rule)}
    options = GenerateOptions(seconds=seconds, variations=seeds, seed=0, sampling=Sampling(),
                              output=Output(include_prompt=False, normalize="none"))
    generation = stream_continuation(prompt, net, options)
    for _ in generation:
        pass
    prompt_wave = load_audio(prompt, SR).samples
    own = load_audio(improvised, SR).samples
    per_window = int(WINDOW_S * SR) // FIRST_CHUNK
    takes = []
    for i in range(seeds):
        codes, bits = generation.sampled(i)
        wave = decode(codes, net.audio.quantization)
        windows = []
        for k in range(int(seconds // WINDOW_S)):
            piece = wave[int(k * WINDOW_S * SR): int((k + 1) * WINDOW_S * SR)]
            alive = liveliness(piece, SR)
            windows.append({"start_s": k * WINDOW_S, "flatness": spectral_flatness(piece),
                            "lufs": loudness_lufs(piece, SR), "onsets": alive.onsets_per_s,
                            "spread_db": alive.level_spread_db,
                            "clipped": float((piece.abs() >= 0.999).float().mean()),
                            "bits": float(bits[k * per_window:(k + 1) * per_window].mean())})
        later = wave[int(FROM_S * SR):]
        takes.append({"seed": i, "bits": float(bits.mean()), "windows": windows,
                      "adherence_db": adherence(later, prompt_wave, own, SR)})
    return {"takes": takes, "band": load_model(BAND_MODEL).summary["eval"]["flatness"],
            "rule_seconds": generation.timings.generate_s,
            "sampling": {k: v for k, v in vars(generation.sampling).items()}}


def rule_cost(rules: list[str], variations: int, seconds: float, rounds: int) -> dict:
    """Each rule's speed in the fused step as `continue` runs it (fp16 weights, `variations` takes;
    guided rules step a prompt row and a free row for each; a rule for unfamiliar prompts as it runs
    on one), interleaved in one process, best of `rounds`: audio seconds of the takes per wall second."""
    import torch

    from s4music.generate import Sampling
    from s4music.model import load_model
    from s4music.model.fast import FusedStep

    net = load_model(os.environ.get("S4MUSIC_LONGFORM_MODEL", "default"))
    step = FusedStep(net, half=True)
    legs = {}
    for name in rules:
        rule = Sampling().resolved(as_summary(name), unfamiliar=True).with_surprise_of(net.summary.get("test_bits")).rule()
        rows = variations * (2 if rule.pairs else 1)
        _, state = net.prefill(torch.randint(0, 256, (rows, 4096)))
        legs[name] = (step, rule, rows, state)
    return {name: variations * speed for name, speed in fused_speeds(legs, seconds, rounds).items()}


def collapsed(window: dict, band: dict) -> bool:
    from s4music.guidance import DRONE_ONSETS_PER_S, DRONE_SPREAD_DB, HISS_FACTOR

    steady = window["onsets"] < DRONE_ONSETS_PER_S and window["spread_db"] < DRONE_SPREAD_DB
    silent = window["lufs"] is None or window["lufs"] < -60
    return silent or steady or window["flatness"] > HISS_FACTOR * band["max"] or window["clipped"] > 0.001


def judged(results: list[dict]) -> dict:
    """The shares over the windows from FROM_S (in band, lively, collapsed) and the takes (adherence)."""
    from s4music.guidance import DRONE_ONSETS_PER_S, DRONE_SPREAD_DB

    n = band_hits = lively = fallen = takes = adherent = 0
    bits = []
    for r in results:
        band = r["band"]
        for take in r["takes"]:
            judged_windows = [w for w in take["windows"] if w["start_s"] >= FROM_S]
            down = sum(collapsed(w, band) for w in judged_windows)
            takes += 1
            adherent += take["adherence_db"] > 0 and down <= len(judged_windows) / 2
            bits.append(take["bits"])
            for w in judged_windows:
                n += 1
                band_hits += band["p5"] <= w["flatness"] <= band["p95"]
                lively += not (w["onsets"] < DRONE_ONSETS_PER_S and w["spread_db"] < DRONE_SPREAD_DB)
            fallen += down
    return {"windows": n, "in_band": band_hits / max(n, 1), "lively": lively / max(n, 1),
            "collapsed": fallen, "adherent": adherent / max(takes, 1), "takes": takes,
            "bits": statistics.mean(bits) if bits else float("nan"),
            "score": (band_hits / max(n, 1) + lively / max(n, 1) + adherent / max(takes, 1)) / 3}


def strata(results: list[dict]) -> str:
    """The shares by kind of prompt: rendered chorales, recordings, the example."""
    kinds = {"chorales": [r for r in results if r["prompt"].startswith("bwv")],
             "recordings": [r for r in results if not r["prompt"].startswith(("bwv", "prompt"))],
             "example": [r for r in results if r["prompt"].startswith("prompt")]}
    return "; ".join(f"{kind}: in band {j['in_band']:.0%}, lively {j['lively']:.0%}, adherent {j['adherent']:.0%}, "
                     f"collapsed {j['collapsed']}/{j['windows']}"
                     for kind, rs in kinds.items() if rs for j in [judged(rs)])


def run_rule(rule: str, prompts: list[str], seeds: int, seconds: float, improvised: str) -> list[dict]:
    """Each prompt's takes under `rule`, in a child each; kept in the cache by the rule, the prompt,
    the lengths, the model and the commit, so a second run of the table reuses them."""
    import hashlib
    import json
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out = []
    for prompt in prompts:
        spec = [RULES[rule], prompt, seeds, seconds, os.environ.get("S4MUSIC_LONGFORM_MODEL", "default"), commit]
        kept = CACHE / "runs" / (hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16] + ".json")
        if kept.exists():
            r = json.loads(kept.read_text())
        else:
            r = run_child(__file__, "windows", prompt=prompt, rule=rule, seeds=seeds, seconds=seconds,
                          improvised=improvised)
            if "error" in r:
                raise SystemExit(f"{rule} on {prompt}: {r['error']}")
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(r))
        r["prompt"] = Path(prompt).name
        out.append(r)
    return out


def cells(j: dict) -> str:
    return (f"{j['in_band']:.0%} | {j['lively']:.0%} | {j['adherent']:.0%} ({j['takes']} takes) | "
            f"{j['collapsed']}/{j['windows']} | {j['bits']:.3f}")


def main() -> None:
    args = parse_args({"windows": continue_windows, "improvisation": improvisation, "cost": rule_cost})
    if args is None:
        return
    quick = args.quick
    seconds, seeds = (12.0, 2) if quick else (30.0, 2)
    val = render_prompts("val", 2) + recording_prompts("val", 1 if quick else 2)
    test = render_prompts("test", 2 if quick else 3) + recording_prompts("test", 1 if quick else 3)
    if not quick:
        test.append(str(ROOT / "examples" / "prompt.wav"))
    rules = list(RULES)[:2] if quick else list(RULES)
    model = os.environ.get("S4MUSIC_LONGFORM_MODEL", "the bundled model")
    improvised = run_child(__file__, "improvisation", seconds=seconds, seeds=seeds)["path"]
    head = ("| sampling rule | in band | lively | takes nearer their prompt than the model's own music | "
            "collapsed windows | bits/sample |\n|---|---|---|---|---|---|")
    print(f"## Long-form continuations, {model} ({seconds:g} s, {seeds} seeds a prompt)\n")
    print(f"Windows from {FROM_S:g} s after the seam: flatness in the held-out chorale band, lively (not a drone), "
          "collapsed (silent, a drone or clipped); takes: adherence (module docstring). "
          f"Validation: {len(val)} prompts ({', '.join(Path(p).name for p in val)}).\n")
    print(head)
    val_judged = {}
    by_kind = {}
    for rule in rules:
        results = run_rule(rule, val, seeds, seconds, improvised)
        val_judged[rule], by_kind[rule] = judged(results), strata(results)
        print(f"| {rule} | {cells(val_judged[rule])} |", flush=True)
    print("\nBy kind of prompt:\n")
    for rule, line in by_kind.items():
        print(f"- {rule}: {line}")
    chosen = max(rules, key=lambda r: val_judged[r]["score"])  # the first of equals: the baseline
    verdict = "no rule beat it" if chosen == BASELINE else f"**{chosen}**"
    print(f"\nChosen on validation (best mean of in band, lively, adherent; the baseline unless another is "
          f"strictly better): {verdict} ({val_judged[chosen]['score']:.2f} against "
          f"{val_judged[BASELINE]['score']:.2f} for {BASELINE}).\n")
    print(f"Test: {len(test)} prompts ({', '.join(Path(p).name for p in test)}), never used to choose.\n")
    print(head)
    curves: dict[str, list] = {}
    test_kinds: dict[str, str] = {}
    band = None
    for rule in dict.fromkeys([BASELINE, chosen]):
        results = run_rule(rule, test, seeds, seconds, improvised)
        print(f"| {rule} | {cells(judged(results))} |", flush=True)
        test_kinds[rule] = strata(results)
        band = results[0]["band"]
        for r in results:
            for take in r["takes"]:
                curves.setdefault(rule, []).extend((k, w["flatness"]) for k, w in enumerate(take["windows"]))
    print("\nBy kind of prompt:\n")
    for rule, line in test_kinds.items():
        print(f"- {rule}: {line}")
    print(f"\nThe held-out chorale windows' flatness (models/chorales, `eval --record`): 5th percentile {band['p5']:.4f}, median "
          f"{band['median']:.4f}, 95th {band['p95']:.4f}, max {band['max']:.4f}.")
    window_table(curves, seconds)
    picture(curves, band, seconds)
    compared = list(dict.fromkeys([BASELINE, chosen]))
    cost = run_child(__file__, "cost", rules=compared, variations=seeds, seconds=2.0 if quick else 6.0,
                     rounds=3)
    if "error" in cost:
        print(f"\nSpeed in the fused step: failed: {cost['error']}")
    else:
        print(f"\nSpeed in the fused step ({kind()}, fp16 weights, {seeds} takes at once, interleaved, best of "
              "3): " + "; ".join(f"{rule}: {cost[rule]:.2f}\u00d7 real time" for rule in compared) + ".")


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
    ax.axhspan(band["p5"], band["p95"], color="#9c9", alpha=0.4, label="held-out chorale windows, 5th-95th percentile")
    ax.axhline(band["max"], color="#696", linewidth=0.8, linestyle="--", label="held-out chorale windows, max")
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

"""Write the chorale model's card (models/chorales, the bundled model's first two stages) from
what its recipe recorded: no figure is typed by hand.

    python examples/write_model_card.py MODEL_DIR RUN_DIR... [--hardware TEXT] [--demo WAV] [--variations N]

MODEL_DIR holds the checkpoint (its summary carries the `eval --record` result); each RUN_DIR is a
training run (log.csv, config.yaml), in the order they ran.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
from pathlib import Path

import soundfile as sf
import torch
import yaml

from s4music.audio import spectral_flatness
from s4music.generate import GenerateOptions, Output, continue_prompt


def describe_run(run: Path, sample_rate: int) -> str:
    """One markdown section on a training run, from its config.yaml and log.csv alone."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    rows = list(csv.DictReader((run / "log.csv").open()))
    vals = [(int(r["step"]), float(r["val_bits"])) for r in rows if r["val_bits"]]
    lrs = [float(r["lr"]) for r in rows]
    # A learning rate that rises after warm-up marks a `--resume` to more steps than the schedule had.
    restarts = [i + 1 for i in range(max(config["warmup"], 1), len(lrs)) if lrs[i] > lrs[i - 1] * 1.01]
    seconds = len(rows) * config["batch_size"] * config["seq_len"] / sample_rate
    start = {"scratch": "From scratch", "finetune": "Fine-tuned from the previous stage",
             "reparam": "Reparameterized from the previous stage"}[config["mode"]]
    history = (f"- The learning rate rose again at step {', '.join(map(str, restarts))}: the run was resumed\n"
               "  (`--resume`) with more steps after its cosine had decayed (a warm restart). Re-running the\n"
               "  recipe in one go reproduces this only approximately.\n") if restarts else ""
    return f"""### {start}, {config['seq_len'] / sample_rate:.2f} s windows
- {len(rows)} optimizer steps of {config['batch_size']} windows x {config['seq_len']} samples ({seconds / 3600:.2f} hours of audio
  seen), AdamW, lr {config['lr']} (S4 parameters {config['ssm_lr']}, no weight decay), {config['schedule']} schedule,
  {config['warmup']} warm-up steps, gradient clip {config['clip']}, seed {config['seed']}; mean throughput
  {sum(float(r['audio_s_per_s']) for r in rows) / len(rows):.2f} audio seconds per second.
{history}- Validation bits/sample: {', '.join(f'{v:.3f} (step {s})' for s, v in vals)}.
"""


def continuation_flatness(model: Path, n: int, test: dict) -> str:
    """The flatness of n 10 s continuations of the example prompt (seeds 0..n-1), with the model's
    recommended sampling, against the test windows' quantiles `test`."""
    prompt = Path(__file__).with_name("prompt.wav")
    options = GenerateOptions(seconds=10, variations=n, seed=0, output=Output(include_prompt=False))
    with tempfile.TemporaryDirectory() as tmp:
        takes = continue_prompt(prompt, Path(tmp) / "take.wav", model=model, options=options).takes
        flats = [spectral_flatness(torch.from_numpy(sf.read(str(t.path), dtype="float32")[0])) for t in takes]
    band = sum(test["p5"] <= f <= test["p95"] for f in flats)
    whole = sum(test["min"] <= f <= test["max"] for f in flats)
    return (f"Over {n} continuations of the example prompt (10 s, seeds 0 to {n - 1}, the recommended sampling),\n"
            f"the flatness has median {statistics.median(flats):.4f} and range {min(flats):.4f} to {max(flats):.4f}; "
            f"{band} of {n} lie\nwithin the test windows' 5th to 95th percentile and {whole} of {n} within their whole range.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("runs", type=Path, nargs="+", help="the training runs, in order (each fine-tunes the last)")
    parser.add_argument("--hardware", default="unknown")
    parser.add_argument("--demo", type=Path, help="a continuation of the example prompt (10 s, seed 0) to measure")
    parser.add_argument("--prompt-seconds", type=float, default=5.0, help="length of the prompt at its start")
    parser.add_argument("--variations", type=int, default=8,
                        help="continuations of the example prompt (seeds 0..N-1) whose flatness the card reports")
    args = parser.parse_args()
    meta = json.loads((args.model / "config.json").read_text())
    summary, ev = meta["summary"], meta["summary"]["eval"]
    stages = [describe_run(run, meta["audio"]["sample_rate"]) for run in args.runs]
    model = meta["model"]
    lo, hi = ev["interval_95"]
    flat = ev["flatness"]
    strata = "\n".join(f"| {s['stratum']} | {s['windows']} | {s['model_bits']:.3f} | {s['unigram_bits']:.3f} | "
                       f"{s['bigram_bits']:.3f} |" for s in ev["strata"])
    demo = drift = spread = ""
    if args.demo is not None:
        wave, sample_rate = sf.read(str(args.demo), dtype="float32")
        demo_flat = spectral_flatness(torch.from_numpy(wave[int(args.prompt_seconds * sample_rate):]))
        demo = f"Its continuation of the example prompt (10 s, seed 0) has a spectral flatness of {demo_flat:.4f}."
        sidecar = json.loads(args.demo.with_suffix(".json").read_text())
        drift = (f" (the demo's had reached {sidecar['outputs'][0]['dc_offset_removed']:+.2f} of full scale "
                 f"after {sidecar['options']['seconds']:g} s)")
    if args.variations > 0:
        spread = continuation_flatness(args.model, args.variations, flat)
    card = f"""# models/chorales: the chorale model

The SaShiMi architecture of the paper, trained from scratch with this toolkit's own commands on
one GPU: the first two stages of the bundled model, which GPU leases fine-tune further
(`examples/gpu_lease.py`). The exact recipe is
`examples/train_default_model.sh` with `examples/default_model.yaml` and
`examples/default_model_long.yaml`; this card is written by `examples/write_model_card.py` from
what that recipe recorded.

## Model
- SaShiMi, {meta['parameters']:,} parameters: d_model {model['d_model']}, {model['n_layers']} (S4, FF) pairs per
  tier, pooling {model['pool']}, expand {model['expand']}, S4 mode `{model['s4']['mode']}` (S4D), state size
  {model['s4']['d_state']}.
- Audio: {meta['audio']['sample_rate']} Hz, 8-bit `{meta['audio']['quantization']}` codes.
- Weights: float16 safetensors but for the S4 layers' own parameters (float32), \
{sum(f.stat().st_size for f in args.model.iterdir() if f.suffix == '.safetensors') / 1e6:.1f} MB: in float16
  those lose enough to cost a clear part of a bit per sample; the rest moved the example prompt's
  bits/sample by under 1e-4.
- Recommended sampling (used by `continue`/`generate` unless overridden): {summary.get('sampling')}, chosen by
  the spectral flatness of continuations of the example prompt at temperatures 0.7 to 1; for a
  prompt the model finds surprising (more than 0.75 bits/sample above its test figure), {summary.get('sampling_unfamiliar')}
  as well, chosen by the long-form benchmark on validation prompts (below).

## Data
- {summary.get('domain')}.
- Scores: the music21 corpus (public-domain works; music21 is BSD-licensed). Bach chorales:
  the first 150 `bwv*` files in sorted order, and Joplin's Maple Leaf Rag; rendered with
  `render-midi --instrument piano --max-seconds 120` through FluidSynth and the TimGM6mb General
  MIDI soundfont (Debian `timgm6mb-soundfont`, GPL-2).
- `prepare --seconds 4.096 --val 0.05 --test 0.05 --seed 0` for stage 1 and evaluation, and the
  same with `--seconds 8.192` for stage 2: whole pieces go to one split, the same pieces in both.
  The test split is held out from training and model selection; `examples/default_model_splits.json`
  lists every piece's split, and `prepare --splits` with it rebuilds the same split anywhere.

## Training
{len(stages)} {"stage" if len(stages) == 1 else "stages"} of `s4music train` on the train split. Hardware: {args.hardware}.

{chr(10).join(stages)}
The shipped weights are the last stage's `best/`: its lowest validation NLL.

## Evaluation (`s4music eval --split test --record`, context {ev['context']} samples)

| stratum | windows | model | unigram | bigram |
|---|---|---|---|---|
{strata}

Test NLL: **{summary['test_bits']:.3f} bits/sample**, bootstrap 95% interval [{lo:.3f}, {hi:.3f}] over
source files. Baselines: unigram {ev['unigram_bits']:.3f} (entropy of the test codes' own histogram),
bigram {ev['bigram_bits']:.3f} (previous-sample model counted on the train split). For scale, the
SaShiMi paper reports about 1.3 bits/sample on YouTubeMix piano (real recordings, a harder and
larger dataset) with this architecture trained for far longer.

Spectral flatness of the {ev['windows']} test windows: median {flat['median']:.4f}, 5th to 95th percentile
{flat['p5']:.4f} to {flat['p95']:.4f}, whole range {flat['min']:.4f} to {flat['max']:.4f} (white noise is about 0.56). {demo}
{spread}

## Long-form quality
`benchmarks/bench_longform.py` continues held-out prompts for 30 s with two seeds each: chorales of
this split rendered as the training data was, and real recordings from the Debian game-music
packages the corpus allows. From 5 s after the seam it judges each 3 s window by measures no
sampling rule reads (`s4music/measures.py`): flatness in the test windows' band, liveliness (onsets
or a moving level, not a drone) and collapse (silence, hiss, a drone, clipping); and each take by
adherence (its spectrum nearer its prompt's than the model's own music's). A rule is chosen on the
validation prompts and reported on the test prompts; the figures are in `benchmarks/RESULTS.md`.
On its own music the model stays lively (no test window collapsed at temperature 0.8), but its
spectrum drifts above the band within seconds. On recordings it finds surprising, temperature 0.8
fell into a drone in 26 of 48 test windows; with typical sampling at 0.9 as well, 13. Typical 0.9
for every prompt made its own music collapse instead, so the rule chosen on validation applies it
only to a prompt the model finds surprising. No rule tried (guidance by the prompt, Mirostat,
typical sampling; before them temperatures 0.7 to 0.9, a falling temperature, top-p, top-k and
re-anchoring) keeps more than a few percent of the windows in band, or more than 7% of takes nearer
their prompt than the model's own music.

![median flatness per 3 s window after the seam, per sampling rule](../../benchmarks/longform-intel-xeon-avx-512-amx-bf16.png)

## Known limits
- Continuations have the piano's timbre, its attacks and decays, and chords in the prompt's
  register; they have no phrase structure, and they drift toward hiss (see Long-form quality).
- Sampled code streams drift slowly away from zero under a signal that stays lively{drift}.
  `continue` removes the drift from what it writes (a 10 Hz high-pass) and records the offset it
  removed in the sidecar; takes where the offset dwarfs the signal are flagged `offset`.
- It knows one rendered GM piano playing four-part chorales. Other instruments, drums, voice or
  real recordings are out of its domain; `s4music check` says so.
- Trained on windows of at most 8 s, it has learned no structure longer than that.
- Stage 2 started from a float16 copy of stage 1's best weights (the copy that fitted the GPU
  machine's transfer limit) and was stopped by its time limit shortly before its last steps, at a
  learning rate near zero; the recipe does the same conversion and runs all its steps.

## Licenses
- Weights: Apache-2.0, like the toolkit.
- Training data: public-domain compositions from the music21 corpus, rendered with TimGM6mb
  (GPL-2); the example prompt `examples/prompt.wav` is the first 5 s of BWV 124.6 from the
  held-out test split, rendered the same way.
"""
    (args.model / "MODEL_CARD.md").write_text(card)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The exact recipe of the bundled model (s4music/assets/default-model) and the example prompt.
# Run from the repository root after `make install`; about two and a half hours on two CPU cores.
#
#   bash examples/train_default_model.sh            # WORK=/tmp/default by default
#
# `prepare` orders files for the split by a hash of their resolved paths, so the held-out test
# split is the shipped model's only when the audio lies where it did: keep WORK=/tmp/default.
set -euo pipefail
WORK=${WORK:-/tmp/default}
S4=.venv/bin/s4music

# 1. Open data: public-domain scores from the music21 corpus, rendered on the GM piano (TimGM6mb).
.venv/bin/python examples/corpus_midi.py "$WORK/midi" --chorales 150
$S4 render-midi "$WORK/midi" -o "$WORK/audio" --instrument piano --max-seconds 120
$S4 prepare "$WORK/audio" -o "$WORK/data" --seconds 4.096 --val 0.05 --test 0.05 --seed 0

# 2. Train (the configs hold every hyperparameter): from scratch on 0.5 s windows, then fine-tuned
#    on 2 s windows. Score the held-out test split and record it.
$S4 train --config examples/default_model.yaml --data "$WORK/data" --out "$WORK/run"
$S4 train --config examples/default_model_long.yaml --from "$WORK/run/best" --data "$WORK/data" --out "$WORK/run-long"
$S4 eval "$WORK/run-long/best" --data "$WORK/data" --split test --record --json > "$WORK/eval.json"

# 3. Ship: the best checkpoint (by validation NLL), its recommended sampling (chosen by listening
#    and by the spectral flatness of continuations), a 5 s prompt from a held-out test piece, and
#    the model card, written from the recorded figures.
rm -rf s4music/assets/default-model
cp -r "$WORK/run-long/best" s4music/assets/default-model
.venv/bin/python -c "from s4music.model.checkpoint import update_summary as u; \
u('s4music/assets/default-model', {'sampling': {'top_k': ${TOP_K:-2}}})"
ffmpeg -v error -y -i "$WORK/audio/chorale/bwv124.6.wav" -t 5 -ar 16000 -ac 1 examples/prompt.wav
make demo
cp demo/continuation.png examples/continuation.png
.venv/bin/python examples/write_model_card.py s4music/assets/default-model "$WORK/run" "$WORK/run-long" --demo demo/continuation.wav \
    --hardware "${HARDWARE:-2 CPU cores (AMD EPYC), no GPU}"

#!/usr/bin/env bash
# Build the training corpus from scratch on a clean machine (after `make install`), resumably:
# every step skips what an earlier run finished, so after a kill, run it again.
#
#   bash examples/corpus/build.sh                 # WORK=/tmp/corpus, all of it
#   COMPOSERS=bach,palestrina bash examples/corpus/build.sh   # a part of the music21 corpus
#   PARTS=20 bash examples/corpus/build.sh        # pack only 20 parts, each a random sample of all
#   SHARD=1/20 WORK=/tmp/corpus-1 bash examples/corpus/build.sh  # every 20th score, every recording: minutes
#
# First the soundfonts' and the recordings' Debian packages, then: 1. every music21 score of 20 s or
# more, as MIDI for a piano and for a small ensemble; 2. the real recordings; 3. the split by work
# (examples/corpus/splits.json, kept in the repository), fixed before anything is rendered; 4-5.
# FluidSynth renders with a seeded player's variation each; 6. the dataset of 8.192 s windows;
# 7. packed in parts of PART_MB MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/tmp/corpus}
SOUNDFONT=${SOUNDFONT:-musescore,fluidr3}  # one drawn per file (this order made the renders so far)
PART_MB=${PART_MB:-27}  # a GPU lease's call carries 64 MiB with the working tree (26 MiB; 35 with a models/wip)
PARTS=${PARTS:-}  # empty: every part (about 500 for the whole corpus; examples/corpus/README.md)
SHARD=${SHARD:-}  # i/n: export only every n-th score from the i-th (a WORK of its own for each shard)
WORKERS=${WORKERS:-$(nproc)}
S4=.venv/bin/s4music
PY=.venv/bin/python

packages="musescore-general-soundfont fluid-soundfont-gm hyperrogue-music drascula-music ufoai-music asc-music xblast-tnt-musics"
missing=""; for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

echo "== 1/7 scores to MIDI"
$PY examples/corpus/export_music21.py "$WORK/midi" --workers "$WORKERS" ${COMPOSERS:+--composers "$COMPOSERS"} \
    ${SHARD:+--shard "$SHARD"}
echo "== 2/7 recordings"
$PY examples/corpus/recordings.py "$WORK/audio/recordings"
echo "== 3/7 split by work"
$PY examples/corpus/make_splits.py "$WORK/midi" "$WORK/audio" -o examples/corpus/splits.json
echo "== 4/7 piano renders ($SOUNDFONT)"
$S4 render-midi "$WORK/midi/piano" -o "$WORK/audio/piano" --soundfont "$SOUNDFONT" --program piano --vary --seed 0 \
    --no-drums --max-seconds 600 --workers "$WORKERS"
echo "== 5/7 ensemble renders ($SOUNDFONT)"
$S4 render-midi "$WORK/midi/ensemble" -o "$WORK/audio/ensemble" --soundfont "$SOUNDFONT" --vary --seed 1 \
    --no-drums --max-seconds 600 --workers "$WORKERS"
echo "== 6/7 the dataset"
$S4 prepare "$WORK/audio" -o "$WORK/data" --seconds 8.192 --splits examples/corpus/splits.json
echo "== 7/7 packed"
$S4 pack "$WORK/data" -o "$WORK/pack" --part-mb "$PART_MB" --workers "$WORKERS" ${PARTS:+--max-parts "$PARTS"}

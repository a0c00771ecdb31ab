"""Audio-in throughput, as seconds of audio per wall-clock second.

  render-midi: real MIDI from the music21 corpus through FluidSynth; baseline: 1 worker.
  prepare:     real Ogg recordings (Debian's drascula-music) to a dataset; baseline: plain ffmpeg
               decoding and resampling of the same files to 16 kHz mono WAV (the conversion alone).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECORDINGS = Path("/usr/share/scummvm/drascula/audio")
PIECES = ["joplin/maple_leaf_rag", "bach/bwv66.6", "mozart/k80/movement1", "beethoven/opus18no1/movement2"]


def main() -> None:
    import soundfile as sf
    from music21 import corpus

    from s4music.data.midi import RenderOptions, render_midi
    from s4music.data.prepare import PrepareOptions, prepare

    work = Path(tempfile.mkdtemp(prefix="s4music-bench-"))
    midi = work / "midi"
    midi.mkdir()
    for name in PIECES:
        corpus.parse(name).write("midi", fp=str(midi / (name.replace("/", "_") + ".mid")))

    print("## Audio in\n")
    print("| stage | setting | audio s | wall s | audio s per s | vs baseline |")
    print("|---|---|---|---|---|---|")
    base = None
    for workers in (1, 2):
        t0 = time.perf_counter()
        report = render_midi([midi], work / f"render{workers}", RenderOptions(workers=workers, max_seconds=120))
        wall = time.perf_counter() - t0
        audio = sum(s for _, _, s in report.rendered)
        rate = audio / wall
        base = base or rate
        print(f"| render-midi | {workers} worker(s), {len(report.rendered)} files | {audio:.0f} | {wall:.1f} "
              f"| {rate:.1f} | {rate / base:.2f}x |")

    files = sorted(RECORDINGS.glob("*.ogg"))[:10]
    audio = sum(sf.info(str(f)).duration for f in files)
    t0 = time.perf_counter()
    for f in files:
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(f), "-ac", "1", "-ar", "16000",
                        str(work / (f.stem + ".wav"))], check=True)
    ffmpeg_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = prepare(files, work / "dataset", PrepareOptions())
    wall = time.perf_counter() - t0
    assert not report.failed, report.failed
    print(f"| prepare | {len(files)} Ogg files, 44.1 kHz stereo | {audio:.0f} | {wall:.1f} | {audio / wall:.0f} "
          f"| {ffmpeg_wall / wall:.2f}x |")
    print(f"| ffmpeg to 16 kHz mono WAV (baseline) | same files | {audio:.0f} | {ffmpeg_wall:.1f} "
          f"| {audio / ffmpeg_wall:.0f} | 1.00x |")


if __name__ == "__main__":
    sys.exit(main())

"""Audio-in throughput, as seconds of audio per wall-clock second.

  render-midi: real MIDI from the music21 corpus through FluidSynth; baseline: 1 worker. With
               MuseScore General's SF3 (where installed), 1 worker, against FluidSynth loading the
               SF3 itself for the same files (render-midi loads the SF2 decoded from it once).
  prepare:     real Ogg recordings (Debian's drascula-music) to a dataset; baseline: plain ffmpeg
               decoding and resampling of the same files to 16 kHz mono WAV (the conversion alone).
  pack:        that dataset's codes as one stream, through `s4music pack`'s filters (CPU time of one
               core, best of three); baseline: the LZMA2 setting it used before (preset 6's
               binary-tree match finder), on the same bytes, the order alternating from round to
               round. Then `pack` itself, 1 worker, in wall time.
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

    render_sf3(midi, work)

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
    pack_codes(work / "dataset", work / "pack")


def pack_codes(dataset: Path, out: Path) -> None:
    """Compression of a dataset's codes, with pack's LZMA2 filters against the ones it used before."""
    import lzma

    from s4music.data.format import read_meta
    from s4music.data.pack import LZMA_FILTERS, pack

    before = [LZMA_FILTERS[0], {"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 4, "lp": 0, "pb": 0}]
    codes = b"".join(f.read_bytes() for f in sorted(dataset.glob("*.u8")))
    audio = len(codes) / read_meta(dataset)["sample_rate"]
    settings = [("before", before), ("used", LZMA_FILTERS)]
    best = {name: float("inf") for name, _ in settings}
    bits = {}
    for r in range(3):
        for name, filters in settings[::-1] if r % 2 else settings:
            t0 = time.process_time()  # lzma compresses on one thread: CPU time, steady on a busy machine
            size = len(lzma.compress(codes, format=lzma.FORMAT_XZ, filters=filters))
            best[name] = min(best[name], time.process_time() - t0)
            bits[name] = 8 * size / len(codes)
    print(f"| pack's LZMA2, preset 6's match finder (baseline; CPU s) | {bits['before']:.3f} bits a sample | {audio:.0f} "
          f"| {best['before']:.1f} | {audio / best['before']:.0f} | 1.00x |")
    print(f"| pack's LZMA2, 3-byte hash chain (used; CPU s) | {bits['used']:.3f} bits a sample | {audio:.0f} "
          f"| {best['used']:.1f} | {audio / best['used']:.0f} | {best['before'] / best['used']:.2f}x |")
    t0 = time.perf_counter()
    parts = pack(dataset, out, part_mb=30, workers=1)
    wall = time.perf_counter() - t0
    packed = sum(p.hours for p in parts) * 3600
    print(f"| `pack` | 1 worker, {len(parts)} part(s), {sum(p.bytes for p in parts) / 2**20:.1f} MiB | {packed:.0f} "
          f"| {wall:.1f} | {packed / wall:.0f} | |")


def render_sf3(midi: Path, work: Path) -> None:
    """render-midi with an SF3 against FluidSynth loading the SF3 itself, one file at a time."""
    from s4music.data.midi import RenderOptions, filter_midi, render_midi
    from s4music.data.soundfont import playable
    from s4music.system import installed_soundfonts

    sf3 = installed_soundfonts().get("musescore")
    if sf3 is None or sf3.suffix != ".sf3":
        print("| render-midi, SF3 | skipped: MuseScore General's SF3 is not installed | | | | |")
        return
    playable(sf3)  # decoded once, outside the timing, as a corpus build does before its first file
    capped = work / "capped"  # at 120 s, as render-midi caps them, for both
    capped.mkdir()
    for f in sorted(midi.glob("*.mid")):
        filter_midi(f, None, True, 120)[0].save(str(capped / f.name))
    t0 = time.perf_counter()
    for f in sorted(capped.glob("*.mid")):
        subprocess.run(["fluidsynth", "-ni", "-q", "-r", "16000", "-o", "synth.dynamic-sample-loading=1", "-T", "wav",
                        "-F", str(work / "sf3.wav"), str(sf3), str(f)], check=True, capture_output=True)
    base_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = render_midi([capped], work / "render-sf3", RenderOptions(workers=1, soundfont="musescore", max_seconds=120))
    wall = time.perf_counter() - t0
    audio = sum(s for _, _, s in report.rendered)
    print(f"| FluidSynth loading the SF3 (baseline) | 1 process at a time, {len(report.rendered)} files | {audio:.0f} "
          f"| {base_wall:.1f} | {audio / base_wall:.1f} | 1.00x |")
    print(f"| render-midi, MuseScore SF3 decoded once | 1 worker, {len(report.rendered)} files | {audio:.0f} "
          f"| {wall:.1f} | {audio / wall:.1f} | {base_wall / wall:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())

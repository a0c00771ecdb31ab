"""Export every score of the music21 corpus that plays for at least 20 s to MIDI, twice.

    python examples/corpus/export_music21.py OUT [--composers bach,mozart] [--workers 2] [--shard 1/20]

OUT/piano/COMPOSER/...mid      the score as it is (render-midi --program piano plays it on a piano)
OUT/ensemble/COMPOSER/...mid   each part on a General MIDI program of a small ensemble: strings for
                               quartets, a choir or an organ for vocal music, a mixed band otherwise

A book (an ABC file of many tunes, such as O'Neill's 1850 tunes) becomes a folder of numbered tunes,
`piano/oneills1850/0001-0050/0001.mid`, with ensemble/.../book.json written last. A score whose
repeats music21 cannot unfold is played once through.

Paths mirror the corpus (`bach/bwv66.6.mxl` -> `piano/bach/bwv66.6.mid`), so a re-run skips what is
done and `s4music.data.corpus.work_of` finds each file's work. Scores too short or that music21
cannot export are listed with the reason in OUT/not_exported.jsonl, and a re-run skips them too
(delete the file to try them again). Eight works are in the corpus twice, as Humdrum and as
MusicXML (or in two MusicXML files): each is exported once, from MusicXML. The scores are public domain;
music21's corpus is distributed under its own open license.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from s4music.data.progress import time_left
from s4music.files import AtomicFile, atomic_path
from s4music.options import OptionError, Shard, parse_shard

MIN_SECONDS = 20.0
ENCODINGS = (".mxl", ".musicxml", ".xml")  # of a work the corpus holds twice, the one exported: MusicXML first
QUARTET = (40, 40, 41, 42)  # violin, violin, viola, cello
VOCAL = {"bach", "palestrina", "monteverdi", "trecento", "josquin", "ciconia", "luca", "lusitano"}
VOICES = (52, 53)  # choir aahs, voice oohs
ORGAN = (19, 20)  # church organ, reed organ
BAND = (40, 73, 71, 42, 68, 70, 60, 46)  # violin, flute, clarinet, cello, oboe, bassoon, horn, harp


def ensemble_programs(rel: str, parts: int) -> list[int]:
    """A General MIDI program per part, fixed by the score's path."""
    rng = random.Random(rel)
    composer = rel.split("/", 1)[0]
    if parts == 4 and composer in {"beethoven", "mozart", "haydn"}:
        return list(QUARTET)
    if composer in VOCAL:
        return [rng.choice(VOICES if rng.random() < 0.5 else ORGAN)] * parts
    start = rng.randrange(len(BAND))
    return [BAND[(start + i) % len(BAND)] for i in range(parts)]


def with_programs(src: Path, dest: Path, rel: str) -> None:
    """A copy of the MIDI file with each track's channel on its part's program."""
    import mido

    midi = mido.MidiFile(str(src))
    tracks = [t for t in midi.tracks if any(m.type == "note_on" for m in t)]
    programs = ensemble_programs(rel, len(tracks))
    for track, program in zip(tracks, programs, strict=True):
        channels = sorted({m.channel for m in track if m.type == "note_on"})
        kept = [m for m in track if m.type != "program_change"]
        if kept and kept[0].time:  # the program changes go first, at time 0
            kept[0] = kept[0].copy()
        track[:] = [mido.Message("program_change", channel=c, program=program, time=0) for c in channels] + kept
    midi.save(str(dest))


def midi_path(out: str, rendering: str, rel: str) -> Path:
    """Where a score's MIDI for a rendering ("piano" or "ensemble") goes: its corpus path, mirrored."""
    return Path(out) / rendering / Path(rel).with_suffix(".mid")


def ensemble_path(job: tuple[str, str, str]) -> Path:
    """The last file a score's export writes: where it exists, the score is done."""
    _, rel, out = job
    return midi_path(out, "ensemble", rel)


def book_path(job: tuple[str, str, str]) -> Path:
    """The record a book's export writes last (a corpus file of many scores, such as an ABC book)."""
    _, rel, out = job
    return Path(out) / "ensemble" / Path(rel).with_suffix("") / "book.json"


def _without_repeats(score) -> None:
    """Drop the repeat signs music21 cannot unfold, so the score plays once through."""
    from music21 import bar, repeat, spanner

    for measure in score.recurse().getElementsByClass("Measure"):
        for side in ("leftBarline", "rightBarline"):
            if isinstance(getattr(measure, side), bar.Repeat):
                setattr(measure, side, None)
    for mark in list(score.recurse().getElementsByClass((repeat.RepeatExpression, spanner.RepeatBracket))):
        mark.activeSite.remove(mark)


def export_score(score, rel: str, out: str) -> str:
    """Write one score's two MIDI files; "ok", "short", or "once" (played without its repeats, which
    music21 could not unfold)."""
    import mido
    from music21 import repeat

    piano = AtomicFile(midi_path(out, "piano", rel))  # a hidden temporary, removed if the score fails
    try:
        status = "ok"
        try:
            score.write("midi", fp=str(piano.tmp))
        except repeat.ExpanderException:
            _without_repeats(score)
            score.write("midi", fp=str(piano.tmp))
            status = "once"
        if mido.MidiFile(str(piano.tmp)).length < MIN_SECONDS:
            return "short"
        piano.commit()
    finally:
        piano.abort()
    with atomic_path(midi_path(out, "ensemble", rel)) as tmp:
        with_programs(piano.path, tmp, rel)
    return status


def _reason(e: Exception) -> str:
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def export(job: tuple[str, str, str]) -> tuple[str, str]:
    """Export one corpus file; (its path under the corpus, "ok", "once", "short", or the reason it
    failed). A book (an ABC file of many tunes) becomes a folder, a pair of files per tune."""
    path, rel, out = job
    from music21 import converter, stream

    try:
        score = converter.parse(path)
        if not isinstance(score, stream.Opus):
            return rel, export_score(score, rel, out)
        counts: dict[str, int] = {}
        for i, tune in enumerate(score.scores, 1):
            try:
                kind = export_score(tune, f"{Path(rel).with_suffix('')}/{i:04d}{Path(rel).suffix}", out)
            except Exception:  # one tune music21 cannot export, counted in book.json
                kind = "failed"
            counts[kind] = counts.get(kind, 0) + 1
        marker = book_path(job)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"scores": len(score.scores), **counts}) + "\n")
    except Exception as e:  # a file music21 cannot read or export is reported, not fatal
        return rel, _reason(e)
    if counts.get("ok", 0) + counts.get("once", 0):
        return rel, "ok"
    return rel, "short" if counts.get("short") else f"failed: no tune of {len(score.scores)} exported"


def timed_export(job: tuple[str, str, str]) -> tuple[str, str, float]:
    """`export`, and the seconds it took."""
    start = time.monotonic()
    return (*export(job), time.monotonic() - start)


class TimeLeft:
    """How long the files not yet exported will take: each format's seconds per byte so far (a
    MusicXML byte reads far faster than an ABC or Humdrum byte), shared among the workers."""

    def __init__(self, paths: list[str], workers: int):
        self.workers = workers
        self.size = {path: os.path.getsize(path) for path in paths}
        self.bytes_left: dict[str, int] = defaultdict(int)
        self.spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # format -> [seconds, bytes]
        for path, size in self.size.items():
            self.bytes_left[Path(path).suffix.lower()] += size

    def done(self, path: str, seconds: float) -> None:
        kind = Path(path).suffix.lower()
        self.bytes_left[kind] -= self.size[path]
        self.spent[kind][0] += seconds
        self.spent[kind][1] += self.size[path]

    def __call__(self) -> float:
        overall = sum(s for s, _ in self.spent.values()) / max(1.0, sum(b for _, b in self.spent.values()))
        per_byte = {f: s / b if b else overall for f, (s, b) in self.spent.items()}
        return sum(n * per_byte.get(f, overall) for f, n in self.bytes_left.items()) / self.workers


def corpus_jobs(paths: list[Path], out: str, wanted: set[str], shard: Shard | None = None) -> list[tuple[str, str, str]]:
    """(path, its corpus path, out) for each score of the `wanted` folders (all if empty), in order
    of corpus path; with `shard`, only those at its positions. A work the corpus holds twice
    (bach/bwv277.krn and .mxl) would write one MIDI from whichever finished last: it is exported
    once, from the first of ENCODINGS it is in."""
    jobs = {}
    rank = {suffix: i for i, suffix in enumerate(ENCODINGS)}
    for p in sorted(map(Path, paths), key=lambda p: (rank.get(p.suffix, len(ENCODINGS)), str(p))):
        rel = str(p).split("/corpus/", 1)[1]
        if rel.endswith(".rntxt") or (wanted and rel.split("/", 1)[0] not in wanted):
            continue  # roman-numeral analyses are not scores
        jobs.setdefault(midi_path(out, "piano", rel), (str(p), rel, out))
    ordered = sorted(jobs.values(), key=lambda job: job[1])
    return [job for position, job in enumerate(ordered) if shard is None or shard.owns(position)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--composers", default="", help="Comma-separated corpus folders (default: all).")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard", help="i/n: only every n-th score from the i-th, in corpus order (within the "
                                        "--composers folders): a quick sample of the whole; the shards add up to it")
    args = parser.parse_args()
    try:
        shard = parse_shard(args.shard) if args.shard else None
    except OptionError as e:
        parser.exit(2, f"{e}\n")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from music21 import corpus

    jobs = corpus_jobs(corpus.getPaths(), str(args.out), set(filter(None, args.composers.split(","))), shard)
    skipped_log = args.out / "not_exported.jsonl"
    skipped = {}
    if skipped_log.exists():
        text = skipped_log.read_text()
        if text and not text.endswith("\n"):  # a kill cut the last line short: new lines start afresh
            with skipped_log.open("a") as log:
                log.write("\n")
        for line in text.splitlines():
            with contextlib.suppress(ValueError, KeyError):  # a line cut short by a kill
                row = json.loads(line)
                skipped[row["score"]] = row["reason"]
    counts: dict[str, int] = {}
    todo = []
    for job in jobs:
        done_before = ensemble_path(job).exists() or book_path(job).exists()
        kind = "ok" if done_before else skipped.get(job[1], "").split(":")[0]
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
        else:
            todo.append(job)
    done = len(jobs) - len(todo)
    time_to_go = TimeLeft([job[0] for job in todo], args.workers)
    # the largest first (a book of a thousand tunes takes minutes), so none is left to run alone at the end
    todo.sort(key=lambda job: -time_to_go.size[job[0]])
    start, said = time.monotonic(), 0.0
    args.out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.workers) as pool, skipped_log.open("a") as log:
        futures = {pool.submit(timed_export, job): job for job in todo}
        for i, future in enumerate(as_completed(futures), 1):
            rel, status, seconds = future.result()
            time_to_go.done(futures[future][0], seconds)
            kind = status.split(":")[0]
            counts[kind] = counts.get(kind, 0) + 1
            if kind not in ("ok", "once"):
                log.write(json.dumps({"score": rel, "reason": status}) + "\n")
                log.flush()
            if kind == "failed":
                logging.warning("%s %s", rel, status)
            elapsed = time.monotonic() - start
            if elapsed - said >= 30 or i == len(todo):  # a line every 30 s: readable in a log file too
                said = elapsed
                logging.info("%d/%d scores %s, %s left", done + i, len(jobs), counts, time_left(time_to_go()))
    if not todo:
        logging.info("%d/%d scores done by an earlier run %s", done, len(jobs), counts)


if __name__ == "__main__":
    main()

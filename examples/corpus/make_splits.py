"""Write the corpus's split file: whole works to train, val or test (s4music.data.corpus).

    python examples/corpus/make_splits.py MIDI_DIR AUDIO_DIR -o examples/corpus/splits.json

Files are named by their path under the folder given (as `prepare` names them), a MIDI file by the
WAV `render-midi` makes of it (`MIDI_DIR/piano/bach/bwv66.6.mid` is `piano/bach/bwv66.6.wav`), so
the split is fixed from the exported scores before a single one is rendered.

The bundled model's chorale val and test pieces (examples/default_model_splits.json) keep their
splits, so the old and new models are compared on the same held-out works. An existing split file
is kept as it is: new files of works it holds join them, new works are placed by the rule, and
files it lists that this run did not find stay listed (a build of part of the corpus).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from s4music.data.corpus import split_by_work, work_of
from s4music.data.midi import find_midi
from s4music.data.prepare import find_audio
from s4music.files import atomic_path

OLD_SPLITS = Path(__file__).resolve().parents[1] / "default_model_splits.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", type=Path, nargs="+", help="Folders of audio files, or of MIDI files to render.")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--val", type=float, default=0.05)
    parser.add_argument("--test", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for source in args.sources:  # a mistyped folder would add its own name to the file, for good
        if not source.is_dir():
            parser.error(f"{source}: not a folder")
    names = sorted({*(name for _, _, name in find_audio(args.sources)),
                    *(rel.with_suffix(".wav").as_posix() for _, rel in find_midi(args.sources))})
    old = json.loads(OLD_SPLITS.read_text())
    # chorale/bwv254.wav was the music21 score bach/bwv254 (any rendering folder names the same work)
    pinned = {f"chorale/bach/{Path(n).name}": split for split in ("val", "test") for n in old[split]}
    kept = json.loads(args.out.read_text()) if args.out.exists() else {}
    for split, listed in kept.items():
        pinned.update(dict.fromkeys(listed, split))
    placed = split_by_work(names, args.val, args.test, args.seed, pinned)
    # a build of part of the corpus adds to the file and takes nothing out of it
    splits = {s: sorted({*placed[s], *kept.get(s, [])}) for s in placed}
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(splits, indent=0) + "\n")
    works = {s: len({work_of(n) for n in v}) for s, v in splits.items()}
    print(f"{args.out}: " + ", ".join(f"{s} {len(v)} files of {works[s]} works" for s, v in splits.items()))


if __name__ == "__main__":
    main()

"""Export public-domain scores from the music21 corpus to MIDI: the default model's training data.

    python examples/corpus_midi.py OUT_DIR [--chorales N]

Writes OUT_DIR/chorale/*.mid (Bach four-part chorales) and OUT_DIR/joplin/*.mid (Joplin rags).
The scores are public domain; music21's corpus is distributed under its own open license.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from music21 import corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--chorales", type=int, default=150)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    chorales = sorted(p for p in corpus.getComposer("bach") if p.name.startswith("bwv"))[: args.chorales]
    for folder, paths in (("chorale", chorales), ("joplin", corpus.getComposer("joplin"))):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
        for path in paths:
            dest = args.out / folder / f"{path.stem}.mid"
            if dest.exists():
                continue
            try:
                corpus.parse(str(path)).write("midi", fp=str(dest))
            except Exception as e:  # a score music21 cannot export is skipped, not fatal
                logging.warning("skipped %s: %s", path.name, e)
    logging.info("wrote %d MIDI files under %s", len(list(args.out.rglob("*.mid"))), args.out)


if __name__ == "__main__":
    main()

"""Gather the real recordings the corpus may use, from Debian packages, as files `prepare` reads.

    python examples/corpus/recordings.py OUT

Only these packages: hyperrogue-music, drascula-music, ufoai-music, asc-music, xblast-tnt-musics.
Every other Debian music package is held out for independent evaluation and is never read here.
OUT/PACKAGE/NAME.EXT: Ogg and MP3 files are linked as they are; UFO:AI's music is read out of its
zip archive (music/*.ogg entries only, by their base names, so no entry can write outside OUT);
XBlast's songs are raw unsigned 8-bit mono at 22,050 Hz and are written as WAV.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import soundfile as sf

PACKAGES = {
    "hyperrogue": "/usr/share/hyperrogue/music",
    "drascula": "/usr/share/scummvm/drascula/audio",
    "asc": "/usr/share/games/asc/music",
    "ufoai": "/usr/share/games/ufoai/base/0music.pk3",
    "xblast": "/usr/share/games/xblast-tnt/sounds",
}
XBLAST_RATE = 22050


def gather(out: Path) -> list[Path]:
    written = []
    for name, where in PACKAGES.items():
        src, dest = Path(where), out / name
        if not src.exists():
            print(f"missing: {where} (apt-get install the package)", file=sys.stderr)
            continue
        dest.mkdir(parents=True, exist_ok=True)
        if name == "ufoai":
            with zipfile.ZipFile(src) as archive:
                for entry in archive.namelist():
                    base = os.path.basename(entry)
                    if not (entry.startswith("music/") and base.endswith(".ogg")) or base in ("", ".", ".."):
                        continue
                    target = dest / base
                    if not target.exists():
                        tmp = target.with_suffix(".part")
                        tmp.write_bytes(archive.read(entry))
                        tmp.replace(target)
                    written.append(target)
        elif name == "xblast":
            for raw in sorted(src.glob("*.raw")):
                target = dest / f"{raw.stem}.wav"
                if not target.exists():
                    pcm = (np.frombuffer(raw.read_bytes(), dtype=np.uint8).astype(np.float32) - 128) / 128
                    sf.write(str(target.with_suffix(".part.wav")), pcm, XBLAST_RATE)
                    target.with_suffix(".part.wav").replace(target)
                written.append(target)
        else:
            for f in sorted(p for p in src.iterdir() if p.suffix in (".ogg", ".mp3")):
                target = dest / f.name
                if not target.exists():
                    target.symlink_to(f)
                written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    files = gather(parser.parse_args().out)
    print(f"{len(files)} recordings")


if __name__ == "__main__":
    main()

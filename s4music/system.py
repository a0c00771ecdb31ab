"""The machine around the toolkit: the external programs it uses (ffmpeg, FluidSynth, a General
MIDI soundfont, a JavaScript runtime for yt-dlp's YouTube support) and the C allocator."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

# The General MIDI soundfonts of Debian's packages, by name, best first. FluidR3 GM (141 MB) comes
# first by a measurement (examples/corpus/README.md): of the same chorale on each one's piano, its
# share of energy above 4 kHz (1.1%) and spectral flatness (0.0036) lie nearest those of the real
# recordings the corpus may use (median 0.30% and 0.0055); MuseScore General (a 38 MB sf3) is far
# darker (0.01%, 0.0001), and so is TimGM6mb (6 MB, the bundled model's first training data).
SOUNDFONTS = {
    "fluidr3": ("fluid-soundfont-gm", ["/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/soundfonts/FluidR3_GM.sf2"]),
    "musescore": ("musescore-general-soundfont", ["/usr/share/sounds/sf3/MuseScore_General.sf3",
                                                  "/usr/share/sounds/sf3/MuseScore_General_Full.sf3",
                                                  "/usr/share/sounds/sf2/MuseScore_General.sf2"]),
    "timgm6mb": ("timgm6mb-soundfont", ["/usr/share/sounds/sf2/TimGM6mb.sf2"]),
}


class SoundfontError(ValueError):
    pass


def program_version(name: str) -> str | None:
    """First line of `name -version`/`--version`, or None when the program is not installed."""
    path = shutil.which(name)
    if path is None:
        return None
    for flag in ("-version", "--version"):
        try:
            out = subprocess.run([path, flag], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = (out.stdout or out.stderr).strip()
        if out.returncode == 0 and text:
            return text.splitlines()[0]
    return path


def installed_soundfonts() -> dict[str, Path]:
    """{name: file} of the named soundfonts installed here, best first."""
    found = {}
    for name, (_, paths) in SOUNDFONTS.items():
        hit = next((Path(p) for p in paths if Path(p).is_file()), None)
        if hit is not None:
            found[name] = hit.resolve()
    return found


def find_soundfont(name: str | Path | None = None) -> Path | None:
    """The soundfont `name` names (a file, or a name of SOUNDFONTS); without one, the best installed,
    else any .sf2/.sf3 under Debian's soundfont folders. An unknown or missing name raises
    SoundfontError, naming the installed ones."""
    installed = installed_soundfonts()
    if name is not None:
        if Path(name).is_file():
            return Path(name)
        key = str(name).lower()
        if key in installed:
            return installed[key]
        names = ", ".join(installed) or "none"
        if key in SOUNDFONTS:
            raise SoundfontError(f"soundfont {name!r} is not installed (apt-get install {SOUNDFONTS[key][0]}); "
                                 f"installed: {names}")
        raise SoundfontError(f"{name}: no such soundfont file or name; installed names: {names}")
    if installed:
        return next(iter(installed.values()))
    for root in ("/usr/share/sounds/sf2", "/usr/share/sounds/sf3", "/usr/share/soundfonts"):
        found = sorted(p for p in Path(root).glob("*.sf[23]")) if Path(root).is_dir() else []
        if found:
            return found[0]
    return None


def bundled_deno() -> str | None:
    """The Deno binary of the `deno` package (a dependency of s4music), or None where it is absent."""
    try:
        import deno
    except ImportError:
        return None
    path = deno.find_deno_bin()
    return str(path) if path and Path(path).is_file() else None


def js_runtimes() -> dict[str, str]:
    """JavaScript runtimes yt-dlp can use for YouTube, as {name: path}, by yt-dlp's own version rules:
    the Deno that ships with s4music first (so it works without the venv on PATH), then PATH's."""
    import yt_dlp  # noqa: F401  (registers the runtimes)
    from yt_dlp.globals import supported_js_runtimes

    usable = {}
    candidates = [("deno", bundled_deno())] + [(name, None) for name in supported_js_runtimes.value]
    for name, path in candidates:
        if name in usable:
            continue
        info = supported_js_runtimes.value[name](path).info
        if info is not None and info.supported:
            usable[name] = info.path
    return usable


def js_runtime_report() -> tuple[bool, str]:
    """(usable, description) for `s4music doctor`."""
    usable = js_runtimes()
    if usable:
        return True, ", ".join(f"{name} ({path})" for name, path in usable.items())
    import yt_dlp  # noqa: F401
    from yt_dlp.globals import supported_js_runtimes

    too_old = [f"{n} {i.version}" for n, r in supported_js_runtimes.value.items() if (i := r().info) is not None]
    hint = "reinstall s4music (it ships deno), or install deno (2.3+) or node (22+)"
    return False, (f"only unsupported versions found ({', '.join(too_old)}); {hint}" if too_old else f"none; {hint}")


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Have glibc keep freed blocks of up to `limit` bytes for reuse instead of unmapping them.

    By default glibc maps each block over 32 MB afresh and unmaps it when it is freed, so every
    large tensor pays a page fault per 4 KB page on first touch, and reading a long prompt allocates
    hundreds of such tensors (benchmarks/RESULTS.md measures both settings). Keeping them raises
    peak memory and changes the whole process, so the CLI's inference commands call this and the
    library never does. False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))
    except (OSError, AttributeError):
        return False

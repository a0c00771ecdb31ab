"""Start-up of the command line: what a user waits on before anything is done.

`s4music --help`, `s4music continue --help` (the command with the most options), `s4music train
--help` and `s4music models`, each in a fresh interpreter as the console script runs, beside the
import of typer and rich (which every command needs) in a fresh interpreter in the same run,
interleaved, so a busy machine slows both alike. Bound: each at most 8x that import (the median
of each over the baseline's median). The target behind it, 0.5 s, holds on a quiet 2-core machine;
on a shared one the absolute times move with the load, the ratio much less.

    python benchmarks/bench_cli.py            # 15 rounds
    python benchmarks/bench_cli.py --quick    # 5
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from common import ROOT, cpu, parse_args

BASELINE = "typer and rich imported (`python -c \"import typer, rich\"`)"
COMMANDS = {
    BASELINE: ["-c", "import typer, rich"],
    "`s4music --help`": ["-m", "s4music.cli", "--help"],
    "`s4music continue --help`": ["-m", "s4music.cli", "continue", "--help"],
    "`s4music train --help`": ["-m", "s4music.cli", "train", "--help"],
    "`s4music models`": ["-m", "s4music.cli", "models"],
}
BOUND_RATIO = 8.0


def wall(args: list[str]) -> float:
    """Seconds from starting a fresh interpreter to its exit (run from the checkout, so its s4music)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "COLUMNS": "100"})
    return time.perf_counter() - started


def main() -> None:
    args = parse_args({})
    if args is None:
        return
    rounds = 5 if args.quick else 15
    for argv in COMMANDS.values():  # once, untimed: the file cache warm for every one alike
        wall(argv)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(rounds):
        for name, argv in COMMANDS.items():
            times[name].append(wall(argv))
    name, features = cpu()
    base_best, base_median = min(times[BASELINE]), statistics.median(times[BASELINE])
    print("## Start-up of the command line\n")
    print(f"CPU: {name}, {os.cpu_count()} cores. Each a fresh interpreter, {rounds} rounds interleaved; "
          f"bound: at most {BOUND_RATIO:g}x the import of typer and rich measured in the same run.\n")
    print("| what | best s | median s | best / baseline's best | median / baseline's median | bound |")
    print("|---|---|---|---|---|---|")
    for what, seconds in times.items():
        best, median = min(seconds), statistics.median(seconds)
        if what == BASELINE:
            verdict = "baseline"
        else:
            verdict = "holds" if median <= BOUND_RATIO * base_median else "missed"
        print(f"| {what} | {best:.3f} | {median:.3f} | {best / base_best:.1f}x | {median / base_median:.1f}x "
              f"| {verdict} |")
    print(f"\nThe bound is judged on the medians: at most {BOUND_RATIO:g}x the baseline's.")


if __name__ == "__main__":
    main()

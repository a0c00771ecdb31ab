"""Jam: how fast the state follows live input, and how soon the model answers and stops.

  - following: seconds of input the state takes per wall second, in the aligned blocks jam uses
    (prefill from a state) and by teacher forcing through the fused step (what is left when an
    answer starts), default and bundled models; beside stepping the plain model, the baseline;
  - answer latency: wall time from the block that completes --wait to the answer's first block
    ready (the pending input taken by teacher forcing, then 20 ms sampled), with the most input
    pending that jam ever leaves (one aligned block less a sample) and with half of it;
  - end-of-answer latency: the block in which the player returns is the answer's last (faded):
    20 ms of audio plus the wall time to sample and fade it.

    python benchmarks/bench_jam.py [--quick]
"""

from __future__ import annotations

import time

from common import parse_args, run_child

SR = 16000


def following(which: str, seconds: float) -> dict:
    import torch

    from s4music.jam import Jam, JamOptions
    from s4music.model import DEFAULT_MODEL, SaShiMi, load_model
    from s4music.system import keep_freed_memory

    keep_freed_memory()
    torch.manual_seed(0)
    net = load_model(DEFAULT_MODEL) if which == "bundled" else SaShiMi().eval()
    codes = torch.randint(0, 256, (int(seconds * SR) + 8192,))
    jam = Jam(net, JamOptions())
    out = {"align": jam.align, "step": jam.stepper.name}
    jam._take(codes[: 2 * jam.align], forced=False)  # warm: the recurrences are built
    for name, forced in (("prefill", False), ("forced", True)):
        t0, done = time.perf_counter(), 0
        while done < seconds * SR:
            piece = codes[done : done + 2 * jam.align] if not forced else codes[done : done + 2000]
            jam._take(piece, forced=forced)
            done += len(piece)
        out[name] = done / SR / (time.perf_counter() - t0)
    return out


def latency() -> dict:
    import torch

    from s4music.jam import Jam, JamOptions
    from s4music.model import DEFAULT_MODEL, load_model

    net = load_model(DEFAULT_MODEL)
    out = {}
    for pending in ("most", "half"):
        jam = Jam(net, JamOptions(seed=0))
        n = jam.align - 1 if pending == "most" else jam.align // 2  # while quiet, one aligned unit at most
        jam._take(torch.randint(0, 256, (jam.align,)), forced=False)
        jam.pending = [torch.randint(0, 256, (n,))]
        jam.quiet_since, jam.armed = 0, True
        t0 = time.perf_counter()
        jam._start_answer(0)
        jam._answer_block(320, ended=None)
        out[f"answer_{pending}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        jam._answer_block(320, ended="player returned")
        out[f"end_{pending}"] = time.perf_counter() - t0
    return out


def main() -> None:
    args = parse_args({"follow": following, "latency": latency})
    if args is None:
        return
    seconds = 4.0 if args.quick else 16.0
    print("## Jam: following live input, answering, stopping (CPU)\n")
    print("| model | aligned blocks by prefill: input s per s | teacher forcing (fused step): input s per s | "
          "target |")
    print("|---|---|---|---|")
    for which in ("default", "bundled"):
        r = run_child(__file__, "follow", which=which, seconds=seconds)
        if "error" in r:
            print(f"| {which} | failed: {r['error']} | | |")
            continue
        name = "paper's default config (DPLR)" if which == "default" else "bundled (S4D)"
        print(f"| {name}, blocks of {2 * r['align']} samples, {r['step']} | {r['prefill']:.2f} | {r['forced']:.2f} "
              "| at least 2 |")
    r = run_child(__file__, "latency")
    if "error" in r:
        print(f"\nlatency: failed: {r['error']}")
        return
    print("\nBundled model, wall time to the answer's first 20 ms block after --wait (the pending input taken "
          f"first): {r['answer_most']:.3f} s with the most input jam leaves pending, {r['answer_half']:.3f} s "
          "with half of it (target: under 0.3 s). End of an answer: 0.020 s of audio (the faded block) plus "
          f"{r['end_most']:.3f} s to sample it (target: under 0.1 s).")


if __name__ == "__main__":
    main()

"""A/B the fused CPU step of a git revision against the working tree's, in one process.

A change to the fused step (s4music/model/csrc) moves its speed by a few to tens of percent, less than this shared
machine drifts between runs. So both builds run here, interleaved (A B, then B A, ...), each
keeping its best, after a check that they compute the same: the codes they sample and the logits
they give for the same inputs.

    python benchmarks/ab_fused_step.py --base HEAD~1                 # bundled model, 8 variations, fp16
    python benchmarks/ab_fused_step.py --base main --batch 1 --full-weights --rounds 8
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from s4music.model import DEFAULT_MODEL, load_model
from s4music.model.fast import SOURCE, FusedStep, build_extension
from s4music.system import keep_freed_memory


def source_at(revision: str, directory: Path) -> Path:
    """The fused step's sources as they were at `revision` (csrc/, or the one fast_step.cpp it was
    before the split), written into `directory`; returns its fast_step.cpp."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root).stdout

    csrc = SOURCE.parent.relative_to(root).as_posix()
    files = git("ls-tree", "--name-only", f"{revision}:{csrc}").split() if git(
        "ls-tree", "--name-only", revision, csrc + "/").strip() else []
    for name in files or ["fast_step.cpp"]:
        path = f"{csrc}/{name}" if files else SOURCE.parents[1].relative_to(root).as_posix() + "/fast_step.cpp"
        (directory / name).write_text(git("show", f"{revision}:{path}"))
    return directory / SOURCE.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision whose fused step is A (B: the working tree's)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--batch", type=int, default=8, help="variations stepped together")
    parser.add_argument("--steps", type=int, default=0, help="samples a timed run (default: 1 s of audio / batch)")
    parser.add_argument("--rounds", type=int, default=6, help="timed runs of each build")
    parser.add_argument("--full-weights", action="store_true", help="float32 linear weights instead of half")
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI's inference commands run

    with tempfile.TemporaryDirectory(prefix="s4music-ab-") as tmp:
        try:
            base = source_at(args.base, Path(tmp))
        except subprocess.CalledProcessError as e:
            parser.error(f"--base {args.base}: {e.stderr.strip().splitlines()[-1]}")
        builds = {"A": build_extension(base), "B": build_extension(SOURCE)}
    model = load_model(args.model)
    rate = model.audio.sample_rate
    steps = args.steps or rate // args.batch
    _, state = model.prefill(torch.randint(0, 256, (args.batch, 2048), generator=torch.Generator().manual_seed(0)))
    fused = {k: FusedStep(model, half=not args.full_weights, extension=ext) for k, ext in builds.items()}
    first = torch.full((args.batch,), model.config.n_codes // 2)

    uniforms = torch.rand(args.batch, 300, generator=torch.Generator().manual_seed(1))
    sampled = {k: f.run(first, state.repeat(1), uniforms)[0] for k, f in fused.items()}
    logits = {k: f.run(first, state.repeat(1), uniforms, forced=sampled["A"])[2] for k, f in fused.items()}
    print(f"same codes for 300 samples: {torch.equal(sampled['A'], sampled['B'])}; "
          f"largest logit difference: {(logits['A'] - logits['B']).abs().max().item():.2e}")

    best = dict.fromkeys(fused, 0.0)
    for r in range(args.rounds):
        for k in ("A", "B") if r % 2 == 0 else ("B", "A"):
            s = state.repeat(1)
            t0 = time.perf_counter()
            fused[k].run(first, s, torch.rand(args.batch, steps))
            best[k] = max(best[k], args.batch * steps / (time.perf_counter() - t0) / rate)
    print(f"\n| build | × real time at batch {args.batch} (all variations), best of {args.rounds} | vs A |")
    print("|---|---|---|")
    for k, name in (("A", f"A: {args.base}"), ("B", "B: working tree")):
        print(f"| {name} | {best[k]:.3f} | {best[k] / best['A']:.3f}x |")


if __name__ == "__main__":
    main()

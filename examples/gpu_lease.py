"""Grow the model on a GPU lease: one prepared entry for a fresh GPU machine that has torch and
nothing of ours (run from the repository root, which travels to it).

    python examples/gpu_lease.py unpack .lease/pack            # parts carried by this call, into the data folder
    python examples/gpu_lease.py run --out $OUT --minutes 8     # (compare,) train, write the weights
    python examples/gpu_lease.py join LEASE_FILES models/wip --half   # here, afterwards: the checkpoint

A lease carries at most 64 MiB a call, the working tree included, so the corpus travels as packed
parts (`s4music pack`), one a call, each in a folder beside a copy of its pack.json; `unpack`
decompresses what a call carried into the data folder (/tmp/s4music-lease/data, or
$S4MUSIC_LEASE_DATA), which stays while the machine is warm. `run` then:
  1. unpacks the parts given with --pack, if any (with none at all, it stops: train on data);
  2. compares today's training step with the fast ones, by FFT and by chunked convolutions, over
     300 steps beside the noise between two initialisations of the fast step (benchmarks/bench_gpu.py
     --only fast), and chooses the faster convolution; but only if neither
     benchmarks/RESULTS.md nor an earlier call on this machine made that choice for this GPU model;
  3. fine-tunes the best model so far (models/wip if it exists, else the bundled model) for the
     minutes left: a warm restart with a fresh optimizer, a short warm-up and a cosine decay planned
     by `--max-minutes`, the fast step with the chosen convolution, bf16 autocast;
  4. writes the best weights (by validation bits/sample) to OUT in files of at most 16 MiB, with the
     run's log and its figures (lease.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("S4MUSIC_LEASE_DATA", "/tmp/s4music-lease/data"))
WIP = ROOT / "models" / "wip"
BUNDLED = ROOT / "s4music" / "assets" / "default-model"
SHARD_BYTES = 15 * 2**20  # under the 16 MiB a returned file may hold
# Where RESULTS.md records a GPU model's comparison, and the convolution it chose for training there.
MARKER = "<!-- fast-train v2: {gpu}; conv_chunk {chunk} -->"
MIN_STEPS = 10  # timed steps each fast leg needs before its speed decides anything
# A comparison made by an earlier call on this machine (it stays while the machine is warm), so that
# the calls of one lease compare once: RESULTS.md gains its record only after the lease.
COMPARED = DATA.parent / "compared.json"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def unpack_parts(pack: Path) -> list[Path]:
    """The parts this call carried (those present beside the index), into the data folder."""
    from s4music.data.pack import PackError, unpack

    carried = sorted(p.stem for p in pack.glob("part-*.s4pack"))
    if not carried:
        raise PackError(f"{pack}: no part-*.s4pack here (a call carries its parts beside their pack.json)")
    started = time.perf_counter()
    done = unpack(pack, DATA, only=carried)
    log(f"unpacked {len(done)} parts from {pack} in {time.perf_counter() - started:.1f} s: {[p.name for p in done]}")
    return done


def datasets() -> list[Path]:
    return sorted(p for p in DATA.glob("part-*") if (p / "dataset.json").exists())


def choose_conv_chunk(figures: dict) -> int | None:
    """The fast step's convolution from the comparison's figures (bench_fast.json): the chunked one
    where it ran faster than the FFT over at least MIN_STEPS steps each and its loss over the steps
    both ran is higher by at most 0.05 bits/sample, or by the noise between two initialisations where
    that is larger (the same function, in bf16 products: more would be a fault); else 0, the FFT.
    None when the FFT leg itself failed: nothing was compared."""
    runs, legs = figures["runs"], figures["legs"]
    fft = runs.get("fast", {"error": "not run"})
    if "error" in fft:
        return None
    best, chunk = fft["seconds"], 0
    allowed = max(0.05, (figures.get("blocks") or {}).get("noise") or 0.0)
    for name, leg in legs.items():
        r = runs.get(name, {"error": "not run"})
        if not leg.get("conv_chunk") or "error" in r:
            continue
        n = min(len(r["losses"]), len(fft["losses"]))
        if n < MIN_STEPS:
            continue
        excess = statistics.mean(r["losses"][:n]) - statistics.mean(fft["losses"][:n])
        if r["seconds"] < best and excess <= allowed:
            best, chunk = r["seconds"], leg["conv_chunk"]
    return chunk


def recorded_conv_chunk(gpu: str) -> int | None:
    """The convolution RESULTS.md records as chosen on this GPU model; None if no comparison is recorded."""
    results = ROOT / "benchmarks" / "RESULTS.md"
    pattern = re.escape(MARKER.format(gpu=gpu, chunk="@")).replace("@", r"(\d+)")
    recorded = re.search(pattern, results.read_text()) if results.exists() else None
    return int(recorded.group(1)) if recorded else None


def known_conv_chunk(gpu: str) -> tuple[int | None, str]:
    """The convolution chosen on this GPU model by an earlier comparison, and where it is kept:
    RESULTS.md, or COMPARED from an earlier call on this machine. (None, "") when there was none."""
    chunk = recorded_conv_chunk(gpu)
    if chunk is not None:
        return chunk, "benchmarks/RESULTS.md"
    compared = json.loads(COMPARED.read_text()) if COMPARED.exists() else {}
    if compared.get("gpu") == gpu:
        return compared["conv_chunk"], f"an earlier call on this machine, {COMPARED}"
    return None, ""


def compare(gpu: str, out: Path, data: list[Path], seconds: float) -> int | None:
    """The part-1 comparison, for a GPU model RESULTS.md has none for: its table goes to
    OUT/bench_fast.md, headed by the marker that records the chosen convolution (only when the
    comparison ran). Returns that choice (conv_chunk), or None when it did not run."""
    figures_path = out / "bench_fast.json"
    env = {**os.environ, "S4MUSIC_BENCH_DATA": ",".join(map(str, data[:2])), "S4MUSIC_BENCH_SECONDS": str(seconds),
           "S4MUSIC_BENCH_JSON": str(figures_path), "PYTHONPATH": str(ROOT)}
    log("comparing today's training step with the fast ones")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--only", "fast"],
                          capture_output=True, text=True, env=env)
    figures = json.loads(figures_path.read_text()) if figures_path.exists() else None
    chunk = None if figures is None else choose_conv_chunk(figures)
    if chunk is not None:  # atomically: a call cut off mid-write leaves no half file for the next one
        from s4music.files import write_json

        COMPARED.parent.mkdir(parents=True, exist_ok=True)
        write_json(COMPARED, {"gpu": gpu, "conv_chunk": chunk})
    text = ("" if chunk is None else MARKER.format(gpu=gpu, chunk=chunk) + "\n") + proc.stdout
    (out / "bench_fast.md").write_text(text + (f"\nstderr:\n{proc.stderr[-3000:]}" if proc.returncode else ""))
    print(proc.stdout[-6000:], flush=True)
    return chunk


def write_shards(model_dir: Path, out: Path) -> list[Path]:
    """The checkpoint's weights as files of at most SHARD_BYTES, beside its config.json."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    paths = []
    for i, shard in enumerate(shards):
        path = out / f"weights-{i}.safetensors"
        save_file(shard, str(path))
        paths.append(path)
    (out / "config.json").write_text((model_dir / "config.json").read_text())
    return paths


def join(files: Path, dest: Path, half: bool = False) -> None:
    """Rebuild a checkpoint from write_shards' files (here, after the lease); `half` stores it in
    float16 but for the S4 parameters (save_model), as models/wip is kept in the repository."""
    import torch
    from safetensors.torch import load_file

    from s4music.model.checkpoint import save_model
    from s4music.model.config import AudioFormat, SaShiMiConfig
    from s4music.model.sashimi import SaShiMi

    meta = json.loads((files / "config.json").read_text())
    model = SaShiMi(SaShiMiConfig.from_dict(meta["model"]))
    model.audio = AudioFormat(**meta["audio"])
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(files.glob("weights-*.safetensors")):
        tensors.update(load_file(str(shard)))
    model.load_state_dict(tensors)
    save_model(model, dest, summary=meta.get("summary", {}), dtype=torch.float16 if half else None)
    print(f"{dest}: {model.num_parameters():,} parameters, from {len(list(files.glob('weights-*.safetensors')))} files")


def run(args: argparse.Namespace) -> None:
    import torch

    deadline = time.perf_counter() + 60 * args.minutes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    log(f"{gpu}; torch {torch.__version__}; {os.cpu_count()} cores; {args.minutes:g} minutes")
    if args.pack:
        unpack_parts(Path(args.pack))
    data = datasets()
    if not data:
        sys.exit(f"no datasets under {DATA}: carry packed parts and give --pack, or unpack them first")
    chunk, where = known_conv_chunk(gpu)
    if chunk is not None:
        log(f"the fast steps were compared for {gpu} ({where}): conv_chunk {chunk}")
    elif args.compare_seconds > 0 and not args.plain:
        chunk = compare(gpu, out, data, args.compare_seconds)
    if args.plain:
        chunk = 0
    elif args.conv_chunk is not None:  # given: it overrides the comparison
        chunk = args.conv_chunk
    chunk = chunk or 0  # nothing compared: the FFT

    from s4music.model.registry import load_model
    from s4music.train import TrainConfig, train

    init = Path(args.init) if args.init else (WIP if (WIP / "config.json").exists() else BUNDLED)
    before = load_model(init).summary
    minutes = (deadline - time.perf_counter()) / 60 - args.margin
    if minutes < 1:
        log(f"{minutes:.1f} minutes left after the comparison: no training in this call")
        return
    step_name = "plain" if args.plain else f"fast, conv_chunk {chunk}"
    log(f"training {init} on {len(data)} datasets for {minutes:.1f} minutes ({step_name} step)")
    run_dir = Path(args.run_dir)
    config = TrainConfig(
        data=[str(p) for p in data], out=str(run_dir), mode="finetune", init=str(init), seq_len=args.seq_len,
        batch_size=args.batch, steps=10**6, lr=args.lr, ssm_lr=args.lr / 4, warmup=args.warmup, schedule="cosine",
        clip=1.0, precision="bf16", fast=not args.plain, conv_chunk=chunk, max_minutes=minutes, seed=args.seed,
        eval_every=args.eval_every, eval_windows=args.eval_windows, save_every=10**6, keep_last=1,
        domain=before.get("domain"))
    last = [0.0]

    def on_step(s) -> None:
        if time.perf_counter() - last[0] > 20 or s.val_bits is not None:
            last[0] = time.perf_counter()
            val = f", val {s.val_bits:.4f}" if s.val_bits is not None else ""
            log(f"step {s.step}/{s.steps or '?'}: {s.bits:.4f} bits{val}; {s.audio_seconds_per_second:.0f} audio s/s; "
                f"{(s.eta_seconds or 0) / 60:.1f} min left")

    started = time.perf_counter()
    # If a step fails before its first logged step (it failed to build here), the rest of the lease
    # trains the next one: the fast step by FFT after the chunked one, then the plain step.
    fallbacks = ([("fast-fft", True, 0)] if config.conv_chunk else []) + ([("plain", False, 0)] if config.fast else [])
    while True:
        try:
            result = train(config, on_step=on_step)
            break
        except Exception as e:
            logged = (run_dir / "log.csv").exists() and len((run_dir / "log.csv").read_text().splitlines()) > 1
            if logged or not fallbacks:
                raise
            suffix, config.fast, config.conv_chunk = fallbacks.pop(0)
            log(f"that step failed ({type(e).__name__}: {str(e)[:300]}); training the {suffix} step instead")
            run_dir = run_dir.with_name(f"{Path(args.run_dir).name}-{suffix}")
            config.out, config.max_minutes = str(run_dir), (deadline - time.perf_counter()) / 60 - args.margin
    seconds = time.perf_counter() - started
    best = result.best or result.model
    write_shards(best, out)
    for name in ("log.csv",):  # at most 8 files come back: weights (2), config, log, figures, comparison (2), output
        if (run_dir / name).exists():
            (out / name).write_text((run_dir / name).read_text())
    hours = result.step * args.batch * args.seq_len / 16000 / 3600
    shown = str(init.relative_to(ROOT)) if init.is_relative_to(ROOT) else str(init)
    figures = {"gpu": gpu, "torch": torch.__version__, "init": shown,
               "steps": result.step, "batch": args.batch, "seq_len": args.seq_len, "hours_seen": round(hours, 2),
               "train_seconds": round(seconds, 1), "best_val_bits": load_model(best).summary.get("val_bits"),
               "datasets": [p.name for p in data], "fast": config.fast, "conv_chunk": config.conv_chunk}
    (out / "lease.json").write_text(json.dumps(figures, indent=2) + "\n")
    log(f"done: {json.dumps(figures)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("unpack", help="decompress carried parts into the data folder")
    p.add_argument("pack", type=Path, help="the folder this call carried: pack.json and one or more of its parts")
    p = sub.add_parser("run", help="compare (once per GPU model), train, write the weights")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, required=True, help="wall time for all of it")
    p.add_argument("--pack", help="parts carried by this call, unpacked first")
    p.add_argument("--init", help="checkpoint to continue (default: models/wip, else the bundled model)")
    p.add_argument("--run-dir", default="/tmp/s4music-lease/run")
    p.add_argument("--compare-seconds", type=float, default=120.0,
                   help="cap on each leg of the comparison after its first step: 120 s lets today's step run the "
                        "300 steps the loss curves are compared over (0: no comparison)")
    p.add_argument("--conv-chunk", type=int, help="the fast step's convolution (0: FFT; default: the comparison's choice)")
    p.add_argument("--margin", type=float, default=0.6, help="minutes kept for writing the results")
    p.add_argument("--seq-len", type=int, default=65536, help="the comparison's, so its compiled kernels are reused")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--plain", action="store_true", help="today's training step instead of the fast one")
    p = sub.add_parser("join", help="rebuild the checkpoint from the files a lease returned")
    p.add_argument("files", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--half", action="store_true", help="float16 but for the S4 parameters: half the size")
    args = parser.parse_args()
    from s4music.errors import S4MusicError, first_line

    try:
        if args.verb == "unpack":
            unpack_parts(args.pack)
        elif args.verb == "join":
            join(args.files, args.dest, args.half)
        else:
            run(args)
    except S4MusicError as e:  # a missing or damaged part, say: one line, not a traceback
        parser.exit(1, f"error: {first_line(e)}\n")


if __name__ == "__main__":
    main()

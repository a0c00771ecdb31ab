"""Default SaShiMi model on a CUDA GPU: the Cauchy kernel, training steps, prompt reading, generation.

Ratios are against baselines measured in the same run:
  - Cauchy product: the PyTorch chunked path (what runs when the extension is unavailable);
  - training: the same step with the PyTorch Cauchy path (DPLR), and in float32 (bf16 rows);
  - the fast training step: today's step (the bundled model's architecture, S4D, bf16 autocast),
    both trained from the same seed on the same windows (S4MUSIC_BENCH_DATA: prepared datasets,
    comma-separated; random codes without), with the loss after each block of steps, and the fast
    step from a second seed: the noise its difference from today's is judged against;
  - generation: the plain step at batch 1.
Each configuration runs in a fresh subprocess so its peak GPU memory is its own. Without a GPU
this prints one line saying so.

    python benchmarks/bench_gpu.py            # all
    python benchmarks/bench_gpu.py --quick    # short lengths, for a smoke run
    python benchmarks/bench_gpu.py --only gen # one section
    S4MUSIC_BENCH_DATA=data/part-000 python benchmarks/bench_gpu.py --only fast   # the fast step vs today's
"""

from __future__ import annotations

import json
import os
import statistics
import time

from common import parse_args, run_child

SAMPLE_RATE = 16000


def _timed(fn, repeats: int) -> list[float]:
    import torch

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def _peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9


def cauchy(length: int, width: int, path: str) -> dict:
    """Forward + backward of one S4 layer's Cauchy product at the default model's sizes."""
    import torch

    from s4music.model.kernels import _ChunkedCauchy, cuda_cauchy, cauchy_reference

    gen = torch.Generator().manual_seed(0)
    n = 64  # conjugate pairs expanded, as S4Kernel calls it
    v = torch.randn(4, width, n, dtype=torch.cfloat, generator=gen).cuda()
    w = (-0.5 - 1j * torch.rand(width, n, generator=gen) * 100).to(torch.cfloat).cuda()
    omega = torch.exp(-2j * torch.pi * torch.arange(length // 2 + 1, dtype=torch.float64) / length)
    z = (2 * (1 - omega) / (1 + omega)).to(torch.cfloat).cuda()
    grad = torch.randn(4, width, z.shape[0], dtype=torch.cfloat, generator=gen).cuda()
    fn = cuda_cauchy() if path == "cuda" else _ChunkedCauchy.apply
    if fn is None:
        return {"error": "the CUDA extension is unavailable"}

    def run():
        vv, ww = v.clone().requires_grad_(), w.clone().requires_grad_()
        fn(vv, z, ww).backward(grad)
        return vv.grad, ww.grad

    run()
    times = _timed(run, 10)
    # Accuracy against the plain product in float64 (values only; sizes that fit in memory).
    sub = slice(0, 4096)
    ref = cauchy_reference(v[:, :8].cdouble(), z[sub].cdouble(), w[:8].cdouble())
    out = fn(v[:, :8].contiguous(), z[sub].contiguous(), w[:8].contiguous()).cdouble()
    err = ((out - ref).norm() / ref.norm()).item()
    return {"ms": 1e3 * statistics.median(times), "rel_err": err, "peak_gb": _peak_gb()}


def train_step(length: int, batch: int, mode: str, precision: str, steps: int) -> dict:
    """Forward + backward + AdamW of the default architecture (S4 `mode`), as `s4music train` runs it."""
    import torch

    from s4music.model import SaShiMi, SaShiMiConfig, S4Config
    from s4music.model.sashimi import code_bits

    torch.manual_seed(0)
    model = SaShiMi(SaShiMiConfig(s4=S4Config(mode=mode))).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (batch, length), device="cuda")
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = code_bits(model(model.shift_right(x)), x).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # attunes the kernels, allocates the optimizer state
    times = _timed(step, steps)
    return {"seconds": statistics.median(times), "peak_gb": _peak_gb()}


def train_curve(length: int, batch: int, steps: int, fast: bool, max_seconds: float, profile: int = 0,
                conv_chunk: int = 0, device: str = "cuda", seed: int = 0) -> dict:
    """Train the bundled model's architecture from scratch (initialised from `seed`, bf16 autocast;
    the windows and their order are the same for every seed) for `steps` steps,
    or for `max_seconds` after the first (compiling) one: today's step or the fast one
    (SaShiMi.fast_training, with `conv_chunk`), on the windows of S4MUSIC_BENCH_DATA (random codes
    without). Returns the loss of every step, the step time and the peak memory. Then `profile` more
    forward + backward passes are profiled (torch.profiler's top kernels), after the timed steps so
    that they change nothing in them. `device` "cpu" is for a smoke run where there is no GPU."""
    import torch

    from s4music.data.dataset import PreparedDataset, WindowMixture
    from s4music.model import SaShiMi, SaShiMiConfig, S4Config
    from s4music.model.sashimi import code_bits

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(seed)
    model = SaShiMi(SaShiMiConfig(s4=S4Config(mode="diag"))).to(device).train()
    if fast:
        model.fast_training(conv_chunk=conv_chunk)
    else:  # today's step as the GPU-lease issue measured it: S4D kernels by the chunked exp per sample
        for block in model.s4_blocks():
            block.kernel.blocked = False
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    data = [p for p in os.environ.get("S4MUSIC_BENCH_DATA", "").split(",") if p]
    mixture = WindowMixture([(PreparedDataset(p), 1.0) for p in data], length, "train", 0) if data else None
    gen = torch.Generator().manual_seed(0)

    def codes():
        if mixture is not None:
            return mixture.sample(batch).to(device, non_blocking=True)
        return torch.randint(0, 256, (batch, length), generator=gen).to(device)

    def loss_of(x):
        with torch.autocast(device, dtype=torch.bfloat16):
            return code_bits(model(model.shift_right(x)), x).mean()

    def step(x):
        loss = loss_of(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    losses, times = [], []
    started = None  # the cap counts from the end of the first step, which compiles
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        losses.append(step(codes()))
        sync()
        times.append(time.perf_counter() - t0)
        started = started or time.perf_counter()
        if time.perf_counter() - started > max_seconds:
            break
    peak = _peak_gb() if cuda else 0.0
    table = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        x = codes()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        sync()
        t0 = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            for _ in range(profile):
                loss_of(x).backward()
            sync()
        wall = time.perf_counter() - t0
        opt.zero_grad(set_to_none=True)
        averages = prof.key_averages()
        table = averages.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25,
                               max_name_column_width=60)
        # The kernels' own time against the wall time: far below it, the step waits on launches
        # (what CUDA graphs remove); near it, on the kernels themselves.
        busy = sum(getattr(e, "self_device_time_total", 0) for e in averages) / 1e6
        table = f"GPU busy {1e3 * busy:.0f} ms of {1e3 * wall:.0f} ms wall (profiled)\n" + table
    return {"losses": [float(v) for v in torch.stack(losses).cpu()], "first_s": times[0],
            "seconds": statistics.median(times[3:] or times), "peak_gb": peak, "profile": table}


def prefill(seconds_of_audio: float) -> dict:
    import torch

    from s4music.model import SaShiMi

    torch.manual_seed(0)
    model = SaShiMi().cuda().eval()
    x = torch.randint(0, 256, (1, int(seconds_of_audio * SAMPLE_RATE)), device="cuda")
    model.prefill(x[:, :4096])
    times = _timed(lambda: model.prefill(x), 3)
    return {"seconds": min(times), "peak_gb": _peak_gb()}


def generation(batch: int, steps: int, step: str) -> dict:
    """The recurrent step plus sampling, as `continue` runs it: `plain` or `graphed` (CUDA graphs) on
    the GPU, or `fused` (the C++ step, fp16 weights) on this machine's CPU cores."""
    import torch

    from s4music.generate import Sampling, StepOptions
    from s4music.generate.sampler import Stepper
    from s4music.model import SaShiMi

    torch.manual_seed(0)
    model = SaShiMi().eval() if step == "fused" else SaShiMi().cuda().eval()
    _, state = model.prefill(torch.randint(0, 256, (1, 4096), device=model.device))
    first = torch.tensor([128])
    options = {"plain": StepOptions(device="cuda", fused=False), "graphed": StepOptions(device="cuda"),
               "fused": StepOptions(device="cpu")}[step]
    stepper = Stepper(model, options)
    stepper.sampler(state, first, list(range(batch)), Sampling(1.0, 0, 1.0)).take(256)  # warm-up (and capture)
    sampler = stepper.sampler(state, first, list(range(batch)), Sampling(1.0, 0, 1.0))
    t = _timed(lambda: sampler.take(steps), 1)[0]
    return {"samples_per_s": batch * steps / t, "threads": torch.get_num_threads()}


def _child(kind: str, env: dict | None = None, **kw) -> dict:
    return run_child(__file__, kind, env, **kw)


def _cell(r: dict, key: str, fmt: str) -> str:
    return f"failed: {r['error']}" if "error" in r else format(r[key], fmt)


def main() -> None:
    sections = {"cauchy": cauchy_table, "train": train_table, "fast": fast_table, "prefill": prefill_line,
                "gen": generation_table}
    args = parse_args({"cauchy": cauchy, "train": train_step, "curve": train_curve, "prefill": prefill,
                       "gen": generation}, list(sections))
    if args is None:
        return

    import torch

    if not torch.cuda.is_available():
        print("## GPU\n\nNo CUDA device on this machine: skipped.")
        return
    print(f"## Default model (4,751,072 parameters), GPU: {torch.cuda.get_device_name(0)}\n")
    for name, table in sections.items():
        if args.only in (None, name):
            table(args.quick)


def cauchy_table(quick: bool) -> None:
    length = 16384 if quick else 65536
    print(f"### Cauchy product, forward + backward (K=4, N=64, L={length}; median of 10)\n")
    print("| channels H | PyTorch chunked ms | CUDA extension ms | speed-up | extension's relative error vs float64 |")
    print("|---|---|---|---|---|")
    for width in (64, 128, 256):
        base = _child("cauchy", length=length, width=width, path="pytorch")
        ours = _child("cauchy", length=length, width=width, path="cuda")
        ratio = "" if "error" in base or "error" in ours else f"{base['ms'] / ours['ms']:.1f}x"
        print(f"| {width} | {_cell(base, 'ms', '.2f')} | {_cell(ours, 'ms', '.2f')} | {ratio} "
              f"| {_cell(ours, 'rel_err', '.1e')} |")
    print()


def train_table(quick: bool) -> None:
    length = 16384 if quick else 65536
    batch, steps = (2, 3) if quick else (8, 5)
    print(f"### Training step (batch {batch} x {length} samples, forward + backward + AdamW; median of {steps})\n")
    print("| S4 mode | Cauchy path | precision | s/step | audio s per s | peak GB | vs PyTorch path, float32 |")
    print("|---|---|---|---|---|---|---|")
    no_ext = {"S4MUSIC_NO_CUDA_EXT": "1"}
    rows = [("dplr", "pytorch", "no", no_ext), ("dplr", "cuda", "no", None), ("dplr", "cuda", "bf16", None),
            ("diag", "none (blocked Vandermonde)", "no", None), ("diag", "none (blocked Vandermonde)", "bf16", None)]
    base = None
    for mode, path, precision, env in rows:
        r = _child("train", env=env, length=length, batch=batch, mode=mode, precision=precision, steps=steps)
        if base is None and "error" not in r:
            base = r["seconds"]
        ratio = f"{base / r['seconds']:.2f}x" if base and "error" not in r else ""
        audio = "" if "error" in r else f"{batch * length / SAMPLE_RATE / r['seconds']:.0f}"
        print(f"| {mode} | {path} | {precision} | {_cell(r, 'seconds', '.3f')} | {audio} "
              f"| {_cell(r, 'peak_gb', '.1f')} | {ratio} |")
    print()


# The noise reference: the fast step again from another initialisation, on the same windows. A leg
# whose curve parts from today's by no more than two initialisations of one step part is within noise
# (a lenient yardstick: today's and the fast legs start from the same weights).
NOISE_LEG = "fast, init seed 1"


def fast_legs() -> list[tuple[str, dict]]:
    """The fast-step comparison's legs: today's step, the fast one, the fast one with chunked
    convolutions (S4MUSIC_BENCH_CHUNK samples a chunk, kernels.CONV_CHUNK by default; 0 leaves that
    leg out), and the noise reference (NOISE_LEG)."""
    from s4music.model.kernels import CONV_CHUNK

    chunk = int(os.environ.get("S4MUSIC_BENCH_CHUNK", CONV_CHUNK))
    legs = [("today's", {"fast": False}), ("fast", {"fast": True})]
    legs += [(f"fast, chunked {chunk}", {"fast": True, "conv_chunk": chunk})] if chunk else []
    return legs + [(NOISE_LEG, {"fast": True, "seed": 1})]


def loss_blocks(runs: dict) -> dict | None:
    """The loss curves side by side: mean bits/sample over blocks of n // 6 steps (at least 1) of the
    n steps every leg ran. The noise: the mean absolute difference of NOISE_LEG's blocks from the
    fast step's. Each fast leg's mean difference from today's (signed: which way it leans) and mean
    absolute difference, within noise when that is no larger than the noise (None: not judged, no
    reference ran). None without today's and the fast step."""
    done = {name: r for name, r in runs.items() if "error" not in r}
    if "today's" not in done or "fast" not in done:
        return None
    n = min(len(r["losses"]) for r in done.values())
    block = max(1, n // 6)
    starts = range(0, n - block + 1, block)
    means = {name: [statistics.mean(r["losses"][i : i + block]) for i in starts] for name, r in done.items()}

    def gaps(name: str, reference: str) -> list[float]:
        return [a - b for a, b in zip(means[name], means[reference], strict=True)]

    noise = statistics.mean(map(abs, gaps(NOISE_LEG, "fast"))) if NOISE_LEG in means else None
    legs = [name for name in means if name not in ("today's", NOISE_LEG)]
    from_today = {name: gaps(name, "today's") for name in legs}
    differences = {name: statistics.mean(g) for name, g in from_today.items()}
    apart = {name: statistics.mean(map(abs, g)) for name, g in from_today.items()}
    return {"block": block, "starts": list(starts), "means": means, "noise": noise, "differences": differences,
            "apart": apart, "within_noise": {name: None if noise is None else apart[name] <= noise for name in legs}}


def fast_table(quick: bool) -> None:
    """Today's training step against the fast ones: speed, memory, the loss curves from one
    initialisation beside the noise between two, and where each spends its GPU time."""
    length, batch = (16384, 2) if quick else (65536, 8)
    steps = int(os.environ.get("S4MUSIC_BENCH_STEPS", 20 if quick else 300))
    cap = float(os.environ.get("S4MUSIC_BENCH_SECONDS", 150))
    data = os.environ.get("S4MUSIC_BENCH_DATA") or "random codes"
    print(f"### The fast training step against today's (bundled architecture, S4D, bf16 autocast; batch {batch} x "
          f"{length} samples; {steps} steps from seed 0 (seed 1 for the noise leg), or {cap:g} s, on {data})\n")
    legs = dict(fast_legs())
    runs = {name: _child("curve", length=length, batch=batch, steps=steps, max_seconds=cap,
                         profile=0 if name == NOISE_LEG else 3, **leg)
            for name, leg in legs.items()}
    today = runs["today's"]
    print("| step | s/step (median) | audio s per s | first step s (compiles) | peak GB | vs today |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | |")
            continue
        ratio = "" if "error" in today else f"{today['seconds'] / r['seconds']:.2f}x"
        print(f"| {name} | {r['seconds']:.4f} | {batch * length / SAMPLE_RATE / r['seconds']:.0f} | {r['first_s']:.1f} "
              f"| {r['peak_gb']:.1f} | {ratio} |")
    blocks = loss_blocks(runs)
    if blocks:
        block, means = blocks["block"], blocks["means"]
        others = [name for name in means if name != "today's"]
        print(f"\nMean training loss (bits/sample) over blocks of {block} steps, the same windows in the same order; "
              f"each fast step's difference from today's, and {NOISE_LEG}'s from the fast step's:\n")
        print("| steps | today's | " + " | ".join(others) + " |")
        print("|---|---|" + "---|" * len(others))
        today_means = means["today's"]
        against = {name: means["fast"] if name == NOISE_LEG else today_means for name in others}
        for k, start in enumerate(blocks["starts"]):
            cells = [f"{means[name][k]:.4f} ({means[name][k] - against[name][k]:+.4f})" for name in others]
            print(f"| {start + 1}-{start + block} | {today_means[k]:.4f} | " + " | ".join(cells) + " |")
        noise, verdicts = blocks["noise"], {True: "within noise", False: "outside noise", None: "not judged"}
        reference = ("no noise reference (its leg failed)" if noise is None
                     else f"{noise:.4f} between the fast step's two initialisations")
        print("\nMean absolute block difference from today's (and the signed mean), against " + reference + ": "
              + "; ".join(f"{name} {blocks['apart'][name]:.4f} ({d:+.4f}), {verdicts[blocks['within_noise'][name]]}"
                          for name, d in blocks["differences"].items()) + ".")
    if os.environ.get("S4MUSIC_BENCH_JSON"):
        with open(os.environ["S4MUSIC_BENCH_JSON"], "w") as f:
            json.dump({"runs": runs, "legs": legs, "batch": batch, "length": length, "blocks": blocks}, f)
    for name, r in runs.items():
        if r.get("profile"):
            print(f"\nProfile of the {name} step (3 forward + backward passes after its timed steps, torch.profiler, "
                  "by CUDA time):\n")
            print("```\n" + r["profile"] + "\n```")
    print()


def prefill_line(quick: bool) -> None:
    audio_s = 10.0
    r = _child("prefill", seconds_of_audio=audio_s)
    print(f"### Reading a {audio_s:g} s prompt (`prefill`, best of three): {_cell(r, 'seconds', '.3f')} s\n")


def generation_table(quick: bool) -> None:
    steps = 200 if quick else 2000
    print("### Recurrent generation, step + sampling (the `continue` loop)\n")
    print("| step | batch | samples/s (all variations) | × real time | vs plain GPU step, batch 1 |")
    print("|---|---|---|---|---|")
    one = None
    for step in ("plain", "graphed", "fused"):
        for b in (1, 8, 64):
            r = _child("gen", batch=b, steps=steps * (4 if step == "fused" else 1), step=step)
            name = {"plain": "plain, GPU", "graphed": "CUDA graphs, GPU"}.get(step)
            name = name or f"fused C++, fp16 weights, CPU ({r.get('threads')} threads)"
            one = one or r.get("samples_per_s")
            if "error" in r:
                print(f"| {name} | {b} | failed: {r['error']} | | |")
                continue
            print(f"| {name} | {b} | {r['samples_per_s']:.0f} | {r['samples_per_s'] / SAMPLE_RATE:.3f} "
                  f"| {r['samples_per_s'] / one:.1f}x |")

if __name__ == "__main__":
    main()

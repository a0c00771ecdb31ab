"""Default SaShiMi model on a CUDA GPU: the Cauchy kernel, training steps, prompt reading, generation.

Ratios are against baselines measured in the same run:
  - Cauchy product: the PyTorch chunked path (what runs when the extension is unavailable);
  - training: the same step with the PyTorch Cauchy path (DPLR), and in float32 (bf16 rows);
  - generation: the plain step at batch 1.
Each configuration runs in a fresh subprocess so its peak GPU memory is its own. Without a GPU
this prints one line saying so.

    python benchmarks/bench_gpu.py            # all
    python benchmarks/bench_gpu.py --quick    # short lengths, for a smoke run
    python benchmarks/bench_gpu.py --only gen # one section
"""

from __future__ import annotations

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
    sections = {"cauchy": cauchy_table, "train": train_table, "prefill": prefill_line, "gen": generation_table}
    args = parse_args({"cauchy": cauchy, "train": train_step, "prefill": prefill, "gen": generation}, list(sections))
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
            ("diag", "none (Vandermonde)", "no", None), ("diag", "none (Vandermonde)", "bf16", None)]
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


def prefill_line(quick: bool) -> None:
    audio_s = 10.0
    r = _child("prefill", seconds_of_audio=audio_s)
    print(f"### Reading a {audio_s:g} s prompt (`prefill`, best of three): {_cell(r, 'seconds', '.3f')} s\n")


def generation_table(quick: bool) -> None:
    steps = 200 if quick else 2000
    print("### Recurrent generation, step + sampling (the `continue` loop)\n")
    print("| step | batch | samples/s (all variations) | RTF | vs plain GPU step, batch 1 |")
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

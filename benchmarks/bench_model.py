"""Default SaShiMi model on this machine's CPU: training steps, prompt reading, generation.

Every figure comes with a ratio against a baseline measured in the same run:
  - training: the naive Cauchy path (materializes (K, H, N, L), like the official CPU fallback);
  - prompt reading: stepping through the prompt one sample at a time, at the measured step rate;
  - generation at batch 8: batch 1.
Each configuration runs in a fresh subprocess so its peak resident memory is its own.

    python benchmarks/bench_model.py            # all
    python benchmarks/bench_model.py --quick    # short lengths, for a smoke run
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from common import parse_args, run_child

SAMPLE_RATE = 16000


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB


def train_step(length: int, path: str, steps: int, checkpointing: bool = False, bf16: bool = False) -> dict:
    import torch

    import s4music.model.s4 as s4
    from s4music.model import SaShiMi
    from s4music.model.kernels import cauchy_reference

    if path == "naive":
        s4.cauchy = cauchy_reference
    torch.manual_seed(0)
    model = SaShiMi().train()
    model.gradient_checkpointing = checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (1, length))
    times = []
    for _ in range(steps + 1):  # the first step also attunes the kernels; not timed
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as train's precision=bf16
            loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 256).float(), x.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times[1:]), "peak_gb": _peak_gb()}


def _model(which: str):
    import torch

    from s4music.model import DEFAULT_MODEL, SaShiMi, load_model

    torch.manual_seed(0)
    return load_model(DEFAULT_MODEL) if which == "bundled" else SaShiMi().eval()


def generation(batch: int, steps: int, path: str = "plain", which: str = "default", half: bool = False) -> dict:
    import torch

    from s4music.model.fast import FusedStep

    model = _model(which)
    _, state = model.prefill(torch.randint(0, 256, (batch, 4096)))
    code = torch.full((batch,), 128)
    if path == "fused":
        fused = FusedStep(model, half=half)
        fused.run(code, state, torch.rand(batch, 64))  # warm-up
        seconds = []
        for _ in range(3):  # best of three: a shared 2-core machine stalls a thread now and then
            t0 = time.perf_counter()
            fused.run(code, state, torch.rand(batch, steps))
            seconds.append(time.perf_counter() - t0)
        return {"samples_per_s": batch * steps / min(seconds), "peak_gb": _peak_gb()}
    for _ in range(32):  # warm-up, including the cached recurrence matrices
        model.step(code, state)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, state = model.step(code, state)
        code = logits.argmax(-1)
    seconds = time.perf_counter() - t0
    return {"samples_per_s": batch * steps / seconds, "peak_gb": _peak_gb()}


def prefill(seconds_of_audio: float, which: str = "default", path: str = "scan", repeats: int = 3,
            keep_freed: bool = True, bf16: bool = False) -> dict:
    import torch

    from s4music.model.s4 import S4Kernel, fft_convolution
    from s4music.system import keep_freed_memory

    if keep_freed:  # as the CLI's inference commands run
        keep_freed_memory()

    if path == "fft":  # the training path's kernels and FFT convolution instead of the scan (logits only)
        def fft(self, u, state=None):  # from rest only, as here
            with torch.enable_grad():
                k = self.conv_kernel(u.shape[1]).detach()
            return fft_convolution(u, k), self.initial_state(u.shape[0])

        S4Kernel.scan = fft
    model = _model(which)
    x = torch.randint(0, 256, (1, int(seconds_of_audio * SAMPLE_RATE)))
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # the S4 parts stay float32
    with precision:
        model.prefill(x[:, :4096])  # builds the cached recurrence matrices
        seconds = []
        for _ in range(repeats):  # best of: a shared 2-core machine stalls a thread now and then
            t0 = time.perf_counter()
            model.prefill(x)
            seconds.append(time.perf_counter() - t0)
    return {"seconds": min(seconds), "peak_gb": _peak_gb(), "prompt_bits": prompt_bits(model, bf16)}


def prompt_bits(model, bf16: bool) -> float:
    """The model's bits/sample on examples/prompt.wav, read as `continue` reads it."""
    import torch

    from s4music.audio import encode, load_audio
    from s4music.model.sashimi import code_bits

    codes = encode(load_audio(Path(__file__).parent.parent / "examples" / "prompt.wav").samples,
                   model.audio.quantization).long()[None]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, _ = model.prefill(model.shift_right(codes))
    return code_bits(logits.float(), codes).mean().item()


def arithmetic_peak() -> dict:
    """This machine's multiply-add peak on all threads (benchmarks/peak.cpp): float FMAs and int16
    vpmaddwd, in billions of multiply-adds per second; empty without AVX2."""
    import torch
    from torch.utils import cpp_extension

    module = cpp_extension.load(name="s4music_bench_peak", sources=[str(Path(__file__).with_name("peak.cpp"))],
                                extra_cflags=["-O2", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    module.peak(10_000_000)  # warm-up: clocks up, threads started
    rates = module.peak(200_000_000)
    if not rates:
        return {}
    out = {"fma_gmacs": rates[0], "madd_gmacs": rates[1], "threads": torch.get_num_threads()}
    if len(rates) > 2:
        out["fma512_gmacs"] = rates[2]
    return out


def linear_bound(seconds_of_audio: float) -> dict:
    """The least time the default model's linear layers alone need for a prompt: multiply-adds
    counted by hooks in a real forward pass, at this machine's measured float32 matrix-multiply
    rate (a large matrix product) and at its float FMA peak (`arithmetic_peak`)."""
    import torch

    from s4music.model.sashimi import WeightNormLinear

    model, macs = _model("default"), [0]

    def count(module, inputs, _output):
        w = module.weight
        macs[0] += inputs[0].numel() // w.shape[1] * w.numel()

    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, WeightNormLinear)):
            m.register_forward_hook(count)
    length = SAMPLE_RATE
    with torch.no_grad():
        model(torch.randint(0, 256, (1, length)))
    rates = {dtype: matmul_gflops(dtype) for dtype in (torch.float32, torch.bfloat16)}
    flops = 2 * macs[0] / length * seconds_of_audio * SAMPLE_RATE
    peak = arithmetic_peak()
    gflops = rates[torch.float32]
    bound = {"gflop": flops / 1e9, "rate_gflops": gflops, "seconds": flops / 1e9 / gflops,
             "bf16_gflops": rates[torch.bfloat16], "bf16_seconds": flops / 1e9 / rates[torch.bfloat16]}
    if peak:
        widest = peak.get("fma512_gmacs", peak["fma_gmacs"])
        bound.update(peak, peak_gflops=2 * widest, peak_seconds=flops / 1e9 / (2 * widest))
    return bound


def matmul_gflops(dtype) -> float:
    """A large matrix product's rate on this machine's threads (bf16: AMX or AVX512-BF16 where the
    CPU has them, else whatever torch does), best of five."""
    import torch

    a, b = torch.randn(40000, 256).to(dtype), torch.randn(256, 512).to(dtype)
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / min(times) / 1e9


def _child(kind: str, env: dict | None = None, **kw) -> dict:
    return run_child(__file__, kind, env, **kw)


def main() -> None:
    args = parse_args({"train": train_step, "gen": generation, "prefill": prefill, "bound": linear_bound})
    if args is None:
        return

    lengths = [2000, 8000] if args.quick else [16000, 128000]
    steps = 1
    print("## Default model (4,751,072 parameters), CPU\n")
    print("### Training step (batch 1, forward + backward + AdamW)\n")
    print("| L | path | s/step | audio s per s | peak RSS GB | vs naive path |")
    print("|---|---|---|---|---|---|")
    naive = _child("train", length=lengths[0], path="naive", steps=steps)
    for length in lengths:
        for ckpt, bf16 in ((False, False), (True, False), (False, True)):
            name = "chunked + checkpointing" if ckpt else "chunked, bf16 autocast" if bf16 else "chunked"
            ours = _child("train", length=length, path="chunked", steps=steps, checkpointing=ckpt, bf16=bf16)
            if "error" in ours:
                print(f"| {length} | {name} | failed: {ours['error']} | | | |")
                continue
            ratio = ""
            if length == lengths[0] and "error" not in naive:
                ratio = (f"{naive['seconds'] / ours['seconds']:.1f}x faster, "
                         f"{naive['peak_gb'] / ours['peak_gb']:.1f}x less memory")
            print(f"| {length} | {name} | {ours['seconds']:.2f} | {length / SAMPLE_RATE / ours['seconds']:.3f} "
                  f"| {ours['peak_gb']:.2f} | {ratio} |")
    if "error" in naive:
        print(f"| {lengths[0]} | naive | failed: {naive['error']} | | | |")
    else:
        print(f"| {lengths[0]} | naive | {naive['seconds']:.2f} | {lengths[0] / SAMPLE_RATE / naive['seconds']:.3f} "
              f"| {naive['peak_gb']:.2f} | 1.0x |")
    print(f"| {lengths[1]} | naive | not run: its (K, H, N, L) tensors need far more than this machine's memory | | | |")

    gen_steps = 100 if args.quick else 400
    print("\n### Recurrent generation, default model (fused: best of three runs)\n")
    print("| step | batch | samples/s (all variations) | RTF | peak RSS GB | vs plain step, batch 1 |")
    print("|---|---|---|---|---|---|")
    base = None
    one_thread = {"OMP_NUM_THREADS": "1"}
    runs = [("plain", 1, gen_steps, None, False), ("plain", 8, gen_steps, None, False)]
    for half in (False, True):  # linear weights in float32 (the plain step's codes), then half precision
        runs += [("fused", 1, gen_steps * 40, one_thread, half), ("fused", 1, gen_steps * 40, None, half),
                 ("fused", 8, gen_steps * 20, None, half)]
    for path, batch, steps, env, half in runs:
        r = _child("gen", env=env, batch=batch, steps=steps, path=path, half=half)
        base = base or r["samples_per_s"]
        name = path if path == "plain" else f"{path}, {'fp16' if half else 'fp32'} weights"
        name += ", 1 thread" if env else ""
        print(f"| {name} | {batch} | {r['samples_per_s']:.0f} | {r['samples_per_s'] / SAMPLE_RATE:.3f} "
              f"| {r['peak_gb']:.2f} | {r['samples_per_s'] / base:.1f}x |")

    audio_s = 2.0 if args.quick else 10.0
    r = _child("prefill", seconds_of_audio=audio_s)
    faulting = _child("prefill", seconds_of_audio=audio_s, keep_freed=False)
    fft = _child("prefill", seconds_of_audio=audio_s, path="fft", repeats=1)
    bound = _child("bound", seconds_of_audio=audio_s)
    stepping = audio_s * SAMPLE_RATE / base
    print(f"\n### Reading a {audio_s:g} s prompt, default model\n")
    print("| method | seconds | vs stepping |")
    print("|---|---|---|")
    print(f"| one parallel pass (`prefill`): chunked scan, best of three; freed memory kept for reuse, as the CLI "
          f"runs it (peak RSS {r['peak_gb']:.2f} GB) | {r['seconds']:.2f} | {stepping / r['seconds']:.0f}x faster |")
    print(f"| the same with glibc's defaults: each tensor over 32 MB mapped afresh and page-faulted "
          f"(peak RSS {faulting['peak_gb']:.2f} GB) | {faulting['seconds']:.2f} | {stepping / faulting['seconds']:.0f}x "
          "faster |")
    print(f"| one parallel pass with the training path's Cauchy kernels and FFT convolution (logits only) "
          f"| {fft['seconds']:.2f} | {stepping / fft['seconds']:.0f}x faster |")
    print(f"| stepping sample by sample (at the plain batch-1 rate above) | {stepping:.1f} | 1x |")
    print(f"| lower bound: the linear layers alone ({bound['gflop']:.0f} GFLOP) at this machine's measured "
          f"float32 matrix-multiply rate ({bound['rate_gflops']:.0f} GFLOP/s) | {bound['seconds']:.2f} | |")
    print(f"| lower bound: the same at its bfloat16 matrix-multiply rate ({bound['bf16_gflops']:.0f} GFLOP/s) "
          f"| {bound['bf16_seconds']:.2f} | |")
    if "peak_seconds" in bound:
        width = "AVX-512" if "fma512_gmacs" in bound else "AVX2"
        print(f"| lower bound: the same at this machine's float FMA peak ({bound['peak_gflops']:.0f} GFLOP/s, "
              f"{width}, below) | {bound['peak_seconds']:.2f} | |")
    print(f"\nThe parallel pass takes {r['seconds'] / bound['seconds']:.1f}x the linear layers' float32 matrix "
          f"time (the issue's target: 1.5x).")
    print("\n| bundled model, 10 s prompt | seconds | vs float32 linear bound | bits/sample on examples/prompt.wav |")
    print("|---|---|---|---|")
    for bf16 in (False, True):
        b = _child("prefill", seconds_of_audio=audio_s, which="bundled", bf16=bf16)
        if "error" in b:
            print(f"| {'bf16 autocast' if bf16 else 'float32'} | failed: {b['error']} | | |")
            continue
        print(f"| {'bf16 autocast (linear layers; S4 in float32)' if bf16 else 'float32'} | {b['seconds']:.2f} | "
              f"{b['seconds'] / bound['seconds']:.1f}x | {b['prompt_bits']:.5f} |")
    if "fma_gmacs" in bound:
        print(f"\n### Arithmetic peak, all {bound['threads']} threads issuing independent multiply-adds "
              "(`benchmarks/peak.cpp`)\n")
        print("| instruction | multiply-adds per second | vs float FMA (ymm) |")
        print("|---|---|---|")
        print(f"| vfmadd231ps (float32, 8 a ymm instruction) | {bound['fma_gmacs']:.1f} G | 1.00x |")
        print(f"| vpmaddwd + vpaddd (int16 pairs into int32, 16 a instruction) | {bound['madd_gmacs']:.1f} G "
              f"| {bound['madd_gmacs'] / bound['fma_gmacs']:.2f}x |")
        if "fma512_gmacs" in bound:
            print(f"| vfmadd231ps (float32, 16 a zmm instruction, AVX-512) | {bound['fma512_gmacs']:.1f} G "
                  f"| {bound['fma512_gmacs'] / bound['fma_gmacs']:.2f}x |")

    print("\n## Bundled model (s4music/assets/default-model), CPU (fused: best of three runs)\n")
    # the arithmetic bound of a step: its linear layers' multiply-adds per sample at the FMA peak
    flop_per_sample = bound["gflop"] * 1e9 / (audio_s * SAMPLE_RATE)
    bound_rate = bound["peak_gflops"] * 1e9 / flop_per_sample if "peak_gflops" in bound else None
    print("| what | batch | samples/s | RTF | vs plain step, batch 1 | of the FMA-peak bound |")
    print("|---|---|---|---|---|---|")
    small = _child("gen", batch=1, steps=gen_steps * 4, path="plain", which="bundled")
    print(f"| plain step | 1 | {small['samples_per_s']:.0f} | {small['samples_per_s'] / SAMPLE_RATE:.3f} | 1.0x | |")
    for batch in (1, 8):
        r = _child("gen", batch=batch, steps=gen_steps * 80, path="fused", which="bundled", half=True)
        share = f"{r['samples_per_s'] / bound_rate:.0%}" if bound_rate else ""
        print(f"| fused step, fp16 weights | {batch} | {r['samples_per_s']:.0f} | {r['samples_per_s'] / SAMPLE_RATE:.2f} "
              f"| {r['samples_per_s'] / small['samples_per_s']:.0f}x | {share} |")
    if bound_rate:
        print(f"\nThe FMA-peak bound: {flop_per_sample / 1e6:.2f} MFLOP of linear layers a sample at "
              f"{bound['peak_gflops']:.0f} GFLOP/s is {bound_rate:.0f} samples/s (RTF {bound_rate / SAMPLE_RATE:.1f}), "
              "all variations together; at batch 1 a step is bound by reading its weights, not by arithmetic.")


if __name__ == "__main__":
    main()

"""`continue` and `generate`: what comes next after a prompt, or music from nothing.

    result = continue_prompt("prompt.ogg", "out.wav", options=GenerateOptions(seconds=10, seed=1))
    result = improvise("out.wav", options=GenerateOptions(seconds=5, variations=4, rank=True))

The prompt goes through the same conversion as training data (decode, mono, resample, quantize
with the checkpoint's scheme), is read in one parallel pass that also scores it for guidance, and
the continuation is stepped from the resulting state: on the fused C++ CPU step where it builds (with
--device auto even when a GPU read the prompt), from CUDA graphs with --device cuda, else plainly.
Every setting, the seeds, timings and the real-time factor go to a JSON sidecar beside the output.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from s4music.audio import Audio, decode, encode, load_audio, normalize, remove_dc, write_audio
from s4music.errors import S4MusicError
from s4music.files import atomic_path, write_json
from s4music.guidance import PromptReport, degeneracy, describe_signal, judge
from s4music.model.registry import load_model, resolve_model
from s4music.model.fast import FusedStep, GraphedStep, fused_available, plain_steps
from s4music.model.sashimi import SaShiMi, SaShiMiState, code_bits

log = logging.getLogger(__name__)
PROGRESS_EVERY = 2000  # samples between progress reports (and fast-step calls)


class GenerationError(S4MusicError):
    pass


@dataclass
class GenerateOptions:
    seconds: float = 5.0  # length of the continuation
    variations: int = 1
    # Sampling; None takes the checkpoint's recommendation (summary "sampling"), else 1.0 / off / off.
    temperature: float | None = None
    top_k: int | None = None  # 0: off
    top_p: float | None = None  # 1: off
    seed: int | None = None  # None: a fresh random seed (always reported); variation i uses seed + i
    rank: bool = False  # order variations by the model's likelihood, best first
    prompt_seconds: float = 8.0  # use the last N seconds of the prompt (selection)
    prompt_start: float | None = None
    prompt_end: float | None = None
    include_prompt: bool = True
    normalize: str = "loudness"  # loudness (-16 LUFS), peak (-1 dBFS) or none
    format: str = "wav"  # wav or flac
    device: str = "auto"  # cpu, cuda, or auto: read the prompt on a GPU if any, generate on the fused CPU step
    fused: bool = True  # the fast step: fused C++ on a CPU (when it builds), CUDA graphs on a GPU
    half_weights: bool = True  # fused step: linear weights in half precision (faster; not code for code the plain step)
    force: bool = False  # continue even when guidance judges the prompt far out of domain
    retry_degenerate: int = 0  # resample a variation that collapses, turns to noise or drifts to an offset, up to N times
    plot: bool = False  # a PNG of waveform and spectrogram beside each output


@dataclass
class Take:
    path: Path
    seed: int
    bits: float  # mean NLL of the sampled codes under the model, bits/sample
    degenerate: str | None
    retries: int
    dc_offset: float  # the continuation's mean level over its last second, as sampled; removed on writing


@dataclass
class GenerateResult:
    takes: list[Take]
    sidecar: Path
    guidance: PromptReport | None
    seed: int
    rtf: float  # generated audio seconds (all variations) per wall-clock second
    timings: dict[str, float] = field(default_factory=dict)


ProgressFn = Callable[[int, int, float], None]  # (samples done, total, live RTF)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise GenerationError("--device cuda: no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise GenerationError(f"--device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def open_model(spec: str | Path | None, device: torch.device) -> tuple[SaShiMi, str]:
    """The model a name or path stands for (None: the bundled one), and what to call it in the sidecar."""
    path = resolve_model(spec)
    return load_model(path, device=device), str(path)


def read_prompt(prompt: str | Path, sample_rate: int, options: GenerateOptions) -> tuple[Audio, float | None]:
    """The prompt selection at the model's rate, cut to its last `prompt_seconds`; URLs are fetched."""
    source = str(prompt)
    if "://" in source:
        from s4music.data.fetch import FetchOptions, fetch

        with tempfile.TemporaryDirectory(prefix="s4music-prompt-") as tmp:
            report = fetch([source], tmp, FetchOptions(sample_rate=sample_rate))
            if report.failed:
                raise GenerationError(report.failed[0][1])
            audio = load_audio(report.fetched[0].audio, sample_rate, options.prompt_start, options.prompt_end)
    else:
        audio = load_audio(source, sample_rate, options.prompt_start, options.prompt_end)
    keep = int(round(options.prompt_seconds * sample_rate))
    if 0 < keep < audio.samples.numel():
        full = audio.seconds
        return dataclasses.replace(audio, samples=audio.samples[-keep:].contiguous()), full
    return audio, None


SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


def with_sampling(options: GenerateOptions, summary: dict) -> GenerateOptions:
    """Fill unset sampling options from the checkpoint's recommendation, then the neutral defaults."""
    recommended = summary.get("sampling") or {}
    values = {k: getattr(options, k) if getattr(options, k) is not None else recommended.get(k, default)
              for k, default in SAMPLING_DEFAULTS.items()}
    return dataclasses.replace(options, **values)


def _check_options(options: GenerateOptions) -> None:
    t, k, p = options.temperature, options.top_k, options.top_p
    problems = {
        "seconds": options.seconds <= 0, "variations": options.variations < 1,
        "temperature": t is not None and t < 0, "top-k": k is not None and k < 0,
        "top-p": p is not None and not 0 < p <= 1, "prompt-seconds": options.prompt_seconds <= 0,
        "format": options.format not in ("wav", "flac"),
        "normalize": options.normalize not in ("loudness", "peak", "none"),
    }
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise GenerationError(f"invalid option(s): {', '.join('--' + b for b in bad)}")


def _read_and_score(prompt: str | Path, model: str | Path | None, options: GenerateOptions):
    """Load the model and the prompt, read the prompt in one parallel pass, and judge it."""
    device = resolve_device(options.device)
    net, model_id = open_model(model, device)
    audio, full = read_prompt(prompt, net.audio.sample_rate, options)
    codes = encode(audio.samples, net.audio.quantization).long().unsqueeze(0).to(device)
    loaded = time.perf_counter()
    logits, state = net.prefill(net.shift_right(codes))
    prefill_s = time.perf_counter() - loaded
    bits = code_bits(logits, codes).mean().item()
    report = judge(describe_signal(audio, str(prompt), full), bits, net.summary)
    return net, model_id, codes, state, report, prefill_s


def check_prompt(prompt: str | Path, model: str | Path | None = None,
                 options: GenerateOptions | None = None) -> PromptReport:
    """Guidance alone: how well `prompt` suits the model, without generating."""
    return _read_and_score(prompt, model, options or GenerateOptions())[4]


def continue_prompt(prompt: str | Path, out: str | Path, model: str | Path | None = None,
                    options: GenerateOptions | None = None, on_progress: ProgressFn | None = None,
                    on_guidance: Callable[[PromptReport], None] | None = None) -> GenerateResult:
    """Continue `prompt` (a file in any common format, or a URL) into `out`. See the module docstring."""
    options = options or GenerateOptions()
    _check_options(options)
    started = time.perf_counter()
    net, model_id, codes, state, report, prefill_s = _read_and_score(prompt, model, options)
    if on_guidance is not None:
        on_guidance(report)
    if report.far and not options.force:
        raise GenerationError(f"{prompt}: {report.verdict}: {'; '.join(report.reasons)}. "
                              "Use --force to continue anyway")
    timings = {"load_s": time.perf_counter() - started - prefill_s, "prefill_s": prefill_s}
    return _finish(net, model_id, state, codes[0, -1:], codes[0].cpu(), out, options, on_progress, report, timings,
                   started, source=str(prompt))


def improvise(out: str | Path, model: str | Path | None = None, options: GenerateOptions | None = None,
              on_progress: ProgressFn | None = None) -> GenerateResult:
    """Music from nothing: step the model from rest."""
    options = options or GenerateOptions()
    _check_options(options)
    started = time.perf_counter()
    net, model_id = open_model(model, resolve_device(options.device))
    start = torch.tensor([net.config.n_codes // 2], device=net.device)
    timings = {"load_s": time.perf_counter() - started, "prefill_s": 0.0}
    return _finish(net, model_id, net.initial_state(1), start, None, out, options, on_progress, None, timings, started,
                   source=None)


def _finish(net: SaShiMi, model_id: str, state: SaShiMiState, first: torch.Tensor, prompt_codes: torch.Tensor | None,
            out: str | Path, options: GenerateOptions, on_progress: ProgressFn | None,
            report: PromptReport | None, timings: dict, started: float, source: str | None) -> GenerateResult:
    """Sample the variations from `state`, retry degenerate ones, rank, write audio and the sidecar."""
    options = with_sampling(options, net.summary)
    out = Path(out)
    if out.suffix.lower() not in (".wav", ".flac"):
        out = out.with_suffix(f".{options.format}")
    sr, scheme = net.audio.sample_rate, net.audio.quantization
    n = max(1, int(round(options.seconds * sr)))
    seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
    seeds = [seed + i for i in range(options.variations)]
    net, fast, step = _generation_step(net, options)
    log.info("seed %d; %s step", seed, step)

    gen_started = time.perf_counter()
    codes, logprobs = _sample(net, fast, state, first, seeds, n, options, on_progress)
    generated = options.variations * n
    retries = [0] * options.variations
    waves = [decode(c, scheme) for c in codes]
    verdicts = [degeneracy(w, sr) for w in waves]
    for i in range(options.variations):
        while verdicts[i] and retries[i] < options.retry_degenerate:
            retries[i] += 1
            seeds[i] = seed + i + 1_000_003 * retries[i]
            log.info("variation %d: %s; resampling with seed %d", i + 1, verdicts[i], seeds[i])
            c, lp = _sample(net, fast, state, first, [seeds[i]], n, options, on_progress)
            codes[i], logprobs[i] = c[0], lp[0]
            waves[i] = decode(codes[i], scheme)
            verdicts[i] = degeneracy(waves[i], sr)
            generated += n
    gen_seconds = time.perf_counter() - gen_started
    bits = (-logprobs.double().mean(dim=1) / math.log(2)).tolist()
    order = sorted(range(options.variations), key=lambda i: bits[i]) if options.rank else list(range(options.variations))

    lead = decode(prompt_codes, scheme) if options.include_prompt and prompt_codes is not None else None
    boundary = 0.0 if lead is None else lead.numel() / sr
    takes = []
    for k, i in enumerate(order):
        path = out if options.variations == 1 else out.with_name(f"{out.stem}-{k + 1}{out.suffix}")
        wave = waves[i] if lead is None else torch.cat([lead, waves[i]])  # one code stream: no seam to click
        wave = remove_dc(wave, sr)  # the model's slow drift (see guidance.degeneracy), not its music
        target = -16.0 if options.normalize == "loudness" else -1.0
        wave = normalize(wave, sr, options.normalize, target)
        write_audio(path, wave, sr)
        if options.plot:
            plot_continuation(wave, sr, boundary, path.with_suffix(".png"))
        takes.append(Take(path, seeds[i], bits[i], verdicts[i], retries[i], float(waves[i][-sr:].mean())))

    rtf = generated / sr / gen_seconds
    timings.update(generate_s=gen_seconds, total_s=time.perf_counter() - started)
    sidecar = out.with_suffix(".json")
    write_json(sidecar, {
        "command": "continue" if source else "generate",
        "prompt": source,
        "model": {"path": model_id, "parameters": net.num_parameters(), "config": net.config.to_dict(),
                  "audio": vars(net.audio), "trained": {k: net.summary.get(k) for k in ("mode", "step", "test_bits")}},
        "options": dataclasses.asdict(options),
        "seed": seed,
        "step": step,
        "outputs": [{"file": t.path.name, "seed": t.seed, "bits_per_sample": t.bits, "degenerate": t.degenerate,
                     "retries": t.retries, "dc_offset_removed": t.dc_offset} for t in takes],
        "guidance": report.to_dict() if report else None,
        "timings": timings,
        "rtf": rtf,
        "samples_per_second": generated / gen_seconds,
    })
    return GenerateResult(takes, sidecar, report, seed, rtf, timings)


def _generation_step(net: SaShiMi, options: GenerateOptions) -> tuple[SaShiMi, FusedStep | GraphedStep | None, str]:
    """The model on the device that generates, its fast step (None: the plain one), and the step's name.

    With --device auto the fused CPU step generates whenever it builds, even where a GPU read the
    prompt: a GPU step is bound by kernel launches, and the fused step outran an H100's CUDA graphs
    up to dozens of variations (benchmarks/RESULTS.md). --device cuda keeps generation on the GPU.
    """
    if not options.fused:
        return net, None, f"plain-{net.device.type}"
    if net.device.type == "cuda" and options.device == "auto" and fused_available():
        log.info("prompt read on the GPU; generating on the fused CPU step (--device cuda: on the GPU)")
        net = net.cpu()
    if net.device.type == "cuda":
        return net, GraphedStep(net), "graphed-cuda"
    if fused_available():
        fast = FusedStep(net, half=options.half_weights)
        return net, fast, "fused-cpu-fp16" if fast.half else "fused-cpu"
    return net, None, "plain-cpu"


@torch.no_grad()
def _sample(net: SaShiMi, fast: FusedStep | GraphedStep | None, state: SaShiMiState, first: torch.Tensor,
            seeds: list[int], n: int, options: GenerateOptions,
            on_progress: ProgressFn | None) -> tuple[torch.Tensor, torch.Tensor]:
    """n codes for each seed from (a copy of) `state`: codes (V, n) int64 and their log-probs (V, n)."""
    uniforms = torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(s)) for s in seeds])
    batch = len(seeds)
    state = state.repeat(batch)
    code = first.reshape(-1)[:1].repeat(batch).to(net.device)
    codes = torch.empty(batch, n, dtype=torch.long)
    logprobs = torch.empty(batch, n)
    started = time.perf_counter()
    for lo in range(0, n, PROGRESS_EVERY):
        hi = min(n, lo + PROGRESS_EVERY)
        if fast is not None:
            c, lp = fast.run(code, state, uniforms[:, lo:hi], options.temperature, options.top_k, options.top_p)
            codes[:, lo:hi], logprobs[:, lo:hi] = c, lp
            code = c[:, -1]
        else:
            code, state = plain_steps(net, code, state, uniforms[:, lo:hi], codes[:, lo:hi], logprobs[:, lo:hi],
                                      options.temperature, options.top_k, options.top_p)
        if on_progress is not None:
            on_progress(hi, n, batch * hi / net.audio.sample_rate / (time.perf_counter() - started))
    return codes, logprobs


def plot_continuation(wave: torch.Tensor, sample_rate: int, boundary: float, png: Path) -> Path:
    """Waveform and spectrogram, with the prompt/continuation boundary marked."""
    from matplotlib.figure import Figure  # no pyplot: no global figure manager or backend to set

    x = wave.detach().cpu().numpy()
    t = torch.arange(len(x)).numpy() / sample_rate
    fig = Figure(figsize=(9, 5), dpi=110)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(t, x, linewidth=0.4, color="#345")
    ax1.set_ylabel("amplitude")
    ax2.specgram(x, NFFT=512, Fs=sample_rate, noverlap=384, cmap="magma")
    ax2.set_ylabel("Hz")
    ax2.set_xlabel("seconds")
    if boundary > 0:
        for ax in (ax1, ax2):
            ax.axvline(boundary, color="#0a0", linewidth=1.5)
        ax1.text(boundary, ax1.get_ylim()[1], " continuation", color="#0a0", va="top")
        ax1.text(boundary, ax1.get_ylim()[1], "prompt ", color="#0a0", va="top", ha="right")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    return png

"""Prompt guidance: is this prompt a good fit for the model, and if not, why?

`s4music check` runs it alone (exit 2 for a far prompt); `continue` runs it first, reports the
verdict, reasons and advice, and goes on (with --strict it refuses a far prompt). It looks at the signal (length, the
conversions it needs, silence, clipping, DC offset, noise-likeness) and at the model's own NLL on
the prompt in bits/sample, placed against the test-set NLL that `s4music eval --record` stored in
the checkpoint.

It also judges finished continuations: `degeneracy` spots collapse into silence, runaway noise, and
a drift to an offset that dwarfs the signal on it (a model stuck on one level under a faint texture).
A slow drift under a lively signal is not degenerate: `continue` removes it from what it writes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from s4music.audio import Audio, spectral_flatness
from s4music.dsp import dbfs
from s4music.measures import liveliness

TYPICAL, UNUSUAL, FAR = "typical", "unusual", "far from what this model knows"
UNKNOWN = "not judged"  # a sound signal, and no test NLL to judge the model's bits on it by
CHANCE_BITS = 7.5  # 8 bits/sample is a guess among 256 codes: a model this near it has learned little
NOISE_FLATNESS = 0.35  # white noise is ~0.56; music is usually below 0.1
SILENT_DBFS = -55.0
SILENT_END_S = 0.5  # a prompt ending in this much silence is continued from silence, not from its music
DC_OFFSET = 0.05  # a mean level beyond this is an offset, not music (full scale is 1)
SURPRISING = 0.75  # bits/sample above the model's test figure from which a prompt is unfamiliar to it
STUCK_RATIO = 3.0  # a continuation is stuck when its offset is this many times the spread of the signal on it


@dataclass
class PromptReport:
    source: str
    seconds: float
    source_rate: int
    source_channels: int
    sample_rate: int
    conversions: list[str]
    peak_dbfs: float
    rms_dbfs: float
    clipped: float  # share of samples at full scale
    dc_offset: float
    flatness: float
    silent_end: float = 0.0  # seconds of silence it ends in: where the continuation starts
    bits: float | None = None  # the model's NLL on the prompt
    reference_bits: float | None = None  # the model's recorded test NLL
    verdict: str = TYPICAL
    reasons: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    @property
    def far(self) -> bool:
        return self.verdict == FAR

    @property
    def unfamiliar(self) -> bool:
        return unfamiliar(self.bits, self.reference_bits)

    def to_dict(self) -> dict:
        return asdict(self)


def unfamiliar(bits: float | None, reference_bits: float | None) -> bool:
    """Whether the model finds audio surprising: its bits/sample on it well above its test figure."""
    return bits is not None and reference_bits is not None and bits - reference_bits > SURPRISING


def describe_signal(audio: Audio, source: str, trimmed_from: float | None = None) -> PromptReport:
    """The signal checks (no model needed)."""
    x = audio.samples
    conversions = []
    if audio.source_channels != 1:
        conversions.append(f"mixed {audio.source_channels} channels down to mono")
    if audio.source_rate != audio.sample_rate:
        conversions.append(f"resampled {audio.source_rate} Hz to {audio.sample_rate} Hz")
    if trimmed_from is not None:
        conversions.append(f"kept the last {audio.seconds:.2f} s of {trimmed_from:.2f} s")
    peak = float(x.abs().max()) if x.numel() else 0.0
    return PromptReport(
        source=source, seconds=audio.seconds, source_rate=audio.source_rate, source_channels=audio.source_channels,
        sample_rate=audio.sample_rate, conversions=conversions, peak_dbfs=dbfs(peak),
        rms_dbfs=dbfs(float(x.square().mean().sqrt()) if x.numel() else 0.0),
        clipped=float((x.abs() >= 0.999).float().mean()) if x.numel() else 0.0,
        dc_offset=float(x.mean()) if x.numel() else 0.0, flatness=spectral_flatness(x),
        silent_end=silent_end(x, audio.sample_rate, peak))


def silent_end(x: torch.Tensor, sample_rate: int, peak: float, frame_s: float = 0.05) -> float:
    """Seconds of silence at the end of `x` (L,), whose peak is `peak`: frames of `frame_s` whose
    RMS is SILENT_DBFS or more under the peak, since the encoding scales the prompt to full scale (a
    quiet recording's tail is as loud to the model as a loud one's)."""
    frame = max(1, int(frame_s * sample_rate))
    n = x.numel() // frame
    if n == 0 or peak == 0.0:
        return 0.0
    loud = x[-n * frame:].reshape(n, frame).square().mean(dim=1).sqrt() >= peak * 10 ** (SILENT_DBFS / 20)
    last = int(loud.nonzero().max()) if loud.any() else -1  # the last frame that plays
    return (n - 1 - last) * frame / sample_rate


# What fine-tuning has cost and given, as measured (benchmarks/RESULTS.md: GPU lease 1, which made the
# bundled model from the chorale model, and the S4D training step on a CPU, 2 x 4,096 samples in
# 0.871 s), for the advice on a prompt the model finds surprising.
FINETUNE_MEASURED = {
    "hours": 3.88, "seen_hours": 25.2, "steps": 2768, "window_s": 4.096, "batch": 8, "gpu": "an H200", "gpu_s": 543,
    "before_bits": 5.556, "after_bits": 3.518,  # held-out piano renders through soundfonts it had not heard
    "cpu": "2 AMD EPYC cores", "cpu_audio_s_per_s": 0.59,
}


def finetune_advice(model: str | None) -> str:
    """What fine-tuning on similar music takes: the hours, steps and time measured, and the commands,
    with the model named."""
    m, name = FINETUNE_MEASURED, model or "default"
    cpu_hours = 3600 / m["cpu_audio_s_per_s"] / 3600
    return (f"to continue music like this well, fine-tune on some of it. Measured: {m['hours']:g} h of new "
            f"music, {m['steps']:,} steps of {m['batch']} x {m['window_s']:g} s windows ({m['seen_hours']:g} h "
            f"seen), {m['gpu_s'] / 60:.0f} min "
            f"on {m['gpu']}, took the chorale model to the bundled one, from {m['before_bits']:.2f} to {m['after_bits']:.2f} "
            f"bits/sample on music of that kind it had not heard. Gather an hour or more of similar audio (the "
            f"measured run had {m['hours']:g} h); on a CPU ({m['cpu']}: {m['cpu_audio_s_per_s']:g} audio s per s) "
            f"one pass over an hour takes about {cpu_hours:.0f} h, so use a GPU if you can: `s4music prepare YOUR_FILES "
            f"-o data/mine`, then `s4music train --mode finetune --from {name} --data data/mine --fast "
            f"--max-minutes 10`")


def judge(report: PromptReport, bits: float | None, summary: dict, model: str | None = None) -> PromptReport:
    """Set the verdict, reasons and advice from the signal and the model's NLL on the prompt.
    `model`: the model's name or path, as the advice's commands name it."""
    domain = summary.get("domain")
    knows = f"this model was trained on {domain}" if domain else "this model's training data"
    report.bits, report.reference_bits = bits, summary.get("test_bits")
    levels = []

    def flag(level: str, reason: str, advice: str | None = None) -> None:
        levels.append(level)
        report.reasons.append(reason)
        if advice:
            report.advice.append(advice)

    if summary.get("kind") == "speech":
        flag(FAR, f"this model knows speech ({domain or 'spoken words'}), not music",
             "for music, use --model default, or youtubemix for piano")
    if report.rms_dbfs < SILENT_DBFS:
        level = "digital silence" if report.peak_dbfs <= dbfs(0.0) else f"RMS {report.rms_dbfs:.0f} dBFS"
        flag(FAR, f"the prompt is silent ({level})",
             "give a prompt with music in it, or trim to a part that plays (--prompt-start/--prompt-end)")
    elif report.flatness > NOISE_FLATNESS:
        flag(FAR, f"the prompt sounds like noise (spectral flatness {report.flatness:.2f}; music is usually < 0.1)",
             f"{knows}; a noisy prompt gives a noisy continuation")
    if report.rms_dbfs >= SILENT_DBFS and report.silent_end >= SILENT_END_S:
        flag(UNUSUAL, f"the prompt ends in {report.silent_end:.1f} s of silence, where the continuation starts",
             "end the prompt where the music still plays (--prompt-end: seconds into the file)")
    if report.seconds < 0.5:
        flag(UNUSUAL, f"the prompt is short ({report.seconds:.2f} s)", "a few seconds of prompt give the model more to go on")
    if report.clipped > 0.001:
        flag(UNUSUAL, f"{report.clipped:.1%} of the samples are clipped", "use a less compressed or quieter source")
    if abs(report.dc_offset) > DC_OFFSET:
        flag(UNUSUAL, f"DC offset of {report.dc_offset:+.3f}", None)

    ref = report.reference_bits
    if bits is not None and ref is not None:
        delta = bits - ref
        where = f"{bits:.2f} bits/sample against {ref:.2f} on the model's test set"
        if delta > 2.0:
            flag(FAR, f"the model finds the prompt very surprising ({where})",
                 f"{knows}; music far from it (other instruments, drums, voice) will likely degrade")
        elif delta > SURPRISING:
            flag(UNUSUAL, f"the model finds the prompt surprising ({where})",
                 f"{knows}; expect a looser continuation")
        elif delta < -2.0:
            flag(UNUSUAL, f"the prompt is far more predictable than the model's music ({where})",
                 "very simple or sparse prompts tend to fade into silence")
        else:
            report.reasons.append(f"the model finds the prompt familiar ({where})")
    elif bits is not None:
        levels.append(UNKNOWN)
        chance = ", near chance (8): the model has learned little" if bits > CHANCE_BITS else ""
        report.reasons.append(f"{bits:.2f} bits/sample on the prompt{chance}; this checkpoint records no test NLL "
                              "to compare with")
        report.advice.append("`s4music eval MODEL --data DATASET --record` gives it one")
    report.verdict = next((level for level in (FAR, UNUSUAL, UNKNOWN) if level in levels), TYPICAL)
    if report.verdict != TYPICAL and report.unfamiliar:
        report.advice.append(finetune_advice(model))
    if report.unfamiliar and (rule := summary.get("sampling_unfamiliar")):
        values = ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in rule.items())
        report.advice.append(f"`continue` samples it with {values}, this model's rule for a prompt it finds "
                             "surprising, unless you set them")
    return report


DEGENERACIES = {"silence": "collapsed into silence", "noise": "ran away into noise",
                "hiss": "turned to hiss, far flatter than any of the model's test audio",
                "offset": "stuck at a DC offset",
                "drone": "settled into a drone: no onsets and a steady level over its second half"}
# A take is hiss when its flatness is this many times the flattest (hissiest) window of the audio the
# model was tested on (`eval --record` keeps the band): the chorale model's (models/chorales) test
# windows reach 0.0076, its takes that drift stay near that, and a take that turned to hiss measured
# 0.095. The bundled model's test audio has recordings up to 0.12: 4x that is past NOISE_FLATNESS.
HISS_FACTOR = 4.0
# A take is a drone when over its second half it has fewer onsets than this a second and a steadier
# level than this (`measures.liveliness`): rendered chorales and the corpus recordings measured 3-8
# onsets a second in 5 s windows, with level spreads from 1.5 dB up; a held tone has 0 and 0.
DRONE_ONSETS_PER_S = 0.5
DRONE_SPREAD_DB = 1.0
DRONE_MIN_S = 2.0  # judged on a second half at least this long: a take of 4 s or more


def degeneracy(wave: torch.Tensor, sample_rate: int, band: dict | None = None) -> str | None:
    """'silence', 'noise', 'hiss', 'offset' or 'drone' when the continuation (as the model made it,
    before any DC removal) collapses to silence, runs away into noise (absolute: near white noise),
    turns flatter than HISS_FACTOR times the hissiest window of the model's own test audio (`band`,
    the flatness band `eval --record` stores; relative to the model), over its second half sits at
    an offset beyond DC_OFFSET and STUCK_RATIO times its own spread, or there settles into a drone
    (`measures.liveliness`: no onsets, a steady level); None when it does none of these."""
    tail = wave[wave.numel() // 2 :]
    if tail.numel() == 0:
        return None
    if dbfs(float((tail - tail.mean()).square().mean().sqrt())) < SILENT_DBFS:
        return "silence"  # a constant level is silence too, whatever its offset
    flatness = spectral_flatness(wave)
    if flatness > NOISE_FLATNESS:
        return "noise"
    if band and band.get("max") and flatness > HISS_FACTOR * band["max"]:
        return "hiss"
    if abs(float(tail.mean())) > max(DC_OFFSET, STUCK_RATIO * float(tail.std())):
        return "offset"
    if tail.numel() >= DRONE_MIN_S * sample_rate:
        alive = liveliness(tail, sample_rate)
        if alive.onsets_per_s < DRONE_ONSETS_PER_S and alive.level_spread_db < DRONE_SPREAD_DB:
            return "drone"
    return None

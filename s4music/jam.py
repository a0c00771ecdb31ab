"""`s4music jam`: a band mate that listens live and answers when you pause.

    result = run_jam(wav_stream(sys.stdin.buffer, 16000), options=JamOptions(wait=1.0),
                     record="jam.wav", log="turns.jsonl")

A state-space model keeps a constant-size state in step with live audio, sample by sample, for as
long as the music goes on. While the player plays, the state follows the input as it arrives: in
blocks of `align` samples (or two) read in one parallel pass (`prefill(x, state)`) where the
state's time is aligned to them, and by teacher forcing through the fused step for the rest (fewer
samples, and its cost per sample does not depend on the block). When the input has stayed quiet for `wait`
seconds (quiet: `quiet_db` below the recent playing level), the model answers from its state until
the player comes back or `max_answer` seconds pass; then the answer fades out within one block
(20 ms) and the jam listens again. The model hears its own answer (its state continues through it)
and then the player's return.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from s4music.audio import Audio, decode, encode
from s4music.dsp import HighPass, dbfs
from s4music.files import AtomicFile, interrupts_deferred
from s4music.generate.options import new_seed
from s4music.generate.sampler import Sampler, Stepper
from s4music.jam_options import JamError, JamOptions
from s4music.guidance import describe_signal, judge, unfamiliar
from s4music.model.registry import load_model
from s4music.model.s4 import SCAN_CHUNK
from s4music.model.sashimi import SaShiMi
from s4music.sinks import DeviceSink, RecordingSink, Sink

MUSIC_FLOOR_DBFS = -60.0  # the first block above this starts the jam's sense of the playing level
LEVEL_RELEASE_DB_PER_S = 3.0  # how fast the playing level follows a softer passage down
PEAK_RELEASE_DB_PER_S = 1.0  # how fast the encoding scale follows the input down
# ... but no lower than this (-60 dBFS): through a long silence the scale kept falling, to where a
# noise floor would be encoded at full scale
PEAK_FLOOR = 1e-3
RECENT_S = 3.0  # the live verdict judges this much of the latest playing
LEVEL_S = 2.0  # an answer matches the loudness of this much of the latest playing
MAX_LEVEL_GAIN = 10.0  # an answer is raised or lowered by at most 20 dB to match


@dataclass
class Turn:
    """One answer, on the jam's clock (seconds of input since the start)."""

    index: int
    seed: int
    silence_s: float  # when the quiet it answers began
    start_s: float
    end_s: float
    ended: str  # "player returned", "max answer", "input ended" or "stopped" (Ctrl-C)
    bits_per_sample: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class JamEvent:
    # "listening" (the first block is in: the recording is kept from here, however the jam stops),
    # "verdict" (the live guidance changed), "answer" (one begins) or "turn" (one ended)
    kind: str
    time_s: float
    text: str
    turn: Turn | None = None


class Jam:
    """Listening and answering, one block of input at a time: `feed(block)` returns the model's
    answer for that block's time (zeros while it listens)."""

    def __init__(self, net: SaShiMi, options: JamOptions | None = None,
                 on_event: Callable[[JamEvent], None] | None = None):
        self.options = options or JamOptions()
        self.options.check()
        self.on_event = on_event or (lambda event: None)
        self.sr = net.audio.sample_rate
        self.scheme = net.audio.quantization
        self.stepper = Stepper(net, self.options.step)
        self.net = self.stepper.net
        # a jam's state follows the live input as it comes, so it is never re-anchored; by whether
        # the model finds what it heard surprising, the model's rule for familiar or unfamiliar input
        self.rules = {strange: replace(self.options.sampling.resolved(net.summary, strange), context_seconds=0.0)
                      for strange in (False, True)}
        guiding = [rule for rule in self.rules.values() if rule.guidance != 1]
        self.seed = self.options.seed if self.options.seed is not None else new_seed()
        self.align = SCAN_CHUNK * net.config.total_pool  # a prefill from a state this aligned takes no slow head
        self.state = self.net.initial_state(1)
        self.code = torch.tensor([net.config.n_codes // 2])  # the next input, as after the official start code
        self.clock = 0  # input samples seen
        self.pending: list[torch.Tensor] = []  # input codes the state has not taken yet
        self.peak = PEAK_FLOOR  # the encoding scale: the input's recent peak
        self.target_rms = 0.0  # the answer's loudness: the player's last LEVEL_S seconds before the pause
        self.tail: deque[np.ndarray] = deque()  # the last LEVEL_S seconds of input, quiet moments included
        self.level_db: float | None = None  # the recent playing level
        self.quiet_since: int | None = None  # clock sample where the current quiet began
        self.armed = False  # the player has played since the last answer
        self.answer: Sampler | None = None
        self.turns: list[Turn] = []
        self.highpass = HighPass(self.sr)
        self.heard: deque[np.ndarray] = deque()  # the last few seconds of playing, and the model's bits on them
        self.heard_bits: deque[tuple[int, float]] = deque()  # (samples, summed bits) of what the state took
        # the last codes the state took, ending with the next input: what guidance's free row hears
        self.recent = torch.zeros(0, dtype=torch.long)
        self.recent_keep = int((max(r.guidance_seconds for r in guiding) + 1) * self.sr) if guiding else 0
        self.played_s = 0.0
        self.verdict: str | None = None
        self.next_verdict_s = self.options.guidance_after

    # ---------------------------------------------------------------- the state follows the input
    def _absorb(self, everything: bool, eager: bool = False) -> None:
        """Feed pending input codes into the state: aligned blocks by one parallel pass (two aligned
        units at a time while the player plays, which runs faster; one at a time with `eager`, when
        an answer may be near and what is left pending must be short), the rest (to re-align after
        an answer, or all of it with `everything`) by teacher forcing."""
        codes = torch.cat(self.pending) if self.pending else torch.zeros(0, dtype=torch.long)
        taken, big = 0, 2 * self.align
        while taken < len(codes):
            t, left = self.state.t, len(codes) - taken
            if t % self.align:
                n, forced = min(left, self.align - t % self.align), True
            elif t % big == 0 and left >= big:
                n, forced = big, False
            elif left >= self.align and (eager or t % big):
                n, forced = self.align, False
            elif everything:
                n, forced = left, True
            else:
                break
            self._take(codes[taken : taken + n], forced)
            taken += n
        self.pending = [codes[taken:]] if taken < len(codes) else []

    def _take(self, codes: torch.Tensor, forced: bool) -> None:
        bits, self.state = self.stepper.follow(self.code, self.state, codes, step_by_step=forced)
        self.code = codes[-1:]
        if self.recent_keep:
            self.recent = torch.cat([self.recent, codes])[-self.recent_keep:]
        self.heard_bits.append((len(codes), float(bits.sum())))
        while sum(n for n, _ in self.heard_bits) - self.heard_bits[0][0] > RECENT_S * self.sr:
            self.heard_bits.popleft()

    # ---------------------------------------------------------------- a block
    def feed(self, block: np.ndarray) -> np.ndarray:
        """One block of input (n,) float32 at the model's rate -> the answer for its time (n,)."""
        block = np.asarray(block, dtype=np.float32)
        n = len(block)
        seconds = n / self.sr
        rms_db = dbfs(float(np.sqrt(np.mean(block.astype(np.float64) ** 2)))) if n else -200.0
        quiet = self.level_db is None or rms_db < self.level_db - self.options.quiet_db
        if not quiet:
            self.level_db = max(rms_db, self.level_db - LEVEL_RELEASE_DB_PER_S * seconds)
        elif self.level_db is None and rms_db > MUSIC_FLOOR_DBFS:
            self.level_db, quiet = rms_db, False
        out = np.zeros(n, dtype=np.float32)
        if self.answer is None:
            self._listen(block, quiet)
        else:
            out = self._answer_block(n, ended=None if quiet else "player returned")
            if not quiet:  # the answer has ended; the state hears the block the player came back with
                self._listen(block, quiet)
        self.clock += n
        return out

    def _listen(self, block: np.ndarray, quiet: bool) -> None:
        n = len(block)
        if len(block):
            self.peak = max(PEAK_FLOOR, float(np.abs(block).max()),
                            self.peak * 10 ** (-PEAK_RELEASE_DB_PER_S * n / self.sr / 20))
        self.pending.append(encode(torch.from_numpy(block), self.scheme, peak=self.peak).long())
        self._absorb(everything=False, eager=quiet)
        if quiet and self.quiet_since is None and self.tail:  # a pause begins: the level to answer at
            recent = np.concatenate(self.tail).astype(np.float64)
            self.target_rms = float(np.sqrt(np.mean(recent**2)))
        self.tail.append(block)
        while len(self.tail) > 1 and sum(map(len, self.tail)) - len(self.tail[0]) >= LEVEL_S * self.sr:
            self.tail.popleft()
        if not quiet:
            self.armed, self.quiet_since = True, None
            self.played_s += n / self.sr
            self.heard.append(block)
            while len(self.heard) > 1 and sum(map(len, self.heard)) - len(self.heard[0]) > RECENT_S * self.sr:
                self.heard.popleft()
            self._guidance()
            return
        if self.quiet_since is None:
            self.quiet_since = self.clock
        if self.armed and self.clock + n - self.quiet_since >= self.options.wait * self.sr:
            self._start_answer(self.clock + n)  # from the next block on

    def _start_answer(self, start: int) -> None:
        self._absorb(everything=True)
        index = len(self.turns)
        seed = self.seed + index
        taken = sum(n for n, _ in self.heard_bits)
        heard = sum(b for _, b in self.heard_bits) / taken if taken else None
        test_bits = self.net.summary.get("test_bits")
        strange = unfamiliar(heard, test_bits) and self.rules[True] != self.rules[False]
        sampling = self.rules[strange].with_surprise_of(heard or test_bits)
        self.answer = self.stepper.sampler(self.state, self.code, [seed], sampling, self.recent)
        self.answer_info = {"index": index, "seed": seed, "silence": self.quiet_since, "start": start,
                            "logprob": 0.0, "samples": 0, "energy": 0.0, "gain": None}

        self.armed, self.quiet_since = False, None
        self.on_event(JamEvent("answer", self.answer_info["start"] / self.sr, f"answering (seed {seed}"
                                   f"{', the rule for unfamiliar input' if strange else ''})"))

    def _answer_block(self, n: int, ended: str | None) -> np.ndarray:
        info = self.answer_info
        if ended is None and info["samples"] + n >= self.options.max_answer * self.sr:
            ended = "max answer"
        codes, logprobs = self.answer.take(n)
        info["logprob"] += float(logprobs.double().sum())
        info["samples"] += n
        wave = self.highpass(decode(codes, self.scheme) * self.peak)[0].float().numpy()
        if self.options.match_level and self.target_rms > 0:
            wave = self._matched(wave, info)
        if ended is not None:
            wave *= np.linspace(1.0, 0.0, n, dtype=np.float32)  # fade out within the block
            self._end_answer(ended, self.clock + n)
        return wave

    def _matched(self, wave: np.ndarray, info: dict) -> np.ndarray:
        """The answer block at the player's recent loudness: a gain from the answer's RMS so far,
        moved halfway to the new figure each block (no jumps), clipped to full scale."""
        info["energy"] += float(np.sum(wave.astype(np.float64) ** 2))
        rms = math.sqrt(info["energy"] / max(1, info["samples"]))
        want = min(MAX_LEVEL_GAIN, max(1 / MAX_LEVEL_GAIN, self.target_rms / max(rms, 1e-9)))
        info["gain"] = want if info["gain"] is None else info["gain"] + 0.5 * (want - info["gain"])
        return np.clip(wave * info["gain"], -1.0, 1.0)

    def _end_answer(self, why: str, end: int) -> None:
        info = self.answer_info
        state, code = self.answer.variations()  # it heard its own answer (not guidance's free row)
        self.state, self.code = state, code.cpu()
        self.answer = None
        bits = -info["logprob"] / max(1, info["samples"]) / math.log(2)
        turn = Turn(info["index"], info["seed"], info["silence"] / self.sr, info["start"] / self.sr, end / self.sr,
                    why, bits)
        self.turns.append(turn)
        self.on_event(JamEvent("turn", turn.end_s, f"answer {turn.index + 1}: {turn.start_s:.2f}-{turn.end_s:.2f} s, "
                                                   f"{why}, {bits:.2f} bits/sample", turn))

    def finish(self, why: str = "input ended") -> None:
        """The input has ended, or the jam was stopped: close an answer that was playing."""
        if self.answer is not None:
            self._end_answer(why, self.clock)

    def _guidance(self) -> None:
        """A one-line verdict on how well the model knows the input, first after guidance_after
        seconds of playing, then each second, reported when it changes."""
        if self.played_s < self.next_verdict_s:
            return
        self.next_verdict_s = self.played_s + 1.0
        taken = sum(n for n, _ in self.heard_bits)
        if not taken or not self.heard:
            return
        audio = Audio(torch.from_numpy(np.concatenate(self.heard)), self.sr, self.sr, 1)
        report = judge(describe_signal(audio, "live input"), sum(b for _, b in self.heard_bits) / taken,
                       self.net.summary, self.net.name)
        if report.verdict != self.verdict:
            self.verdict = report.verdict
            why = report.reasons[-1] if report.reasons else ""
            self.on_event(JamEvent("verdict", self.clock / self.sr, f"{report.verdict}: {why}"))


@dataclass
class JamResult:
    turns: list[Turn]
    seconds: float  # of input
    seed: int
    step: str
    record: Path | None
    log: Path | None


def run_jam(source: Iterator[np.ndarray], model: str | Path | SaShiMi | None = None,
            options: JamOptions | None = None, record: str | Path | None = None, log: str | Path | None = None,
            play: bool = True, on_event: Callable[[JamEvent], None] | None = None,
            sample_rate: int | None = None) -> JamResult:
    """Jam on the blocks of `source` (mono float32 at the model's rate; see s4music.sources), until it
    ends. `record` writes the jam as two channels (the input as heard, the model's answers); `log`
    one JSON line per answer. Both are kept, closed and valid, however the jam stops."""
    options = options or JamOptions()
    net = model if isinstance(model, SaShiMi) else load_model(model, device="cpu")
    sr = net.audio.sample_rate
    if sample_rate is not None and sample_rate != sr:
        raise JamError(f"the source gives {sample_rate} Hz, the model takes {sr} Hz")
    with contextlib.ExitStack() as stack:
        if hasattr(source, "close"):  # a live input's stream closes however the jam ends
            stack.callback(source.close)

        recording, turns = _Kept(), _Kept()  # no files yet

        def event(e: JamEvent) -> None:
            if e.turn is not None and turns.output is not None:
                turns.output.write(e.turn)
            if on_event is not None:
                on_event(e)

        jam = Jam(net, options, event)  # before any file: bad options leave nothing behind
        # each output's exit is registered before its file exists, and a Ctrl-C waits until the file
        # is in its hands, so no stop leaves a temporary
        stack.enter_context(recording)
        stack.enter_context(turns)
        with interrupts_deferred():
            recording.output = RecordingSink(record, sr, 2) if record else None
            turns.output = TurnLog(log) if log else None
        device = DeviceSink(sr) if play else None
        if device is not None:
            stack.callback(device.abort)  # does nothing once it has closed
        try:
            for block in source:
                answer = jam.feed(block)
                if recording.output is not None:
                    recording.output.write(np.stack([block, answer], axis=1))
                if not recording.started:  # the jam has begun: from here its outputs are kept however it stops
                    recording.started = turns.started = True
                    event(JamEvent("listening", jam.clock / sr, "listening"))
                if device is not None:
                    device.write(answer)
        except KeyboardInterrupt:
            with interrupts_deferred():  # the answer in progress goes into the log as it stopped
                jam.finish("stopped")
            raise
        jam.finish()
        if device is not None:
            device.close()  # what is queued plays to its end
    return JamResult(jam.turns, jam.clock / sr, jam.seed, jam.stepper.name, Path(record) if record else None,
                     Path(log) if log else None)


class TurnLog:
    """One JSON line per answer, in a file that appears on close() (kept, like the recording, however
    the jam stops) or not at all on abort()."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.file = AtomicFile(self.path)
            self.stream = open(self.file.tmp, "w")
        except BaseException as e:  # a Ctrl-C here too: no temporary stays
            if hasattr(self, "file"):
                self.file.abort()
            if isinstance(e, OSError):
                raise JamError(f"{self.path}: cannot write here ({e.strerror or e})") from None
            raise

    def write(self, turn: Turn) -> None:
        self.stream.write(json.dumps(turn.to_dict()) + "\n")
        self.stream.flush()

    def close(self) -> Path:
        self.stream.close()
        return self.file.commit()

    def abort(self) -> None:
        self.stream.close()
        self.file.abort()


class _Kept:
    """An output of the jam (or None) as a context exit: kept (closed) once the jam has begun, however it
    stops; thrown away if it stopped before the first block (a missing device or input file, or a
    Ctrl-C while it was starting), so an earlier file of that name is not replaced by an empty one."""

    def __init__(self):
        self.output: Sink | TurnLog | None = None
        self.started = False

    def __enter__(self) -> _Kept:
        return self

    def __exit__(self, *exc) -> bool:
        if self.output is not None:
            with interrupts_deferred():  # a second Ctrl-C cannot cut a recording's closing short
                if self.started:
                    self.output.close()
                else:
                    self.output.abort()
        return False

"""Stage 3: the sampler. Codes for several variations at once, from one state, a chunk at a time.

    stepper = Stepper(net, StepOptions())                    # picks the step: fused CPU, CUDA graphs, plain
    sampler = stepper.sampler(state, first_code, seeds=[7, 8], sampling=Sampling(0.8, 0, 1.0))
    codes, logprobs = sampler.take(2000)                     # (2, 2000) each; call again to go on

Randomness is one seeded generator per variation, drawn a chunk at a time (the same numbers as one
draw of the whole take), so a seed fixes the codes whatever the chunking.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import torch

from s4music.generate.options import GenerationError, Sampling, StepOptions
from s4music.model.fast import FusedReader, FusedStep, GraphedStep, fused_available, plain_steps, reader
from s4music.model.sashimi import SaShiMi, SaShiMiState

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """The device a model is loaded on: a GPU for auto when there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise GenerationError("--device cuda: no CUDA device is available")
    return torch.device(device)


def prompt_reader(net: SaShiMi, options: StepOptions) -> SaShiMi | FusedReader:
    """What reads prompts and windows for `net` in one parallel pass: the model's own pass for the
    plain step; else the fused C++ reader where it runs, in bf16 where the CPU has it unless full
    weights are asked for (which then read and sample as the plain path does)."""
    return reader(net, bf16=options.half_weights) if options.fused else net


class Stepper:
    """The model on the device that generates, and its fast step.

    With --device auto the fused CPU step generates whenever it builds, even where a GPU read the
    prompt: a GPU step is bound by kernel launches, and the fused step outran an H100's CUDA graphs
    up to dozens of variations (benchmarks/RESULTS.md). --device cuda keeps generation on the GPU.
    """

    def __init__(self, net: SaShiMi, options: StepOptions):
        self.fast: FusedStep | GraphedStep | None = None
        self.reader = prompt_reader(net, options)  # re-anchoring's reads: on the GPU where there is one
        to_cpu = net.device.type == "cuda" and (
            options.device == "cpu" or (options.device == "auto" and options.fused and fused_available()))
        if to_cpu:  # a copy: the caller's model stays where it is
            log.info("generating on the CPU (--device cuda: on the GPU)")
            net = copy.deepcopy(net).cpu()
        if not options.fused:
            self.name = f"plain-{net.device.type}"
        else:
            if net.device.type == "cuda":
                self.fast, self.name = GraphedStep(net), "graphed-cuda"
            elif fused_available():
                self.fast = FusedStep(net, half=options.half_weights)
                self.name = "fused-cpu-fp16" if self.fast.half else "fused-cpu"
            else:
                self.name = "plain-cpu"
        self.net = net

    @torch.no_grad()
    def follow(self, first: torch.Tensor, state: SaShiMiState, codes: torch.Tensor,
               step_by_step: bool = False) -> tuple[torch.Tensor, SaShiMiState]:
        """Feed what was heard into `state` (batch 1): inputs `first` (1,) then codes[:-1] (L,).
        Returns each code's bits (L,) float64 and the state after (its next input is codes[-1]).
        step_by_step: teacher forcing through the fused step where there is one (cheap for a few
        samples, and from any point of the pools); else one parallel pass of the reader."""
        if step_by_step and isinstance(self.fast, FusedStep):
            _, logprobs, _ = self.fast.run(first, state, torch.zeros(1, len(codes)), forced=codes.unsqueeze(0))
            return -logprobs[0].double() / math.log(2), state
        x = torch.cat([first, codes[:-1]]).unsqueeze(0)
        bits, state = self.reader.prefill_bits(x, codes.unsqueeze(0), state)
        return bits[0].double(), state

    def sampler(self, state: SaShiMiState, first: torch.Tensor, seeds: list[int], sampling: Sampling,
                heard: torch.Tensor | None = None) -> Sampler:
        """Variations, one per seed, that all start from `state` (batch 1, left as it is) and input `first`.
        `heard`: the codes (L,) the state was read from, ending with `first` (empty from rest); with
        it, sampling.context_seconds re-anchors the state (without it, re-anchoring is off)."""
        return Sampler(self, state, first, seeds, sampling, heard)


class Sampler:
    """len(seeds) variations stepped together from copies of one state.

    Guidance (sampling.guidance != 1, and `heard` given): each variation is a pair of rows, one from
    `state` and one that heard only the last sampling.guidance_seconds of `heard` (a few more
    samples, so both rows are at the same phase of the pools); both take each code drawn from
    free + guidance (prompt - free). A batch of 2 per variation. The log-probabilities returned are
    the prompt row's.

    Re-anchoring (sampling.context_seconds = W, and `heard` given): every W/2 samples from the seam,
    each variation's state is read afresh, in one parallel pass of its own, from its last W seconds
    alone (prompt and sampled codes), as a training window of that length is read; so the model
    hears between W and 1.5 W seconds. Points where all it has heard fits in W are skipped (the
    read would give the state it has). The points count from the seam and each variation is read
    alone, so a seed fixes its codes whatever the chunking and the number of variations. Each read
    costs about as long as reading a prompt of W seconds, and log-probabilities are then those
    given the window.

    Mirostat (sampling.surprise > 0): each variation keeps its running bound from take to take.
    """

    def __init__(self, stepper: Stepper, state: SaShiMiState, first: torch.Tensor, seeds: list[int],
                 sampling: Sampling, heard: torch.Tensor | None = None):
        sampling = sampling.resolved({})  # what is unset is off
        self.stepper, self.sampling, self.seeds = stepper, sampling, list(seeds)
        device, rule = stepper.net.device, sampling.rule()
        free = self._free_state(state, heard) if rule.pairs else None
        self.pairs = free is not None
        self.state = SaShiMiState.join([state, free] * len(seeds), device) if free else state.repeat(len(seeds))
        self.rows = len(seeds) * (2 if self.pairs else 1)
        self.code = first.reshape(-1)[:1].repeat(self.rows).to(device)
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.mu = rule.first_mu(self.rows)
        if self.mu is not None and stepper.fast is None:
            self.mu = self.mu.to(device)
        window = int(round((sampling.context_seconds or 0) * stepper.net.audio.sample_rate))
        self.window = window if heard is not None and window >= 2 else 0
        if self.window:
            self.heard = heard.reshape(1, -1)[:, -self.window:].long().repeat(len(seeds), 1)  # (V, <= window)
            self.heard_total = heard.numel()  # codes the state has heard, all told
        self.since_anchor = 0
        self.anchors = 0  # re-anchorings so far

    def variations(self) -> tuple[SaShiMiState, torch.Tensor]:
        """Each variation's own state (V, ...) and next input (V,), without guidance's free rows:
        what heard the prompt and the codes drawn so far."""
        if not self.pairs:
            return self.state, self.code
        return self.state.rows(slice(0, None, 2)), self.code[0::2]

    def _free_state(self, state: SaShiMiState, heard: torch.Tensor | None) -> SaShiMiState | None:
        """The state after the last guidance_seconds of `heard` alone, from rest, rounded up to the
        pools' phase of `state`; None when nothing was heard (nothing to contrast with)."""
        net = self.stepper.net
        if heard is None or heard.numel() < 2:
            return None
        period = math.prod(net.config.pool)
        n = int(round(self.sampling.guidance_seconds * net.audio.sample_rate))
        n += (state.t - n) % period
        while n > heard.numel():
            n -= period
        if n < 0:
            return None
        tail = heard.reshape(1, -1)[:, heard.numel() - n:].long()
        if n == 0:
            free = net.initial_state(1)
        else:
            reader = self.stepper.reader
            free = reader.prefill(reader.shift_right(tail.to(reader.device)), logits=False)[1]
        free.t = state.t
        return free

    @torch.no_grad()
    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next n codes of every variation, (V, n) int64, and their log-probabilities (V, n)."""
        uniforms = torch.stack([torch.rand(n, generator=g) for g in self.generators])
        if self.pairs:
            uniforms = uniforms.repeat_interleave(2, dim=0)
        if not self.window or n == 0:
            return self._steps(uniforms)
        every, parts, i = self.window // 2, [], 0
        while i < n:
            m = min(n - i, every - self.since_anchor)
            parts.append(self._steps(uniforms[:, i:i + m]))
            self.heard = torch.cat([self.heard, parts[-1][0]], dim=1)[:, -self.window:]
            i, self.since_anchor, self.heard_total = i + m, self.since_anchor + m, self.heard_total + m
            if self.since_anchor == every:
                self.since_anchor = 0
                if self.heard_total > self.window:
                    self._reanchor()
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

    def _reanchor(self) -> None:
        """Each variation's state after its last `window` codes alone; its next input (the last code)
        is unchanged."""
        reader = self.stepper.reader
        states = [reader.prefill(reader.shift_right(row[None].to(reader.device)), logits=False)[1]
                  for row in self.heard]
        self.state = SaShiMiState.join(states, self.stepper.net.device)
        self.anchors += 1

    def _steps(self, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and log-probabilities (V, n) for uniforms (rows, n)."""
        n = uniforms.shape[1]
        rule = self.sampling.rule()
        if not self.pairs:
            rule = dataclasses.replace(rule, guidance=1.0)  # nothing heard: nothing to guide by
        fast = self.stepper.fast
        if fast is not None:
            codes, logprobs = fast.run(self.code, self.state, uniforms, rule, self.mu)
            self.code = codes[:, -1].to(self.stepper.net.device)
            codes, logprobs = codes.cpu(), logprobs.cpu()
        else:
            codes = torch.empty(self.rows, n, dtype=torch.long)
            logprobs = torch.empty(self.rows, n)
            self.code, self.state = plain_steps(self.stepper.net, self.code, self.state, uniforms, codes, logprobs,
                                                rule, self.mu)
        if self.pairs:
            return codes[0::2], logprobs[0::2]
        return codes, logprobs

"""Sampling, and the fast steps: fused C++ on the CPU, CUDA graphs on a GPU.

Three paths produce continuations, and they make the same choices:
    plain    SaShiMi.step (PyTorch, any device), one Python call per sample; the reference
    fused    csrc/fast_step.cpp: the whole step and the sampling in C++, many samples per call, with the
             linear weights in float32 (the same codes as the plain path) or half precision (faster)
    graphed  the plain step and sampling on a CUDA device, captured once as a CUDA graph of many
             samples and replayed: the same kernels, so the same codes, without Python per sample

Randomness is a tensor of uniforms drawn up front from a seeded generator, one per sample and
variation, and both paths turn logits into a code with the same inverse-CDF rule
(`sample_codes`). So a seed fixes the output, and the paths agree wherever their logits do.
The extension is JIT-built once per machine (`make install` does it; else the first use, with a
log line while it builds) and cached; without a C++ compiler the plain path is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from s4music.errors import first_line
from s4music.extensions import cache_home, load_extension
from s4music.files import write_json
from s4music.model.s4 import weights_version
from s4music.model.sashimi import FeedForward, SaShiMi, SaShiMiState, WeightNormLinear

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "fast_step.cpp"  # with the headers beside it
_built: dict = {}


@dataclass(frozen=True)
class Rule:
    """How logits become a code, the same in every path (sample_codes here, `sample` in csrc/sampling.h).

    The probabilities at `temperature` (0: greedy), then, in this order: Mirostat's bound when
    `surprise` > 0 (codes more surprising than the running bound mu, in bits at temperature 1,
    dropped; the likeliest kept; after each draw mu -= SURPRISE_RATE (the code's surprise - target),
    from 2 x target); locally typical (`typical` < 1: the codes whose surprise is nearest the
    entropy, up to that probability); top-k; top-p. `guidance` != 1: rows come in pairs (the
    prompt's, then one that did not hear it) and both take the code drawn from
    free + guidance (prompt - free).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical: float = 1.0
    guidance: float = 1.0
    surprise: float = 0.0

    SURPRISE_RATE = 0.1

    @property
    def pairs(self) -> bool:
        return self.guidance != 1.0

    def first_mu(self, rows: int) -> torch.Tensor | None:
        """Mirostat's starting bounds for `rows` rows, float64; None when it is off."""
        return torch.full((rows,), 2.0 * self.surprise, dtype=torch.float64) if self.surprise > 0 else None


def _keep_prefix(prob: torch.Tensor, order: torch.Tensor, mass: float, ranked: int | None = None) -> torch.Tensor:
    """prob with all but the smallest prefix of `order` (its first `ranked`) reaching `mass` of the total zeroed."""
    ranked_prob = prob.gather(-1, order)
    before = ranked_prob.cumsum(-1) - ranked_prob
    keep = before / prob.sum(-1, keepdim=True) < mass
    keep[:, 0] = True
    if ranked is not None:
        keep[:, ranked:] = False
    return prob * torch.zeros_like(keep).scatter(-1, order, keep).to(prob.dtype)


def sample_codes(logits: torch.Tensor, uniforms: torch.Tensor, rule: Rule = Rule(),
                 mu: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V), uniforms (B,) in [0, 1) -> codes (B,) and their log-probability (B,) at temperature 1.

    The code is the first whose cumulative kept probability exceeds u times their total (see Rule).
    mu (B,) float64: Mirostat's bounds, updated in place (given when rule.surprise > 0).
    """
    logits = logits.float()
    logp = torch.log_softmax(logits.double(), dim=-1).float()
    if rule.temperature <= 0:
        codes = logits.argmax(-1)
    else:
        shifted = logits.double() - logits.double().amax(-1, keepdim=True)
        prob = torch.exp(shifted / rule.temperature)
        if mu is not None:
            surprise = (torch.log(torch.exp(shifted).sum(-1, keepdim=True)) - shifted) / math.log(2)
            likeliest = torch.arange(prob.shape[-1], device=logits.device) == logits.argmax(-1, keepdim=True)
            keep = (surprise <= mu.unsqueeze(-1)) | likeliest
            prob = prob * keep
        if rule.typical < 1:
            total = prob.sum(-1, keepdim=True)
            nats = torch.log(total) - torch.log(prob)  # inf where prob is 0
            entropy = torch.where(prob > 0, prob / total * nats, 0).sum(-1, keepdim=True)
            score = torch.where(prob > 0, (nats - entropy).abs(), math.inf)
            prob = _keep_prefix(prob, torch.sort(score, dim=-1, stable=True).indices, rule.typical)
        if (0 < rule.top_k < prob.shape[-1]) or rule.top_p < 1:
            order = torch.sort(prob, dim=-1, descending=True, stable=True).indices
            prob = _keep_prefix(prob, order, rule.top_p, rule.top_k if rule.top_k > 0 else None)
        cum = prob.cumsum(-1)
        hit = (cum > uniforms.double().unsqueeze(-1) * prob.sum(-1, keepdim=True)) & (prob > 0)
        last_kept = prob.shape[-1] - 1 - (prob > 0).flip(-1).int().argmax(-1)
        codes = torch.where(hit.any(-1), hit.int().argmax(-1), last_kept)
        if mu is not None:
            mu -= Rule.SURPRISE_RATE * (surprise.gather(-1, codes.unsqueeze(-1)).squeeze(-1) - rule.surprise)
    return codes, logp.gather(-1, codes.unsqueeze(-1)).squeeze(-1)


def guided_codes(logits: torch.Tensor, uniforms: torch.Tensor, rule: Rule,
                 mu: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_codes for any rule: with guidance, rows in pairs (prompt, free) -> each pair's code,
    drawn from free + guidance (prompt - free) with the first row's uniform and mu, given to both
    rows, and each row's own log-probability."""
    if not rule.pairs:
        return sample_codes(logits, uniforms, rule, mu)
    prompt, free = logits.float()[0::2].double(), logits.float()[1::2].double()
    mixed = (free + rule.guidance * (prompt - free)).float()
    half = None if mu is None else mu[0::2].clone()
    codes, _ = sample_codes(mixed, uniforms[0::2], rule, half)
    if mu is not None:
        mu[0::2] = half
    codes = codes.repeat_interleave(2)
    return codes, torch.log_softmax(logits.double(), -1).float().gather(-1, codes.unsqueeze(-1)).squeeze(-1)


def plain_steps(model: SaShiMi, code: torch.Tensor, state: SaShiMiState, uniforms: torch.Tensor, codes: torch.Tensor,
                logprobs: torch.Tensor, rule: Rule = Rule(),
                mu: torch.Tensor | None = None) -> tuple[torch.Tensor, SaShiMiState]:
    """The plain path: one SaShiMi.step and one `guided_codes` per column of uniforms (B, n), from
    inputs `code` (B,). Writes codes (B, n) and their log-probabilities (B, n) in place; returns the
    last code and the state. mu: Mirostat's bounds (B,), updated in place."""
    uniforms = uniforms.to(model.device)
    for k in range(uniforms.shape[1]):
        logits, state = model.step(code, state)
        code, lp = guided_codes(logits, uniforms[:, k], rule, mu)
        codes[:, k], logprobs[:, k] = code, lp
    return code, state


def _extension():
    """Build (or load the cached build of) the fused step; None when that is impossible here."""
    if "module" in _built:
        return _built["module"]
    module = None
    try:
        module = build_extension(SOURCE)
    except Exception as e:  # no compiler, or a failed build: the plain path still works
        log.warning("fused CPU step unavailable (%s); using the plain PyTorch step", first_line(e)[:200])
    _built["module"] = module
    return module


def build_extension(source: Path, arch: str = "native"):
    """Build (or load the cached build of) a fused step from `source`, cached by its text, the
    flags, this CPU, torch and the compiler (extensions.load_extension). Raises when it cannot
    build. `SOURCE` is the toolkit's; the A/B benchmark (benchmarks/ab_fused_step.py) builds an
    earlier revision beside it. `arch` is gcc's -march: "native" (this CPU's widest vectors), or
    e.g. "x86-64-v3" (AVX2) to run a narrower CPU's code path on a wider one, as the tests do."""
    flags = ["-O3", f"-march={arch}", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
    return load_extension("s4music_fast_step", [source], cflags=flags, ldflags=["-fopenmp"],
                          headers=sorted(source.parent.glob("*.h")),
                          what=f"the fused CPU step for this CPU ({source.name}, -march={arch})",
                          key_extra=_cpu_flags())


def _cpu_info() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_flags() -> str:
    return next((line for line in _cpu_info().splitlines() if line.startswith("flags")), "")


def fused_available() -> bool:
    return _extension() is not None


def fused_report() -> tuple[bool, str]:
    """Whether the fused CPU step is built here, the instruction sets it runs, and its build's folder."""
    module = _extension()
    if module is None:
        return False, "not built (no C++ compiler, or the build failed: see the log); the plain PyTorch step is used"
    return True, f"built; runs {', '.join(instruction_sets(module))} (widest first); {Path(module.__file__).parent}"


def _weight(linear: nn.Linear | WeightNormLinear) -> tuple[torch.Tensor, torch.Tensor]:
    return linear.weight.detach().float().contiguous(), linear.bias.detach().float().contiguous()


def _layer_tensors(ext, layer: nn.Module) -> tuple[object, dict[str, torch.Tensor]]:
    """A residual layer's kind (ext.LayerKind) and its tensors by the names add_layer takes."""
    if isinstance(layer, FeedForward):
        (w1, b1), (w2, b2) = _weight(layer.fc1), _weight(layer.fc2)
        return ext.LayerKind.FEEDFORWARD, {"fc1_w": w1, "fc1_b": b1, "fc2_w": w2, "fc2_b": b2}
    params = layer.kernel.step_params()
    out_w, out_b = _weight(layer.output_linear)
    tensors = {"a": params["a"], "b": params["b"], "c": params["c"], "D": layer.D.detach()[0].float().contiguous(),
               "out_w": out_w, "out_b": out_b}
    if layer.kernel.config.mode == "diag":
        return ext.LayerKind.S4D, tensors
    return ext.LayerKind.DPLR, {**tensors, **{k: params[k] for k in ("p", "g", "q", "kappa", "cg")}}


def _fast_model(model: SaShiMi, half: bool, extension, isa: str | None, bf16: bool = False):
    """The model's weights, in step form, in a C++ FastSaShiMi (a copy: build it after the weights are final)."""
    ext = extension or _extension()
    if ext is None:
        raise RuntimeError("the fused CPU step could not be built")
    with torch.no_grad():
        downs = [_weight(p.linear) for p in model.down_pools]
        ups = [_weight(u.pool.linear) for u in model.up_blocks]
        dec_w, dec_b = _weight(model.decoder)
        impl = ext.FastSaShiMi(
            embedding=model.encoder.weight.detach().float().clone(), pools=list(model.config.pool),
            down_w=[w for w, _ in downs], down_b=[b for _, b in downs],
            up_w=[w for w, _ in ups], up_b=[b for _, b in ups],
            ln_w=model.norm.weight.detach().float().clone(), ln_b=model.norm.bias.detach().float().clone(),
            ln_eps=model.norm.eps, dec_w=dec_w, dec_b=dec_b, half=half,
            **({"isa": isa} if isa else {}), **({"bf16": True} if bf16 else {}))  # (older A/B builds take neither)
        for tier, layers in enumerate(model.tiers()):
            for res in layers:
                kind, tensors = _layer_tensors(ext, res.layer)
                impl.add_layer(tier=tier, kind=kind, norm_m=float(res.norm.m), norm_s=float(res.norm.s), tensors=tensors)
    return impl


def instruction_sets(extension=None) -> list[str]:
    """The vector instruction sets the fused kernels can run with here, widest first (the first is
    the default): "avx512", "avx2", "plain", as far as this build and CPU have them."""
    ext = extension or _extension()
    return list(ext.instruction_sets()) if ext is not None else []


class FusedStep:
    """The model in step form for the C++ kernel. Build it after the weights are final (it copies them).

    half: hold the linear layers' weights in IEEE half precision (computing in float32), which halves
    the memory a step reads; at batch 1 a step is bound by that. The S4 recurrences stay in float32.
    Without F16C conversions (no AVX2) the weights stay float32; `half` says what is in effect.
    isa: the vector instruction set to run with (see `instruction_sets`); None for the widest.
    """

    def __init__(self, model: SaShiMi, half: bool = False, extension=None, isa: str | None = None):
        """extension: a module from `build_extension`, to run another build of the kernel (A/B)."""
        self.impl = _fast_model(model, half, extension, isa)
        self.half = self.impl.half_weights()
        self.isa = self.impl.instruction_set() if hasattr(self.impl, "instruction_set") else "native"  # (older A/B builds)

    def run(self, codes: torch.Tensor, state: SaShiMiState, uniforms: torch.Tensor, rule: Rule = Rule(),
            mu: torch.Tensor | None = None, forced: torch.Tensor | None = None):
        """Take uniforms.shape[1] steps from `state` (updated in place), first inputs `codes` (B,).

        Returns codes (B, n) and their log-probabilities (B, n); with `forced` (B, n) codes as the
        inputs instead of samples, also the logits (B, n, V). mu: Mirostat's bounds (B,) float64,
        updated in place."""
        rows = {"input codes": {codes.shape[0]}, "uniforms": {uniforms.shape[0]}}
        rows.update({f"state.{name}": {x.shape[0] for x in getattr(state, name)} for name in ("s4", "down", "up")})
        if len(set().union(*rows.values())) > 1:
            raise ValueError("the fused step takes one row of each per input code: "
                             + ", ".join(f"{name} {'/'.join(map(str, sorted(n)))}" for name, n in rows.items() if n))
        # The kernel updates the state tensors in place, so they must be contiguous CPU tensors.
        for group in (state.s4, state.down, state.up):
            group[:] = [x.detach().cpu().contiguous() for x in group]
        extra = {}  # only what is asked for, so earlier builds (the A/B benchmark) run their rules
        if rule.typical != 1 or rule.pairs or mu is not None:
            extra = {"typical": rule.typical, "guidance": rule.guidance, "surprise": rule.surprise,
                     "mu": torch.empty(0, dtype=torch.float64) if mu is None else mu}
        out = self.impl.run(codes.long().contiguous(), state.t, state.s4, state.down, state.up,
                            uniforms.float().contiguous(), rule.temperature, rule.top_k, rule.top_p,
                            torch.empty(0, dtype=torch.long) if forced is None else forced.long().contiguous(),
                            **extra)
        state.t += uniforms.shape[1]
        return tuple(out)


class FusedReader:
    """`SaShiMi.prefill`, `prefill_bits` and `bits` with every tier's residual layers, and the scored
    decoder, in the C++ kernel: time in blocks that stay in cache, the S4 recurrence along each
    block, the linear layers as register tiles (csrc/read.h). The pooling and skips are
    the model's own code. A copy of the weights, so build it after they are final (`reader` does).

    bf16: the residual layers' linear maps take their inputs and weights in bfloat16 (float32 sums)
    where the CPU has AVX512-BF16, twice the multiply-adds an instruction; elsewhere, and for the
    S4 recurrences, pools and decoder always, float32. `precision` says what is in effect. It moved
    the chorale model's bits/sample by +4.7e-4 on examples/prompt.wav and +4.5e-4 on its test split
    (benchmarks/RESULTS.md; tests hold the bundled model's to 1e-3), so prompts are read so (generate, jam) where it measured
    faster on the machine (`reader`); scoring (eval, validation) stays float32.
    """

    def __init__(self, model: SaShiMi, extension=None, isa: str | None = None, bf16: bool = False, *, impl=None):
        """impl: the kernel's copy of these weights, made earlier (`reader` keeps one per model)."""
        if model.device.type != "cpu":
            raise RuntimeError("the fused reader runs on the CPU")
        self.model = model
        self.impl = impl or _fast_model(model, False, extension, isa, bf16)
        self.isa = self.impl.instruction_set()
        self.precision = self.impl.read_precision()
        self.device = model.device
        self.shift_right = model.shift_right

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, state: SaShiMiState | None = None,
                logits: bool = True) -> tuple[torch.Tensor | None, SaShiMiState]:
        """As SaShiMi.prefill: inputs x (B, L) from rest or `state` (left as it is) -> logits and the state after."""
        return self.model.prefill(x, state, logits, parts=self)

    @torch.no_grad()
    def prefill_bits(self, x: torch.Tensor, targets: torch.Tensor,
                     state: SaShiMiState | None = None) -> tuple[torch.Tensor, SaShiMiState]:
        """As SaShiMi.prefill_bits: inputs x (B, L) and the codes they predict -> bits (B, L) and the state after x."""
        return self.model.prefill_bits(x, targets, state, parts=self)

    @torch.no_grad()
    def bits(self, codes: torch.Tensor) -> torch.Tensor:
        """As SaShiMi.bits: each code's negative log-likelihood in bits, (B, L) -> (B, L)."""
        return self.prefill_bits(self.model.shift_right(codes), codes)[0]

    def tier(self, tier: int, h: torch.Tensor, skip: torch.Tensor | None, given: list[torch.Tensor | None]):
        """FastParts.tier, in C++ (in place on h where it can)."""
        blocks = [res.layer for res in self.model.tiers()[tier] if res.is_s4]
        states = [block.kernel.initial_state(h.shape[0]) if s is None else s.to(torch.complex64).clone()
                  for block, s in zip(blocks, given, strict=True)]
        h = h.float().contiguous()
        skip = torch.empty(0) if skip is None else skip.float().contiguous()
        self.impl.read(tier, h, skip, states)
        return h, states

    def head_bits(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """FastParts.head_bits, in C++."""
        return self.impl.head_bits(h.float().contiguous(), targets.long().contiguous())


# model -> {bf16: (its weights' versions, the kernel's copy of them)}; the copies hold no reference to the model
_kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reader(model: SaShiMi, bf16: bool = False) -> SaShiMi | FusedReader:
    """What reads prompts for `model` fastest here, with the same `prefill`, `prefill_bits` and
    `bits`: a FusedReader (see its `bf16`) for a model on the CPU in eval mode where the kernel
    builds, else the model itself. bf16 is a request: it is taken where the CPU has AVX512-BF16 and
    the bf16 read measured faster than the float32 one on this machine (`bf16_read_is_faster`).
    Kept while the weights are unchanged, and made afresh when they change."""
    if model.device.type != "cpu" or model.training or not fused_available():
        return model
    key = weights_version(model)
    kept = _kept.setdefault(model, {})
    for precision in (False, True) if bf16 else (False,):
        if precision not in kept or kept[precision][0] != key:
            kept[precision] = (key, _fast_model(model, False, None, None, precision))
    if bf16 and kept[True][1].read_precision() == "bf16" and bf16_read_is_faster(model, kept[False][1], kept[True][1]):
        return FusedReader(model, impl=kept[True][1])
    return FusedReader(model, impl=kept[False][1])


# The bf16 read is taken only when it is faster by this much: it changes the music (by about 5e-4
# bits/sample), and on a 2-core Xeon with AMX it was 1.3-1.6x slower than float32 while the EPYC it
# was chosen on ran it faster (issue 35, benchmarks/RESULTS.md).
BF16_MIN_GAIN = 1.1
READ_TRIAL_SAMPLES = 16000


def bf16_read_is_faster(model: SaShiMi, float32_impl, bf16_impl) -> bool:
    """Whether reading with `bf16_impl` beats `float32_impl` by BF16_MIN_GAIN for this model here:
    measured once (the faster of 3 interleaved reads of a second of codes each) and kept in
    S4MUSIC_CACHE/read-precision.json by CPU, kernel build, thread count and model shape."""
    module = _extension()
    cpu = next((line for line in _cpu_info().splitlines() if line.startswith("model name")), "")
    key = hashlib.sha256(json.dumps([cpu, _cpu_flags(), getattr(module, "__file__", ""), torch.get_num_threads(),
                                     model.config.to_dict()], sort_keys=True).encode()).hexdigest()[:16]
    path = cache_home() / "read-precision.json"
    try:
        measured = json.loads(path.read_text())
    except (OSError, ValueError):
        measured = {}
    if key not in measured:
        codes = torch.randint(0, model.config.n_codes, (1, READ_TRIAL_SAMPLES),
                              generator=torch.Generator().manual_seed(0))
        best = {"float32": math.inf, "bf16": math.inf}
        for _ in range(3):
            for name, impl in (("float32", float32_impl), ("bf16", bf16_impl)):
                started = time.perf_counter()
                FusedReader(model, impl=impl).prefill(codes, logits=False)
                best[name] = min(best[name], time.perf_counter() - started)
        measured[key] = {"cpu": cpu.split(":", 1)[-1].strip(), "float32_s": best["float32"], "bf16_s": best["bf16"]}
        log.info("measured the prompt read here once: float32 %.3f s, bf16 %.3f s for %d samples; reading in %s",
                 best["float32"], best["bf16"], READ_TRIAL_SAMPLES,
                 "bf16" if best["float32"] >= BF16_MIN_GAIN * best["bf16"] else "float32")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, measured)
    return measured[key]["float32_s"] >= BF16_MIN_GAIN * measured[key]["bf16_s"]


class GraphedStep:
    """SaShiMi.step and `sample_codes` on a CUDA device, replayed from CUDA graphs.

    The plain step launches a few hundred small kernels a sample, and at small batches the GPU idles
    while Python issues them. Which tiers step depends only on t mod P (P the product of the pools),
    so one graph of `block` samples (a multiple of P) starting at t = 0 mod P serves every block that
    starts there. A graph is captured on first use for each batch size and sampling setting, and
    replayed after that. It runs the plain step's kernels on the same inputs, so it samples the plain
    path's codes, bit for bit (tests check this). Samples before the first block boundary and after
    the last whole block take the plain step.
    """

    def __init__(self, model: SaShiMi, block: int = 64):
        if model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        self.model = model
        self.period = math.prod(model.config.pool)
        self.block = self.period * max(1, block // self.period)
        self._graphs: dict[tuple, _StepGraph] = {}

    @torch.no_grad()
    def run(self, codes: torch.Tensor, state: SaShiMiState, uniforms: torch.Tensor, rule: Rule = Rule(),
            mu: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Take uniforms.shape[1] steps from `state` (updated in place), first inputs `codes` (B,).

        Returns codes (B, n) and their log-probabilities (B, n), on the CPU. mu: Mirostat's bounds
        (B,) on the model's device, updated in place."""
        device = self.model.device
        batch, n = uniforms.shape
        uniforms = uniforms.to(device)
        out_codes = torch.empty(batch, n, dtype=torch.long, device=device)
        out_logp = torch.empty(batch, n, device=device)
        code = codes.to(device)
        i = 0
        while i < n:
            if state.t % self.period == 0 and n - i >= self.block:
                key = (batch, rule)
                if key not in self._graphs:
                    self._graphs[key] = _StepGraph(self.model, state, batch, self.block, rule)
                graph = self._graphs[key]
                graph.replay(code, state, uniforms[:, i:i + self.block], mu)
                out_codes[:, i:i + self.block], out_logp[:, i:i + self.block] = graph.codes, graph.logp
                code = graph.codes[:, -1].clone()
                state.t += self.block
                i += self.block
            else:
                code, state = plain_steps(self.model, code, state, uniforms[:, i:i + 1], out_codes[:, i:i + 1],
                                          out_logp[:, i:i + 1], rule, mu)
                i += 1
        return out_codes.cpu(), out_logp.cpu()


class _StepGraph:
    """One captured block of steps and sampling, with the static tensors it reads and writes."""

    def __init__(self, model: SaShiMi, state: SaShiMiState, batch: int, block: int, rule: Rule):
        self.model, self.block, self.rule = model, block, rule
        device = model.device
        self.code = torch.zeros(batch, dtype=torch.long, device=device)
        self.uniforms = torch.zeros(batch, block, device=device)
        self.codes = torch.zeros(batch, block, dtype=torch.long, device=device)
        self.logp = torch.zeros(batch, block, device=device)
        self.mu = None if (mu := rule.first_mu(batch)) is None else mu.to(device)
        self.state = SaShiMiState(0, *[[x.detach().clone() for x in group] for group in _groups(state)])
        # Capture needs a run first on a side stream (cuBLAS sets up its workspace then).
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._body()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()

    def _body(self) -> None:
        state = SaShiMiState(0, *[list(group) for group in _groups(self.state)])
        _, state = plain_steps(self.model, self.code, state, self.uniforms, self.codes, self.logp, self.rule,
                               self.mu)
        for statics, news in zip(_groups(self.state), _groups(state), strict=True):
            for static, new in zip(statics, news, strict=True):
                if new is not static:  # step returns fresh S4 states and pooled outputs
                    static.copy_(new)

    def replay(self, code: torch.Tensor, state: SaShiMiState, uniforms: torch.Tensor,
               mu: torch.Tensor | None) -> None:
        """Run the block from `state` (its tensors become the static ones, updated in place) and mu."""
        self.code.copy_(code)
        self.uniforms.copy_(uniforms)
        if mu is not None:
            self.mu.copy_(mu)
        for statics, group in zip(_groups(self.state), _groups(state), strict=True):
            for j, static in enumerate(statics):
                if group[j] is not static:
                    static.copy_(group[j])
                    group[j] = static
        self.graph.replay()
        if mu is not None:
            mu.copy_(self.mu)


def _groups(state: SaShiMiState) -> tuple[list, list, list]:
    return state.s4, state.down, state.up

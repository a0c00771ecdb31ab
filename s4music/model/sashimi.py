"""SaShiMi: a multi-scale stack of S4 blocks over 8-bit audio codes.

Follows the official experiment model (state-spaces/s4, src/models/sequence/backbones/sashimi.py,
non-U-Net variant), which is what the released checkpoints hold:

    codes (B, L) -> Embedding -> tier 0 (L, H)
      down: DownPool_i (reshape p steps into channels, linear H*p -> H*expand), no blocks
      centre: n_layers x [S4 block, FF block] at the narrowest tier, plus the centre's input
      up (deepest first): UpPool (linear, shift one pooled step, unfold), add the skip of that
        tier, n_layers x [S4 block, FF block], add the block's input again
    -> LayerNorm -> Linear -> logits (B, L, 256)

Three ways to run it, which are the same function (tests check this):
    forward(x)            the whole sequence in parallel (training, scoring)
    prefill(x)            forward, plus the recurrent state after x, in one parallel pass
    step(code, state)     one sample at a time from a state (generation)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from s4music.model.config import AudioFormat, SaShiMiConfig
from s4music.model.s4 import S4Block


class ScalarLayerNorm(nn.Module):
    """Layer norm over channels with one scalar shift m and scale s, no eps (official TransposedLN).

    y = (s / std) * (x - mean + m), statistics over the last axis.
    """

    def __init__(self):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(1))
        self.s = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:  # a tier the prompt is too short to reach
            return x
        if not torch.is_grad_enabled():  # the fused kernel, which gives 1/std too (not differentiably)
            normed, _, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, 0.0)
            return normed.mul_(self.s).addcmul_(rstd, self.s * self.m)
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        scale = self.s * var.rsqrt()
        return torch.addcmul((self.m - mean) * scale, x, scale)


class WeightNormLinear(nn.Module):
    """Linear layer whose weight is g * v / |v| per output row (torch weight_norm, dim 0)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        base = nn.Linear(d_in, d_out)
        self.weight_v = nn.Parameter(base.weight.detach().clone())
        self.weight_g = nn.Parameter(base.weight.detach().norm(dim=1, keepdim=True))
        self.bias = nn.Parameter(base.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The effective (out, in) weight."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class FeedForward(nn.Module):
    """Linear H -> ff*H, GELU, Linear back to H."""

    def __init__(self, d_model: int, expand: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, expand * d_model)
        self.fc2 = nn.Linear(expand * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class Residual(nn.Module):
    """Pre-norm residual: x + layer(norm(x))."""

    def __init__(self, layer: nn.Module, dropout: float):
        super().__init__()
        self.norm = ScalarLayerNorm()
        self.layer = layer
        self.dropout = nn.Dropout(dropout)

    @property
    def is_s4(self) -> bool:
        return isinstance(self.layer, S4Block)

    def forward(self, x: torch.Tensor, return_state: bool = False, state: torch.Tensor | None = None):
        if self.is_s4:
            y, state = self.layer(self.norm(x), return_state=return_state, state=state)
            return x + self.dropout(y), state
        return x + self.dropout(self.layer(self.norm(x))), None

    def step(self, x: torch.Tensor, state):
        if self.is_s4:
            y, state = self.layer.step(self.norm(x), state)
            return x + y, state
        return x + self.layer(self.norm(x)), None


class DownPool(nn.Module):
    """(B, L, H) -> (B, L // p, H * expand): p consecutive steps become channels h * p + s."""

    def __init__(self, d_model: int, expand: int, pool: int):
        super().__init__()
        self.pool = pool
        self.linear = WeightNormLinear(d_model * pool, d_model * expand)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H, p) -> (..., H * p) then the linear."""
        return self.linear(x.flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, h = x.shape
        n = length // self.pool
        x = x[:, : n * self.pool].reshape(batch, n, self.pool, h).transpose(2, 3)
        return self.fold(x)


class UpPool(nn.Module):
    """(B, Lp, H) -> (B, L, H // expand): linear to p steps, shifted one pooled step for causality.

    Pooled output j feeds full-rate block j + 1; block 0 is zeros. Output channel index is h * p + s.
    """

    def __init__(self, d_model: int, expand: int, pool: int):
        super().__init__()
        self.pool = pool
        self.d_out = d_model // expand
        self.linear = WeightNormLinear(d_model, self.d_out * pool)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., H_out, p): the p full-rate outputs that one pooled step yields."""
        return self.linear(x).unflatten(-1, (self.d_out, self.pool))

    def forward(self, x: torch.Tensor, length: int, first: torch.Tensor | None = None,
                offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (B, length, H_out) and the block that holds the position after them (B, H_out, p).

        From rest the first block is zeros; continuing, it is `first` (B, H_out, p), the block being
        emitted, of which `offset` positions are already out."""
        blocks = self.unfold(x)  # (B, Lp, H_out, p)
        head = blocks.new_zeros(blocks.shape[0], 1, *blocks.shape[2:]) if first is None else first.unsqueeze(1)
        blocks = torch.cat([head, blocks], dim=1)
        y = blocks.transpose(2, 3).flatten(1, 2)[:, offset : offset + length]
        return y, blocks[:, (offset + length) // self.pool]


class UpBlock(nn.Module):
    def __init__(self, pool: UpPool, layers: list[Residual]):
        super().__init__()
        self.pool = pool
        self.layers = nn.ModuleList(layers)


# Samples of time the decoder scores at once (`SaShiMi.bits`, `prefill_bits`): its logits stay in cache.
BITS_STRETCH = 4096


def code_bits(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in bits: logits (B, L, 256) and target codes (B, L) -> (B, L)."""
    return F.cross_entropy(logits.float().transpose(1, 2), codes, reduction="none") / math.log(2)


def compile_options() -> dict:
    """torch.compile's inductor options for the fast training step. The CPU vector width ATen runs
    at (ATEN_CPU_CAPABILITY can lower it) is named, so it enters inductor's FX-graph cache key: the
    key leaves it out, and a graph compiled at one width, loaded at another, gave NaN or a corrupt
    heap (tests/test_train.py, the fast step under each capability)."""
    widths = {"AVX512": 512, "AVX2": 256}
    width = widths.get(torch.backends.cpu.get_cpu_capability())
    return {} if width is None else {"cpp.simdlen": width}


@dataclass
class SaShiMiState:
    """Everything `step` needs to continue after `t` samples.

    s4:   one (B, H, N/2) complex state per S4 block, in module order.
    down: per DownPool, the (B, H, p) inputs of the pooled step being gathered.
    up:   per UpBlock, the (B, H, p) outputs of the current pooled block being emitted.
    """

    t: int
    s4: list[torch.Tensor] = field(default_factory=list)
    down: list[torch.Tensor] = field(default_factory=list)
    up: list[torch.Tensor] = field(default_factory=list)

    def repeat(self, n: int) -> SaShiMiState:
        """The same state for n variations of each batch item: (B, ...) -> (B * n, ...)."""
        rep = lambda ts: [x.repeat_interleave(n, dim=0) for x in ts]  # noqa: E731
        return SaShiMiState(self.t, rep(self.s4), rep(self.down), rep(self.up))

    def rows(self, index: slice) -> SaShiMiState:
        """The batch rows `index` picks, as a state of their own: (B, ...) -> (B', ...)."""
        pick = lambda ts: [x[index].contiguous() for x in ts]  # noqa: E731
        return SaShiMiState(self.t, pick(self.s4), pick(self.down), pick(self.up))

    @staticmethod
    def join(states: list[SaShiMiState], device: torch.device) -> SaShiMiState:
        """States after the same number of samples, one batch: [(B_i, ...)] -> (sum B_i, ...) on `device`."""
        cat = lambda group: [torch.cat(xs).to(device) for xs in zip(*group, strict=True)]  # noqa: E731
        return SaShiMiState(states[0].t, cat([s.s4 for s in states]), cat([s.down for s in states]),
                            cat([s.up for s in states]))


class FastParts(Protocol):
    """The heavy parts of a parallel pass, done some other way (fast.FusedReader does them in C++);
    the pooling and skips stay in SaShiMi._run."""

    def tier(self, tier: int, h: torch.Tensor, skip: torch.Tensor | None,
             given: list[torch.Tensor | None]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A tier's residual layers (see SaShiMi.tiers) with the residual around them: x + layers(x)
        with x = h + skip (h alone without a skip), h and skip (B, L, H), given the S4 layers' states
        before x (None each: from rest) -> that, and their states after x. May overwrite h."""

    def head_bits(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The final norm and decoder on h (B, L, H), scored: the bits of targets (B, L) -> (B, L)."""


class SaShiMi(nn.Module):
    def __init__(self, config: SaShiMiConfig | None = None):
        super().__init__()
        cfg = config or SaShiMiConfig()
        self.config = cfg
        self.audio = AudioFormat()
        self.summary: dict = {}
        self.name: str | None = None  # as it was loaded: a model name or a checkpoint path
        # Recompute each block's activations in backward instead of storing them: far less memory
        # for long training windows, at about a third more compute.
        self.gradient_checkpointing = False

        def tier(h: int) -> list[Residual]:
            layers = []
            for _ in range(cfg.n_layers):
                layers.append(Residual(S4Block(h, cfg.s4), cfg.dropout))
                layers.append(Residual(FeedForward(h, cfg.ff_expand, cfg.dropout), cfg.dropout))
            return layers

        self.encoder = nn.Embedding(cfg.n_codes, cfg.d_model)
        h, widths = cfg.d_model, []
        self.down_pools = nn.ModuleList()
        for p in cfg.pool:
            widths.append(h)
            self.down_pools.append(DownPool(h, cfg.expand, p))
            h *= cfg.expand
        self.center = nn.ModuleList(tier(h))
        self.up_blocks = nn.ModuleList()
        for p, w in zip(reversed(cfg.pool), reversed(widths), strict=True):
            self.up_blocks.append(UpBlock(UpPool(h, cfg.expand, p), tier(w)))
            h = w
        self.norm = nn.LayerNorm(cfg.d_model)
        self.decoder = nn.Linear(cfg.d_model, cfg.n_codes)

    # ------------------------------------------------------------------ utilities
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    def s4_blocks(self) -> list[S4Block]:
        return [m for m in self.modules() if isinstance(m, S4Block)]

    def fast_training(self, compile: bool = True, conv_chunk: int = 0) -> SaShiMi:
        """Switch to the fast training step; the same function as the plain one (tests hold the loss
        and gradients to it). With `compile`, each layer's chain of element-wise work (the pre-norm,
        the D skip, GELU, the GLU output linear; the whole feed-forward residual) is fused by
        torch.compile. With `conv_chunk`, S4D convolutions are matrix products over chunks of that
        many samples (`kernels.chunked_convolution`, in bf16 under bf16 autocast) instead of FFTs.
        (S4D kernels come from one blocked complex matrix product in every step: S4Kernel.blocked.)
        Returns the model."""
        options = {"dynamic": False, "options": compile_options()}
        for block in self.s4_blocks():
            block.conv_chunk = conv_chunk
            if compile:
                block.compiled_out = torch.compile(block._out, **options)
        if compile:
            for tier in self.tiers():
                for layer in tier:
                    if layer.is_s4:
                        layer.norm.compile(**options)
                    else:
                        layer.compile(**options)
        return self

    # ------------------------------------------------------------------ parallel
    def shift_right(self, codes: torch.Tensor) -> torch.Tensor:
        """The official input shift: (B, L) codes -> inputs [mid-code, codes[:-1]], mid-code = 128."""
        start = codes.new_full((codes.shape[0], 1), self.config.n_codes // 2)
        return torch.cat([start, codes[:, :-1]], dim=1)

    def bits(self, codes: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each code given those before it, in bits: (B, L) -> (B, L).

        Every position is scored, the first one from the start code alone, as in the paper."""
        return self._run(self.shift_right(codes), return_state=False, targets=codes)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L) int64 input codes, already shifted right (x[:, 0] = 128) -> logits (B, L, 256)."""
        return self._run(x, return_state=False)[0]

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, state: SaShiMiState | None = None, logits: bool = True,
                parts: FastParts | None = None) -> tuple[torch.Tensor | None, SaShiMiState]:
        """Read inputs x (B, L) in one parallel pass, from rest or from `state` (which is left as it
        is): logits (B, L, 256), None with logits=False, and the state after them.
        prefill(x[:, :k]) then prefill(x[:, k:], state) is prefill(x), for any k.

        parts: the tiers and the scored head done another way (fast.FusedReader passes itself)."""
        return self._run(x, return_state=True, start=state, logits=logits, parts=parts)

    @torch.no_grad()
    def prefill_bits(self, x: torch.Tensor, targets: torch.Tensor, state: SaShiMiState | None = None,
                     parts: FastParts | None = None) -> tuple[torch.Tensor, SaShiMiState]:
        """prefill, scored: inputs x (B, L) and the codes they predict, targets (B, L) -> the bits of
        each target (B, L) and the state after x. The decoder takes the sequence a stretch at a time,
        so no (B, L, 256) logits are held."""
        return self._run(x, return_state=True, start=state, parts=parts, targets=targets)

    def tiers(self) -> list[nn.ModuleList]:
        """The residual layers of each tier in the order the model runs them: the centre, then the
        up blocks from the deepest (tier numbers for `FastParts.tier`)."""
        return [self.center, *[up.layers for up in self.up_blocks]]

    def _run(self, x: torch.Tensor, return_state: bool, start: SaShiMiState | None = None, logits: bool = True,
             parts: FastParts | None = None, targets: torch.Tensor | None = None):
        t0 = start.t if start is not None else 0
        state = SaShiMiState(t=t0 + x.shape[1])
        s4_in = iter(start.s4) if start is not None else None

        def run_tier(tier: int, h, skip=None):
            """x + the tier's layers on x, with x = h + skip (the block's own residual around its layers)."""
            layers = self.tiers()[tier]
            given = [next(s4_in) if s4_in is not None else None for layer in layers if layer.is_s4]
            if parts is not None:
                h, states = parts.tier(tier, h, skip, given)
                state.s4.extend(states)
                return h
            x = h if skip is None else h + skip
            h, given = x, iter(given)
            for layer in layers:
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    h = checkpoint(lambda t, layer=layer: layer(t)[0], h, use_reentrant=False)
                    continue
                h, s = layer(h, return_state=return_state, state=next(given) if layer.is_s4 else None)
                if s is not None:
                    state.s4.append(s)
            return h + x

        h = self.encoder(x)
        skips, slots = [h], []  # slots[i]: tier i's position within its current pooled step, at t0
        period = 1
        for i, pool in enumerate(self.down_pools):
            slots.append((t0 // period) % pool.pool)
            if start is not None:  # the pooled step being gathered starts with the samples waiting in the buffer
                h = torch.cat([start.down[i][..., : slots[i]].transpose(1, 2), h], dim=1)
            if return_state:  # the partial pooled step at the end waits in the buffer
                n = h.shape[1] // pool.pool * pool.pool
                buf = h.new_zeros(h.shape[0], h.shape[2], pool.pool)
                buf[..., : h.shape[1] - n] = h[:, n:].transpose(1, 2)
                state.down.append(buf)
            h = pool(h)
            skips.append(h)
            period *= pool.pool
        skips.pop()  # the centre's input: its residual adds it
        h = run_tier(0, h)
        for j, up in enumerate(self.up_blocks):
            skip = skips.pop()
            tier = len(self.up_blocks) - 1 - j
            first = start.up[j] if start is not None else None
            h, pending = up.pool(h, skip.shape[1], first=first, offset=slots[tier])
            state.up.append(pending)
            h = run_tier(j + 1, h, skip)
        if targets is not None and parts is not None:
            out = parts.head_bits(h, targets)
        elif targets is not None:
            out = torch.cat([code_bits(self.decoder(self.norm(h[:, i : i + BITS_STRETCH])), targets[:, i : i + BITS_STRETCH])
                             for i in range(0, max(h.shape[1], 1), BITS_STRETCH)], dim=1)
        else:
            out = self.decoder(self.norm(h)) if logits else None
        return out, (state if return_state else None)

    # ------------------------------------------------------------------ recurrent
    def initial_state(self, batch: int = 1) -> SaShiMiState:
        """The state before any sample (all zeros, as after an empty prompt)."""
        zeros = lambda h, p: torch.zeros(batch, h, p, device=self.device)  # noqa: E731
        return SaShiMiState(
            t=0,
            s4=[block.kernel.initial_state(batch) for block in self.s4_blocks()],
            down=[zeros(pool.linear.weight_v.shape[1] // pool.pool, pool.pool) for pool in self.down_pools],
            up=[zeros(up.pool.d_out, up.pool.pool) for up in self.up_blocks],
        )

    @torch.no_grad()
    def step(self, code: torch.Tensor, state: SaShiMiState) -> tuple[torch.Tensor, SaShiMiState]:
        """One input code per batch item, (B,) int64 -> logits (B, 256). Updates `state` in place.

        At time t, tier i takes a step when (t + 1) is a multiple of the pool product above it;
        tiers below the deepest active one are skipped.
        """
        t = state.t
        s4 = iter(range(len(state.s4)))
        s4_states = state.s4

        def blocks(layers, h):
            for layer in layers:
                if layer.is_s4:
                    i = next(s4)
                    h, s4_states[i] = layer.step(h, s4_states[i])
                else:
                    h, _ = layer.step(h, None)
            return h

        h = self.encoder(code)
        skips, depth, period = [h], 0, 1
        for i, pool in enumerate(self.down_pools):
            slot = (t // period) % pool.pool
            state.down[i][..., slot] = h
            if slot != pool.pool - 1:
                break
            h = pool.fold(state.down[i])
            period *= pool.pool
            depth = i + 1
            skips.append(h)

        n_tiers = len(self.down_pools)
        center_layers = sum(1 for m in self.center if m.is_s4)
        if depth == n_tiers:
            h = blocks(self.center, h) + skips.pop()
        else:
            for _ in range(center_layers):
                next(s4)
        for j, up in enumerate(self.up_blocks):
            out_tier = n_tiers - 1 - j
            n_s4 = sum(1 for m in up.layers if m.is_s4)
            if out_tier > depth:  # this tier does not step now
                for _ in range(n_s4):
                    next(s4)
                continue
            period = 1
            for p in self.config.pool[:out_tier]:
                period *= p
            slot = (t // period) % up.pool.pool
            y = state.up[j][..., slot].clone()
            if out_tier < depth:  # the tier below stepped: its output feeds the next block
                state.up[j] = up.pool.unfold(h)
            h = y + skips.pop()
            h = blocks(up.layers, h) + h
        state.t = t + 1
        return self.decoder(self.norm(h)), state

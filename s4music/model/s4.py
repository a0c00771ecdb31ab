"""The S4 layer, in convolution mode (training by FFT; prompt reading and evaluation by a chunked
scan) and recurrent mode (generation).

Follows the state-spaces/s4 experiment model. The continuous system of one channel h is

    x'(t) = A x(t) + B u(t),   y(t) = 2 Re(C x(t)),   A = diag(Lambda) - P P^H   (DPLR)
                                                      A = diag(Lambda)            (diag, S4D)

with N/2 complex state entries standing for N real ones (conjugate pairs). DPLR is discretized
with the bilinear transform, S4D with zero-order hold, both with a per-channel step dt.

Parameter names and shapes are those of the official modules, so released checkpoints load
as they are:
    A_real (S', N/2)     Lambda.real = -exp(A_real)   (S' = lambda_copies, or S)
    A_imag (S', N/2)     Lambda.imag = -A_imag
    P      (1, S, N/2, 2) low-rank term, complex as (re, im)         [dplr only]
    B      (1, S, N/2, 2)
    C      (1, H, N/2, 2) for dplr this is C-tilde = C (I - dA^l_kernel) once l_kernel > 0
    inv_dt (H, 1)        dt = softplus(inv_dt) (or exp, for V3 imports); (H, N/2) with dt_per_state
    l_kernel ()          the length C-tilde is attuned to; 0 means C is the raw C  [dplr only]
S copies of (Lambda, P, B) are shared by the H channels in turn (channel h uses copy h mod S).
A per-state dt scales the rows of A and B: the bilinear and Cauchy formulas hold entry by entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from s4music.model.config import S4Config
from s4music.model.kernels import cauchy, chunked_convolution, vandermonde

# The prompt scan folds this many samples into the state per matrix step.
SCAN_CHUNK = 256
# Up to this many chunks (batch x chunks) in a call, a chunk's own convolution goes by FFT rather than by
# building the (H, SCAN_CHUNK, SCAN_CHUNK) Toeplitz matrix, which costs more than it saves there.
FFT_CHUNKS = 16


def hippo_legs_nplr(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lambda, P, B (each n/2 complex) of HiPPO-LegS in normal-plus-low-rank form.

    LegS A = -sqrt(2i+1) sqrt(2j+1) below the diagonal, -(i+1) on it. Adding P P^T with
    P = sqrt(i + 1/2) leaves -I/2 + (skew-symmetric), which is unitarily diagonalizable.
    Of each conjugate eigenvalue pair we keep the one with negative imaginary part.
    """
    q = np.arange(n, dtype=np.float64)
    scale = np.sqrt(2 * q + 1)
    a = -np.tril(np.outer(scale, scale), -1) - np.diag(q + 1)
    p = np.sqrt(q + 0.5)
    normal = a + np.outer(p, p)  # -1/2 I + skew
    w_imag, v = np.linalg.eigh(-1j * normal)
    order = np.argsort(w_imag)[: n // 2]
    lam = -0.5 + 1j * w_imag[order]
    v = v[:, order]
    return lam, v.conj().T @ p, v.conj().T @ scale


def _softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def _conj_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., N/2) -> (..., N): append the conjugates."""
    return torch.cat([x, x.conj()], dim=-1)


def _matrix_power(a: torch.Tensor, n: int) -> torch.Tensor:
    """a^n for a batch of square matrices, by repeated squaring."""
    out = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a).clone()
    while n:
        if n & 1:
            out = out @ a
        n >>= 1
        if n:
            a = a @ a
    return out


def weights_version(module: nn.Module) -> tuple:
    """What changes when any parameter or buffer of `module` is replaced or written in place: the
    key that what is computed from the weights is kept under."""
    return tuple((t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))


@dataclass
class Recurrence:
    """Discrete matrices for stepping one S4 layer.

    dA_top (H, N/2, N) complex64: the rows of dA that update the kept half of the state.
    dB     (H, N/2) complex64.
    dC     (H, N/2) complex64: the raw C (C-tilde undone), so y = 2 Re(dC . x).
    dA_log (H, N/2) complex64: the log of dA's diagonal (S4D; None for DPLR), so dA^k = exp(k dA_log).
    """

    dA_top: torch.Tensor
    dB: torch.Tensor
    dC: torch.Tensor
    dA_log: torch.Tensor | None


@dataclass
class ScanMatrices:
    """What `scan` folds a sequence into the state with, a chunk of SCAN_CHUNK samples at a time.

    columns (H, SCAN_CHUNK, N) float32: row j is (dA^j dB) over the half state, as [real | imag]:
            what an input j samples before a chunk's end adds to the state.
    taps    (H, SCAN_CHUNK) float32: the kernel's first taps K[j] = 2 Re(dC dA^j dB).
    taps_f  (H, SCAN_CHUNK + 1) complex64: their FFT at 2 SCAN_CHUNK points.
    rows    (H, N, SCAN_CHUNK) float32: column i is (dC dA^(i+1)) over the half state, as
            [real; -imag], so that 2 Re(x . column) is a real product with [x.real | x.imag].
    power   (H, N, N) complex128: dA^SCAN_CHUNK, full rows.
    """

    columns: torch.Tensor
    taps: torch.Tensor
    taps_f: torch.Tensor
    rows: torch.Tensor
    power: torch.Tensor


class S4Kernel(nn.Module):
    """The state-space parameters of one S4 layer over H channels."""

    def __init__(self, d_model: int, config: S4Config):
        super().__init__()
        cfg = config
        # More copies than channels means one per channel (a config can serve tiers of any width).
        s, s_lam = (min(c, d_model) for c in (cfg.n_ssm, cfg.lambda_copies or cfg.n_ssm))
        for copies in (s, s_lam):
            if d_model % copies:
                raise ValueError(f"{copies} copies of the SSM must divide the layer width {d_model}")
        self.config = cfg
        self.H, self.N2 = d_model, cfg.d_state // 2
        lam, p, b = (torch.as_tensor(t, dtype=torch.cfloat) for t in hippo_legs_nplr(cfg.d_state))

        log_dt = torch.rand(self.H, 1) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min)
        inv_dt = _softplus_inverse(log_dt.exp()) if cfg.dt_transform == "softplus" else log_dt
        self.inv_dt = nn.Parameter(inv_dt.repeat(1, self.N2) if cfg.dt_per_state else inv_dt)
        self.A_real = nn.Parameter(torch.log(-lam.real).repeat(s_lam, 1))
        self.A_imag = nn.Parameter((-lam.imag).repeat(s_lam, 1))
        self.B = nn.Parameter(torch.view_as_real(b.repeat(1, s, 1)).contiguous())
        self.C = nn.Parameter(torch.view_as_real(torch.randn(1, self.H, self.N2, dtype=torch.cfloat)))
        if cfg.mode == "dplr":
            self.P = nn.Parameter(torch.view_as_real(p.repeat(1, s, 1)).contiguous())
            self.register_buffer("l_kernel", torch.tensor(0))
        self._cached: dict[str, tuple[tuple, object]] = {}  # name -> (weights_version, value): see _kept
        # S4D's training kernel by one blocked matrix product (6.9x faster training steps on a 2-core
        # CPU); False: the chunked exp per sample it is tested against (`kernels.vandermonde`)
        self.blocked = True

    # ---------------------------------------------------------------- parameters
    def dt(self) -> torch.Tensor:
        """(H, 1) step sizes, or (H, N/2) with dt_per_state."""
        if self.config.dt_transform == "softplus":
            return F.softplus(self.inv_dt)
        return torch.exp(self.inv_dt)

    def _tied(self, x: torch.Tensor) -> torch.Tensor:
        """(S, ...) -> (H, ...): channel h uses copy h mod S."""
        return x.repeat(self.H // x.shape[0], *([1] * (x.dim() - 1)))

    def ssm(self) -> tuple[torch.Tensor, ...]:
        """dt (H, 1), Lambda (H, N/2), P (H, N/2) or None, B (H, N/2), C (H, N/2)."""
        lam = self._tied(-torch.exp(self.A_real) - 1j * self.A_imag)
        p = self._tied(torch.view_as_complex(self.P)[0]) if self.config.mode == "dplr" else None
        b = self._tied(torch.view_as_complex(self.B)[0])
        c = torch.view_as_complex(self.C)[0]
        return self.dt(), lam, p, b, c

    @torch.no_grad()
    def discrete(self, dtype=torch.complex128) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense discrete dA (H, N, N) and dB (H, N) over the full conjugate-paired state."""
        dt, lam, p, b, _ = (t.to(dtype) if t is not None and t.is_complex() else t for t in self.ssm())
        dt = dt.to(torch.float64 if dtype == torch.complex128 else torch.float32)
        if dt.shape[-1] > 1:
            dt = _conj_pairs(dt)
        lam_f, b_f = _conj_pairs(lam), _conj_pairs(b)
        if self.config.mode == "diag":
            dta = dt * lam_f
            return torch.diag_embed(torch.exp(dta)), b_f * torch.expm1(dta) / lam_f
        p_f = _conj_pairs(p)
        a = torch.diag_embed(lam_f) - p_f.unsqueeze(-1) * p_f.conj().unsqueeze(-2)
        eye = torch.eye(a.shape[-1], dtype=dtype, device=a.device)
        half = dt.unsqueeze(-1) / 2 * a
        backward = eye - half
        d_a = torch.linalg.solve(backward, eye + half)
        d_b = torch.linalg.solve(backward, (dt * b_f).unsqueeze(-1)).squeeze(-1)
        return d_a, d_b

    def diagonal_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """S4D's kernel as K[l] = 2 Re(sum_n v exp(x l)): x = dt Lambda and v = C B (exp(x) - 1) / Lambda,
        each (H, N/2) complex, differentiably (zero-order hold)."""
        dt, lam, _, b, c = self.ssm()
        dta = dt * lam
        return dta, c * b * torch.expm1(dta) / lam

    # ---------------------------------------------------------------- C-tilde (dplr)
    @torch.no_grad()
    def attune(self, length: int) -> None:
        """Make C-tilde cover kernels of `length`: set it on first use, then double as needed.

        C-tilde_L = C (I - dA^L); doubling uses (I - dA^2L) = (I - dA^L)(I + dA^L).
        """
        if self.config.mode != "dplr" or length <= int(self.l_kernel):
            return
        d_a, _ = self.discrete()
        c = _conj_pairs(torch.view_as_complex(self.C)[0].to(torch.complex128))
        current = int(self.l_kernel)
        while current < length:
            step = current if current else length
            sign = 1.0 if current else -1.0
            c = c + sign * (c.unsqueeze(-2) @ _matrix_power(d_a, step)).squeeze(-2)
            current = current * 2 if current else length
        self.C.copy_(torch.view_as_real(c[..., : self.N2].to(torch.complex64)).unsqueeze(0))
        self.l_kernel.fill_(current)
        self._cached.clear()

    # ---------------------------------------------------------------- convolution mode
    def conv_kernel(self, length: int) -> torch.Tensor:
        """The length-L convolution kernel K[l] = 2 Re(C dA^l dB), shape (H, L), float32, differentiably
        through the Cauchy (DPLR) or Vandermonde (diag) kernel: the training path. Prompt reading
        and evaluation use `scan` instead.
        """
        if self.config.mode == "diag":
            dta, v = self.diagonal_terms()
            return 2 * vandermonde(v.unsqueeze(0), dta, length, blocked=self.blocked)[0].real

        self.attune(length)
        dt, lam, p, b, c = self.ssm()
        n_fft = int(self.l_kernel)
        omega, z = _fft_nodes(n_fft, lam.device)
        q = p.conj()
        bs = torch.stack([b, p])  # (2, H, N/2)
        cs = torch.stack([c, q])
        v = (bs.unsqueeze(1) * cs.unsqueeze(0) * dt).reshape(4, self.H, self.N2)
        r = cauchy(_conj_pairs(v), z, _conj_pairs(lam * dt)).view(2, 2, self.H, -1)
        # Woodbury for the rank-1 term, then undo the bilinear map of the nodes.
        k_f = r[0, 0] - r[0, 1] * r[1, 0] / (1 + r[1, 1])
        k_f = k_f * 2 / (1 + omega)
        return torch.fft.irfft(k_f, n=n_fft)[..., :length]

    # ---------------------------------------------------------------- recurrent mode
    def _kept(self, name: str, build):
        """build()'s value, kept under `name` until a parameter or buffer changes."""
        version = weights_version(self)
        kept = self._cached.get(name)
        if kept is None or kept[0] != version:
            with torch.no_grad():
                kept = self._cached[name] = (version, build())
        return kept[1]

    def _discrete_raw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dA (H, N, N), dB (H, N) and the raw C (H, N) over the full state, complex128."""
        d_a, d_b = self.discrete()
        c = _conj_pairs(torch.view_as_complex(self.C)[0].to(torch.complex128))
        if self.config.mode == "dplr" and int(self.l_kernel) > 0:
            # C holds C-tilde = C (I - dA^L): solve for the raw C.
            eye = torch.eye(d_a.shape[-1], dtype=d_a.dtype, device=d_a.device)
            lhs = (eye - _matrix_power(d_a, int(self.l_kernel))).transpose(-1, -2)
            c = torch.linalg.solve(lhs, c.unsqueeze(-1)).squeeze(-1)
        return d_a, d_b, c

    def recurrence(self) -> Recurrence:
        """Discrete matrices for stepping, cached until a parameter changes."""
        return self._kept("recurrence", self._build_recurrence)

    def _build_recurrence(self) -> Recurrence:
        d_a, d_b, c = self._discrete_raw()
        n2 = self.N2
        return Recurrence(
            dA_top=d_a[:, :n2].to(torch.complex64),
            dB=d_b[:, :n2].to(torch.complex64),
            dC=c[:, :n2].to(torch.complex64),
            dA_log=torch.log(torch.diagonal(d_a, dim1=-2, dim2=-1)[:, :n2]).to(torch.complex64)
            if self.config.mode == "diag" else None,
        )

    def scan_matrices(self) -> ScanMatrices:
        """The matrices `scan` folds chunks with, cached until a parameter changes. Building them
        takes dense products by doubling, seconds for a whole model; the fused kernels need none."""
        return self._kept("scan", self._build_scan_matrices)

    def _build_scan_matrices(self) -> ScanMatrices:
        d_a, d_b, c = self._discrete_raw()
        columns, rows, power = d_b.unsqueeze(-1), c.unsqueeze(-2) @ d_a, d_a
        while columns.shape[-1] < SCAN_CHUNK:  # doubling: power is dA^(columns so far)
            columns = torch.cat([columns, power @ columns], dim=-1)
            rows = torch.cat([rows, rows @ power], dim=-2)
            power = power @ power
        n2 = self.N2
        half = columns[:, :n2]  # (H, N/2, c) complex128
        taps = 2 * torch.einsum("hn,hnc->hc", c[:, :n2], half).real.float()
        return ScanMatrices(
            columns=torch.cat([half.real, half.imag], dim=1).transpose(1, 2).float().contiguous(),
            taps=taps,
            taps_f=torch.fft.rfft(taps, n=2 * SCAN_CHUNK),
            rows=torch.cat([rows[..., :n2].real, -rows[..., :n2].imag], -1).transpose(1, 2).float(),
            power=power,
        )

    @torch.no_grad()
    def step_params(self) -> dict[str, torch.Tensor]:
        """The recurrence in O(N) form for the fused CPU step (csrc/s4_layer.h), complex64 (H, N/2).

        diag: x' = a x + b u.   dplr: the bilinear step with A = Lambda - P P^H, solved by
        Sherman-Morrison (exact; diagonalizing dA instead is ill-conditioned for HiPPO):
            w = a x - g * 2 Re(sum conj(p) x) + b u,   x' = w - g * kappa * 2 Re(sum conj(p) w)
        with e = 1 - dt/2 Lambda, a = (1 + dt/2 Lambda) / e, b = dt B / e, g = dt/2 P / e,
        kappa = 1 / (1 + 2 Re(sum conj(p) g)). Both: y = 2 Re(sum c x'), c the raw C.
        The kernel keeps w and alpha = kappa * 2 Re(sum conj(p) w) rather than x' = w - g alpha; then
        2 Re(sum conj(p) x') = alpha, so the next w = a w - q alpha + b u with q = (a + 1) g, and
        Re(sum c x') = Re(sum c w) - alpha cg with cg = Re(sum c g): one pass over the state a step.
        """
        rec = self.recurrence()
        c64 = lambda t: t.to(torch.complex64).contiguous()  # noqa: E731
        if self.config.mode == "diag":
            return {"a": c64(torch.diagonal(rec.dA_top, dim1=-2, dim2=-1)), "b": c64(rec.dB), "c": c64(rec.dC)}
        dt, lam, p, b, _ = self.ssm()
        dt, lam, p, b = dt.double(), lam.to(torch.complex128), p.to(torch.complex128), b.to(torch.complex128)
        c = rec.dC.to(torch.complex128)
        half = dt / 2
        e = 1 - half * lam
        a, g = (1 + half * lam) / e, half * p / e
        kappa = 1 / (1 + 2 * (p.conj() * g).sum(-1).real)
        return {"a": c64(a), "b": c64(dt * b / e), "c": c64(c), "p": c64(p), "g": c64(g), "q": c64((a + 1) * g),
                "kappa": kappa.float().contiguous(), "cg": (c * g).sum(-1).real.float().contiguous()}

    def initial_state(self, batch: int) -> torch.Tensor:
        """(B, H, N/2) complex zeros."""
        return torch.zeros(batch, self.H, self.N2, dtype=torch.complex64, device=self.inv_dt.device)

    def step(self, u: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample: u (B, H) real, state (B, H, N/2) -> y (B, H), new state."""
        rec = self.recurrence()
        full = _conj_pairs(state)
        state = torch.einsum("hnm,bhm->bhn", rec.dA_top, full) + rec.dB * u.unsqueeze(-1)
        y = 2 * torch.einsum("hn,bhn->bh", rec.dC, state).real
        return y, state

    @torch.no_grad()
    def scan(self, u: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Convolution mode without the FFT, for prompt reading: u (B, L, H) -> y (B, L, H) and the
        state after u (B, H, N/2). y = 2 Re(C x) without the D term, as `conv_kernel` gives.

        Chunks of c = SCAN_CHUNK samples. Inside a chunk, y is a (c, c) Toeplitz product with the
        kernel's first c taps. Across chunks, each chunk's input becomes its state contribution in
        one matrix product, a short loop carries the state from chunk to chunk with dA^c, and the
        state x before a chunk adds 2 Re(C dA^(i+1) x) to its sample i. Nothing of size (H, N, L)
        is formed, and all but the loop are real matrix products: several times faster than the
        FFT for long prompts.

        From rest (`state` None) a length that is not a multiple of c is padded with zeros in
        front. From a `state` (B, H, N/2), the first L mod c samples are taken first: in closed form
        for S4D, by the recurrence for DPLR (whose dA^k costs a dense product); lengths that are
        multiples of c go straight to the chunks.
        """
        batch, length, h = u.shape
        c = SCAN_CHUNK
        if state is None:
            pad = (-length) % c
            chunks = u.float().permute(2, 0, 1)  # (H, B, L): time last, so both layout changes are 2-D transposes
            chunks = F.pad(chunks, (pad, 0)) if pad else chunks.contiguous()  # zeros first: at rest
            y, x = self._chunks(chunks, None)
            return y[..., pad:].permute(1, 2, 0).contiguous(), x
        head = length % c
        ys = []
        if head:
            y, state = self._head(u[:, :head].float(), state)
            ys.append(y)
        if length > head:
            y, state = self._chunks(u[:, head:].float().permute(2, 0, 1).contiguous(), state)
            ys.append(y.permute(1, 2, 0))
        return torch.cat(ys, dim=1).contiguous(), state

    def _chunks(self, chunks: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """chunks (H, B, L), L a multiple of c, from `state` (B, H, N/2) or rest -> y (H, B, L), state."""
        rec = self.scan_matrices()
        c = SCAN_CHUNK
        h, batch, length = chunks.shape
        n_chunks = length // c
        chunks = chunks.view(h, batch * n_chunks, c)

        if n_chunks * batch <= FFT_CHUNKS:  # a few chunks: the (H, c, c) Toeplitz would cost more to build than to use
            y = torch.fft.irfft(torch.fft.rfft(chunks, n=2 * c) * rec.taps_f.unsqueeze(1), n=2 * c)[..., :c].contiguous()
        else:
            toeplitz = F.pad(rec.taps, (c - 1, 0)).unfold(-1, c, 1).flip(1)  # (H, c, c): [s, i] = K[i - s]
            y = torch.bmm(chunks, toeplitz)  # (H, B * chunks, c)
        # chunk position i reaches the chunk's end through dA^(c-1-i) dB: reversed, through the columns
        contrib = torch.bmm(chunks.flip(-1), rec.columns)  # (H, B * chunks, N)
        contrib = contrib.view(h, batch, n_chunks, 2, self.N2).permute(2, 0, 1, 4, 3)
        contrib = _conj_pairs(torch.view_as_complex(contrib.contiguous()))  # (chunks, H, B, N)
        power = rec.power.to(torch.complex64)
        if self.config.mode == "diag":  # dA^c is diagonal: the carry is elementwise
            diagonal = torch.diagonal(power, dim1=-2, dim2=-1).unsqueeze(1)  # (H, 1, N)
            carry = lambda x, j: torch.addcmul(contrib[j], x, diagonal)  # noqa: E731
        else:
            power = power.transpose(1, 2).contiguous()  # x @ power = (dA^c x)^T
            carry = lambda x, j: torch.baddbmm(contrib[j], x, power)  # noqa: E731
        before = torch.empty_like(contrib)  # the state before each chunk
        x = contrib.new_zeros(contrib.shape[1:]) if state is None else _conj_pairs(state.transpose(0, 1))
        for j in range(n_chunks):
            before[j] = x
            x = carry(x, j)
        before = torch.view_as_real(before[..., : self.N2].permute(1, 2, 0, 3)).transpose(-1, -2)
        y.baddbmm_(before.reshape(h, batch * n_chunks, -1), rec.rows, alpha=2)
        return y.view(h, batch, length), x[..., : self.N2].transpose(0, 1).contiguous()

    def _head(self, u: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fewer than c samples u (B, r, H) from `state` (B, H, N/2) -> y (B, r, H), the state after."""
        r = u.shape[1]
        if self.config.mode != "diag":
            ys = []
            for t in range(r):
                y, state = self.step(u[:, t], state)
                ys.append(y)
            return torch.stack(ys, dim=1), state
        rec, step = self.scan_matrices(), self.recurrence()
        # from the inputs: the kernel's first r taps; from the state: y_i = 2 Re(C dA^(i+1) x), the scan's rows
        toeplitz = F.pad(rec.taps[:, :r], (r - 1, 0)).unfold(-1, r, 1).flip(1)  # (H, r, r)
        u_h = u.permute(2, 0, 1)  # (H, B, r): channels as the batch of matrix products
        y = torch.bmm(u_h, toeplitz)
        x_ri = torch.cat([state.real, state.imag], dim=-1).transpose(0, 1)  # (H, B, N)
        y = torch.baddbmm(y, x_ri, rec.rows[..., :r], alpha=2).permute(1, 2, 0)
        # input i reaches the end through dA^(r-1-i) dB: reversed in time, through the columns
        ri = torch.bmm(u_h.flip(-1), rec.columns[:, :r]).transpose(0, 1)  # (B, H, N) as [real | imag]
        decay = torch.exp(r * step.dA_log)  # dA^r, elementwise for S4D
        state = decay * state + torch.complex(ri[..., : self.N2], ri[..., self.N2:])
        return y, state


def fft_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n. An FFT whose size has a large prime factor is several times
    slower, and a prompt can have any length."""
    best, p5 = 2 * n, 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def fft_convolution(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal convolution of u (B, L, H) with kernels k (H, L) -> (B, L, H), by FFT."""
    length = u.shape[1]
    n = fft_length(2 * length - 1)  # no wrap-around: the kernel is as long as the input
    u_f = torch.fft.rfft(u.transpose(1, 2), n=n)
    return torch.fft.irfft(u_f * torch.fft.rfft(k, n=n), n=n)[..., :length].transpose(1, 2)


_NODES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _fft_nodes(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Roots of unity omega_k = exp(-2 pi i k / n), k <= n/2, and their bilinear images z."""
    key = (n, str(device))
    if key not in _NODES:
        omega = torch.exp(-2j * math.pi * torch.arange(n // 2 + 1, dtype=torch.float64) / n)
        z = 2 * (1 - omega) / (1 + omega)
        _NODES[key] = (omega.to(torch.complex64).to(device), z.to(torch.complex64).to(device))
    return _NODES[key]


class S4Block(nn.Module):
    """S4 kernel convolution + D skip, GELU, then a GLU output linear. Input and output (B, L, H)."""

    def __init__(self, d_model: int, config: S4Config):
        super().__init__()
        self.kernel = S4Kernel(d_model, config)
        self.D = nn.Parameter(torch.randn(1, d_model))
        self.output_linear = nn.Linear(d_model, 2 * d_model)
        self.compiled_out = None  # _out compiled by torch.compile (SaShiMi.fast_training)
        self.conv_chunk = 0  # S4D training convolutions by kernels.chunked_convolution in chunks of this; 0: FFT

    def _out(self, y: torch.Tensor, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The D skip, GELU and the GLU output linear after the convolution: (..., H) -> (..., H)."""
        return F.glu(self.output_linear(F.gelu((y + u * self.D).to(dtype))), dim=-1)

    def forward(self, x: torch.Tensor, return_state: bool = False, state: torch.Tensor | None = None):
        """x (B, L, H) -> y (B, L, H), and the recurrent state after x when asked. From `state`
        (B, H, N/2) instead of rest: without gradients only (prompt reading)."""
        batch, length, _ = x.shape
        if length == 0:
            if return_state:
                state = self.kernel.initial_state(batch) if state is None else state
            return x, state if return_state else None
        u = x.float()  # the convolution stays in float32 under autocast (the chunked one's products: bf16 under bf16)
        device = u.device.type
        bf16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        with torch.autocast(device_type=device, enabled=False):
            if torch.is_grad_enabled():  # training: a differentiable convolution
                if state is not None:
                    raise ValueError("S4Block: a starting state needs torch.no_grad() (it is for prompt reading)")
                if self.conv_chunk and self.kernel.config.mode == "diag":
                    y = chunked_convolution(u, *self.kernel.diagonal_terms(), chunk=self.conv_chunk,
                                            matmul_dtype=torch.bfloat16 if bf16 else None)
                else:
                    y = fft_convolution(u, self.kernel.conv_kernel(length))
                if return_state:
                    state = self.kernel.scan(u)[1]
            else:  # prompt reading and evaluation: the same function, chunked
                y, state = self.kernel.scan(u, state)
                state = state if return_state else None
        return (self.compiled_out or self._out)(y, u, x.dtype), state

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, H) -> y (B, H), new state."""
        y, state = self.kernel.step(x, state)
        return self._out(y, x, x.dtype), state

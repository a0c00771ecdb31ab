"""Structured products behind S4 kernels: Cauchy (DPLR) and Vandermonde (diagonal).

Each product has a plain reference implementation, which materializes an (..., N, L) tensor and is
obviously right, and a memory-bounded one that walks L in chunks and recomputes those chunks in the
backward pass, so its memory is O(H N chunk) rather than O(H N L). Tests compare the two.

Shapes:  v (K, H, N) complex, w (H, N) complex, z (L,) complex  ->  (K, H, L) complex.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from s4music.cuda import build
from s4music.errors import first_line

log = logging.getLogger(__name__)

# Elements of one (H, N, chunk) complex intermediate; 2**22 complex64 = 32 MiB.
CHUNK_ELEMENTS = 1 << 22


def _chunk_len(h: int, n: int, length: int) -> int:
    return max(1, min(length, CHUNK_ELEMENTS // max(1, h * n)))


# --------------------------------------------------------------------------------------------
# Cauchy:  out[k, h, l] = sum_n v[k, h, n] / (z[l] - w[h, n])


def cauchy_reference(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Plain Cauchy product; materializes (K, H, N, L)."""
    return (v.unsqueeze(-1) / (z - w.unsqueeze(-1))).sum(dim=-2)


class _ChunkedCauchy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, z, w):
        ctx.save_for_backward(v, z, w)
        k, h, length = v.shape[0], v.shape[1], z.shape[0]
        out = v.new_empty(h, k, length)
        step = _chunk_len(h, w.shape[1], length)
        vt = v.transpose(0, 1).contiguous()  # (H, K, N)
        for start in range(0, length, step):
            inv = torch.reciprocal(z[start : start + step] - w.unsqueeze(-1))  # (H, N, c)
            torch.bmm(vt, inv, out=out[:, :, start : start + step])
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad):
        # PyTorch's complex convention: grad_x = sum grad_out * conj(d out / d x).
        v, z, w = ctx.saved_tensors
        h, n, length = w.shape[0], w.shape[1], z.shape[0]
        grad_v = v.new_zeros(h, v.shape[0], n)
        grad_w = torch.zeros_like(w)
        step = _chunk_len(h, n, length)
        g_all = grad.transpose(0, 1).contiguous()  # (H, K, L)
        vc = v.conj().permute(1, 2, 0).contiguous()  # (H, N, K)
        zc, wc = z.conj(), w.conj().unsqueeze(-1)
        for start in range(0, length, step):
            inv_c = torch.reciprocal(zc[start : start + step] - wc)  # conj(1 / (z - w)), (H, N, c)
            g = g_all[:, :, start : start + step]  # (H, K, c)
            grad_v.baddbmm_(g, inv_c.transpose(1, 2))
            mix = torch.bmm(vc, g).mul_(inv_c).mul_(inv_c)
            grad_w += mix.sum(-1)
        return grad_v.transpose(0, 1), None, grad_w


def cauchy(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Cauchy product with bounded memory; on CUDA the compiled extension once it has passed its
    numerical check (`cuda_cauchy`)."""
    if v.is_cuda:
        fast = cuda_cauchy()
        if fast is not None:
            return fast(v, z, w)
    return _ChunkedCauchy.apply(v, z, w)


# The compiled CUDA Cauchy product (s4music/cuda) is used only after it reproduces _ChunkedCauchy
# on random inputs, values and gradients; if it cannot build or fails that check, the toolkit logs
# one warning and keeps the PyTorch path, which is always correct. S4MUSIC_NO_CUDA_EXT=1 disables it.
_cuda: dict = {"checked": False, "fn": None, "module": None, "reason": "not tried yet"}


class _CudaCauchy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, z, w):
        ctx.save_for_backward(v, z, w)
        return _cuda["module"].forward(v, z, w)

    @staticmethod
    def backward(ctx, grad):
        v, z, w = ctx.saved_tensors
        grad_v, grad_w = _cuda["module"].backward(grad.contiguous(), v, z, w)
        return grad_v, None, grad_w


def check_cauchy(fn: Callable, device: str = "cuda") -> float:
    """Largest relative error of `fn` against the PyTorch path, values and gradients."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(4, 8, 64, dtype=torch.cfloat, generator=gen).to(device)
    w = (-0.5 - 1j * torch.rand(8, 64, generator=gen) * 50).to(torch.cfloat).to(device)
    omega = torch.exp(-2j * torch.pi * torch.arange(257, dtype=torch.float64) / 512)
    z = (2 * (1 - omega) / (1 + omega)).to(torch.cfloat).to(device)
    grad = torch.randn(4, 8, 257, dtype=torch.cfloat, generator=gen).to(device)
    outs = []
    for f in (fn, _ChunkedCauchy.apply):
        vv, ww = v.clone().requires_grad_(), w.clone().requires_grad_()
        out = f(vv, z, ww)
        out.backward(grad)
        outs.append((out.detach(), vv.grad, ww.grad))
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(*outs, strict=True))


def cuda_cauchy() -> Callable | None:
    """The checked CUDA Cauchy product, or None (after one warning) when it cannot be used."""
    if _cuda["checked"]:
        return _cuda["fn"]
    _cuda["checked"] = True
    if os.environ.get("S4MUSIC_NO_CUDA_EXT"):
        _cuda["reason"] = "disabled by S4MUSIC_NO_CUDA_EXT"
        return None
    try:
        _cuda["module"] = build()
        err = check_cauchy(_CudaCauchy.apply)
        if err > 1e-4:
            raise RuntimeError(f"numerical check failed (relative error {err:.2e})")
        _cuda["fn"], _cuda["reason"] = _CudaCauchy.apply, f"active (check error {err:.1e})"
    except Exception as e:  # any failure means: use the PyTorch path
        _cuda["reason"] = f"unavailable: {first_line(e, last=True)}"
        log.warning("CUDA Cauchy extension %s; using the PyTorch kernel path", _cuda["reason"])
    return _cuda["fn"]


def kernel_path(device: str) -> str:
    """Which Cauchy implementation tensors on `device` use, for `s4music doctor`."""
    if not device.startswith("cuda"):
        return "pytorch (chunked, CPU)"
    fn = cuda_cauchy()
    return "cuda extension" if fn is not None else f"pytorch ({_cuda['reason']})"


# --------------------------------------------------------------------------------------------
# Vandermonde:  out[k, h, l] = sum_n v[k, h, n] * exp(x[h, n] * l)


def vandermonde_reference(v: torch.Tensor, x: torch.Tensor, length: int) -> torch.Tensor:
    """Plain Vandermonde product; materializes (H, N, L)."""
    powers = torch.exp(x.unsqueeze(-1) * torch.arange(length, device=x.device, dtype=x.real.dtype))
    return torch.einsum("khn,hnl->khl", v, powers)


def _power_chunks(x: torch.Tensor, length: int, step: int):
    """Yield (start, exp(x * l) for l in [start, start + step)) as (H, N, c) chunks.

    One complex exp table for the first chunk, then one multiply by exp(x * start) per chunk:
    complex exp is far slower than a multiply, and this is exact up to rounding."""
    base = torch.exp(x.unsqueeze(-1) * torch.arange(min(step, length), device=x.device, dtype=x.real.dtype))
    for start in range(0, length, step):
        n = min(step, length - start)
        yield start, base[..., :n] * torch.exp(x * start).unsqueeze(-1) if start else base[..., :n]


class _ChunkedVandermonde(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, x, length):
        ctx.save_for_backward(v, x)
        ctx.length = length
        out = v.new_empty(v.shape[0], v.shape[1], length)
        step = _chunk_len(x.shape[0], x.shape[1], length)
        vt = v.transpose(0, 1)
        for start, powers in _power_chunks(x, length, step):
            out[:, :, start : start + step] = torch.bmm(vt, powers).transpose(0, 1)
        return out

    @staticmethod
    def backward(ctx, grad):
        v, x = ctx.saved_tensors
        grad_v = torch.zeros_like(v)
        grad_x = torch.zeros_like(x)
        step = _chunk_len(x.shape[0], x.shape[1], ctx.length)
        vc = v.conj().permute(1, 2, 0)  # (H, N, K)
        for start, powers in _power_chunks(x, ctx.length, step):
            pw_c = powers.conj()  # (H, N, c)
            pos = torch.arange(start, start + pw_c.shape[-1], device=x.device, dtype=x.real.dtype)
            g = grad[:, :, start : start + step].transpose(0, 1)  # (H, K, c)
            grad_v += torch.bmm(g, pw_c.transpose(1, 2)).transpose(0, 1)
            grad_x += (torch.bmm(vc, g) * pw_c * pos).sum(-1)
        return grad_v, grad_x, None


def vandermonde_blocked(v: torch.Tensor, x: torch.Tensor, length: int) -> torch.Tensor:
    """The Vandermonde product as one batched matrix product, through autograd: with l = a c + b,
    exp(x l) = exp(x c a) exp(x b), so out[k, h, a, b] = sum_n (v exp(x c a))[k, h, n, a] exp(x b)[h, n, b].
    Its tables are (H, N, about sqrt(L)), so memory stays bounded without chunks or a hand-written
    backward, and the work is one complex GEMM rather than an exp per (h, n, l): every training
    step's path (S4Kernel.blocked; 6.9x faster steps on a 2-core CPU, `benchmarks/bench_model.py`)."""
    c = 1 << max(0, math.ceil(math.log2(max(1, length)) / 2))
    a = -(-length // c)
    steps = torch.arange(max(a, c), device=x.device, dtype=x.real.dtype)
    inner = torch.exp(x.unsqueeze(-1) * steps[:c])  # (H, N, c)
    outer = torch.exp((x * c).unsqueeze(-1) * steps[:a])  # (H, N, a)
    left = v.unsqueeze(-1) * outer  # (K, H, N, a)
    out = torch.einsum("khna,hnb->khab", left, inner)
    return out.reshape(*out.shape[:2], a * c)[..., :length]


def vandermonde(v: torch.Tensor, x: torch.Tensor, length: int, blocked: bool = False) -> torch.Tensor:
    """Vandermonde product with bounded memory: in chunks with a hand-written backward, or `blocked`."""
    if blocked:
        return vandermonde_blocked(v, x, length)
    return _ChunkedVandermonde.apply(v, x, length)


# --------------------------------------------------------------------------------------------
# A diagonal SSM's causal convolution without the FFT:
#   y[b, l, h] = sum_{j <= l} K[h, l - j] u[b, j, h],   K[h, l] = 2 Re(sum_n v[h, n] exp(x[h, n] l))

# Samples per chunk of `chunked_convolution`: its (H, c, c) matrices and the log2(L / c) carry passes
# trade against each other.
CONV_CHUNK = 256


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose gradient is made contiguous: a batched product's gradient may arrive in
    any layout, and a CPU product then goes matrix by matrix."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def chunked_convolution(u: torch.Tensor, x: torch.Tensor, v: torch.Tensor, chunk: int = CONV_CHUNK,
                        matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """u (B, L, H) real, x and v (H, N) complex -> y (B, L, H): S4D's convolution as matrix products,
    differentiable through autograd. `fft_convolution` with the kernel of `vandermonde` is the same
    function (tests hold this one to a direct sum).

    The sequence goes in chunks of c samples. Within a chunk, y is a (c, c) Toeplitz product with the
    kernel's first c taps (a Hankel one, as each chunk goes in reversed). Each chunk's input becomes
    the state at its end, S_j = sum_s exp(x (c-1-s)) u_s, in one product; the states are carried
    across chunks, S_j += exp(x c) S_(j-1), by doubling (log2 of the chunk count passes); and the state
    before a chunk adds 2 Re(v exp(x (i+1)) S) to its sample i. The three products run in
    `matmul_dtype` (bfloat16 for tensor cores under autocast; u's dtype when None), the carry in x's
    precision; y comes out in the products' dtype.
    """
    batch, length, h = u.shape
    n = x.shape[-1]
    c = max(1, min(chunk, length))
    chunks = -(-length // c)
    dtype = matmul_dtype or u.dtype
    powers = torch.exp(x.unsqueeze(-1) * torch.arange(c + 1, device=x.device, dtype=x.real.dtype))  # (H, N, c+1)
    weighted = v.unsqueeze(-1) * powers  # (H, N, c+1): v exp(x k)
    taps = 2 * weighted[..., :c].sum(1).real  # (H, c)
    # Each chunk's samples go in reversed (the copy that puts time last does it), so that both matrices
    # below are read straight off the taps and powers: sample a of a reversed chunk is c-1-a before its end.
    hankel = F.pad(taps, (c - 1, 0)).unfold(-1, c, 1)  # (H, c, c): [a, i] = K[i - (c-1-a)], 0 below lag 0
    ends = powers[..., :c]  # (H, N, c): reversed sample a reaches its chunk's end through exp(x a)
    columns = torch.cat([ends.real, ends.imag], dim=1).transpose(1, 2)  # (H, c, 2N) as [real | imag]
    reach = weighted[..., 1:]  # (H, N, c): the state before a chunk reaches its sample i
    rows = 2 * torch.cat([reach.real, -reach.imag], dim=1)  # (H, 2N, c): 2 Re(reach S) as a real product

    # The cast, then one copy that puts time last; an end pad only when the chunks overrun; and the
    # flip of that contiguous tensor comes out contiguous, as the products need.
    timed = u.to(dtype).permute(2, 0, 1).contiguous()  # (H, B, L)
    padded = F.pad(timed, (0, chunks * c - length)) if chunks * c > length else timed
    flat = padded.unflatten(-1, (chunks, c)).flip(-1).view(h, batch * chunks, c)
    y = torch.bmm(flat, hankel.to(dtype).contiguous())  # (H, B * chunks, c); its overlapping rows copied once
    end = torch.bmm(flat, columns.to(dtype)).to(x.real.dtype)
    state = torch.complex(end[..., :n], end[..., n:]).view(h, batch, chunks, n)
    decay, span = powers[..., c].view(h, 1, 1, n), 1  # exp(x c)^span
    while span < chunks:  # state j takes in the states before it, span at a time
        state = torch.cat([state[:, :, :span], state[:, :, span:] + decay * state[:, :, :-span]], dim=2)
        decay, span = decay * decay, 2 * span
    before = torch.cat([torch.zeros_like(state[:, :, :1]), state[:, :, :-1]], dim=2)
    before = torch.cat([before.real, before.imag], dim=-1).reshape(h, batch * chunks, 2 * n)
    y = _ContiguousGrad.apply(torch.baddbmm(y, before.to(dtype), rows.to(dtype)))
    return y.view(h, batch, chunks * c)[..., :length].permute(1, 2, 0)

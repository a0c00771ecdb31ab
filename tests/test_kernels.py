"""The memory-bounded Cauchy and Vandermonde products against their plain references."""

import pytest
import torch

from s4music.model import kernels


@pytest.fixture(params=[1 << 22, 1000], ids=["one-chunk", "many-chunks"])
def chunking(request, monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", request.param)
    return request.param


def _inputs(k=4, h=5, n=16, length=257):
    v = torch.randn(k, h, n, dtype=torch.cdouble, requires_grad=True)
    w = (-torch.rand(h, n) - 1j * torch.rand(h, n) * 20).to(torch.cdouble).requires_grad_()
    omega = torch.exp(-2j * torch.pi * torch.arange(length, dtype=torch.float64) / (2 * length - 2))
    z = 2 * (1 - omega) / (1 + omega)
    return v, z, w


def test_cauchy_matches_reference_values_and_gradients(chunking):
    v, z, w = _inputs()
    out = kernels._ChunkedCauchy.apply(v, z, w)
    ref = kernels.cauchy_reference(v, z, w)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (v, w), g)
    ref_grads = torch.autograd.grad(ref, (v, w), g)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_cauchy_gradcheck():
    v, z, w = _inputs(k=2, h=2, n=3, length=9)
    assert torch.autograd.gradcheck(lambda v, w: kernels._ChunkedCauchy.apply(v, z, w), (v, w))


def test_vandermonde_matches_reference_values_and_gradients(chunking):
    v = torch.randn(1, 5, 16, dtype=torch.cdouble, requires_grad=True)
    x = (-torch.rand(5, 16) * 0.1 - 1j * torch.rand(5, 16)).to(torch.cdouble).requires_grad_()
    out = kernels.vandermonde(v, x, 300)
    ref = kernels.vandermonde_reference(v, x, 300)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (v, x), g), torch.autograd.grad(ref, (v, x), g), strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-9)


def test_chunk_length_bounds_the_intermediate():
    # 64 channels x 64 states: one chunk of the (H, N, chunk) intermediate stays within budget.
    step = kernels._chunk_len(64, 64, 64001)
    assert 64 * 64 * step <= kernels.CHUNK_ELEMENTS and step < 64001


@pytest.mark.parametrize("length", [1, 17, 300, 4096])
def test_blocked_vandermonde_matches_reference_values_and_gradients(length):
    v = torch.randn(2, 5, 16, dtype=torch.cdouble, requires_grad=True)
    x = (-torch.rand(5, 16) * 0.1 - 1j * torch.rand(5, 16)).to(torch.cdouble).requires_grad_()
    out = kernels.vandermonde(v, x, length, blocked=True)
    ref = kernels.vandermonde_reference(v, x, length)
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (v, x), g), torch.autograd.grad(ref, (v, x), g), strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-8)


def _direct_convolution(u: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """y[b, l, h] = sum_{j <= l} K[h, l - j] u[b, j, h], term by term, with K from the plain Vandermonde product."""
    length = u.shape[1]
    k = 2 * kernels.vandermonde_reference(v.unsqueeze(0), x, length)[0].real  # (H, L)
    lag = torch.arange(length).unsqueeze(1) - torch.arange(length).unsqueeze(0)  # [l, j] = l - j
    toeplitz = torch.where(lag >= 0, k[:, lag.clamp(min=0)], 0)  # (H, L, L)
    return torch.einsum("hlj,bjh->blh", toeplitz, u)


@pytest.mark.parametrize("chunk", [1, 7, 64, 75, 300, 1000])
def test_chunked_convolution_matches_the_direct_sum_values_and_gradients(chunk):
    """One sample a chunk; chunks that do not divide the length (the last one padded); four that do,
    as a lease's 65,536 / 256 do; one chunk; and one longer than the sequence."""
    torch.manual_seed(0)
    u = torch.randn(2, 300, 3, dtype=torch.float64, requires_grad=True)
    x = (-torch.rand(3, 8) * 0.05 - 1j * torch.rand(3, 8) * 3).to(torch.cdouble).requires_grad_()
    v = torch.randn(3, 8, dtype=torch.cdouble, requires_grad=True)
    out = kernels.chunked_convolution(u, x, v, chunk=chunk)
    ref = _direct_convolution(u, x, v)
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (u, x, v), g), torch.autograd.grad(ref, (u, x, v), g), strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-8)


def test_chunked_convolution_in_bfloat16_stays_near_float32():
    """The products in bfloat16 (as under autocast) and the carry in float32: within bfloat16's rounding."""
    torch.manual_seed(0)
    u = torch.randn(2, 1024, 4, requires_grad=True)
    x = (-torch.rand(4, 8) * 0.01 - 1j * torch.rand(4, 8)).to(torch.cfloat).requires_grad_()
    v = torch.randn(4, 8, dtype=torch.cfloat, requires_grad=True)
    full = kernels.chunked_convolution(u, x, v, chunk=128)
    low = kernels.chunked_convolution(u, x, v, chunk=128, matmul_dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    relative = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert 1e-4 < relative(low.float(), full) < 2e-2  # rounded, as bfloat16 is, and no worse
    g = torch.randn_like(full)
    for a, b in zip(torch.autograd.grad(low, (u, x, v), g.bfloat16()), torch.autograd.grad(full, (u, x, v), g),
                    strict=True):
        assert a.dtype == b.dtype and relative(a, b) < 2e-2  # the parameters' gradients in their own precision

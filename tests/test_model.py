"""The SaShiMi model: its size, and that convolution, recurrence and prompt reading agree."""

import pytest
import torch

from conftest import perturbed
from s4music.model import S4Config, SaShiMi, SaShiMiConfig
from s4music.model.sashimi import ScalarLayerNorm
from s4music.model.s4 import S4Block, fft_length

TOL = 1e-4


def small(mode="dplr", **kw):
    return perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=2, s4=S4Config(mode=mode), **kw)))


def test_default_config_matches_official_parameter_count():
    # The official experiment model for YouTubeMix has 4,751,072 parameters.
    assert SaShiMi().num_parameters() == 4_751_072


def test_config_yaml_round_trip(tmp_path):
    cfg = SaShiMiConfig(d_model=32, pool=[2, 4], s4=S4Config(mode="diag", n_ssm=2))
    cfg.save_yaml(tmp_path / "m.yaml")
    assert SaShiMiConfig.load_yaml(tmp_path / "m.yaml") == cfg
    (tmp_path / "bad.yaml").write_text("d_model: 8\nwidth: 3\n")
    with pytest.raises(ValueError, match="width"):
        SaShiMiConfig.load_yaml(tmp_path / "bad.yaml")


def test_scalar_layer_norm_is_the_official_formula_with_and_without_gradients():
    norm = perturbed(ScalarLayerNorm(), scale=0.5)
    x = 3 * torch.randn(2, 50, 16) + 1
    ref = norm.s * (x - x.mean(-1, keepdim=True) + norm.m) / x.std(-1, keepdim=True, correction=0)
    with torch.no_grad():
        fast = norm(x)  # the fused kernel
    assert (norm(x) - ref).abs().max() < 1e-5 and (fast - ref).abs().max() < 1e-5


def test_fft_length_is_the_next_5_smooth_size():
    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in [*range(1, 2000), 2 * 159997 - 1, 2**20 + 1]:
        size = fft_length(n)
        assert size >= n and smooth(size) and not any(smooth(m) for m in range(n, size))


@pytest.mark.parametrize("mode", ["dplr", "diag"])
@pytest.mark.parametrize("length", [300, 512])  # chunks of 256: padded, and exact
def test_s4_block_conv_step_and_final_state_agree(mode, length):
    block = perturbed(S4Block(8, S4Config(mode=mode)))
    x = torch.randn(3, length, 8)
    with torch.no_grad():
        y_conv, state = block(x, return_state=True)
        s = block.kernel.initial_state(3)
        ys = []
        for t in range(length):
            y, s = block.step(x[:, t], s)
            ys.append(y)
    assert (torch.stack(ys, 1) - y_conv).abs().max() < TOL
    assert (s - state).abs().max() < TOL * s.abs().max()


@pytest.mark.parametrize("mode", ["dplr", "diag"])
@pytest.mark.parametrize("length", [1, 77, 256, 1000])
def test_chunked_scan_matches_the_fft_convolution(mode, length):
    # Without gradients (prompt reading, eval) the block scans chunks; in training it convolves by FFT.
    block = perturbed(S4Block(8, S4Config(mode=mode)))
    x = torch.randn(2, length, 8)
    y_fft, _ = block(x)
    with torch.no_grad():
        y_scan, _ = block(x)
    # relative: the training path's float32 Vandermonde phases (diag) lose ~1e-5 of scale by 1000 samples
    assert (y_scan - y_fft).abs().max() < TOL * y_fft.abs().max()


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_conv_kernel_matches_dense_recurrence(mode):
    # K[l] = 2 Re(C dA^l dB), computed the slow way in float64 from the dense discrete system.
    kernel = perturbed(S4Block(4, S4Config(mode=mode))).kernel
    length = 500
    # the training kernel (Cauchy for dplr, Vandermonde for diag), and the chunked scan's impulse response
    kernels = [kernel.conv_kernel(length).detach()]
    impulse = torch.zeros(1, length, 4)
    impulse[0, 0] = 1
    kernels.append(kernel.scan(impulse)[0][0].T)
    with torch.no_grad():
        rec = kernel.recurrence()
        d_a, d_b = kernel.discrete()
        c = torch.cat([rec.dC, rec.dC.conj()], -1).to(torch.complex128)
        x, ref = d_b, []
        for _ in range(length):
            ref.append((c * x).sum(-1).real)
            x = torch.einsum("hnm,hm->hn", d_a, x)
    ref = torch.stack(ref, -1)
    for k in kernels:
        assert (k.double() - ref).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_recurrent_mode_matches_convolution_mode(mode):
    model = small(mode)
    x = torch.randint(0, 256, (2, 200))  # not a multiple of the pool product 16
    with torch.no_grad():
        ref = model(x)
    state = model.initial_state(2)
    outs = []
    for t in range(x.shape[1]):
        y, state = model.step(x[:, t], state)
        outs.append(y)
    assert (torch.stack(outs, 1) - ref).abs().max() < TOL


@pytest.mark.parametrize("mode", ["dplr", "diag"])
@pytest.mark.parametrize("prompt", [1, 16, 77, 300])
def test_prefill_then_step_matches_convolution_mode(mode, prompt):
    model = small(mode)
    total = prompt + 40
    x = torch.randint(0, 256, (2, total))
    with torch.no_grad():
        ref = model(x)
    logits, state = model.prefill(x[:, :prompt])
    assert state.t == prompt
    outs = [logits]
    for t in range(prompt, total):
        y, state = model.step(x[:, t], state)
        outs.append(y[:, None])
    assert (torch.cat(outs, 1) - ref).abs().max() < TOL


def test_longer_sequence_than_attuned_length_doubles_c_tilde_without_changing_the_function():
    model = small("dplr")
    x = torch.randint(0, 256, (1, 1000))
    model(x[:, :64])  # attunes C-tilde to short lengths (with gradients, as in training)
    short = [int(b.kernel.l_kernel) for b in model.s4_blocks()]
    long_out = model(x).detach()
    assert [int(b.kernel.l_kernel) for b in model.s4_blocks()] != short
    state = model.initial_state(1)
    outs = []
    for t in range(1000):
        y, state = model.step(x[:, t], state)
        outs.append(y)
    assert (torch.stack(outs, 1) - long_out).abs().max() < TOL


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_causality(mode):
    model = small(mode)
    x = torch.randint(0, 256, (1, 256))
    t = 137
    x2 = x.clone()
    x2[0, t] = (x[0, t] + 100) % 256
    with torch.no_grad():
        a, b = model(x), model(x2)
    before = (a[:, :t] - b[:, :t]).abs().max().item()
    after = (a[:, t:] - b[:, t:]).abs().max().item()
    assert before < 1e-5, before  # FFT round-off only
    assert after > 1e-2


def test_variations_share_a_prompt_state():
    model = small()
    x = torch.randint(0, 256, (1, 50))
    _, state = model.prefill(x)
    alone, _ = model.step(torch.tensor([5]), model.prefill(x)[1])
    many, _ = model.step(torch.tensor([5, 5, 5]), state.repeat(3))
    # Rows of one batch agree to float32 round-off: a batched matrix product may sum in another
    # order than a single row's (AVX-512 kernels do), so not bit for bit.
    scale = alone.abs().max()
    for row in many:
        assert (row - alone[0]).abs().max() <= 1e-5 * scale
    assert scale > 1e-2  # the logits are not all zero


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_training_step_gives_finite_gradients_to_every_parameter(mode):
    model = small(mode).train()
    x = torch.randint(0, 256, (2, 128))
    loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), x.reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_gradient_checkpointing_leaves_loss_and_gradients_unchanged():
    model = small().train()
    x = torch.randint(0, 256, (2, 96))

    def grads():
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), x.reshape(-1))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss_plain, plain = grads()
    model.gradient_checkpointing = True
    loss_ckpt, ckpt = grads()
    assert loss_plain == pytest.approx(loss_ckpt, abs=1e-6)
    for a, b in zip(plain, ckpt, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_prefill_from_a_state_continues_exactly(mode):
    # chunk lengths that are not multiples of the pooling (16) nor of the scan's chunk (256), and some that are
    model = small(mode, pool=[4, 4])
    x = torch.randint(0, 256, (2, 1100))
    whole_logits, whole = model.prefill(x)
    for cuts in ([333, 767], [1, 2, 3, 1094], [256, 512, 332], [13] * 84 + [8]):
        state, logits, at = None, [], 0
        for n in cuts:
            lg, after = model.prefill(x[:, at:at + n], state)
            if state is not None:
                assert after is not state and state.t == at  # the given state is left as it was
            logits.append(lg)
            state, at = after, at + n
        assert state.t == 1100
        assert (torch.cat(logits, 1) - whole_logits).abs().max() < TOL, cuts
        for got, want in zip([*state.s4, *state.down, *state.up], [*whole.s4, *whole.down, *whole.up], strict=True):
            assert (got - want).abs().max() < TOL * max(1.0, want.abs().max()), cuts
    # and stepping on from a chunked prefill is the convolution over everything
    _, state = model.prefill(x[:, 100:307], model.prefill(x[:, :100])[1])
    y, _ = model.step(x[:, 307], state)
    assert (y - model(x)[:, 307]).abs().max() < TOL

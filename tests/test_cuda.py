"""The compiled CUDA Cauchy kernel and the GPU paths: the extension builds here; on a GPU, kernel, training
and generation match the CPU (or PyTorch) path."""

import copy
import json
import shutil

import pytest
import torch

from conftest import perturbed

import s4music.cuda as cuda
import s4music.model.kernels as kernels
from s4music.extensions import find_cuda_home
from s4music.generate import GenerateOptions, Output, Sampling, StepOptions, continue_prompt, improvise
from s4music.generate.sampler import Stepper
from s4music.model import S4Config, SaShiMi, SaShiMiConfig, save_model
from s4music.model.fast import fused_available
from s4music.model.sashimi import code_bits
from s4music.model.s4 import S4Block

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.slow
@pytest.mark.skipif(find_cuda_home() is None or torch.version.cuda is None,
                    reason="needs nvcc and a CUDA build of torch")
def test_extension_compiles_and_links():
    module = cuda.build()
    assert hasattr(module, "forward") and hasattr(module, "backward")


def test_fallback_warns_once_and_uses_the_pytorch_path(monkeypatch, caplog):
    monkeypatch.setitem(kernels._cuda, "checked", False)
    monkeypatch.setitem(kernels._cuda, "fn", None)

    def broken_build():
        raise RuntimeError("nvcc exploded")

    monkeypatch.setattr(kernels, "build", broken_build)
    with caplog.at_level("WARNING", logger="s4music.model.kernels"):
        assert kernels.cuda_cauchy() is None
        assert kernels.cuda_cauchy() is None
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(messages) == 1 and "nvcc exploded" in messages[0]
    assert "nvcc exploded" in kernels.kernel_path("cuda:0")


def test_find_cuda_home_reads_through_an_nvcc_wrapper_script(tmp_path, monkeypatch):
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {toolkit}/bin/nvcc \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(wrapper.parent))
    assert shutil.which("nvcc") == str(wrapper)
    assert find_cuda_home() == toolkit


@pytest.mark.gpu
@needs_gpu
def test_cuda_cauchy_matches_pytorch_path():
    fn = kernels.cuda_cauchy()
    assert fn is not None, kernels._cuda["reason"]
    assert kernels.check_cauchy(fn) < 1e-5


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("length", [1000, 16000])
def test_s4_layer_on_gpu_matches_cpu(length):
    block = S4Block(64, S4Config()).eval()
    x = torch.randn(2, length, 64)
    with torch.no_grad():
        ref = block(x)[0]
        out = block.cuda()(x.cuda())[0].cpu()
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_training_loss_and_gradients_on_gpu_match_cpu(mode):

    cpu = perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=2, s4=S4Config(mode=mode, d_state=16)))).train()
    gpu = copy.deepcopy(cpu).cuda()
    codes = torch.randint(0, 256, (2, 4096))
    results = []
    for model, x in ((cpu, codes), (gpu, codes.cuda())):
        loss = code_bits(model(model.shift_right(x)), x).mean()
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten().cpu() for p in model.parameters()])))
    (loss_cpu, grad_cpu), (loss_gpu, grad_gpu) = results
    assert abs(loss_gpu - loss_cpu) < 1e-4 * loss_cpu
    assert ((grad_gpu - grad_cpu).norm() / grad_cpu.norm()).item() < 1e-3


@pytest.mark.gpu
@needs_gpu
def test_generation_on_gpu_is_reproducible_bit_for_bit(tmp_path):

    save_model(perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=2, s4=S4Config(d_state=16)))), tmp_path / "model")
    options = GenerateOptions(seconds=0.1, seed=7, step=StepOptions(device="cuda"), output=Output(normalize="none"))
    outs = [improvise(tmp_path / f"out{i}.wav", tmp_path / "model", options) for i in range(2)]
    assert (tmp_path / "out0.wav").read_bytes() == (tmp_path / "out1.wav").read_bytes()
    assert json.loads(outs[0].sidecar.read_text())["step"] == "graphed-cuda"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("mode, sampling", [("dplr", {}), ("diag", {"temperature": 0.8, "top_k": 50, "top_p": 0.95})])
def test_graphed_step_samples_the_plain_steps_codes(mode, sampling):
    model = perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=2, s4=S4Config(mode=mode, d_state=16)))).cuda()
    # A prompt of 1000 samples leaves the state mid-period (1000 % 16 = 8), and chunks of 120 samples
    # end mid-block: plain steps before, between and after the graph's blocks, across calls.
    _, state = model.prefill(torch.randint(0, 256, (1, 1000), device="cuda"))
    resolved = Sampling(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, **sampling})
    first, seeds = torch.tensor([128]), [0, 1, 2]
    plain = Stepper(model, StepOptions(device="cuda", fused=False)).sampler(state, first, seeds, resolved)
    graphed = Stepper(model, StepOptions(device="cuda"))
    assert graphed.name == "graphed-cuda"
    graphed = graphed.sampler(state, first, seeds, resolved)
    for _ in range(3):
        a, b = plain.take(120), graphed.take(120)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.gpu
@needs_gpu
def test_auto_reads_the_prompt_on_the_gpu_and_generates_on_the_fused_cpu_step(tmp_path):
    import soundfile as sf

    save_model(perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=2, s4=S4Config(d_state=16)))), tmp_path / "model")
    t = torch.arange(16000) / 16000
    sf.write(tmp_path / "prompt.wav", (0.3 * torch.sin(2 * torch.pi * 440 * t)).numpy(), 16000)
    options = GenerateOptions(seconds=0.2, seed=3, step=StepOptions(device="auto"), output=Output(normalize="none"))
    result = continue_prompt(tmp_path / "prompt.wav", tmp_path / "out.wav", tmp_path / "model", options)
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["step"] == ("fused-cpu-fp16" if fused_available() else "graphed-cuda")
    assert sf.info(str(tmp_path / "out.wav")).frames == 16000 + 3200

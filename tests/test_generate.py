"""Generation: the fused and plain steps, sampling, the stream and the files made from it, guidance
that advises, and the checks of every option."""

import copy
import math
import dataclasses
import gc
import json
import subprocess
import sys
import weakref

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import DATA, need, perturbed, synthesized_music

from s4music.generate import (GenerateOptions, GenerationError, Output, PromptRefused, PromptSelection, Sampling,
                              StepOptions, check_prompt, continue_prompt, improvise, stream_continuation)
from s4music.generate.sampler import Stepper
from s4music.audio import Audio, spectral_flatness
from s4music.dsp import dbfs
from s4music.guidance import FAR, TYPICAL, UNKNOWN, UNUSUAL, degeneracy, describe_signal, judge
from s4music.model import S4Config, SaShiMi, SaShiMiConfig, import_official, load_model, save_model
from s4music.model.fast import (FusedReader, FusedStep, Rule, fused_available, guided_codes, instruction_sets, plain_steps,
                                reader, sample_codes)
from s4music.model.reparam import untie
from s4music.model.sashimi import SaShiMiState, WeightNormLinear
from s4music.sinks import pcm16

S4MUSIC = [sys.executable, "-m", "s4music.cli"]


@pytest.fixture(scope="module")
def fused():
    need(fused_available(), "a C++ compiler for the fused CPU step")


def _models():
    yield "official-v4", perturbed(import_official(DATA / "official" / "small_v4.pt"))
    for mode in ("dplr", "diag"):
        cfg = SaShiMiConfig(d_model=16, n_layers=2, pool=[4, 4], s4=S4Config(mode=mode, d_state=16))
        model = perturbed(SaShiMi(cfg))
        yield mode, model
        yield f"{mode}-reparam", perturbed(untie(model, groups=4, untie_pb=True, dt_per_state=True)[0])
    # widths 12, 24, 48: the kernel packs channels in vectors of 8 or 16, so the first tier ends in a padded one
    yield "dplr-width-12", perturbed(SaShiMi(SaShiMiConfig(d_model=12, n_layers=2, pool=[2, 2], s4=S4Config(d_state=8))))


def test_fused_step_matches_the_model(fused):
    # every instruction set this machine runs (the narrower ones too, which narrower CPUs run)
    assert instruction_sets()[-1] == "plain"
    torch.manual_seed(0)
    for name, model in _models():
        for batch in (3, 1):  # with fewer rows than threads, a team of threads shares each row
            x = torch.randint(0, 256, (batch, 333))
            full = model(x)
            _, start = model.prefill(x[:, :101])  # not a multiple of the pooling
            for isa in instruction_sets():
                fused, state = FusedStep(model, isa=isa), copy.deepcopy(start)
                assert fused.isa == isa
                # two calls: the state goes back to Python and returns in between
                _, _, first = fused.run(x[:, 101], state, torch.rand(batch, 100), forced=x[:, 102:202])
                _, _, second = fused.run(x[:, 201], state, torch.rand(batch, 131), forced=x[:, 202:])
                logits = torch.cat([first, second], dim=1)
                assert (logits - full[:, 101:-1]).abs().max() < 1e-4, (name, batch, isa)


def test_fused_read_matches_the_model(fused):
    """FusedReader's prefill, prefill_bits and bits are the model's, on every instruction set, from
    rest and from a state, over prompts that take several of its blocks at every tier."""
    torch.manual_seed(0)
    for name, model in _models():
        codes = torch.randint(0, 256, (2, 4500))
        x = model.shift_right(codes)
        logits, state = model.prefill(x)
        bits = model.bits(codes)
        for isa in instruction_sets():
            reader = FusedReader(model, isa=isa)
            got, got_state = reader.prefill(x)
            assert (got - logits).abs().max() < 1e-4 and _same_state(got_state, state, 1e-4), (name, isa)
            # from a state, at a split that is no multiple of the pools or of the kernel's blocks
            _, first = reader.prefill(x[:, :1301])
            kept = copy.deepcopy(first)
            got, got_state = reader.prefill(x[:, 1301:], first)
            assert (got - logits[:, 1301:]).abs().max() < 1e-4 and _same_state(got_state, state, 1e-4), (name, isa)
            assert _same_state(first, kept, 0.0)  # the state given is left as it was
            assert (reader.bits(codes) - bits).abs().max() < 1e-3, (name, isa)
            scored, scored_state = reader.prefill_bits(x, codes)
            assert (scored - bits).abs().max() < 1e-3 and _same_state(scored_state, state, 1e-4), (name, isa)
    short = x[:, :5]  # too short to reach the deeper tiers
    assert (FusedReader(model).prefill(short)[0] - model.prefill(short)[0]).abs().max() < 1e-4


def test_the_fused_read_refuses_another_models_state(fused):
    """A state of another shape (here a model with twice the state size) is refused with the shape
    the reader needs, before any of it is read, and the state given is left as it was."""
    config = SaShiMiConfig(d_model=16, n_layers=1, pool=[4], s4=S4Config(mode="diag", d_state=8))
    model = SaShiMi(config).eval()
    other = SaShiMi(SaShiMiConfig(d_model=16, n_layers=1, pool=[4], s4=S4Config(mode="diag", d_state=16))).eval()
    x = torch.randint(0, 256, (2, 100))
    _, foreign = other.prefill(x)
    kept = copy.deepcopy(foreign)
    with pytest.raises(RuntimeError, match=r"read: state 0 of tier 0 must be \(2, 32, 4\)"):
        FusedReader(model).prefill(x, foreign)
    assert _same_state(foreign, kept, 0.0)


def test_the_reader_follows_the_weights_and_lets_the_model_go(fused):
    model = perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=1, pool=[4], s4=S4Config(mode="diag", d_state=8))))
    codes = torch.randint(0, 256, (1, 600))
    assert isinstance(reader(model), FusedReader) and reader(model).impl is reader(model).impl  # kept
    before = reader(model).bits(codes)
    with torch.no_grad():
        model.decoder.bias[:128].add_(1.0)  # an update in place, as an optimizer step makes
    assert (reader(model).bits(codes) - model.bits(codes)).abs().max() < 1e-3
    assert (reader(model).bits(codes) - before).abs().max() > 1e-3
    assert reader(model.train()) is model  # dropout: the model's own pass
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def _half_weights(model: SaShiMi) -> SaShiMi:
    """A copy of the model whose linear-layer weights are rounded to half precision (what FusedStep(half=True) stores)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(m.weight.half().float())
            elif isinstance(m, WeightNormLinear):
                w = m.weight.half().float()
                m.weight_v.copy_(w)
                m.weight_g.copy_(w.norm(dim=1, keepdim=True))
    return model


def test_fused_step_with_half_weights_matches_the_rounded_model(fused):
    torch.manual_seed(0)
    model = perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=2, pool=[4, 4], s4=S4Config(d_state=16))))
    rounded = _half_weights(model)
    x = torch.randint(0, 256, (2, 300))
    _, state = rounded.prefill(x[:, :100])
    _, _, logits = FusedStep(model, half=True).run(x[:, 100], state, torch.rand(2, 199), forced=x[:, 101:])
    assert (logits - rounded(x)[:, 100:-1]).abs().max() < 1e-4
    assert (logits - model(x)[:, 100:-1]).abs().max() > 1e-4  # the weights really were rounded


def test_the_bf16_read_is_taken_only_where_it_measured_faster(fused, tmp_path, monkeypatch, caplog):
    """reader(bf16=True) measures both reads once per machine and model shape, keeps the figures in
    the cache, and reads in bf16 only where it was BF16_MIN_GAIN faster; float32 where the CPU has no
    AVX512-BF16, unmeasured."""
    from s4music.model import fast

    monkeypatch.setenv("S4MUSIC_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = perturbed(SaShiMi(SaShiMiConfig(d_model=64, n_layers=2, pool=[4], s4=S4Config(d_state=16)))).eval()
    with caplog.at_level("INFO", logger="s4music.model.fast"):
        first = reader(model, bf16=True)
        second = reader(model, bf16=True)
    measured = json.loads((tmp_path / "read-precision.json").read_text()) if (tmp_path / "read-precision.json").exists() else {}
    if FusedReader(model, bf16=True).precision != "bf16":  # no AVX512-BF16 here: nothing to measure
        assert first.precision == second.precision == "float32" and measured == {}
        return
    (figures,) = measured.values()
    faster = figures["float32_s"] >= fast.BF16_MIN_GAIN * figures["bf16_s"]
    assert first.precision == second.precision == ("bf16" if faster else "float32")
    assert len([r for r in caplog.records if "measured the prompt read" in r.getMessage()]) == 1
    figures["float32_s"], figures["bf16_s"] = 1.0, 2.0  # as on the Xeon where bf16 was slower
    (tmp_path / "read-precision.json").write_text(json.dumps({next(iter(measured)): figures}))
    assert reader(model, bf16=True).precision == "float32"
    assert reader(model).precision == "float32"  # not asked for


def test_every_instruction_set_samples_the_plain_steps_codes(fused):
    torch.manual_seed(0)
    model = perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=2, pool=[4], s4=S4Config(d_state=16))))
    _, state = model.prefill(torch.randint(0, 256, (2, 50)))
    first, uniforms = torch.tensor([77, 3]), torch.rand(2, 400)
    codes, logprobs = torch.empty(2, 400, dtype=torch.long), torch.empty(2, 400)
    plain_steps(model, first, copy.deepcopy(state), uniforms, codes, logprobs, Rule(0.9, 30))
    for isa in instruction_sets():
        got, got_logprobs = FusedStep(model, isa=isa).run(first, copy.deepcopy(state), uniforms, Rule(0.9, 30))
        assert torch.equal(got, codes), isa
        assert torch.allclose(got_logprobs, logprobs, atol=1e-4), isa


def test_fused_and_plain_samplers_give_the_same_codes(fused):
    torch.manual_seed(0)
    model = perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=2, pool=[4], s4=S4Config(d_state=16))))
    model.audio.sample_rate = 100  # guidance's free row hears the last 0.25 s: 25 codes, 27 at the pools' phase
    heard = torch.randint(0, 256, (50,))
    _, state = model.prefill(model.shift_right(heard[None]))
    first = heard[-1:]
    fast = Stepper(model, StepOptions(half_weights=False))
    plain = Stepper(model, StepOptions(fused=False))
    assert (fast.name, plain.name) == ("fused-cpu", "plain-cpu")
    for sampling in (Sampling(1.0, 0, 1.0), Sampling(0.8, 20, 1.0), Sampling(1.0, 0, 0.9), Sampling(typical=0.8),
                     Sampling(surprise=4.0), Sampling(0.9, guidance=2.5), Sampling(guidance=3.0, top_p=0.95, surprise=5.0),
                     Sampling(guidance=2.0, guidance_seconds=0)):
        a, b = (s.sampler(state, first, [5, 6, 7], sampling, heard) for s in (fast, plain))
        assert a.pairs == b.pairs == (sampling.guidance is not None)
        for n in (7, 300):  # two chunks: the state, the generators and Mirostat's bounds carry over
            (ca, la), (cb, lb) = a.take(n), b.take(n)
            assert ca.shape == (3, n)
            assert torch.equal(ca, cb), sampling
            assert torch.allclose(la, lb, atol=1e-4)
        if a.mu is not None:
            assert torch.allclose(a.mu, b.mu, atol=1e-6)


def test_guidance_changes_the_take_and_its_free_row_hears_only_the_end():
    """The free row's state is a read of the prompt's last guidance_seconds alone (rounded to the
    pools' phase); with guidance the take differs, and a variation's codes do not depend on the others."""
    torch.manual_seed(0)
    model = perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=2, pool=[4], s4=S4Config(d_state=16))))
    model.audio.sample_rate = 100
    heard = torch.randint(0, 256, (50,))
    _, state = model.prefill(model.shift_right(heard[None]))
    stepper = Stepper(model, StepOptions(fused=False))
    guided = stepper.sampler(state, heard[-1:], [5, 6], Sampling(guidance=2.0), heard)
    _, free = model.prefill(model.shift_right(heard[None, -26:]))  # 25 codes, then 1 more: 50 - 26 = 0 mod 4
    assert _same_state(guided.state, SaShiMiState.join([state, free, state, free], torch.device("cpu")))
    codes = guided.take(200)[0]
    off = stepper.sampler(state, heard[-1:], [5, 6], Sampling(guidance=1.0), heard).take(200)[0]
    assert not torch.equal(codes, off)
    alone = stepper.sampler(state, heard[-1:], [6], Sampling(guidance=2.0), heard).take(200)[0]
    assert torch.equal(alone[0], codes[1])
    unheard = stepper.sampler(state, heard[-1:], [5, 6], Sampling(guidance=2.0))  # nothing heard: guidance is off
    assert not unheard.pairs and torch.equal(unheard.take(200)[0], off)


def _same_state(a, b, atol: float = 1e-5) -> bool:
    pairs = list(zip(a.s4 + a.down + a.up, b.s4 + b.down + b.up, strict=True))
    return a.t == b.t and all(torch.allclose(x.cpu(), y.cpu(), atol=atol, rtol=atol) for x, y in pairs)


@pytest.mark.parametrize("fused_step", [False, True])
def test_reanchoring_reads_the_last_window_alone(fused_step):
    """With context_seconds W, after every W/2 samples each variation's state is the one a fresh read
    of its last W seconds gives; before that, and with it off or nothing heard, sampling is untouched."""
    need(not fused_step or fused_available(), "a C++ compiler for the fused CPU step")
    torch.manual_seed(0)
    model = perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=2, pool=[4], s4=S4Config(d_state=16))))
    model.audio.sample_rate = 1000  # a window of 0.1 s is 100 codes: re-anchored every 50
    heard = torch.randint(0, 256, (130,))
    _, state = model.prefill(model.shift_right(heard[None]))
    stepper = Stepper(model, StepOptions(fused=fused_step, half_weights=False))
    anchored = Sampling(1.0, 0, 1.0, None, 0.1)
    sampler = stepper.sampler(state, heard[-1:], [3, 4], anchored, heard)
    first = sampler.take(50)  # ends on the first point: the state there is a fresh read of the last 100
    history = torch.cat([heard.expand(2, -1), first[0]], dim=1)
    read = stepper.reader  # the model itself for the plain step, the C++ reader for the fused one
    fresh = [read.prefill(model.shift_right(row[-100:][None]))[1] for row in history]
    assert sampler.anchors == 1 and _same_state(sampler.state, SaShiMiState.join(fresh, torch.device("cpu")))
    parts = [first, *(sampler.take(n) for n in (15, 55, 30))]  # the point at 100 falls mid-chunk
    codes = torch.cat([c for c, _ in parts], dim=1)
    assert sampler.anchors == 3
    again = stepper.sampler(state, heard[-1:], [3, 4], anchored, heard)
    assert torch.equal(again.take(150)[0], codes)  # the chunking changes nothing
    alone = stepper.sampler(state, heard[-1:], [4], anchored, heard)  # nor the number of variations
    assert torch.equal(alone.take(150)[0][0], codes[1])
    plain = lambda: stepper.sampler(state, heard[-1:], [3, 4], Sampling(1.0, 0, 1.0))  # noqa: E731
    assert torch.equal(plain().take(50)[0], codes[:, :50])  # up to the first point, nothing changes
    assert not torch.equal(plain().take(150)[0], codes)
    unheard = stepper.sampler(state, heard[-1:], [3, 4], anchored)  # nothing heard: re-anchoring is off
    assert torch.equal(unheard.take(150)[0], plain().take(150)[0]) and unheard.anchors == 0
    # at every point, each variation goes on as a sampler started from a fresh read of its window
    history = torch.cat([heard.expand(2, -1), codes], dim=1)
    for point in (50, 100):
        windows = history[:, : len(heard) + point][:, -100:]
        for i, seed in enumerate((3, 4)):
            _, fresh = read.prefill(model.shift_right(windows[i][None]))
            reference = stepper.sampler(fresh, windows[i, -1:], [seed], Sampling(1.0, 0, 1.0))
            torch.rand(point, generator=reference.generators[0])  # the uniforms already used
            assert torch.equal(reference.take(50)[0][0], codes[i, point:point + 50]), (point, seed)


def test_reanchoring_from_rest_waits_for_a_full_window():
    """From nothing, a point where all that was sampled still fits in the window is skipped."""
    torch.manual_seed(0)
    model = perturbed(SaShiMi(SaShiMiConfig(d_model=16, n_layers=2, pool=[4], s4=S4Config(d_state=16))))
    model.audio.sample_rate = 1000
    stepper = Stepper(model, StepOptions(fused=False))
    start = torch.tensor([model.config.n_codes // 2])
    sampler = stepper.sampler(model.initial_state(1), start, [1], Sampling(1.0, 0, 1.0, None, 0.1),
                              torch.zeros(0, dtype=torch.long))
    assert sampler.take(0)[0].shape == (1, 0)
    codes = sampler.take(100)[0]
    assert sampler.anchors == 0  # at 50 and 100 samples, all of it fits in the window of 100
    plain = stepper.sampler(model.initial_state(1), start, [1], Sampling(1.0, 0, 1.0))
    assert torch.equal(plain.take(100)[0], codes)
    sampler.take(50)
    assert sampler.anchors == 1


def test_a_continuation_is_reanchored_on_its_prompt(tiny_model, synth_prompt):
    """The stream hands the sampler the prompt's codes: its take is the sampler's from the prompt."""
    from s4music.generate.prompt import read_prompt

    net = load_model(tiny_model)
    sampling = Sampling(0.9, 0, 1.0, None, 0.5)
    options = GenerateOptions(seconds=0.6, seed=5, sampling=sampling, prompt=PromptSelection(seconds=1.0),
                              output=Output(include_prompt=False, normalize="none"))
    generation = stream_continuation(synth_prompt, net, options)
    for _ in generation:
        pass
    codes, _ = generation.sampled(0)
    read = read_prompt(net, synth_prompt, options.prompt)
    stepper = Stepper(net, StepOptions())
    expected = stepper.sampler(read.state, read.codes[-1:], [5], sampling, read.codes).take(len(codes))[0][0]
    assert torch.equal(codes.long(), expected)
    unanchored = stepper.sampler(read.state, read.codes[-1:], [5], dataclasses.replace(sampling, context_seconds=0))
    assert not torch.equal(codes.long(), unanchored.take(len(codes))[0][0])


def test_sampling_rules():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    pick = lambda u, **kw: sample_codes(logits, torch.tensor([u]), Rule(**kw))[0].item()  # noqa: E731
    every = lambda **kw: {pick(u, **kw) for u in np.linspace(0, 0.999, 20)}  # noqa: E731
    assert [pick(u) for u in (0.05, 0.25, 0.5, 0.95)] == [0, 1, 2, 3]
    assert pick(0.0, temperature=0) == 3
    assert every(top_k=2) == {2, 3}
    assert every(top_p=0.5) == {2, 3}  # 0.4 < 0.5, then 0.3 crosses it
    assert every(top_p=0.3) == {3}
    # typical: the entropy is 1.28 nats; surprises 2.30, 1.61, 1.20, 0.92 -> nearest 2, then 1, 3, 0
    assert every(typical=0.25) == {2}
    assert every(typical=0.45) == {1, 2}
    assert every(typical=0.85) == {1, 2, 3}


def test_mirostat_drops_codes_past_its_bound_and_moves_the_bound():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))  # surprises 3.32, 2.32, 1.74, 1.32 bits
    rule = Rule(surprise=1.5)
    assert rule.first_mu(2).tolist() == [3.0, 3.0]
    for u in np.linspace(0, 0.999, 20):
        mu = torch.tensor([2.0], dtype=torch.float64)
        code = sample_codes(logits, torch.tensor([u]), rule, mu)[0].item()
        assert code in (2, 3)
        assert mu.item() == pytest.approx(2.0 - 0.1 * (-math.log2([0.1, 0.2, 0.3, 0.4][code]) - 1.5))
    mu = torch.tensor([0.5], dtype=torch.float64)  # below every code's surprise: the likeliest alone
    assert sample_codes(logits, torch.tensor([0.0]), rule, mu)[0].item() == 3


def test_guidance_draws_from_the_prompts_rows_pushed_away_from_the_free_ones():
    prompt = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    free = torch.log(torch.tensor([0.05, 0.05, 0.1, 0.8]))  # the free row is sure of code 3
    logits = torch.stack([prompt, free, prompt, free])  # two variations, each a (prompt, free) pair
    u = torch.tensor([0.3, 0.9, 0.3, 0.9])
    greedy = lambda g: guided_codes(logits, u, Rule(temperature=0, guidance=g))  # noqa: E731
    assert greedy(1.1)[0].tolist() == [3, 3, 3, 3]  # a little guidance: still the likeliest prompt code
    codes, logprobs = greedy(2.0)  # 2 prompt - free = log(p^2 / f) = log [.2, .8, .9, .2] + c
    assert codes.tolist() == [2, 2, 2, 2]
    assert logprobs.tolist() == pytest.approx([math.log(0.3), math.log(0.1)] * 2, abs=1e-6)  # each row's own
    assert guided_codes(logits, u, Rule(temperature=0, guidance=0.0))[0].tolist() == [3] * 4  # the free row alone
    mixed = torch.log(torch.tensor([[0.2, 0.8, 0.9, 0.2]]))
    for x in np.linspace(0, 0.999, 9):  # sampling too: the mixed distribution, with the first row's uniform
        got = guided_codes(logits, torch.tensor([x, 0.0, x, 0.0]), Rule(guidance=2.0))[0]
        want = sample_codes(mixed, torch.tensor([x]))[0].item()
        assert got.tolist() == [want] * 4


def test_a_guided_continuation_records_its_rule_and_bad_rules_are_named(tiny_model, synth_prompt, tmp_path):
    sampling = Sampling(guidance=2.0, surprise="auto", typical=0.95)
    result = continue_prompt(synth_prompt, tmp_path / "g.wav", tiny_model,
                             GenerateOptions(seconds=0.3, seed=3, sampling=sampling))
    recorded = json.loads(result.sidecar.read_text())["sampling"]
    assert recorded["guidance"] == 2.0 and recorded["typical"] == 0.95 and recorded["guidance_seconds"] == 0.25
    assert recorded["surprise"] == pytest.approx(result.guidance.bits)  # auto: the prompt's own bits
    for bad, named in ((Sampling(guidance=-1), "--guidance -1"), (Sampling(typical=0), "--typical 0"),
                       (Sampling(surprise="lots"), "--surprise lots"), (Sampling(guidance=2, context_seconds=4),
                                                                         "--guidance with --context-seconds")):
        with pytest.raises(GenerationError, match=named):
            GenerateOptions(sampling=bad).check()


def test_a_recommended_guidance_gives_way_to_context_seconds_asked_for(tiny_model, synth_prompt, tmp_path, caplog):
    """The bundled model recommends guidance; --context-seconds excludes it, so asking for
    re-anchoring drops the recommended guidance (it crashed the fused step), and the other way round.
    From nothing there is no prompt to guide by, and the sidecar says guidance was off."""
    net = load_model(tiny_model)
    net.summary = {**net.summary, "sampling": {"temperature": 0.8, "guidance": 2.0, "guidance_seconds": 0.0}}
    with caplog.at_level("INFO", logger="s4music"):
        result = continue_prompt(synth_prompt, tmp_path / "c.wav", net,
                                 GenerateOptions(seconds=1.2, seed=1, sampling=Sampling(context_seconds=0.5)))
    assert any("recommended guidance is off" in r.getMessage() for r in caplog.records)  # and it says so
    recorded = json.loads(result.sidecar.read_text())["sampling"]
    assert recorded["guidance"] == 1.0 and recorded["context_seconds"] == 0.5 and recorded["temperature"] == 0.8
    assert json.loads(result.sidecar.read_text())["options"]["prompt"]["seconds"] == 8.0
    improvised = improvise(tmp_path / "i.wav", net, GenerateOptions(seconds=0.3, seed=1))
    meta = json.loads(improvised.sidecar.read_text())
    assert meta["sampling"]["guidance"] == 1.0  # no prompt to guide by
    assert meta["check"] is None and not {"prompt", "strict"} & set(meta["options"])  # nor a prompt's options
    assert "include_prompt" not in meta["options"]["output"]
    anchoring = {"sampling": {"context_seconds": 4.0}}
    assert Sampling(guidance=2.0).resolved(anchoring).context_seconds == 0.0
    assert Sampling().resolved(anchoring).context_seconds == 4.0


def test_seed_fixes_the_output_bit_for_bit(tiny_model, tmp_path):
    opts = dict(seconds=0.5, variations=2)
    a = improvise(tmp_path / "a.wav", tiny_model, GenerateOptions(seed=11, **opts))
    b = improvise(tmp_path / "b.wav", tiny_model, GenerateOptions(seed=11, **opts))
    c = improvise(tmp_path / "c.wav", tiny_model, GenerateOptions(seed=12, **opts))
    for x, y in zip(a.takes, b.takes, strict=True):
        assert x.path.read_bytes() == y.path.read_bytes()
    assert a.takes[0].path.read_bytes() != c.takes[0].path.read_bytes()
    assert [t.seed for t in a.takes] == [11, 12] and [t.path.name for t in a.takes] == ["a-1.wav", "a-2.wav"]


def test_full_weights_give_the_plain_steps_codes(fused, tiny_model, synth_prompt, tmp_path):
    def run(prompt, name: str, **step):
        options = GenerateOptions(seconds=0.1, seed=5, output=Output(normalize="none"), step=StepOptions(**step))
        out = tmp_path / f"{name}.wav"
        return improvise(out, tiny_model, options) if prompt is None else continue_prompt(prompt, out, tiny_model, options)

    for prompt in (None, synth_prompt):  # from nothing, and after a prompt (read in float32 too)
        runs = {name: run(prompt, name, **step)
                for name, step in (("half", {}), ("full", {"half_weights": False}), ("plain", {"fused": False}))}
        assert {k: json.loads(r.sidecar.read_text())["step"] for k, r in runs.items()} == {
            "half": "fused-cpu-fp16", "full": "fused-cpu", "plain": "plain-cpu"}
        assert runs["full"].takes[0].path.read_bytes() == runs["plain"].takes[0].path.read_bytes(), prompt


def test_rank_orders_the_takes_of_an_unranked_run(tiny_model, tmp_path):
    plain = improvise(tmp_path / "u.flac", tiny_model, GenerateOptions(seconds=0.3, variations=3, seed=2))
    ranked = improvise(tmp_path / "r.flac", tiny_model, GenerateOptions(seconds=0.3, variations=3, seed=2, rank=True))
    order = sorted(range(3), key=lambda i: plain.takes[i].bits)
    assert order != [0, 1, 2], "pick another seed: the unranked run happens to be in order"
    assert [t.seed for t in ranked.takes] == [plain.takes[i].seed for i in order]
    assert [t.bits for t in ranked.takes] == sorted(t.bits for t in plain.takes)
    for k, i in enumerate(order):  # best first: r-1 is the unranked run's likeliest take
        assert ranked.takes[k].path.name == f"r-{k + 1}.flac"
        assert np.array_equal(sf.read(str(ranked.takes[k].path))[0], sf.read(str(plain.takes[i].path))[0])


@pytest.mark.parametrize("options,message", [
    (GenerateOptions(seconds=0), "--seconds 0: must be more than 0 and at most 3600"),
    (GenerateOptions(seconds=1e9), "--seconds 1e+09: must be more than 0 and at most 3600 (one hour)"),
    (GenerateOptions(variations=0), "--variations 0: must be 1 to 1024"),
    (GenerateOptions(retry_degenerate=-1), "--retry-degenerate -1: must be 0 or more"),
    (GenerateOptions(sampling=Sampling(temperature=-1)), "--temperature -1: must be 0 (greedy) or more"),
    (GenerateOptions(sampling=Sampling(top_k=-2)), "--top-k -2: must be 0 (off) or more"),
    (GenerateOptions(sampling=Sampling(top_p=0)), "--top-p 0: must be in (0, 1]"),
    (GenerateOptions(sampling=Sampling(context_seconds=0.2)), "--context-seconds 0.2: must be 0 (off) or 0.5 to 60"),
    (GenerateOptions(prompt=PromptSelection(seconds=0)), "--prompt-seconds 0: must be positive"),
    (GenerateOptions(prompt=PromptSelection(start=5, end=2)), "--prompt-end 2: must be after --prompt-start (5)"),
    (GenerateOptions(output=Output(normalize="loud")), "--normalize loud: use one of loudness, peak, none"),
    (GenerateOptions(step=StepOptions(device="tpu")), "--device tpu: use one of auto, cpu, cuda"),
])
def test_option_checks_name_the_option_and_its_range(options, message, tmp_path):
    with pytest.raises(GenerationError) as caught:
        improvise(tmp_path / "x.wav", options=options)
    assert message in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_several_bad_options_are_named_at_once_on_the_command_line(tmp_path, cli):
    code, _, err = cli("generate", "-o", tmp_path / "x.wav", "--seconds", "0", "--top-p", "2")
    assert code == 1 and "Traceback" not in err
    assert "--seconds 0: must be more than 0 and at most 3600 (one hour); --top-p 2: must be in (0, 1]; 1 is off" in \
        err.replace("\n", "")
    code, _, err = cli("generate", "--seconds", "abc")  # a value the parser refuses is an error too: exit 1
    assert code == 1 and "Invalid value for '--seconds'" in err


def test_a_degenerate_take_is_resampled_up_to_n_times(tiny_model, tmp_path):
    # a model that can only say one code: every take is a constant level, which is silence
    stuck = load_model(tiny_model)
    with torch.no_grad():
        stuck.decoder.bias[200] = 1e4
    save_model(stuck, tmp_path / "stuck", summary=stuck.summary)
    result = improvise(tmp_path / "s.wav", tmp_path / "stuck", GenerateOptions(seconds=0.5, seed=3, retry_degenerate=2))
    take = result.takes[0]
    assert (take.degenerate, take.retries, take.seed) == ("silence", 2, 3 + 2 * 1_000_003)
    assert json.loads(result.sidecar.read_text())["outputs"][0]["retries"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["s.json", "s.wav"]  # no leftovers


def test_no_prompt_leaves_the_prompt_out_and_the_continuation_as_it_was(tiny_model, synth_prompt, tmp_path):
    opts = dict(seconds=0.5, seed=2)
    whole = continue_prompt(synth_prompt, tmp_path / "w.wav", tiny_model, GenerateOptions(**opts))
    alone = continue_prompt(synth_prompt, tmp_path / "a.wav", tiny_model,
                            GenerateOptions(**opts, output=Output(include_prompt=False)))
    w, a = (sf.read(str(r.takes[0].path), dtype="int16")[0] for r in (whole, alone))
    assert len(a) == 8000 and len(w) == 8000 + 3 * 16000
    assert np.array_equal(w[-8000:], a)


def test_the_stream_is_the_file(tiny_model, synth_prompt, tmp_path):
    options = GenerateOptions(seconds=0.7, variations=2, seed=4)
    generation = stream_continuation(synth_prompt, tiny_model, options)
    assert generation.guidance.verdict == TYPICAL and generation.frames == 3 * 16000 + 11200
    streamed = [b"", b""]
    for chunk in generation:
        for i in range(2):
            streamed[i] += pcm16(chunk.after(generation.first_frame)[i].numpy())
    result = continue_prompt(synth_prompt, tmp_path / "f.wav", tiny_model, options)
    for i in range(2):
        assert result.takes[i].path.read_bytes()[44:] == streamed[i]


@pytest.mark.parametrize("suffix", ["wav", "flac", "ogg", "mp3"])
def test_the_output_format_follows_the_file_name(tiny_model, synth_prompt, tmp_path, suffix):
    result = continue_prompt(synth_prompt, tmp_path / f"out.{suffix}", tiny_model, GenerateOptions(seconds=1, seed=0))
    info = sf.info(str(result.takes[0].path))
    assert info.samplerate == 16000 and info.channels == 1
    assert info.format == {"wav": "WAV", "flac": "FLAC", "ogg": "OGG", "mp3": "MP3"}[suffix]
    assert abs(info.duration - 4.0) < (0.08 if suffix == "mp3" else 1e-3)  # mp3 frames pad the end a little
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.json", f"out.{suffix}"])


def test_an_output_it_cannot_write_is_an_error_before_any_work(tmp_path, cli):
    for out, reason in ((tmp_path / "x.xyz", "cannot write .xyz; use .wav, .flac, .ogg, .mp3"),
                        (tmp_path / "x", "cannot write a file without a suffix")):
        code, _, err = cli("generate", "-o", out, "--model", tmp_path / "no-such-model")
        # the output is checked before the model is even looked for
        assert code == 1 and reason in err.replace("\n", ""), err
    with pytest.raises(GenerationError, match="standard output carries one take"):
        improvise("-", options=GenerateOptions(variations=2))
    with pytest.raises(GenerationError, match="-o -: --retry-degenerate needs files"):  # only what was asked
        improvise("-", options=GenerateOptions(retry_degenerate=2))
    assert list(tmp_path.iterdir()) == []
    for folder in (tmp_path / "takes", tmp_path / "take.wav"):  # a folder, however it is named
        folder.mkdir()
        code, _, err = cli("generate", "-o", folder, "--model", tmp_path / "no-such-model")
        assert code == 1 and f"{folder}: is a folder; name a file in it" in err.replace("\n", ""), err


def test_a_far_prompt_continues_with_a_warning_and_strict_refuses_it(tiny_model, tmp_path, cli):
    sf.write(str(tmp_path / "silence.wav"), np.zeros(32000, dtype=np.float32), 16000)
    report = check_prompt(tmp_path / "silence.wav", tiny_model)
    assert report.verdict == FAR and "silent" in " ".join(report.reasons)
    result = continue_prompt(tmp_path / "silence.wav", tmp_path / "x.wav", tiny_model, GenerateOptions(seconds=0.1))
    assert result.takes[0].path.exists() and result.guidance.far
    assert json.loads(result.sidecar.read_text())["check"]["verdict"] == FAR
    written, _ = sf.read(str(result.takes[0].path), dtype="float32")
    assert np.abs(written[:32000]).max() < 1e-4  # the prompt stays silent: no thump of the lowest code
    with pytest.raises(PromptRefused, match="--strict") as refused:
        continue_prompt(tmp_path / "silence.wav", tmp_path / "y.wav", tiny_model,
                        GenerateOptions(seconds=0.1, strict=True))
    assert refused.value.exit_code == 2 and not (tmp_path / "y.wav").exists()
    base = [tmp_path / "silence.wav", "--model", tiny_model]
    code, _, err = cli("continue", *base, "-o", tmp_path / "z.wav", "--seconds", "0.1")
    assert code == 0 and "warning: verdict: far from what this model knows" in err
    assert "advice:" in err and (tmp_path / "z.wav").exists()
    code, _, err = cli("continue", *base, "-o", tmp_path / "q.wav", "--strict")
    assert code == 2 and "far from what this model knows" in err, err
    code, out, _ = cli("check", *base)  # check's report is its output: `check x.wav > report.txt` keeps it
    assert code == 2 and "verdict: far from what this model knows" in out, out
    assert not (tmp_path / "q.wav").exists()


def test_guidance_knows_its_own_music(trained_model, music_dataset, tmp_path):
    rows = [json.loads(line) for line in (music_dataset / "manifest.jsonl").read_text().splitlines()]
    in_domain = next(r["path"] for r in rows if r["split"] == "test")
    report = check_prompt(in_domain, trained_model, PromptSelection(seconds=4.0))
    assert report.verdict == TYPICAL, report
    assert report.reference_bits is not None
    rng = np.random.default_rng(0)
    sf.write(str(tmp_path / "noise.wav"), rng.uniform(-0.5, 0.5, 48000).astype(np.float32), 48000)
    report = check_prompt(tmp_path / "noise.wav", trained_model)
    assert report.verdict == FAR and "noise" in " ".join(report.reasons)


def test_guidance_says_what_the_model_knows_and_how_to_get_a_model_that_knows_more():
    audio = Audio(torch.from_numpy(synthesized_music()[:, 0]), 16000, 48000, 2)
    summary = {"test_bits": 2.0, "domain": "Bach chorales on a General MIDI piano"}
    for bits, verdict in ((2.1, TYPICAL), (3.0, UNUSUAL), (4.5, FAR)):
        report = judge(describe_signal(audio, "orchestra.wav"), bits, summary)
        assert report.verdict == verdict
        advice = " ".join(report.advice)
        assert ("fine-tune" in advice) == (verdict != TYPICAL)
        assert (summary["domain"] in advice) == (verdict != TYPICAL)
    # a model with no test figure cannot say; one near chance (8 bits/sample) has learned little
    for bits, chance in ((2.1, False), (7.6, True)):
        report = judge(describe_signal(audio, "orchestra.wav"), bits, {})
        assert report.verdict == UNKNOWN and ("near chance" in " ".join(report.reasons)) == chance, report
        assert "--record" in " ".join(report.advice)
    # what fine-tuning costs, as measured, and the commands with the model named
    advice = " ".join(judge(describe_signal(audio, "orchestra.wav"), 4.5, summary, "runs/mine/best").advice)
    assert "--from runs/mine/best" in advice and "MODEL" not in advice
    for measured in ("3.88 h", "25.2 h seen", "2,768 steps", "H200", "5.56 to 3.52", "0.59 audio s per s", "about 2 h"):
        assert measured in advice, measured
    # a model's rule for unfamiliar prompts is named, whatever its values
    rule = {"typical": 0.9, "surprise": "auto"}
    for bits in (2.1, 3.0):
        advice = " ".join(judge(describe_signal(audio, "x.wav"), bits, {**summary, "sampling_unfamiliar": rule}).advice)
        assert ("typical 0.9, surprise auto" in advice) == (bits == 3.0)


def test_the_sidecar_says_the_prompt_s_gain_from_the_input_file(tiny_model, synth_prompt, tmp_path):
    """gain_db applies after the encoding's scaling to full scale, so it says nothing of the file."""
    quiet, sr = sf.read(str(synth_prompt), dtype="float32")
    sf.write(str(tmp_path / "quiet.wav"), 0.05 * quiet, sr)
    options = GenerateOptions(seconds=0.2, seed=0, output=Output(normalize="peak"))
    result = continue_prompt(tmp_path / "quiet.wav", tmp_path / "q.wav", tiny_model, options)
    written, _ = sf.read(str(result.takes[0].path), dtype="float32")
    level = json.loads(result.sidecar.read_text())["level"]
    actual = dbfs(np.abs(written[:len(quiet)]).max()) - dbfs(0.05 * np.abs(quiet).max())
    assert level["gain_from_input_db"] > 20 and abs(level["gain_from_input_db"] - actual) < 1.5, (level, actual)
    assert json.loads(improvise(tmp_path / "i.wav", tiny_model, options).sidecar.read_text())["level"][
        "gain_from_input_db"] is None


def test_a_prompt_that_ends_in_silence_is_unusual_and_digital_silence_is_named():
    music = torch.from_numpy(synthesized_music()[:, 0])  # 3 s
    summary = {"test_bits": 2.0}
    for tail_s, verdict in ((0.0, TYPICAL), (0.3, TYPICAL), (0.8, UNUSUAL)):
        audio = Audio(torch.cat([music, torch.zeros(int(tail_s * 16000))]), 16000, 16000, 1)
        report = judge(describe_signal(audio, "fade.wav"), 2.1, summary)
        assert report.silent_end == pytest.approx(tail_s, abs=0.05) and report.verdict == verdict, report
    assert "ends in 0.8 s of silence" in " ".join(report.reasons) and "--prompt-end" in " ".join(report.advice)
    # silence is judged against the prompt's own peak, as the encoding scales it to full scale:
    # a quiet recording's tail 26 dB under its music is heard, and noise that ends in silence is still noise
    quiet = torch.cat([0.01 * music / music.abs().max(), torch.full((16000,), 5e-4)])
    assert describe_signal(Audio(quiet, 16000, 16000, 1), "quiet.wav").silent_end == 0.0
    noise = torch.cat([torch.rand(48000, generator=torch.Generator().manual_seed(0)) - 0.5, torch.zeros(16000)])
    noisy = judge(describe_signal(Audio(noise, 16000, 16000, 1), "hiss.wav"), 2.1, summary)
    assert noisy.verdict == FAR and "noise" in " ".join(noisy.reasons) and noisy.silent_end == pytest.approx(1.0)
    silence = judge(describe_signal(Audio(torch.zeros(16000), 16000, 16000, 1), "zeros.wav"), None, summary)
    assert silence.verdict == FAR and "the prompt is silent (digital silence)" in silence.reasons


def test_a_loaded_model_knows_its_name_for_the_advice(tiny_model):
    assert load_model(str(tiny_model)).name == str(tiny_model)
    assert load_model(None).name == load_model("default").name == "default"


def test_degeneracy_detection():
    rng = np.random.default_rng(0)
    t = torch.arange(32000) / 16000
    music = 0.3 * torch.sin(2 * torch.pi * 220 * t) * torch.exp(-3 * (t % 0.5)) + 0.2 * torch.sin(2 * torch.pi * 330 * t)
    assert degeneracy(music, 16000) is None
    assert degeneracy(torch.from_numpy(rng.uniform(-1, 1, 32000)).float(), 16000) == "noise"
    assert degeneracy(torch.cat([music[:16000], torch.zeros(16000)]), 16000) == "silence"
    assert degeneracy(torch.cat([music[:16000], torch.full((16000,), 0.2)]), 16000) == "silence"
    drift = music.clone()
    drift[16000:] = 0.2 + 0.05 * music[16000:]  # a faint texture over an offset, as a stuck model makes
    assert degeneracy(drift, 16000) == "offset"
    assert degeneracy(music + 0.01, 16000) is None
    wander = 0.5 * music + torch.linspace(0, -0.2, 32000)  # a slow drift under a lively signal: not stuck
    assert degeneracy(wander, 16000) is None
    # hiss, relative to the model: far flatter than its test audio, though far from white noise
    band = {"p5": 0.0009, "p95": 0.0041, "max": 0.0076}  # the chorale model's recorded band
    hiss = music + torch.from_numpy(rng.normal(0, 0.06, 32000)).float()
    flatness = spectral_flatness(hiss)
    assert 4 * band["max"] < flatness < 0.35  # between the relative and the absolute thresholds
    assert degeneracy(hiss, 16000) is None and degeneracy(hiss, 16000, band) == "hiss"
    assert degeneracy(music, 16000, band) is None


@pytest.mark.slow
def test_continue_from_a_url_and_bad_inputs(tiny_model, synth_prompt, http_server, tmp_path):
    root, base = http_server
    (root / "song.wav").write_bytes(synth_prompt.read_bytes())
    out = subprocess.run([*S4MUSIC, "continue", f"{base}/song.wav", "-o", str(tmp_path / "u.wav"), "--model",
                          str(tiny_model), "--seconds", "0.25", "--seed", "4"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "seed 4" in out.stderr and (tmp_path / "u.wav").exists() and (tmp_path / "u.json").exists()

    (tmp_path / "corrupt.ogg").write_bytes(b"OggS" + bytes(200))
    for prompt, reason in ((str(tmp_path / "missing.ogg"), "no such file"), (f"{base}/nothing.ogg", "404"),
                           (str(tmp_path / "corrupt.ogg"), "not audio")):
        bad = subprocess.run([*S4MUSIC, "continue", prompt, "-o", str(tmp_path / "b.wav"), "--model",
                              str(tiny_model)], capture_output=True, text=True)
        assert bad.returncode == 1
        assert reason in bad.stderr.lower() and prompt.split("/")[-1] in bad.stderr
        assert len([ln for ln in bad.stderr.splitlines() if ln.strip()]) == 1, bad.stderr
        assert not (tmp_path / "b.wav").exists() and not (tmp_path / "b.json").exists()


def test_continue_real_recordings_in_common_formats(trained_model, short_recording, tmp_path):
    need(__import__("shutil").which("ffmpeg") is not None, "ffmpeg")
    prompts = [short_recording]
    for ext, rate in ((".mp3", 48000), (".flac", 48000)):
        dest = tmp_path / f"prompt{ext}"
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(short_recording), "-ar", str(rate), "-ac", "2", str(dest)],
                       check=True)
        prompts.append(dest)
    for prompt in prompts:
        out = tmp_path / f"{prompt.stem}-{prompt.suffix[1:]}.wav"
        result = continue_prompt(prompt, out, trained_model,
                                 GenerateOptions(seconds=1.0, prompt=PromptSelection(seconds=2.0), seed=3))
        info = sf.info(str(out))
        assert info.samplerate == 16000 and info.channels == 1
        assert abs(info.duration - 3.0) < 1e-3
        meta = json.loads(result.sidecar.read_text())
        assert meta["seed"] == 3 and meta["speed_x_realtime"] > 0 and "rtf" not in meta
        assert meta["check"]["source_channels"] == 2
        assert "resampled" in " ".join(meta["check"]["conversions"])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64-v2"])  # AVX2 + FMA + F16C; then SSE4.2 only
def test_the_narrower_cpus_fused_step_matches_the_model_too(fused, arch):
    # every machine runs the widest code its CPU takes; build the narrower paths here as well, so a
    # wide CI machine still covers the code an AVX2-only (or older) CPU runs
    from s4music.model.fast import SOURCE, build_extension

    if arch != "x86-64-v2" and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU cannot run AVX2 code")
    ext = build_extension(SOURCE, arch=arch)
    torch.manual_seed(0)
    for name, model in _models():
        x = torch.randint(0, 256, (2, 300))
        _, state = model.prefill(x[:, :101])
        _, _, logits = FusedStep(model, extension=ext).run(x[:, 101], state, torch.rand(2, 198), forced=x[:, 102:])
        assert (logits - model(x)[:, 101:-1]).abs().max() < 1e-4, (arch, name)
    assert FusedStep(model, half=True, extension=ext).half == (arch != "x86-64-v2")  # F16C or not


def test_a_prompt_the_model_finds_surprising_takes_its_rule_for_unfamiliar_prompts(tiny_model, synth_prompt, tmp_path):
    net = load_model(tiny_model)
    familiar = net.summary["test_bits"]  # the tiny model's test figure is its NLL on this very prompt
    rules = {"sampling": {"temperature": 0.8}, "sampling_unfamiliar": {"typical": 0.9}}
    recorded = {}
    for name, test_bits in (("familiar", familiar), ("surprising", familiar - 1.0)):
        net.summary = {**net.summary, **rules, "test_bits": test_bits}
        result = continue_prompt(synth_prompt, tmp_path / f"{name}.wav", net, GenerateOptions(seconds=0.1, seed=1))
        recorded[name] = json.loads(result.sidecar.read_text())["sampling"]
        assert result.guidance.unfamiliar == (name == "surprising")
        assert any("this model's rule for a prompt it finds surprising" in a
                   for a in result.guidance.advice) == (name == "surprising")
    assert recorded["familiar"]["temperature"] == recorded["surprising"]["temperature"] == 0.8
    assert recorded["familiar"]["typical"] == 1.0 and recorded["surprising"]["typical"] == 0.9
    # what the user sets wins over either rule
    result = continue_prompt(synth_prompt, tmp_path / "set.wav", net,
                             GenerateOptions(seconds=0.1, seed=1, sampling=Sampling(typical=0.95)))
    assert json.loads(result.sidecar.read_text())["sampling"]["typical"] == 0.95
    assert Sampling().resolved(rules).typical == 1.0 and Sampling().resolved(rules, unfamiliar=True).typical == 0.9

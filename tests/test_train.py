import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DATA, perturbed
from safetensors.torch import load_file

from s4music.data.prepare import PrepareOptions, prepare
from s4music.eval_options import EvalOptions
from s4music.evaluate import EvalError, evaluate
from s4music.generate.stream import TARGET_LUFS, Level
from s4music.model import import_official, load_model, save_model
from s4music.model.reparam import untie
from s4music.options import OptionError
from s4music.data.dataset import PreparedDataset, WindowMixture
from s4music.train import TrainConfig, TrainingError, make_scheduler, train, validation_windows

TINY = {"d_model": 16, "n_layers": 1, "pool": [4], "s4": {"d_state": 16}}
S4MUSIC = [sys.executable, "-m", "s4music.cli"]


def tiny(dataset, out, **kw) -> TrainConfig:
    values = {"data": [str(dataset)], "out": str(out), "model": TINY, "seq_len": 1024, "batch_size": 4,
              "steps": 4, "eval_every": 2, "save_every": 2, "eval_windows": 2}
    return TrainConfig(**{**values, **kw})


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def log_rows(run: Path) -> list[dict]:
    lines = (run / "log.csv").read_text().splitlines()
    return [dict(zip(lines[0].split(","), line.split(","), strict=True)) for line in lines[1:]]


@pytest.mark.slow
def test_scratch_training_beats_the_unigram_baseline(music_dataset, tmp_path):
    config = tiny(music_dataset, tmp_path / "run", seq_len=4096, steps=80, lr=1e-2, eval_every=40, save_every=40)
    result = train(config)
    report = evaluate(result.model, music_dataset, EvalOptions(split="val", context=4096, max_windows=24))
    assert report.overall.model_bits < report.overall.unigram_bits - 0.05, report.overall
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000040", "step-0000080"]
    saved = TrainConfig.load(tmp_path / "run" / "config.yaml")
    assert saved == config
    assert load_model(result.model).summary["seed"] == 0


def test_a_run_from_weights_takes_a_gentler_learning_rate_than_one_from_scratch(tmp_path):
    """--from alone fine-tunes, at 3e-4 with a 20-step warm-up; from scratch the official 4e-3, no
    warm-up; the S4 group a quarter of either; what is given is kept, and config.yaml keeps the
    resolved values, so a resume trains on at the same rates."""
    official = str(DATA / "official" / "small_v4.pt")
    rates = lambda c: (c.mode, c.lr, c.ssm_lr, c.warmup)  # noqa: E731
    assert rates(TrainConfig(data=["d"])) == ("scratch", 4e-3, 1e-3, 0)
    tuned = TrainConfig(data=["d"], init=official)
    assert rates(tuned) == ("finetune", 3e-4, 7.5e-5, 20)
    assert rates(TrainConfig(data=["d"], mode="reparam", init=official)) == ("reparam", 3e-4, 7.5e-5, 20)
    given = TrainConfig(data=["d"], init=official, lr=2e-3, ssm_lr=1e-4, warmup=5)
    assert rates(given) == ("finetune", 2e-3, 1e-4, 5)
    for config in (tuned, given):
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config.to_dict()))
        assert TrainConfig.load(path) == config
    with pytest.raises(TrainingError, match="mode scratch starts from nothing"):
        TrainConfig(data=["d"], mode="scratch", init=official)
    # a run saved before --from implied finetune trained from scratch: it resumes as it was
    path.write_text(yaml.safe_dump({"data": ["d"], "mode": "scratch", "init": official}))
    assert TrainConfig.load(path).init is None


def test_a_run_fitted_into_minutes_warms_up_over_at_most_a_fifth_of_its_steps():
    def first_factors(**kw):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make_scheduler(optimizer, TrainConfig(data=["d"], warmup=20, steps=10, **kw))
        factors = []
        for _ in range(3):
            factors.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return factors

    assert first_factors() == pytest.approx([1 / 20, 2 / 20, 3 / 20])  # as asked
    assert first_factors(max_minutes=1.0)[:2] == pytest.approx([1 / 2, 1.0])  # 2 of the 10 steps


def test_finetune_from_an_official_checkpoint(music_dataset, tmp_path):
    official = DATA / "official" / "small_v4.pt"
    source = import_official(official)
    result = train(tiny(music_dataset, tmp_path / "ft", mode="finetune", init=str(official), steps=2,
                        model={}, lr=1e-3))
    tuned = load_model(result.model)
    assert tuned.config == source.config and tuned.summary["mode"] == "finetune"
    moved = [k for k, v in tuned.state_dict().items() if not torch.equal(v, source.state_dict()[k])]
    assert moved, "fine-tuning changed nothing"


def test_a_finetune_that_makes_the_model_worse_leaves_the_starting_model_as_best(music_dataset, tmp_path, caplog):
    """best/ starts as the model the run starts from (validated at step 0): a learning rate that
    wrecks the model leaves it there, with a warning, and `eval` of best/ is the starting model's."""
    official = DATA / "official" / "small_v4.pt"
    source = import_official(official)
    with caplog.at_level("INFO", logger="s4music"):
        result = train(tiny(music_dataset, tmp_path / "ft", mode="finetune", init=str(official), steps=2,
                            model={}, lr=0.5, warmup=0, clip=0))
    best = load_model(result.best)
    assert best.summary["step"] == 0
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in best.state_dict().items())
    assert load_model(result.model).summary["val_bits"] > best.summary["val_bits"]  # the run did get worse
    assert any("no step beat the model it started from" in r.getMessage() for r in caplog.records)


def test_a_finetune_keeps_the_sampling_rules_of_the_model_it_started_from(music_dataset, tmp_path):
    """best/ at step 0 is the starting model's weights: it should sample as that model does, and so
    should what the run makes of them, until a rule is chosen for it."""
    rules = {"sampling": {"temperature": 0.8, "guidance": 2.0}, "sampling_unfamiliar": {"typical": 0.9}}
    start = save_model(perturbed(import_official(DATA / "official" / "small_v4.pt")), tmp_path / "start",
                       summary={**rules, "test_bits": 3.0})
    result = train(tiny(music_dataset, tmp_path / "ft", init=str(start), steps=2, model={}))
    for saved in (result.best, result.model):
        summary = load_model(saved).summary
        assert {k: summary.get(k) for k in rules} == rules and "test_bits" not in summary, saved
    # a checkpoint saved before the rules were carried: a resume takes them from the starting model
    newest = tmp_path / "ft" / "checkpoints" / "step-0000002"
    meta = json.loads((newest / "config.json").read_text())
    meta["summary"] = {k: v for k, v in meta["summary"].items() if k not in rules}
    (newest / "config.json").write_text(json.dumps(meta))
    resumed = train(TrainConfig.load(out=str(tmp_path / "ft"), resume=True, steps=3), resume=True)
    summary = load_model(resumed.model).summary
    assert {k: summary.get(k) for k in rules} == rules


def test_a_budget_spent_before_the_first_steps_are_timed_stops_and_saves(music_dataset, tmp_path, caplog):
    with caplog.at_level("INFO", logger="s4music.train"):
        result = train(tiny(music_dataset, tmp_path / "run", steps=10**6, max_minutes=1e-4, save_every=10**6))
    assert result.step < 5 and (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert any("out of the 0.0001 minutes" in r.getMessage() for r in caplog.records)


def test_reparam_preserves_the_function_and_reports_added_parameters(tmp_path, music_dataset):
    source = perturbed(import_official(DATA / "official" / "small_v4.pt"))
    x = torch.randint(0, 256, (2, 200))
    expected = source(x)
    for kwargs in ({}, {"groups": 2, "untie_pb": True}, {"dt_per_state": True}):
        expanded, added = untie(source, **kwargs)
        assert added > 0
        assert torch.allclose(expanded.eval()(x), expected, atol=1e-6), kwargs
    # untied copies are parameters of their own: they can move apart
    expanded, _ = untie(source)
    lam = expanded.s4_blocks()[0].kernel.A_real
    assert lam.shape[0] == expanded.s4_blocks()[0].kernel.H

    save_model(source, tmp_path / "src")
    result = train(tiny(music_dataset, tmp_path / "rp", mode="reparam", init=str(tmp_path / "src"), steps=1,
                        model={}, untie_pb=True))
    assert result.added_parameters == untie(source, untie_pb=True)[1]
    assert load_model(result.model).config.s4.n_ssm > 1


def test_quantization_mismatch_is_a_clear_error(tmp_path, short_recording):
    linear = tmp_path / "linear"
    prepare([short_recording], linear, PrepareOptions(seconds=1.0, quantization="linear", val_fraction=0,
                                                      test_fraction=0))
    official = DATA / "official" / "small_v4.pt"
    with pytest.raises(TrainingError, match="mulaw-official.*linear"):
        train(tiny(linear, tmp_path / "run", mode="finetune", init=str(official), model={}))
    with pytest.raises(EvalError, match="linear"):
        evaluate(official, linear, EvalOptions(split="train"))


def test_warm_up_then_cosine_and_plateau_schedules():
    params = [torch.nn.Parameter(torch.zeros(1))]

    def lrs(config: TrainConfig, vals=None) -> list[float]:
        opt = torch.optim.SGD(params, lr=config.lr)
        sched = make_scheduler(opt, config)
        out = []
        for i in range(config.steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step(vals[i]) if vals is not None else sched.step()
        return out

    base = dict(data=["x"], lr=1.0, steps=10)
    warm = lrs(TrainConfig(**base, warmup=4))
    assert warm[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warm-up to the full rate
    assert warm[4] == pytest.approx(1.0) and all(a > b for a, b in zip(warm[4:-1], warm[5:], strict=True))  # then cosine down
    assert warm[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert lrs(TrainConfig(**base, schedule="constant")) == [1.0] * 10
    # plateau: the rate halves after `plateau_patience` evaluations without improvement
    vals = [5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.0, 3.0, 3.0, 3.0]
    plateau = lrs(TrainConfig(**base, schedule="plateau", plateau_patience=2), vals)
    assert plateau == [1.0] * 5 + [0.5] * 5


def test_keep_last_prunes_old_checkpoints(synth_dataset, tmp_path):
    result = train(tiny(synth_dataset, tmp_path / "run", seq_len=1024, steps=5, save_every=1, keep_last=2))
    assert sorted(p.name for p in (result.out / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]


def test_resume_takes_the_runs_own_config_and_refuses_another(synth_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = os.path.relpath(synth_dataset, tmp_path)
    train(tiny(data, "run", seq_len=1024, steps=2, save_every=1))
    shutil.copytree(tmp_path / "run", tmp_path / "first")  # as the relative --data left it
    config = TrainConfig.load(out="run", resume=True, steps=3)  # the saved config, with more steps
    assert config == tiny(str(synth_dataset), "run", seq_len=1024, steps=3, save_every=1)  # its data, absolute
    assert train(config, resume=True).step == 3
    with pytest.raises(TrainingError, match=r"config.yaml: the run was started with lr=0.004"):
        train(tiny(synth_dataset, "run", seq_len=1024, steps=4, save_every=1, lr=0.1), resume=True)
    # the same run and data by absolute paths, then a copy of the run: both go on
    assert train(tiny(synth_dataset, tmp_path / "run", seq_len=1024, steps=4, save_every=1), resume=True).step == 4
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    assert train(TrainConfig.load(out="copy", resume=True, steps=5), resume=True).step == 5
    # from another directory: the config holds the data's absolute path, from the first run on
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert train(TrainConfig.load(out=str(tmp_path / "first"), resume=True, steps=3), resume=True).step == 3
    # data that moved: refused where it was, taken where it is now
    moved = shutil.copytree(synth_dataset, tmp_path / "moved")
    config = tiny(str(moved), tmp_path / "m", seq_len=1024, steps=2, save_every=1)
    train(config)
    shutil.move(moved, tmp_path / "there")
    with pytest.raises(TrainingError, match="moved: no such dataset .*; if the run's data moved, give --data where"):
        train(TrainConfig.load(out=str(tmp_path / "m"), resume=True, steps=3), resume=True)
    again = TrainConfig.load(out=str(tmp_path / "m"), resume=True, steps=3, data=[str(tmp_path / "there")])
    assert train(again, resume=True).step == 3
    # but not data the model does not read
    shutil.move(tmp_path / "there", tmp_path / "gone")
    prepare([synth_dataset.parent / "audio"], tmp_path / "8k", PrepareOptions(seconds=0.512, sample_rate=8000))
    other = TrainConfig.load(out=str(tmp_path / "m"), resume=True, steps=4, data=[str(tmp_path / "8k")])
    with pytest.raises(TrainingError, match="8k: trained on 16000 Hz .* but the data is 8000 Hz"):
        train(other, resume=True)


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("data: [a]\nsteps: 7\nmodel:\n  d_model: 32\n")
    config = TrainConfig.load(tmp_path / "c.yaml", ["model.n_layers=2", "lr=1e-3", "schedule=plateau"], seed=5)
    assert (config.steps, config.model, config.lr, config.seed, config.schedule) == (
        7, {"d_model": 32, "n_layers": 2}, 1e-3, 5, "plateau")
    with pytest.raises(TrainingError, match="unknown training config keys"):
        TrainConfig.load(None, ["data=[a]", "stepz=3"])
    with pytest.raises(TrainingError, match="eval_windows must be at least 1"):
        TrainConfig.load(None, ["data=[a]", "eval_windows=0"])
    with pytest.raises(OptionError, match="--set 'steps': expected key=value"):
        TrainConfig.load(None, ["steps"])
    with pytest.raises(TrainingError, match="--set 'model.d_model=4': model is not a mapping"):
        TrainConfig.load(None, ["data=[a]", "model=3", "model.d_model=4"])
    assert TrainConfig.load(None, ["data=[a]"], fast=True, conv_chunk=256).conv_chunk == 256
    with pytest.raises(TrainingError, match=r"conv_chunk=-1: give a number of samples, or 0 for the FFT"):
        TrainConfig.load(None, ["data=[a]", "conv_chunk=-1"])
    with pytest.raises(TrainingError, match=r"conv_chunk=256 is an option of the fast step: add --fast"):
        TrainConfig.load(None, ["data=[a]", "conv_chunk=256"])


def test_yaml_no_is_the_string_no_in_files_and_overrides(tmp_path):
    # YAML 1.1 reads no/off/yes as booleans; precision's values include "no".
    (tmp_path / "c.yaml").write_text("data: [a]\nprecision: no\ngradient_checkpointing: true\n")
    config = TrainConfig.load(tmp_path / "c.yaml")
    assert (config.precision, config.gradient_checkpointing) == ("no", True)
    config = TrainConfig.load(None, ["data=[a]", "precision=bf16", "precision=no", "untie_pb=false"])
    assert (config.precision, config.untie_pb) == ("no", False)


def test_bf16_autocast_changes_the_arithmetic_not_the_saved_weights(music_dataset, tmp_path):
    # One process, precision switched back and forth: the Python API must allow it.
    for name, precision in (("fp32", "no"), ("bf16", "bf16"), ("fp32-again", "no")):
        train(tiny(music_dataset, tmp_path / name, steps=2, precision=precision))
    bits = {name: [row["train_bits"] for row in log_rows(tmp_path / name)] for name in ("fp32", "bf16", "fp32-again")}
    assert bits["fp32-again"] == bits["fp32"]
    assert bits["bf16"] != bits["fp32"]  # autocast really ran: same seed and data, other rounding
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights(tmp_path / "bf16").values())
    with pytest.raises(TrainingError, match="fp16 needs a GPU"):
        train(tiny(music_dataset, tmp_path / "fp16", precision="fp16"))
    assert not (tmp_path / "fp16").exists()


def test_tensorboard_log_holds_the_same_figures_as_the_csv(music_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny(music_dataset, tmp_path / "run", log="tensorboard"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    rows = log_rows(tmp_path / "run")
    for key in ("train_bits", "val_bits", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        expected = [(int(r["step"]), float(r[key])) for r in rows if r[key]]
        assert [s for s, _ in logged] == [s for s, _ in expected] and expected, key
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-4), key


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(music_dataset, tmp_path):
    config = tiny(music_dataset, tmp_path / "nan", lr=1e30, ssm_lr=1e30, steps=20, save_every=1, max_bad_steps=3,
                  clip=0.0)
    with pytest.raises(TrainingError, match="NaN or inf for 3 steps"):
        train(config)
    for ckpt in (tmp_path / "nan" / "checkpoints").iterdir():
        model = load_model(ckpt)
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_kill_9_then_resume_loses_nothing(music_dataset, tmp_path):
    args = ["train", "--data", str(music_dataset), "--steps", "10", "--seq-len", "2048", "--batch-size", "2",
            "--set", "save_every=3", "--set", "eval_every=5", "--set", "eval_windows=2",
            *[f"--set=model.{k}={json.dumps(v)}" for k, v in TINY.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*S4MUSIC, *args, "--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*S4MUSIC, *args, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "log.csv").exists() or len(log_rows(killed)) < 7:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it was killed"
    assert len(log_rows(killed)) >= 7

    resumed = subprocess.run([*S4MUSIC, "train", "--out", str(killed), "--resume"], env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole, again = log_rows(tmp_path / "whole"), log_rows(killed)
    assert [r["step"] for r in again] == [str(i) for i in range(1, 11)]
    for a, b in zip(whole, again, strict=True):
        assert abs(float(a["train_bits"]) - float(b["train_bits"])) < 1e-4, (a, b)
    for k, v in weights(tmp_path / "whole").items():
        assert torch.allclose(v, weights(killed)[k], atol=1e-5), k


@pytest.mark.slow
def test_two_gloo_processes_equal_one_with_the_same_global_batch(music_dataset, tmp_path):
    args = ["train", "--data", str(music_dataset), "--steps", "3", "--seq-len", "1024", "--batch-size", "4",
            "--set", "eval_every=3", *[f"--set=model.{k}={json.dumps(v)}" for k, v in TINY.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    two = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "s4music.cli", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([*S4MUSIC, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]

    world = json.loads((tmp_path / "two" / "world.json").read_text())
    assert world["world_size"] == 2
    assert sorted(r["rank"] for r in world["ranks"]) == [0, 1]
    assert len({r["pid"] for r in world["ranks"]}) == 2, "both ranks ran in one process"
    assert json.loads((tmp_path / "one" / "world.json").read_text())["world_size"] == 1
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_eval_reports_strata_baselines_and_interval(music_dataset, tmp_path):
    result = train(tiny(music_dataset, tmp_path / "run", steps=2))
    out = subprocess.run([*S4MUSIC, "eval", str(result.model), "--data", str(music_dataset), "--context", "4096",
                          "--json", "--record"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [r["stratum"] for r in report["strata"]] == ["folder=chorale", "folder=mozart"]
    assert sum(r["windows"] for r in report["strata"]) == report["overall"]["windows"]
    overall = report["overall"]
    lo, hi = report["interval_95"]
    assert lo <= overall["model_bits"] <= hi
    assert 0 < overall["bigram_bits"] < overall["unigram_bits"] <= 8
    summary = load_model(result.model).summary
    assert summary["test_bits"] == pytest.approx(overall["model_bits"])
    flatness = [report["flatness"][k] for k in ("min", "p5", "median", "p95", "max")]
    assert 0 < flatness[0] and flatness == sorted(flatness) and flatness[-1] < 0.35  # rendered music, not noise
    assert summary["eval"]["flatness"] == report["flatness"]
    # how loud the test audio is: `generate` sets an improvisation's gain by it
    assert -40 < report["level"]["lufs"] < -5 and -30 < report["level"]["peak_dbfs"] <= 0
    assert summary["eval"]["level"] == report["level"]
    level = Level.choose("loudness", load_model(result.model), None)
    assert level.reference == "model's test audio (loudness)"
    assert level.gain_db == pytest.approx(TARGET_LUFS - report["level"]["lufs"])
    # two steps from scratch have learned nothing: the table says so; a run directory is not a model
    table = subprocess.run([*S4MUSIC, "eval", str(result.model), "--data", str(music_dataset), "--context", "4096"],
                           capture_output=True, text=True)
    assert overall["model_bits"] > overall["bigram_bits"] and "no better here than the bigram" in " ".join(table.stderr.split())
    run = subprocess.run([*S4MUSIC, "eval", str(tmp_path / "run"), "--data", str(music_dataset)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and f"its models are {tmp_path / 'run' / 'best'}" in " ".join(run.stderr.split())
    none = subprocess.run([*S4MUSIC, "eval", str(result.model), "--data", str(music_dataset), "--max-windows", "0"],
                          capture_output=True, text=True)
    assert none.returncode == 1 and "max_windows must be at least 1" in none.stderr  # not "the split is empty"


def test_missing_dataset_or_checkpoint_is_one_line_and_leaves_no_run(tmp_path, music_dataset):
    cases = (
        (["--data", str(tmp_path / "nowhere")], "nowhere: no such dataset (build one with `s4music prepare`)"),
        (["--data", str(music_dataset), "--mode", "finetune", "--from", str(tmp_path / "none.pt")], "no such file"),
    )
    for args, reason in cases:
        out = subprocess.run([*S4MUSIC, "train", *args, "--out", str(tmp_path / "run"), "--steps", "1"],
                             capture_output=True, text=True)
        assert out.returncode == 1 and reason in out.stderr, out.stderr
        assert [ln for ln in out.stderr.splitlines() if "error" in ln] and "Traceback" not in out.stderr
        assert not (tmp_path / "run").exists()
    bad = subprocess.run([*S4MUSIC, "eval", str(tmp_path / "none"), "--data", str(music_dataset)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "no such file or directory" in bad.stderr


# ------------------------------------------------------------------ the fast step and the time budget

FAST_TINY = {"d_model": 16, "n_layers": 1, "pool": [4, 4], "s4": {"mode": "diag", "d_state": 16}}


@pytest.mark.slow
@pytest.mark.parametrize("conv_chunk, compile", [(0, False), (100, True)], ids=["fft", "chunked-compiled"])
def test_the_fast_step_gives_the_plain_steps_loss_and_gradients(conv_chunk, compile, monkeypatch):
    """Blocked S4D kernels (every step's now), and convolutions by FFT, or in chunks (of 100 samples:
    each tier's length, 2048, 512 and 128, ends in a part-filled chunk) with the element-wise chains
    compiled, as a lease trains, against the reference: S4D kernels by the chunked exp per sample,
    no compile. Loss within 1e-5 (relative), every gradient within 1e-3 of its largest entry
    (float32 sums in another order)."""
    from s4music.model import SaShiMi, SaShiMiConfig, kernels, s4
    from s4music.model.sashimi import code_bits

    chunked = []  # each call's options
    monkeypatch.setattr(s4, "chunked_convolution", lambda *a, **kw: chunked.append(kw) or kernels.chunked_convolution(*a, **kw))
    torch.manual_seed(0)
    plain = SaShiMi(SaShiMiConfig.from_dict(FAST_TINY)).train()
    for block in plain.s4_blocks():
        block.kernel.blocked = False
    fast = SaShiMi(SaShiMiConfig.from_dict(FAST_TINY)).train()
    assert all(block.kernel.blocked for block in fast.s4_blocks())  # the default
    fast.load_state_dict(plain.state_dict())
    fast.fast_training(compile=compile, conv_chunk=conv_chunk)
    codes = torch.randint(0, 256, (2, 2048))
    results = []
    for model in (plain, fast):
        loss = code_bits(model(model.shift_right(codes)), codes).mean()
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    assert len(chunked) == (len(fast.s4_blocks()) if conv_chunk else 0)  # each S4 block took the path asked for
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) <= 1e-5 * loss_a
    for name, g in grads_a.items():
        assert (g - grads_b[name]).abs().max() <= 1e-3 * g.abs().max() + 1e-8, name
    if conv_chunk:  # in float32 above; in bfloat16 under bfloat16 autocast, into the compiled chains
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bits = code_bits(fast(fast.shift_right(codes)), codes).mean()
        assert chunked[0]["matmul_dtype"] is None and chunked[-1]["matmul_dtype"] == torch.bfloat16
        assert abs(bits.item() - loss_a) < 0.01 * loss_a


COMPILED_AGAINST_PLAIN = f"""
import torch
from s4music.model import SaShiMi, SaShiMiConfig
from s4music.model.sashimi import code_bits
torch.manual_seed(0)
plain = SaShiMi(SaShiMiConfig.from_dict({FAST_TINY!r})).eval()
fast = SaShiMi(SaShiMiConfig.from_dict({FAST_TINY!r})).eval()
fast.load_state_dict(plain.state_dict())
fast.fast_training(compile=True)
codes = torch.randint(0, 256, (1, 512))
with torch.no_grad():
    a, b = (code_bits(m(m.shift_right(codes)), codes) for m in (plain, fast))
print((a - b).abs().max().item())
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="needs a CPU with AVX-512")
def test_a_compiled_step_is_not_reused_at_another_vector_width(tmp_path):
    """Inductor's FX-graph cache leaves the CPU vector width out of its key. A fast step compiled at
    AVX-512, then loaded from the same cache with ATen capped at AVX2 (as `make test-sweep` runs),
    gave NaN. compile_options names the width, so each gets its own graph."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for capability in ("AVX512", "AVX2"):
        env["ATEN_CPU_CAPABILITY"] = capability.lower()
        out = subprocess.run([sys.executable, "-c", COMPILED_AGAINST_PLAIN], env=env, capture_output=True,
                             text=True, check=True).stdout
        assert float(out.split()[-1]) < 1e-4, (capability, out)


@pytest.mark.slow
def test_a_fast_run_resumes_exactly_as_it_would_have_gone_on(music_dataset, tmp_path):
    common = dict(model=FAST_TINY, fast=True, schedule="constant", eval_every=2, save_every=2)
    train(tiny(music_dataset, tmp_path / "whole", steps=4, **common))
    train(tiny(music_dataset, tmp_path / "split", steps=2, **common))
    train(TrainConfig.load(out=str(tmp_path / "split"), resume=True, steps=4), resume=True)
    whole, split = log_rows(tmp_path / "whole"), log_rows(tmp_path / "split")
    assert [r["step"] for r in split] == ["1", "2", "3", "4"]
    for a, b in zip(whole, split, strict=True):
        assert abs(float(a["train_bits"]) - float(b["train_bits"])) < 1e-4, (a, b)
    for k, v in weights(tmp_path / "whole").items():
        assert torch.allclose(v, weights(tmp_path / "split")[k], atol=1e-5), k


def test_validation_windows_spread_over_the_val_files(music_dataset, tmp_path):
    """The first 8 windows, cut to a short seq_len, were 2 s of one file: best/ was chosen on them."""
    dataset = PreparedDataset(music_dataset)
    val = dataset.manifest("val")
    mixture = WindowMixture([(dataset, 1.0)], 1024, "train", 0)
    [codes] = validation_windows(mixture, tiny(music_dataset, tmp_path, eval_windows=4))
    picked = [next(i for i, w in enumerate(dataset.windows("val")) if (w[:1024] == c.numpy()).all()) for c in codes]
    assert codes.shape == (4, 1024) and picked[0] == 0 and picked[-1] == len(val) - 1
    assert len({val[i]["source"] for i in picked}) > 1
    # asked for twice the windows there are: each of them, twice as long
    [codes] = validation_windows(mixture, tiny(music_dataset, tmp_path, eval_windows=2 * len(val)))
    assert codes.shape == (len(val), 2048)


@pytest.mark.slow
@pytest.mark.parametrize("where, kept", [("backward", 3), ("validation", 4)])
def test_ctrl_c_keeps_the_steps_trained_and_a_resume_goes_on_as_it_would_have(where, kept, music_dataset, tmp_path,
                                                                              monkeypatch, caplog):
    """Before the first checkpoint (save_every far off), Ctrl-C lost the whole run. Cut in step 4's
    backward pass, the run keeps step 3 and draws step 4's windows again; cut in step 4's validation
    (after its update, before its schedule step), it keeps step 4."""
    import s4music.train as training

    common = dict(steps=5, save_every=100, schedule="cosine", warmup=2, eval_every=2)
    train(tiny(music_dataset, tmp_path / "whole", **common))
    name = {"backward": "backward", "validation": "mean_bits"}[where]
    real, calls = getattr(training, name), []

    def interrupted(*args, **kwargs):
        done = real(*args, **kwargs)  # the windows drawn, the gradients computed
        calls.append(1)
        if len(calls) == {"backward": 4, "validation": 2}[where]:
            raise KeyboardInterrupt
        return done

    monkeypatch.setattr(training, name, interrupted)
    with caplog.at_level("WARNING", logger="s4music.train"), pytest.raises(KeyboardInterrupt):
        train(tiny(music_dataset, tmp_path / "cut", **common))
    monkeypatch.setattr(training, name, real)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == [f"step-{kept:07d}"]
    assert f"interrupted at step {kept}, saved in" in caplog.text and "--resume" in caplog.text
    train(TrainConfig.load(out=str(tmp_path / "cut"), resume=True), resume=True)
    whole, cut = {r["step"]: r for r in log_rows(tmp_path / "whole")}, log_rows(tmp_path / "cut")
    # a step cut after its update keeps it, but not its log row (written after the validation)
    assert [r["step"] for r in cut] == [str(i) for i in range(1, 6) if where == "backward" or i != kept]
    for b in cut:
        a = whole[b["step"]]
        assert abs(float(a["train_bits"]) - float(b["train_bits"])) < 1e-4 and a["lr"] == b["lr"], (a, b)
    for k, v in weights(tmp_path / "whole").items():
        assert torch.allclose(v, weights(tmp_path / "cut")[k], atol=1e-5), k


def test_a_resume_given_more_minutes_plans_from_the_checkpoint_alone(tmp_path, caplog):
    """Every process must plan alike, so from the minutes spent the checkpoint records, not a clock."""
    from s4music.train import Budget, plan_resumed

    def planned(steps, step, spent, before, minutes) -> int:
        config = TrainConfig(data=["d"], out=str(tmp_path), steps=steps, max_minutes=minutes)
        plan_resumed(config, Budget(minutes, 100, spent) if minutes else None, step, spent, before)
        return config.steps

    # 100 s for 50 steps; 3 minutes less 20 s kept back leave 60 s: 30 steps more
    assert planned(50, 50, 100.0, 2.0, 3.0) == 80
    # stopped 2 steps short of its plan: the plan grows all the same
    assert planned(52, 50, 100.0, 2.0, 3.0) == 80
    # minutes for a run that had none count the seconds it trained too (100 s: 30 steps more again)
    assert planned(50, 50, 100.0, None, 3.0) == 80
    # a checkpoint from before the seconds were kept: its pace unknown until the first steps are timed
    assert planned(1000, 500, 0.0, None, 10.0) == 1000 and planned(500, 500, 0.0, None, 10.0) == 506
    with caplog.at_level("WARNING", logger="s4music.train"):
        assert planned(50, 50, 100.0, 3.0, 3.0) == 50 and planned(50, 50, 100.0, None, None) == 50
        assert planned(50, 50, 200.0, None, 3.0) == 50  # more than it is given, already
    assert "the run has used 1.7 minutes of its 3; give --resume a larger --max-minutes" in caplog.text
    assert "the run has used 3.3 minutes of its 3" in caplog.text
    assert "the run has done its 50 steps; give --resume a larger --steps" in caplog.text


def test_max_minutes_plans_the_schedule_over_the_steps_that_fit(music_dataset, tmp_path, caplog):
    config = tiny(music_dataset, tmp_path / "run", steps=10**6, max_minutes=0.3, warmup=3, eval_every=25,
                  save_every=10**6)
    seen = []
    with caplog.at_level("INFO", logger="s4music.train"):
        result = train(config, on_step=seen.append)
    planned = [r.message for r in caplog.records if "steps fit in 0.3 minutes" in r.message]
    assert planned, "no plan was logged"
    assert 6 < result.step < 10**6 and seen[-1].steps == result.step
    assert seen[-1].eta_seconds == 0
    # the warm-up, then a cosine that reaches its end at the planned last step
    lrs = [s.lr for s in seen]
    assert lrs[0] < lrs[2] and lrs[-1] < 0.05 * max(lrs)
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    # a resume goes on within the same minutes and the plan made in them, not 0.3 minutes more
    # over the config's 10**6 steps: this run spent its minutes, so it has nothing left to do
    caplog.clear()
    again = train(TrainConfig.load(out=str(tmp_path / "run"), resume=True), resume=True)
    assert again.step == result.step and load_model(again.model).summary["val_bits"] is not None  # kept as it was
    assert re.search(r"nothing left to train: the run has used 0\.\d minutes of its 0\.3", caplog.text)
    assert "a larger --max-minutes" in caplog.text
    # more minutes for the whole run: it goes on over them
    more = train(TrainConfig.load(out=str(tmp_path / "run"), resume=True, max_minutes=0.6), resume=True)
    assert more.step > result.step


def test_a_run_without_val_windows_says_it_cannot_validate(synth_dataset, tmp_path, caplog):
    no_val = tmp_path / "no-val"
    prepare([synth_dataset.parent / "audio"], no_val, PrepareOptions(seconds=0.512, val_fraction=0))
    with caplog.at_level("WARNING", logger="s4music.train"):
        result = train(tiny(no_val, tmp_path / "run", seq_len=1024, steps=1))
    assert result.best is None and "no val windows, so the run cannot validate: no best/" in caplog.text


def test_an_empty_split_is_named_with_one_to_score_instead(tiny_model, synth_dataset, tmp_path):
    """`prepare --test 0` leaves no test split: eval says so and names a split it can score."""
    held_none = tmp_path / "no-test"
    prepare([synth_dataset.parent / "audio"], held_none, PrepareOptions(seconds=0.512, test_fraction=0))
    with pytest.raises(EvalError, match=r"the test split is empty; score another with --split val$"):
        evaluate(tiny_model, held_none, EvalOptions(split="test"))

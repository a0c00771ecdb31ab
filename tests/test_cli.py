"""The `s4music` command line: thin commands, one-line errors, exit codes."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from typer.testing import CliRunner

from conftest import DATA
from s4music.cli.app import app
from s4music.data.dataset import PreparedDataset

runner = CliRunner()


def test_help_lists_the_commands_and_each_commands_own_exit_codes():
    result = runner.invoke(app, ["--help"], terminal_width=120)
    assert result.exit_code == 0 and "<bool>" not in result.output and "<int>" not in result.output  # -v counts
    # the first word of each row of the Commands table, so "check" is not found inside "checkpoint"
    listed = set(re.findall(r"^│ ([a-z][a-z-]*) ", result.output.split("Commands")[1], flags=re.M))
    assert listed == {"doctor", "convert", "fetch", "render-midi", "prepare", "pack", "unpack", "fetch-dataset", "models",
                      "train", "eval", "continue", "generate", "check", "jam", "studio"}
    assert "2 prompt judged far from the model's music (check, continue --strict), 130 interrupted" in \
        " ".join(result.output.split())
    judged = set()
    for name in listed:
        text = " ".join(runner.invoke(app, [name, "--help"], terminal_width=120).output.split())
        assert "…" not in runner.invoke(app, [name, "--help"], terminal_width=80).output, name  # nothing cut off
        assert "<bool>" not in text, name  # a flag takes no value, so no type is shown beside it
        assert not re.search(r"\{[a-z]+\}|\[[a-z]+\]\.\.\.", text), name  # arguments in capitals: PROMPT
        if name == "train":  # defaults stated in the help text itself, not eaten as rich markup
            assert re.search(r"Optimizer steps\. [^[]+\[default: 1000\]", text)
        assert re.search(r"Exit codes: 0 done, 1 [^.]+, 130 interrupted\.", text), name
        if "2 prompt judged far" in text:
            judged.add(name)
    assert judged == {"check", "continue"}  # the commands that judge a prompt, and only they


VERBOSITY = """
import logging, sys
from s4music.cli.app import main

sys.argv = ["s4music", *sys.argv[1:], "models"]
try:
    main()
except SystemExit:
    pass
logging.getLogger("filelock").debug("a lock not acquired")
logging.getLogger("matplotlib.font_manager").info("generated new fontManager")
logging.getLogger("s4music.extensions").debug("our debug line")
logging.getLogger("s4music.extensions").info("our line")
"""


def test_progress_in_a_log_file_is_a_line_now_and_then_with_the_time_left():
    import io

    from rich.console import Console

    from s4music.cli.app import LoggedProgress, progress_bar

    bar = progress_bar()
    assert isinstance(bar, LoggedProgress)
    log = io.StringIO()
    bar = LoggedProgress(console=Console(file=log, force_terminal=False))
    task = bar.add_task("rendering", total=200)
    bar.update(task, completed=1)
    assert log.getvalue() == ""  # a run shorter than `every` says nothing more than before
    bar.every = 0.0
    for done in (50, 100):
        time.sleep(0.01)  # the time left comes from the speed between updates
        bar.update(task, completed=done)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("rendering: 100/200 (50%)")
    assert re.fullmatch(r"rendering: 100/200 \(50%\), \d+:\d\d:\d\d left", lines[1])
    # a terminal gets rich's bar, not lines
    tty = io.StringIO()
    bar = LoggedProgress(console=Console(file=tty, force_terminal=True))
    bar.every = 0.0
    bar.update(bar.add_task("x", total=2), completed=1)
    assert "x: 1/2" not in tty.getvalue()


def test_other_libraries_log_only_warnings_unless_vv(tmp_path):
    def said(*flags: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", VERBOSITY, *flags], capture_output=True, text=True,
                             cwd=Path(__file__).parent.parent, env={**os.environ, "HF_HOME": str(tmp_path)})
        return [line for line in ("a lock not acquired", "generated new fontManager", "our debug line", "our line")
                if line in out.stderr]

    assert said() == ["our line"]
    assert said("-v") == ["our debug line", "our line"]
    assert said("-vv") == ["a lock not acquired", "generated new fontManager", "our debug line", "our line"]


STARTUP = """
import contextlib, io, sys
import typer
from s4music.cli.app import app, main

codes = []
for argv in (["--help"], *([name, "--help"] for name in typer.main.get_command(app).commands), ["models"]):
    sys.argv = ["s4music", *argv]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit) as stop:
        main()
    codes.append(stop.code if stop else 0)
import s4music.generate, s4music.data.options, s4music.jam_options, s4music.train_config, s4music.eval_options
print(set(codes), sorted({m.split(".")[0] for m in sys.modules} & {"torch", "gradio", "matplotlib", "scipy"}))
"""


def test_help_and_models_import_no_torch_gradio_matplotlib_or_scipy(tmp_path):
    # a fresh interpreter, as the console script starts; the time this saves is in benchmarks/bench_cli.py
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "S4MUSIC_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", STARTUP], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["{0}", "[]"], out.stdout
    from s4music import load_model  # the package's names still come, on first use

    assert load_model().num_parameters() > 0


def test_models_lists_the_checkpoints_in_a_folder_by_path(tmp_path, monkeypatch):
    from s4music.model.registry import list_models

    root = Path(__file__).parent.parent
    shutil.copytree(root / "models" / "chorales", tmp_path / "runs" / "bach" / "best")
    shutil.copytree(root / "models" / "chorales", tmp_path / "runs" / "song [/live]")  # said whole, not as markup
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "config.json").write_text("{not json")
    start = tmp_path / "runs" / "ft" / "best"  # a fine-tune's best/ that no step beat
    start.mkdir(parents=True)
    summary = {"mode": "finetune", "from": "default", "step": 0, "val_bits": 4.19}
    (start / "config.json").write_text(json.dumps({"summary": summary}))
    rows = {r["name"]: r for r in list_models([tmp_path / "runs"])}
    assert rows[str(start)]["about"] == "finetune's start (default); val 4.19 bits/sample"
    assert rows[str(start)]["cached"] == "here"
    listed = runner.invoke(app, ["models", str(tmp_path / "runs")], env={"COLUMNS": "400"})
    assert listed.exit_code == 0 and "song [/live]" in listed.output, listed.output
    bach = rows[str(tmp_path / "runs" / "bach" / "best")]
    assert "Bach four-part chorales" in bach["about"] and "test 2.19 bits/sample" in bach["about"]
    assert bach["size_mb"] > 9 and rows[str(tmp_path / "runs" / "broken")]["about"] == "config.json unreadable"
    assert {"default", "youtubemix"} <= set(rows)
    monkeypatch.chdir(root)  # with no folder given: ./models, where the chorale model is kept
    listed = runner.invoke(app, ["models"], terminal_width=200)
    assert listed.exit_code == 0 and "models/chorales" in listed.output, listed.output
    monkeypatch.chdir(tmp_path)  # and ./runs, where `train` writes
    listed = runner.invoke(app, ["models"], terminal_width=200)
    assert listed.exit_code == 0 and "runs/ft/best" in listed.output, listed.output
    missing = runner.invoke(app, ["models", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "nowhere: not a folder" in missing.output


def test_convert_writes_a_loadable_checkpoint_and_fails_cleanly(tmp_path):
    from s4music import load_model

    ok = runner.invoke(app, ["convert", str(DATA / "official" / "small_v4.pt"), "-o", str(tmp_path / "m")])
    assert ok.exit_code == 0, ok.output
    assert load_model(tmp_path / "m").num_parameters() == 390_808
    bad = runner.invoke(app, ["convert", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "n")])
    assert bad.exit_code == 1 and "missing.pt: no such file" in bad.output
    assert len([ln for ln in bad.output.splitlines() if "error" in ln]) == 1


def test_fetch_exits_nonzero_when_a_url_fails_but_keeps_the_good_one(http_server, short_recording, tmp_path):
    root, base = http_server
    shutil.copy(short_recording, root / "tune.ogg")
    result = runner.invoke(app, ["fetch", f"{base}/tune.ogg", f"{base}/nothing.ogg", "-o", str(tmp_path / "f")])
    assert result.exit_code == 1
    assert (tmp_path / "f" / "tune.wav").exists()
    assert f"{base}/nothing.ogg: " in result.output and "1 fetched, 1 failed" in result.output


def test_prepare_reports_bad_files_and_builds_the_rest(tmp_path, short_recording):
    src = tmp_path / "src" / "calm"
    src.mkdir(parents=True)
    shutil.copy(short_recording, src / "a.ogg")
    (src / "b.wav").write_text("not audio")
    result = runner.invoke(app, ["prepare", str(tmp_path / "src"), "-o", str(tmp_path / "ds"), "--seconds", "2",
                                 "--tag", "genre=game"])
    assert result.exit_code == 0, result.output
    assert "b.wav: not audio" in result.output and "folder=calm,genre=game" in result.output
    bad_tag = runner.invoke(app, ["prepare", str(tmp_path / "src"), "-o", str(tmp_path / "ds"), "--tag", "oops"])
    assert bad_tag.exit_code == 1 and "expected key=value" in bad_tag.output
    splits = tmp_path / "splits.json"
    splits.write_text('{"test": ["calm/a.ogg", "calm/gone.ogg"], "train": ["a.ogg"]}')
    pinned = runner.invoke(app, ["prepare", str(tmp_path / "src"), "-o", str(tmp_path / "ds3"), "--seconds", "2",
                                 "--splits", str(splits)])
    assert pinned.exit_code == 0, pinned.output
    # some names found: the sources are right, and the rest are not in this build
    assert f"warning: {splits}: 2 listed file(s) not found under the sources (a.ogg, calm/gone.ogg); expected in a " \
        "build of part of what it lists" in " ".join(pinned.output.split())
    splits.write_text('{"test": ["gone.ogg"], "train": ["a.ogg"]}')  # none found: named from another folder
    elsewhere = runner.invoke(app, ["prepare", str(tmp_path / "src"), "-o", str(tmp_path / "ds4"), "--seconds", "2",
                                    "--splits", str(splits)])
    assert elsewhere.exit_code == 0 and "are the sources the directory the split file names files in?" in \
        " ".join(elsewhere.output.split())
    splits.write_text('{"test": ["calm/a.ogg"], "val": ["calm/a.ogg"]}')
    twice = runner.invoke(app, ["prepare", str(tmp_path / "src"), "-o", str(tmp_path / "ds2"), "--splits", str(splits)])
    assert twice.exit_code == 1 and f"{splits}: calm/a.ogg is listed in both test and val" in twice.output
    splits.write_text("[1, 2]")
    wrong = runner.invoke(app, ["prepare", str(tmp_path / "src"), "-o", str(tmp_path / "ds2"), "--splits", str(splits)])
    assert wrong.exit_code == 1 and f"{splits}: expected" in wrong.output
    splits.write_text('{"test": ["calm/a.ogg"')
    broken = runner.invoke(app, ["prepare", str(tmp_path / "src"), "-o", str(tmp_path / "ds2"), "--splits", str(splits)])
    assert broken.exit_code == 1 and f"{splits}: not valid JSON" in broken.output
    missing = tmp_path / "nowhere.json"
    gone = runner.invoke(app, ["prepare", str(tmp_path / "src"), "-o", str(tmp_path / "ds2"), "--splits", str(missing)])
    assert gone.exit_code == 1 and f"{missing}: cannot read the split file" in gone.output
    assert not (tmp_path / "ds2").exists()


def test_prepare_with_a_bad_option_creates_nothing(tmp_path, cli):
    for option, value, reason in (("--quantization", "foo", "quantization='foo': use one of mulaw-official, mulaw, linear"),
                                  ("--val", "0.95", "val_fraction + test_fraction = 1.01: leaves nothing to train on"),
                                  ("--seconds", "-1", "seconds=-1.0: must be positive")):
        code, _, err = cli("prepare", tmp_path, "-o", tmp_path / "ds", option, value)
        assert code == 1 and reason in err.replace("\n", ""), err
        assert "Traceback" not in err and not (tmp_path / "ds").exists()


def test_render_midi_with_an_unknown_instrument_is_one_line_and_exit_1(tmp_path):
    result = runner.invoke(app, ["render-midi", str(tmp_path), "-o", str(tmp_path / "out"), "-i", "kazoo"])
    assert result.exit_code == 1 and "unknown instrument 'kazoo'" in result.output
    assert not (tmp_path / "out").exists()


def test_every_command_that_takes_a_model_takes_the_bundled_one_by_name_or_by_default(cli, synth_dataset):
    import json

    for args in (["eval", "default"], ["eval"]):
        code, out, err = cli(*args, "--data", synth_dataset, "--max-windows", "1", "--json")
        assert code == 0, err
        assert json.loads(out)["model"] == "default" and json.loads(out)["overall"]["windows"] == 1
    code, out, err = cli("eval", "--data", synth_dataset)  # a handful of test files: said to be too few
    files = {r["source"] for r in PreparedDataset(synth_dataset).manifest("test")}
    assert code == 0 and 1 < len(files) < 10 and f"(bootstrap over {len(files)} source files; too few to trust)" in \
        " ".join(out.split()), out
    code, _, err = cli("eval", "no-such-model", "--data", synth_dataset)
    assert code == 1 and "no-such-model: no such file or directory, and not a model name" in err


def test_speed_is_told_as_times_real_time_on_screen_and_in_the_sidecar(cli, tiny_model, tmp_path):
    # "RTF" reads as processing time over audio time to speech and music people: lower is faster
    code, _, err = cli("generate", "--model", tiny_model, "--seconds", "0.2", "--seed", "1", "-o", tmp_path / "a.wav")
    assert code == 0, err
    assert re.search(r"^seed 1$", err, re.M) and re.search(r"^done: \d+\.\d\d× real time", err, re.M), err
    assert "RTF" not in err
    sidecar = json.loads((tmp_path / "a.json").read_text())
    assert sidecar["speed_x_realtime"] > 0 and "rtf" not in sidecar


def test_a_continuation_prints_no_stray_lines_and_keeps_each_reason_on_one_line(tiny_model, synth_prompt, tmp_path):
    # as `make demo` runs on a fresh machine: matplotlib builds its font cache (and said so), in an 80-column terminal
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "matplotlib"), "COLUMNS": "80"}
    out = subprocess.run([sys.executable, "-m", "s4music.cli", "continue", str(synth_prompt), "--model", str(tiny_model),
                          "--seconds", "0.2", "--seed", "0", "--plot", "-o", str(tmp_path / "a.wav")],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "matplotlib").is_dir() and "fontManager" not in out.stderr
    reasons = [line for line in out.stderr.splitlines() if line.startswith("  - the model finds the prompt familiar")]
    assert len(reasons) == 1 and reasons[0].endswith("on the model's test set)"), out.stderr


def test_continue_and_eval_build_their_options_by_name_with_the_librarys_defaults(cli, monkeypatch, tmp_path):
    from s4music.errors import S4MusicError
    from s4music.eval_options import EvalOptions
    from s4music.generate import GenerateOptions, Output, PromptSelection, Sampling, StepOptions

    seen = {}

    def capture(name, options):
        seen[name] = options
        raise S4MusicError("captured")  # the command ends there, with one line and exit 1

    monkeypatch.setattr("s4music.generate.run.continue_prompt", lambda prompt, out, model, options, **_: capture(
        "continue", options))
    monkeypatch.setattr("s4music.evaluate.evaluate", lambda model, data, options, **_: capture("eval", options))
    assert cli("continue", "song.wav")[0] == 1
    # but the seed, which the command draws where none is given, to say it before the first sample
    assert seen["continue"].seed is not None and replace(seen["continue"], seed=None) == GenerateOptions()
    assert cli("eval", "--data", tmp_path)[0] == 1 and seen["eval"] == EvalOptions()
    # every option, each with a value of its own, lands in the field of its name
    code, _, err = cli("continue", "song.wav", "--seconds", "7", "--prompt-seconds", "3", "--prompt-start", "1",
                       "--prompt-end", "9", "-n", "2", "--temperature", "0.7", "--temperature-end", "0.5",
                       "--top-k", "5", "--top-p", "0.9", "--context-seconds", "4", "--typical", "0.8",
                       "--guidance", "2", "--guidance-seconds", "0.5", "--surprise", "3", "--seed", "11", "--rank",
                       "--no-prompt", "--normalize", "peak", "--format", "flac", "--device", "cpu", "--strict",
                       "--retry-degenerate", "2", "--plot", "--no-fused", "--full-weights", "--sidecar", "s.json")
    assert code == 1 and "captured" in err
    assert seen["continue"] == GenerateOptions(
        seconds=7, variations=2, seed=11, rank=True, retry_degenerate=2, strict=True,
        sampling=Sampling(temperature=0.7, top_k=5, top_p=0.9, temperature_end=0.5, context_seconds=4, typical=0.8,
                          guidance=2, guidance_seconds=0.5, surprise=3),
        prompt=PromptSelection(seconds=3, start=1, end=9),
        output=Output(include_prompt=False, normalize="peak", format="flac", plot=True, sidecar="s.json"),
        step=StepOptions(device="cpu", fused=False, half_weights=False))
    cli("eval", "--data", tmp_path, "--split", "val", "--context", "100", "--batch-size", "3", "--max-windows", "5",
        "--device", "cuda")
    assert seen["eval"] == EvalOptions(split="val", context=100, batch_size=3, max_windows=5, device="cuda")


def test_a_known_time_left_stands_in_for_the_rate_so_far():
    """A run fitted into minutes knows its time left better than its first steps' rate does (it
    said 1:28:29 left of a 2-minute run): the field "eta" is shown, in the bar and in a log's lines."""
    import io

    from rich.console import Console

    from s4music.cli.app import LoggedProgress, TimeLeftColumn

    log = io.StringIO()
    bar = LoggedProgress(TimeLeftColumn(), console=Console(file=log, force_terminal=False))
    bar.every = 0.0
    task = bar.add_task("training", total=1000)
    bar.update(task, completed=5, eta=90.0)
    assert TimeLeftColumn().render(bar.tasks[0]).plain == "0:01:30"
    assert "training: 5/1,000 (0%), 0:01:30 left" in log.getvalue()
    bar.add_task("reading", total=10)  # no eta: rich's estimate, none yet
    assert TimeLeftColumn().render(bar.tasks[1]).plain == "-:--:--"


def test_a_file_name_with_brackets_is_said_whole(tmp_path):
    """Music files are often named "song [live].mp3"; rich read the brackets as markup, so the error
    said "song .wav", and a "[/...]" in a name raised MarkupError instead of the one-line error."""
    for name in ("song [live].wav", "song [/live].wav"):
        result = runner.invoke(app, ["check", str(tmp_path / name)], terminal_width=200)
        assert result.exit_code == 1 and f"{tmp_path / name}: no such file" in result.output, result.output


def test_eval_record_says_what_it_recorded(cli, tiny_model, synth_dataset, tmp_path):
    model = shutil.copytree(tiny_model, tmp_path / "m")
    code, _, err = cli("eval", model, "--data", synth_dataset, "--max-windows", "1", "--record")
    bits = json.loads((model / "config.json").read_text())["summary"]["test_bits"]
    assert code == 0 and f"recorded in {model}: test {bits:.4f} bits/sample" in " ".join(err.split()), err

# s4music developer entry points. `make test` and `make demo` each work from a fresh clone:
# they install what is missing first (Debian packages and a virtual environment in .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := ffmpeg fluidsynth timgm6mb-soundfont libportaudio2
# Real recordings (Ogg Vorbis, 44.1 kHz stereo) that the tests use as fixtures, the browser the
# studio's page is tested in (driven by Playwright, which uses it rather than downloading its own),
# and a second General MIDI soundfont for the tests of soundfonts by name.
TEST_APT_PACKAGES := drascula-music chromium fluid-soundfont-gm
PYTEST_ARGS ?=

.PHONY: install system-deps test test-fast test-sweep demo studio bench corpus lint clean

install: system-deps $(STAMP)

# Debian packages the toolkit runs: ffmpeg (decoding, encoding), FluidSynth and a General MIDI
# soundfont, PortAudio (--play).
system-deps:
	@missing=""; for p in $(APT_PACKAGES) $(TEST_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@echo "building the fused CPU step for this CPU (about a minute)"
	$(BIN)/python -c "from s4music.model.fast import fused_available as ok; print('fused CPU step:', \
	  'ready' if ok() else 'unavailable; the plain PyTorch step will be used')"
	touch $@

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The quick tier: synthesized fixtures only (no FluidSynth renders, music21 scores, recordings or
# training; those tests are marked slow). Under a minute on 2 cores once `make install` has built
# the fused step.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The same suite under each CPU setting CI may land on: 1 and 2 threads, and ATen's kernels at
# their default (AVX-512 where the CPU has it) and forced to AVX2. The fast tier by default;
# SWEEP_ARGS= (empty) sweeps the whole suite.
SWEEP_ARGS ?= -m "not slow"
test-sweep: install
	@set -e; for threads in 1 2; do for cap in default avx2; do \
	  echo "== OMP_NUM_THREADS=$$threads ATEN_CPU_CAPABILITY=$$cap"; \
	  env OMP_NUM_THREADS=$$threads $$( [ $$cap = default ] || echo ATEN_CPU_CAPABILITY=$$cap ) \
	    $(BIN)/python -m pytest -q -p no:cacheprovider $(SWEEP_ARGS) $(PYTEST_ARGS); \
	done; done

# Continue the bundled example prompt with the bundled model (no downloads). DEMO_SECONDS=2 for a quick run.
DEMO_SECONDS ?= 10
demo: install
	$(BIN)/s4music continue examples/prompt.wav -o demo/continuation.wav --seconds $(DEMO_SECONDS) --seed 0 --plot
	@echo "listen: demo/continuation.wav (picture: demo/continuation.png, settings: demo/continuation.json)"

# The web page (s4music studio) on http://127.0.0.1:7860; STUDIO_ARGS="--port 8000 --model runs/mine/best".
STUDIO_ARGS ?=
studio: install
	GRADIO_ANALYTICS_ENABLED=False $(BIN)/s4music studio $(STUDIO_ARGS)

bench: install
	$(BIN)/python benchmarks/run.py

# The training corpus (examples/corpus/README.md): hours on a small machine, resumable after a kill;
# WORK, COMPOSERS, SHARD, SOUNDFONT, PARTS, PART_MB and WORKERS pass through to examples/corpus/build.sh.
corpus: install
	bash examples/corpus/build.sh

lint: install
	$(BIN)/python -m ruff check s4music tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info demo

# Two commands: `make test` and `make demo`. Both create/reuse .venv from requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GRID_DIR ?= ../shared/data/real/grid_s1_tvr28
QUICK ?=
export OMP_NUM_THREADS ?= 2
export MKL_NUM_THREADS ?= 2
export AVSR_THREADS ?= 2
# fewer page faults in conv training on glibc (measured ~1.6x faster steps, see GRID-NOTES)
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736

.PHONY: install tts-engine test demo parity adapt aligner lipsync-bench tts-study bench clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# eSpeak NG, the offline TTS of the lip-sync TTS augmentation (src/avsr/lipsync/tts.py): installed
# with apt-get when this runs as root on Debian/Ubuntu; otherwise the message says what to install
# (the tests that need it skip, naming it)
tts-engine:
	@command -v espeak-ng >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q espeak-ng >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	      apt-get install -y -q espeak-ng >/dev/null 2>&1; }; fi; \
	  command -v espeak-ng >/dev/null || echo "espeak-ng not found: install it (apt-get install espeak-ng, dnf install espeak-ng, brew install espeak-ng)" >&2; }

test: $(STAMP) tts-engine
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) scripts/demo.py --grid-dir $(GRID_DIR) $(if $(QUICK),--quick,)

# the AV-RelScore code's scorer and time fusion against ours, on make demo's models (see scripts/parity.py)
parity: $(STAMP)
	$(PY) scripts/parity.py

# make demo's s1 models adapted to GRID s4, against zero-shot and from scratch (see scripts/adapt.py)
adapt: $(STAMP)
	$(PY) scripts/adapt.py

# the phone aligner of the lip-sync visemes on make demo's preprocessed s1 (see scripts/train_aligner.py)
aligner: $(STAMP)
	test -f runs/grid/grid/train.tsv || $(MAKE) demo
	$(PY) scripts/train_aligner.py --data runs/grid/grid --grid-dir $(GRID_DIR)

# the lip-sync models (three cores) against OpenFaceFX, pylipsync and an energy baseline (see
# benchmarks/bench_lipsync.py); the peers are the `lipsync-bench` extra, pinned by requirements.txt
lipsync-bench: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation -c requirements.txt -e ".[lipsync-bench]"
	$(PY) benchmarks/bench_lipsync.py --out benchmarks \
		$(if $(wildcard runs/grid/exp/video/average.pt),--video-frontend runs/grid/exp/video/average.pt,)

# few-shot lip sync with and without TTS augmentation (see benchmarks/bench_tts_augmentation.py)
tts-study: $(STAMP) tts-engine
	$(PY) benchmarks/bench_tts_augmentation.py --out benchmarks

bench: $(STAMP)
	$(PY) scripts/bench.py --out benchmarks

clean:
	rm -rf $(VENV) results runs

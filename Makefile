# Two commands matter: `make run` serves the default model, `make test` runs the tests.
# Both create .venv at the project root on first use and install what they need into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: run test lint models eval eval-ceiling eval-drift eval-spread bench bench-train bench-serving clean

# the service alone: torch (CPU, pinned), FastAPI and friends
$(VENV)/.installed-run: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# everything: training extras, test tools, and the optional Debian data set and browser (page tests)
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-run
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	-test -d /usr/share/datasets/fashion-mnist || apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1
	-test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1
	touch $@

run: $(VENV)/.installed-run
	$(BIN)/python -m service --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

# rebuild the committed models from scratch (digits: ~20 s; Fashion-MNIST: 30 epochs, 82 min on a shared 2-core
# machine, then its defect segmenter's 48,000 steps: 83 min more here on one thread beside other jobs)
models: $(VENV)/.installed-dev
	$(BIN)/python -m training train --data digits --out models/digits.pt --quiet
	$(BIN)/python -m training train --data fashion-mnist --out models/fashion.pt --segmenter-steps 48000 --quiet
	rm -f models/*.ckpt

# anomaly detection against classical anchors: defects, textures, one-class novelty, calibration
# (trains the texture and one-class models into /tmp/vae-evaluate on first use: the ten one-class
# Fashion-MNIST VAEs took 31 min on 2 cores, each texture VAE ~10, and each of the 13 defect
# segmenters 8-13 min on one thread at 6,000 steps, grass's 16 at 12,000; the supervised references
# train as long as their model's segmenter, Fashion-MNIST's 48,000 steps 72 min on one thread)
eval: $(VENV)/.installed-dev
	$(BIN)/python -m training.evaluate

# how separable each Fashion-MNIST defect kind is: a supervised CNN per kind (~35 min on 2 cores)
eval-ceiling: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.defect_ceiling

# why the textures flag more than 1% of clean patches: the threshold, or the photograph drifting
# (make eval's cached texture models; trains them on first use, ~30 min on 2 cores)
eval-drift: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.texture_drift

# how far the segmenter's seed alone moves the learned and fused figures, on models/fashion.pt and
# make eval's brick model (four fresh segmenters each, two at a time on one core each: two of
# Fashion-MNIST's 48,000-step ones took 66 min side by side on 2 cores, so about 2.2 hours for its four;
# brick's four at 6,000 steps took 42 min one after another beside other jobs; more if brick's model is
# not cached)
eval-spread: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.segmenter_spread --jobs 2 --threads 1
	$(BIN)/python -m benchmarks.segmenter_spread --texture brick --jobs 2 --threads 1

bench: bench-train bench-serving

bench-train: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.train_vs_seed

# installs LitServe and TorchServe into benchmarks/serving/.venvs and wrk with apt on first use
bench-serving: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.serving

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

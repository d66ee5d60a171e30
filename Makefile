# Every target installs what it needs into .venv/ first.
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.unet3d-installed

.PHONY: demo test test-slow test-all xvfb install bench bench-quick experiments napari clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# Keep an existing torch (for example a CUDA build); otherwise take the small CPU build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/unet3d demo -o demo-output

# The napari tests need a display: pytest-xvfb starts Xvfb when it is installed (Debian's package,
# with the X libraries Qt loads); without it they skip, saying so — except in CI (CI set), where
# they fail.
XVFB_PACKAGES = xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 libxkbcommon-x11-0 libegl1

# `make test` leaves out the end-to-end runs marked slow (about a minute or more each);
# `make test-slow` runs only those, `make test-all` everything. CI runs test and test-slow.
test: $(STAMP) xvfb
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP) xvfb
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP) xvfb
	$(BIN)/python -m pytest -q

xvfb:
	@command -v Xvfb >/dev/null 2>&1 || apt-get install -y -q $(XVFB_PACKAGES) >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(XVFB_PACKAGES) >/dev/null 2>&1) \
		|| echo "note: Xvfb could not be installed; the napari GUI tests will skip"

# Full benchmarks: peers (MONAI, pytorch-3dunet) live in .venv-bench, created by peers.sh.
bench: $(STAMP)
	bash benchmarks/peers.sh
	.venv-bench/bin/python -m benchmarks.bench_train_step
	.venv-bench/bin/python -m benchmarks.bench_predict
	.venv-bench/bin/python -m benchmarks.bench_augmentation
	$(BIN)/python -m benchmarks.bench_forest

# Short runs that keep the benchmark code working (no timing assertions); part of CI.
bench-quick: $(STAMP)
	for f in benchmarks/bench_*.py; do $(BIN)/python -m benchmarks.$$(basename $$f .py) --quick || exit 1; done
	$(BIN)/python -m benchmarks.bench_predict --quick --planning --repeats 1

# The paper's experiments on the real volumes in ../shared/data (hours; resumable).
experiments: $(STAMP)
	$(BIN)/python -m experiments.paper.run

# The interactive loop in napari (paint, train, correct) on the built-in example.
napari: $(STAMP)
	$(BIN)/unet3d napari

clean:
	rm -rf $(VENV) demo-output

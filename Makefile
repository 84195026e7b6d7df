# Two entry points for a newcomer: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned: on a machine with a local CPU wheel this takes it,
# elsewhere pip takes PyPI's build for the platform (CUDA on Linux x86-64).
TORCH  ?= torch==2.13.0

# Non-empty where torch sees a CUDA GPU (evaluated only by the targets that use it).
CUDA    = $(shell $(BIN)/python -c "import torch; print(torch.cuda.is_available() or '')")

.PHONY: install demo test bench bench-official clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,cluster,app,eval]"
	# The app's browser test drives Debian's chromium (apt, in CI) with Playwright; no browser is downloaded.
	$(BIN)/pip install --quiet playwright
	touch $@

# The main job on an example: fetches the weights and an example portrait and clip, animates them.
demo: install
	$(BIN)/hellomeme demo

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache

# Speed and memory on this machine (tiny weights on the CPU; full size too when a CUDA GPU is present).
bench: install
	$(BIN)/python -m benchmarks.bench --json benchmarks/latest.json $(if $(CUDA),--full-size)

# Ours against the official code (docs/performance.md, "Against the official code"): OFFICIAL is a checkout
# of github.com/HelloVision/HelloMeme; same full-size random weights, inputs and seed on both sides. On the CPU each side runs 3 times (the fastest counts).
bench-official: install
	$(BIN)/python -m benchmarks.vs_official --official $(OFFICIAL) --json benchmarks/official.json $(if $(CUDA),,--repeats 3)

# The two commands of the README: `make demo` (the main job) and `make test` (the test suite, what CI runs).
# Both set up a fresh machine first: torch from the local CPU wheel when missing (never upgraded), then this package.
PYTHON ?= python3

.PHONY: install demo test test-oldest-triton bench plots

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q --no-build-isolation -e ".[test,examples]"

demo: install
	$(PYTHON) examples/train_synthetic.py

# The suite, then the Triton tests again with the oldest supported triton (in a venv of their own, see the script).
test: install
	$(PYTHON) -m pytest tests
	PYTHON=$(PYTHON) scripts/test_oldest_triton.sh

test-oldest-triton:
	PYTHON=$(PYTHON) scripts/test_oldest_triton.sh

bench: install
	$(PYTHON) benchmarks/run.py $(BENCH_ARGS)

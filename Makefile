# The two commands of the README: `make demo` (the main job) and `make test` (the test suite, what CI runs).
# Both set up a fresh machine first: torch from the local CPU wheel when missing (never upgraded), then this package.
PYTHON ?= python3

.PHONY: install demo test bench plots

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q --no-build-isolation -e ".[test]"

demo: install
	$(PYTHON) examples/train_synthetic.py

test: install
	$(PYTHON) -m pytest tests

bench: install
	$(PYTHON) benchmarks/run.py $(BENCH_ARGS)

# make demo: train GRAM and the deterministic TRM baseline on N-Queens 8x8 (CPU, <= 10 min), then
#            compare their prior-sampled accuracy and coverage on held-out inputs.
# make test: the fast test suite.
# Both create .venv on first use. TORCH picks the torch requirement (default: the CPU wheel 2.13.0).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

# the test extras (pytest, hypothesis, notebook runners) on top of the package; the demo does without them
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/python -m gram_pyro.experiments.demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) runs outputs

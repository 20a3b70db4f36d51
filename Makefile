# make demo: train GRAM and the deterministic TRM baseline on N-Queens 8x8 (CPU, <= 10 min), then
#            compare their prior-sampled accuracy and coverage on held-out inputs.
# make test: the fast test suite.
# Both create .venv on first use. TORCH picks the torch requirement (default: the CPU wheel 2.13.0).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m gram_pyro.experiments.demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) runs outputs

# make demo: train GRAM and the deterministic TRM baseline on N-Queens 8x8 (CPU, about 5 min), then
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

# pip byte-compiles every file it installs, one after the other (51 of the 88 s of an install here).
# Instead torch is compiled on the core that pip leaves idle while it installs the rest, then the other
# packages a training run imports (torch's compile workers included) on all cores: where Python writes
# no bytecode itself, each process would compile its imports again. A file this Python cannot compile
# (torch ships 3.12-only test helpers) is skipped, as pip skips it.
RUNTIME_PACKAGES := torchgen functorch pyro numpy sympy mpmath networkx jinja2 hydra omegaconf antlr4 yaml \
	matplotlib PIL fontTools tensorboard google absl tqdm opt_einsum
SITE := $(VENV)/lib/python3*/site-packages

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile "$(TORCH)"
	$(BIN)/python -m compileall -qq $(SITE)/torch & $(BIN)/pip install --quiet --no-compile -e . && wait
	cd $(SITE) && ls -d $(RUNTIME_PACKAGES) 2>/dev/null | xargs $(CURDIR)/$(BIN)/python -m compileall -qq -j 0 || true
	touch $(STAMP)

# the test extras (pytest, hypothesis, notebook runners) on top of the package; the demo does without them
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --no-compile -e ".[test]"
	$(BIN)/python -m compileall -qq -j 0 $(SITE) || true
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/python -m gram_pyro.experiments.demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) runs outputs

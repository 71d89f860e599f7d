# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-0.3
CHROMIUM := /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
NB     := --ExecutePreprocessor.timeout=600 --ExecutePreprocessor.kernel_name=python3

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,graph,ray]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# The whole tour, in the README's order, as one offline page
TOUR := quickstart ioi_activation_patching ioi_circuit attribution_patching causal_tracing \
        generation_steering logit_lens circuit_discovery feature_circuits attribution_graph edits

demo: $(STAMP)
	@$(BIN)/python -m ipy_intervene.report $(TOUR:%=examples/%.ipynb) --out build/demo.html

# Debian's chromium for the real-browser tests (Playwright drives it; no `playwright install`)
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null

# TQDM_DISABLE: a sweep's progress bar appears only after a second, so on a busy machine it
# would add an output to an example notebook's cell; tests must not depend on the speed.
test: $(STAMP) $(CHROMIUM)
	TQDM_DISABLE=1 $(BIN)/python -m pytest tests examples --nbval-lax --nbval-current-env -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python benchmarks/trace_overhead.py
	$(BIN)/python benchmarks/sweep.py
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) build

# The two quick-start commands: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned to the local CPU wheel for development and CI; the package itself asks for torch>=2.4.
TORCH  := torch==2.13.0

.PHONY: setup test demo bench fixtures clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,demo,integration]" "$(TORCH)"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests

# Every optimizer on the 8x8 digits, then the sparse click-through example (tables on stdout) and the pictures,
# in demo-out/ (about 35 s on 2 cores).
demo: setup
	$(PY) -m optzoo demo --out demo-out
	@echo
	@echo 'Next: .venv/bin/optzoo demo --optimizers sgd,nag,adam --epochs 5   (or: . .venv/bin/activate; optzoo --help)'
	@echo '      .venv/bin/optzoo list   (every optimizer and its defaults)'

# The benchmark (about 11 minutes on 2 cores, MXNet peers included): tables on stdout, bench/results/, and bench/README.md's table.
bench: setup
	$(PY) -m optzoo.bench --readme bench/README.md

# Re-record the MXNet 1.9.1 golden numbers (needs network for the side venv; never needed by `make test`).
.mxref/bin/python:
	$(PYTHON) -m venv .mxref
	.mxref/bin/pip install -q mxnet==1.9.1 "numpy<1.24"

fixtures: .mxref/bin/python
	.mxref/bin/python tests/fixtures/record_mxnet.py
	.mxref/bin/python tests/fixtures/record_half.py

clean:
	rm -rf $(VENV) build src/*.egg-info demo-out

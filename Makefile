# fa_study — the two commands: `make study` (run the notebooks, write the report) and `make test`.
# Both create .venv on first use and reuse it afterwards.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= $(or $(FA_STUDY_PROFILE),default)
REPORTS ?= reports

# Data and result caches live in the checkout (git-ignored) unless the caller points elsewhere.
export FA_STUDY_DATA ?= $(CURDIR)/data
export FA_STUDY_CACHE ?= $(CURDIR)/.fa_study_cache

.PHONY: setup study test test-fast notebooks bench lab clean-reports help

help:
	@echo "make study   execute every notebook (PROFILE=quick|default|paper) into $(REPORTS)/ with HTML and a summary"
	@echo "make test    run the test suite and the notebooks (nbval, quick profile)"
	@echo "make notebooks  sync notebooks/NN_name.py (the source) and .ipynb (jupytext), outputs cleared"
	@echo "make setup   create/refresh $(VENV) only"
	@echo "make lab     open JupyterLab on notebooks/"
	@echo "make bench   run the benchmarks in benchmarks/"

# The stamp is rebuilt when pyproject.toml changes. torch is installed first on its own so that
# pip takes the wheel already on this disk (uv/poetry would download gigabytes).
# A new environment takes 6.5 GB (PyPI's torch for x86_64 is a CUDA build): refuse to start with
# less free, naming what is missing, rather than fail half-installed with pip's "No space left".
VENV_MIN_FREE_GB ?= 7
$(VENV)/.installed: pyproject.toml
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
		mkdir -p $(VENV); free=$$(df -Pk $(VENV) | awk 'NR==2 {print int($$4 / 1048576)}'); \
		if [ "$$free" -lt "$(VENV_MIN_FREE_GB)" ]; then \
			echo "setup: $(VENV) needs about $(VENV_MIN_FREE_GB) GB free to install torch and the stack;" \
			     "$$free GB free on $$(df -P $(VENV) | awk 'NR==2 {print $$6}'). Free space, or set" \
			     "VENV=<a path on a larger disk> (VENV_MIN_FREE_GB=<GB> changes the check)." >&2; exit 1; fi; fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "torch>=2.4" torchvision
	$(PY) -m pip install --quiet -e ".[notebooks,test,cluster]"
	@touch $@

setup: $(VENV)/.installed

# Two notebooks at a time, each kernel with half the cores ($FA_STUDY_CORES, set by the runner),
# over which it spreads its units of work (one torch thread each): every core busy, none
# oversubscribed. STUDY_JOBS=1 runs the notebooks in turn, each with every core.
STUDY_JOBS ?= 2
study: setup
	$(PY) -m fa_study.study --profile $(PROFILE) --out $(REPORTS) --jobs $(STUDY_JOBS)

# One torch thread per pytest worker and one worker per core (pytest-xdist): the test models are
# tiny, and a second torch thread made them slower, while a second worker halves the wall time.
# --dist loadscope keeps each test module, and each notebook's cells, in one worker, in order.
# `make test TEST_WORKERS=0` runs everything in one process. Benchmarks and `make study` keep
# torch's default threads.
TEST_WORKERS ?= 2
test: setup
	FA_STUDY_PROFILE=quick OMP_NUM_THREADS=1 $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider -n $(TEST_WORKERS) --dist loadscope --durations=15 $(PYTEST_ARGS)

# Unit tests only, without the notebooks.
test-fast: setup
	FA_STUDY_PROFILE=quick OMP_NUM_THREADS=1 $(PY) -m pytest tests -p no:cacheprovider -m "not browser" $(PYTEST_ARGS)

# notebooks/NN_name.py (jupytext py:percent) and notebooks/NN_name.ipynb are one notebook in two
# files. `jupytext --sync` carries the inputs of the more recently edited file into the other
# (an edited .py rewrites the .ipynb, keeping its cell ids), and creates a missing partner; then
# outputs and execution counts are cleared, and the scripts touched so that they stay the newer
# file (jupytext's JupyterLab extension reads the inputs from the newer one).
NB_FILES = $(wildcard notebooks/[0-9][0-9]_*.py notebooks/[0-9][0-9]_*.ipynb)
notebooks: setup
	$(VENV)/bin/jupytext --sync $(NB_FILES)
	$(VENV)/bin/jupyter nbconvert --clear-output --inplace --log-level=WARN notebooks/[0-9][0-9]_*.ipynb
	touch notebooks/[0-9][0-9]_*.py

# The benchmarks: bench_step (a step against its own matmuls: the tight bound, the floor and each
# rule's fraction of both at one and at all threads), bench_stack (seeds stacked into one model
# against the package's step), the trainer against the reference pipeline, the data pipeline,
# the audit (BENCH_ARGS go to these), then bench_panels: each notebook's panel run in
# the default profile with a fresh cache, before (FA_STUDY_JOBS=1) and after, side by side
# (BENCH_PANELS picks the notebooks: "00 02", "all").
BENCH_PANELS ?= 00 02
bench: setup
	@set -e; for b in $(filter-out benchmarks/bench_panels.py,$(wildcard benchmarks/bench_*.py)); do \
		echo "== $$b"; $(PY) $$b $(BENCH_ARGS); done
	@echo "== benchmarks/bench_panels.py"; $(PY) benchmarks/bench_panels.py $(BENCH_PANELS)

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean-reports:
	rm -rf $(REPORTS)

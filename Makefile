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
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "torch>=2.4" torchvision
	$(PY) -m pip install --quiet -e ".[notebooks,test,cluster]"
	@touch $@

setup: $(VENV)/.installed

study: setup
	$(PY) -m fa_study.study --profile $(PROFILE) --out $(REPORTS)

# One torch thread: the test models are tiny, and on a busy 2-core machine a second thread made
# them many times slower. Benchmarks and `make study` keep torch's default.
test: setup
	FA_STUDY_PROFILE=quick OMP_NUM_THREADS=1 $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider $(PYTEST_ARGS)

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

bench: setup
	@set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b $(BENCH_ARGS); done

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean-reports:
	rm -rf $(REPORTS)

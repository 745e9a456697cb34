# rollfleet — every target bootstraps its own virtualenv (uv) from python3 alone.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VALUES ?= manifests/examples/one-node-8gpu.yaml
CRDS_DIR ?= $(if $(wildcard ../shared/kuberay-v1.7.0/crds),../shared/kuberay-v1.7.0/crds,.cache/kuberay-v1.7.0/crds)
KUBERAY_VERSION := v1.7.0
export UV_PYTHON_DOWNLOADS := never
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export ROLLFLEET_CRDS_DIR := $(abspath $(CRDS_DIR))
# A machine whose pip config names a find-links folder holding a torch wheel (a CPU build on disk)
# installs that wheel; elsewhere torch comes from PyPI.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
LOCAL_TORCH := $(firstword $(foreach d,$(FIND_LINKS),$(wildcard $(d)/torch-*.whl)))

.PHONY: help venv test demo render manifests schema crds lint lock images deploy status down kind-smoke clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/uv pip install -q $(LOCAL_TORCH) -e '.[runtime,dev]'
	touch $@

venv: $(BIN)/.installed ## create .venv with rollfleet, the CPU runtime and the test tools

test: venv ## run the test suite (CPU; GPU tests skip without CUDA)
	$(BIN)/python -m pytest -q

demo: venv ## the embedded default: the runtime on a local Ray, CPU stand-in engines, 3 GRPO-shaped steps
	$(BIN)/rollfleet demo

render: venv ## render VALUES to stdout
	$(BIN)/rollfleet render -f $(VALUES)

manifests: venv ## regenerate the golden renders of every example (manifests/rendered/)
	$(BIN)/python -m rollfleet.golden write

schema: venv ## regenerate charts/rollfleet/values.schema.json from the spec model
	$(BIN)/rollfleet schema > charts/rollfleet/values.schema.json

crds: ## download the KubeRay $(KUBERAY_VERSION) CRDs into .cache/ (CI reads ../shared instead)
	mkdir -p .cache/kuberay-$(KUBERAY_VERSION)/crds
	for k in rayclusters rayjobs; do curl -fsSL -o .cache/kuberay-$(KUBERAY_VERSION)/crds/ray.io_$$k.yaml \
	  https://raw.githubusercontent.com/ray-project/kuberay/$(KUBERAY_VERSION)/ray-operator/config/crd/bases/ray.io_$$k.yaml; done

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .hypothesis

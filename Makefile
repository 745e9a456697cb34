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

.PHONY: help venv test test-e2e test-image demo render manifests schema crds lint lock images deploy diff status down kind-smoke clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set (this CI's machines) no process caches what it
# compiles, so every Ray worker would compile torch and transformers again (~10 s each on 2 cores).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/uv pip install -q --compile-bytecode $(LOCAL_TORCH) -e '.[runtime,report,validate,dev]'
	touch $@

venv: $(BIN)/.installed ## create .venv with rollfleet, the CPU runtime and the test tools

test: venv ## run the test suite (CPU; GPU tests skip without CUDA; the image stand-in build is `make test-image`)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not image_build and not e2e"

test-e2e: venv ## the end-to-end proofs: 20-step demos that learn, survive a killed engine and resume from a checkpoint (~7 min)
	$(BIN)/python -m pytest -q -m e2e

test-image: venv ## the buildah stand-in build of the runtime image, as a test (root, buildah, debootstrap)
	$(BIN)/python -m pytest -q -m image_build tests/test_image.py

demo: venv ## the embedded default: the runtime on a local Ray, CPU stand-in engines, 3 GRPO-shaped steps
	$(BIN)/rollfleet demo

render: ## render VALUES to stdout: only the YAML (the venv bootstrap, if any, talks on stderr)
	@$(MAKE) --no-print-directory venv >&2
	@$(BIN)/rollfleet render -f $(VALUES)

manifests: venv ## regenerate the golden renders of every example (manifests/rendered/)
	$(BIN)/python -m rollfleet.golden write

schema: venv ## regenerate charts/rollfleet/values.schema.json from the spec model
	$(BIN)/rollfleet schema > charts/rollfleet/values.schema.json

crds: ## download the KubeRay v1.7.0 CRDs into .cache/ (CI reads ../shared instead)
	mkdir -p .cache/kuberay-$(KUBERAY_VERSION)/crds
	for k in rayclusters rayjobs; do curl -fsSL -o .cache/kuberay-$(KUBERAY_VERSION)/crds/ray.io_$$k.yaml \
	  https://raw.githubusercontent.com/ray-project/kuberay/$(KUBERAY_VERSION)/ray-operator/config/crd/bases/ray.io_$$k.yaml; done

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .hypothesis

deploy: venv ## preflight, server-side apply and wait for VALUES on the current kube context (docs/deploy.md)
	$(BIN)/rollfleet deploy -f $(VALUES)

diff: venv ## what `make deploy` would change on the current kube context (server-side dry run; exit 1: changes)
	$(BIN)/rollfleet diff -f $(VALUES)

status: venv ## VALUES' fleet on the cluster: objects, pools ready, problems
	$(BIN)/rollfleet status -f $(VALUES)

down: venv ## delete VALUES' fleet: only its RayJob/RayCluster/ConfigMap/NetworkPolicy labelled managed-by=rollfleet
	$(BIN)/rollfleet down -f $(VALUES)

kind-smoke: venv ## GPU host with docker + NVIDIA toolkit, >= 2 GPUs: nvkind, KubeRay, chart, RayJob (DRY_RUN=1 prints)
	DRY_RUN=$(DRY_RUN) scripts/kind-smoke.sh

.PHONY: schema-check helm-lint
schema-check: venv ## fail when charts/rollfleet/values.schema.json differs from the spec model (fix: make schema)
	@$(BIN)/rollfleet schema | diff -u charts/rollfleet/values.schema.json - \
	  || { echo "error: charts/rollfleet/values.schema.json is stale; run \`make schema\`" >&2; exit 1; }

helm-lint: venv ## strict `helm lint` of charts/rollfleet, schema drift, parity with the Jinja render (real Helm engine, no binary)
	$(BIN)/python -m pytest -q tests/test_chart.py

# ---- runtime image: images/runtime/, docs/image.md ---------------------------------------------------
IMAGE_REPO ?= ghcr.io/rollfleet/runtime
CUDA_BASE ?= nvidia/cuda:12.9.1-base-ubuntu22.04
CUDA_BASE_DIGEST ?=
IMAGE_OUTPUT ?= --load
IMAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_VLLM := $(shell sed -n 's/^vllm==\([^ ]*\).*/\1/p' images/runtime/requirements.lock)
IMAGE_DESCRIBE := $(shell git describe --tags --always --dirty 2>/dev/null || echo unknown)
IMAGE_REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)

.PHONY: images lock lint-images base-digest lock-flash-attn image-standin trainer-image
TRAINER_DIR ?= examples
TRAINER_IMAGE ?= rollfleet-trainer:dev
images: ## build the runtime image with docker buildx; needs CUDA_BASE_DIGEST=sha256:... (make base-digest)
	@[[ "$(CUDA_BASE_DIGEST)" =~ ^sha256:[0-9a-f]{64}$$ ]] || { echo "error: CUDA_BASE_DIGEST=sha256:<64 hex> \
	is required: the digest of $(CUDA_BASE), read from the registry with \`make base-digest\` (docs/image.md)" >&2; exit 1; }
	docker buildx build --platform linux/amd64 -f images/runtime/Dockerfile \
	  --build-arg BASE_IMAGE=$(CUDA_BASE) --build-arg BASE_DIGEST=$(CUDA_BASE_DIGEST) \
	  --build-arg VERSION=$(IMAGE_VERSION) --build-arg REVISION=$(IMAGE_REVISION) \
	  -t $(IMAGE_REPO):$(IMAGE_VERSION)-vllm$(IMAGE_VLLM) -t $(IMAGE_REPO):$(IMAGE_DESCRIBE) $(IMAGE_OUTPUT) .

base-digest: ## print the registry digest of CUDA_BASE (needs docker buildx and registry access)
	@docker buildx imagetools inspect $(CUDA_BASE) | awk '/^Digest:/ {print $$2; exit}'

lock: venv ## recompile images/runtime/requirements.lock from requirements.in (uv, PyPI, hashes)
	UV=$(BIN)/uv images/runtime/lock.sh

lock-flash-attn: ## download flash-attn's release wheel (GitHub) and check it against FLASH_ATTN_SHA256
	@url=$$(sed -n 's/^ARG FLASH_ATTN_URL=//p' images/runtime/Dockerfile); \
	want=$$(sed -n 's/^ARG FLASH_ATTN_SHA256=//p' images/runtime/Dockerfile); \
	got=$$(set -o pipefail; curl -fsSL "$$url" | sha256sum | cut -d' ' -f1) || exit 1; \
	echo "$$got  $$url"; \
	if [ -z "$$want" ]; then sed -i "s/^ARG FLASH_ATTN_SHA256=.*/ARG FLASH_ATTN_SHA256=$$got/" images/runtime/Dockerfile; \
	  echo "recorded FLASH_ATTN_SHA256 in images/runtime/Dockerfile"; \
	elif [ "$$got" = "$$want" ]; then echo "ok: equals the Dockerfile's FLASH_ATTN_SHA256"; \
	else echo "error: the Dockerfile pins $$want; investigate before changing it" >&2; exit 1; fi

lint-images: venv ## hadolint both Dockerfiles (ignores documented in images/runtime/.hadolint.yaml)
	$(BIN)/hadolint --config images/runtime/.hadolint.yaml images/runtime/Dockerfile images/trainer/Dockerfile

trainer-image: ## your trainer code (TRAINER_DIR) on the runtime image, as TRAINER_IMAGE (docker buildx)
	docker buildx build --platform linux/amd64 -f images/trainer/Dockerfile \
	  --build-arg BASE_IMAGE=$(IMAGE_REPO):$(IMAGE_VERSION)-vllm$(IMAGE_VLLM) \
	  -t $(TRAINER_IMAGE) $(IMAGE_OUTPUT) $(TRAINER_DIR)

image-standin: venv ## buildah stand-in build of the Dockerfile on a local Debian base (root; no registry; docs/image.md)
	UV=$(BIN)/uv images/runtime/standin.sh

# rollfleet — every target bootstraps its own virtualenv (uv) from python3 alone.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VALUES ?= manifests/examples/one-node-8gpu.yaml
CRDS_DIR ?= $(if $(wildcard ../shared/kuberay-v1.7.0/crds),../shared/kuberay-v1.7.0/crds,.cache/kuberay-v1.7.0/crds)
KUBERAY_VERSION := v1.7.0
# The Prometheus Operator's CRDs (PodMonitor, PrometheusRule): its module zip from the Go module proxy,
# pinned by sha256 (the same bytes the Go checksum database records for this version).
PROMETHEUS_OPERATOR_VERSION := v0.92.1
PROMETHEUS_OPERATOR_ZIP_SHA256 := f46d2f85f2098e623d536b2e8e19bbba56564deabfb83cdca80786606936c8af
MONITORING_CRDS_DIR := .cache/prometheus-operator-$(PROMETHEUS_OPERATOR_VERSION)/crds
export UV_PYTHON_DOWNLOADS := never
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export ROLLFLEET_CRDS_DIR := $(abspath $(CRDS_DIR))
export ROLLFLEET_MONITORING_CRDS_DIR := $(abspath $(MONITORING_CRDS_DIR))
# A machine whose pip config names a find-links folder holding a torch wheel (a CPU build on disk)
# installs that wheel; elsewhere torch comes from PyPI.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
LOCAL_TORCH := $(firstword $(foreach d,$(FIND_LINKS),$(wildcard $(d)/torch-*.whl)))

.PHONY: help venv test test-e2e test-image demo render manifests schema crds monitoring-crds lint lock images deploy diff status down kind-smoke clean

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

test: venv monitoring-crds ## run the test suite (CPU; GPU tests skip without CUDA; the image stand-in build is `make test-image`)
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

crds: monitoring-crds ## download the KubeRay v1.7.0 CRDs into .cache/ (CI reads ../shared instead), and the monitoring ones
	mkdir -p .cache/kuberay-$(KUBERAY_VERSION)/crds
	for k in rayclusters rayjobs; do f=.cache/kuberay-$(KUBERAY_VERSION)/crds/ray.io_$$k.yaml; \
	  u=https://raw.githubusercontent.com/ray-project/kuberay/$(KUBERAY_VERSION)/ray-operator/config/crd/bases/ray.io_$$k.yaml; \
	  curl -fsSL -o $$f.part $$u && mv $$f.part $$f || { rm -f $$f.part; rmdir .cache/kuberay-$(KUBERAY_VERSION)/crds 2>/dev/null; \
	  echo "error: could not download $$u; fetch it where you can into .cache/kuberay-$(KUBERAY_VERSION)/crds/ (or point ROLLFLEET_CRDS_DIR at a copy)" >&2; exit 1; }; done

monitoring-crds: $(MONITORING_CRDS_DIR)/monitoring.coreos.com_prometheusrules.yaml ## the Prometheus Operator's PodMonitor and PrometheusRule CRDs into .cache/

$(MONITORING_CRDS_DIR)/monitoring.coreos.com_prometheusrules.yaml:
	@d=$(MONITORING_CRDS_DIR); zip=$$d/../module.zip; \
	url=https://proxy.golang.org/github.com/prometheus-operator/prometheus-operator/@v/$(PROMETHEUS_OPERATOR_VERSION).zip; \
	mkdir -p $$d && echo "fetching the Prometheus Operator $(PROMETHEUS_OPERATOR_VERSION) CRDs from $$url" && \
	curl -fsSL -o $$zip $$url && echo "$(PROMETHEUS_OPERATOR_ZIP_SHA256)  $$zip" | sha256sum -c --quiet && \
	$(PYTHON) -c 'import sys, zipfile, pathlib; z = zipfile.ZipFile(sys.argv[1]); [pathlib.Path(sys.argv[2], k + ".yaml").write_bytes(z.read(sys.argv[3] + k + ".yaml")) for k in ("monitoring.coreos.com_podmonitors", "monitoring.coreos.com_prometheusrules")]' \
	  $$zip $$d github.com/prometheus-operator/prometheus-operator@$(PROMETHEUS_OPERATOR_VERSION)/example/prometheus-operator-crd/ \
	  && rm -f $$zip || { rm -rf "$$(dirname $$d)"; echo "error: could not fetch or check $$url; fetch it where you can, take \
	example/prometheus-operator-crd/monitoring.coreos.com_{podmonitors,prometheusrules}.yaml from it into a directory \
	and set ROLLFLEET_MONITORING_CRDS_DIR to it" >&2; exit 1; }

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .hypothesis

deploy: venv ## preflight, server-side apply and wait for VALUES on the current kube context (docs/deploy.md)
	$(BIN)/rollfleet deploy -f $(VALUES)

diff: venv ## what `make deploy` would change on the current kube context (server-side dry run; exit 1: changes)
	$(BIN)/rollfleet diff -f $(VALUES)

status: venv ## VALUES' fleet on the cluster: objects, pools ready, problems
	$(BIN)/rollfleet status -f $(VALUES)

down: venv ## delete VALUES' fleet: only its RayJob/RayCluster/ConfigMap/NetworkPolicy/PodMonitor/PrometheusRule labelled managed-by=rollfleet
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

#!/usr/bin/env bash
# kind smoke test of rollfleet on one GPU host: an nvkind cluster, the NVIDIA device plugin, the KubeRay
# operator, the runtime image loaded into kind, the chart installed with the kind profile, then a wait
# until the RayJob succeeds and the tail of its logs. The cluster is deleted on exit. The profile follows
# the host: manifests/examples/kind.yaml (1 trainer GPU + 1 engine GPU) with 2 GPUs or more,
# manifests/examples/kind-colocated.yaml (trainer and engine share the GPU) with one.
#
# Needs: docker with the NVIDIA container toolkit set up for nvkind (see docs/deploy.md), a GPU,
# nvkind, kind, helm, kubectl, the runtime image in the local docker (make images, or docker pull), and
# .venv (make venv). Not run by CI: there is no GPU host there.
#
#   scripts/kind-smoke.sh [--dry-run]      DRY_RUN=1 works too: print every command, run none
#
# Environment: CLUSTER, VALUES, IMAGE, KUBERAY_VERSION, DEVICE_PLUGIN_VERSION, TIMEOUT (seconds for the
# RayJob to succeed), KEEP=1 (leave the cluster up), HF_TOKEN (optional; passed to kubectl on stdin,
# never printed), GPUS (the host's GPU count; found with nvidia-smi, 2 in a dry run).
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "kind-smoke: unknown argument $arg (use --dry-run)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
CLUSTER="${CLUSTER:-rollfleet-smoke}"
CONTEXT="kind-${CLUSTER}"
if [[ "$DRY_RUN" == 1 ]]; then
  GPUS="${GPUS:-2}"
else
  GPUS="${GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)}"
fi
if ((GPUS >= 2)); then VALUES="${VALUES:-manifests/examples/kind.yaml}"; else VALUES="${VALUES:-manifests/examples/kind-colocated.yaml}"; fi
IMAGE="${IMAGE:-ghcr.io/rollfleet/runtime:0.1.0-vllm0.14.1}"
KUBERAY_VERSION="${KUBERAY_VERSION:-1.7.0}"
DEVICE_PLUGIN_VERSION="${DEVICE_PLUGIN_VERSION:-0.17.1}"
TIMEOUT="${TIMEOUT:-1800}"
KEEP="${KEEP:-0}"
ROLLFLEET="${ROLLFLEET:-.venv/bin/rollfleet}"
PYTHON="${PYTHON:-.venv/bin/python}"
RELEASE=rollfleet-smoke
# The profile's namespace and the GPUs it asks for: every pool's, once (the colocated pool's GPUs hold
# trainer and engine alike); read as rollfleet reads values files.
read -r NAMESPACE NEED < <("$PYTHON" -c 'import sys; from rollfleet.values import load_values; s = load_values(sys.argv[1]); print(s.namespace, sum(p.gpus for _, p, _ in s.groups))' "$VALUES")

log() { printf '\n== kind-smoke: %s\n' "$*"; }

# Print a command (shell-quoted, one line, prefixed "+ "), then run it unless this is a dry run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  [[ "$DRY_RUN" == 1 ]] || "$@"
}

# wait_for <what> <seconds> <command...>: poll the command every 5 s until it succeeds or time runs out.
wait_for() {
  local what="$1" seconds="$2"
  shift 2
  echo "waiting up to ${seconds}s for ${what}"
  [[ "$DRY_RUN" == 1 ]] && { run "$@"; return 0; }
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "kind-smoke: timed out after ${seconds}s waiting for ${what}" >&2
      return 1
    fi
    sleep 5
  done
}

gpus_allocatable() {  # succeeds once the nodes together offer the profile's allocatable nvidia.com/gpu
  kubectl --context "$CONTEXT" get nodes -o jsonpath='{range .items[*]}{.status.allocatable.nvidia\.com/gpu}{"\n"}{end}' |
    awk -v need="$NEED" '{ total += $1 } END { exit !(total >= need) }'
}

CREATED=0
cleanup() {
  local rc=$?
  if ((rc != 0)) && ((CREATED == 1)); then
    log "failed (exit $rc): the fleet's state"
    run "$ROLLFLEET" status "$RELEASE" -n "$NAMESPACE" --context "$CONTEXT" || true
  fi
  if ((CREATED == 1)) && [[ "$KEEP" != 1 ]]; then
    log "cleanup"
    run kind delete cluster --name "$CLUSTER" || true
  fi
  exit "$rc"
}
trap cleanup EXIT

log "host checks"
if [[ "$DRY_RUN" == 1 ]]; then
  echo "(dry run: tools, GPUs and the image are not checked)"
else
  for tool in docker nvkind kind helm kubectl nvidia-smi; do
    command -v "$tool" >/dev/null || { echo "kind-smoke: $tool is not on PATH (docs/deploy.md lists what to install)" >&2; exit 2; }
  done
  ((GPUS >= NEED)) || { echo "kind-smoke: $VALUES needs $NEED GPU(s), this host has $GPUS" >&2; exit 2; }
  docker image inspect "$IMAGE" >/dev/null 2>&1 ||
    { echo "kind-smoke: image $IMAGE is not in the local docker: build it (make images) or docker pull it, or set IMAGE" >&2; exit 2; }
fi
run "$ROLLFLEET" validate -f "$VALUES"

log "nvkind cluster $CLUSTER (one worker with every GPU of this host)"
CREATED=1
run nvkind cluster create --name="$CLUSTER"

log "NVIDIA device plugin $DEVICE_PLUGIN_VERSION"
run helm repo add nvdp https://nvidia.github.io/k8s-device-plugin --force-update
run helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update
run helm repo update nvdp kuberay
run helm upgrade --install nvidia-device-plugin nvdp/nvidia-device-plugin --version "$DEVICE_PLUGIN_VERSION" \
  --kube-context "$CONTEXT" --namespace nvidia --create-namespace --wait --timeout 5m
wait_for "$NEED allocatable nvidia.com/gpu on the kind nodes" 300 gpus_allocatable

log "KubeRay operator $KUBERAY_VERSION (with its CRDs)"
run helm upgrade --install kuberay-operator kuberay/kuberay-operator --version "$KUBERAY_VERSION" \
  --kube-context "$CONTEXT" --namespace kuberay-system --create-namespace --wait --timeout 5m

log "runtime image $IMAGE into kind"
run kind load docker-image "$IMAGE" --name "$CLUSTER"

token_args=()
if [[ -n "${HF_TOKEN:-}" ]]; then
  log "Secret hf-token from HF_TOKEN (on stdin, not printed)"
  run kubectl --context "$CONTEXT" --namespace "$NAMESPACE" create secret generic hf-token \
    --from-file=token=/dev/stdin <<<"$HF_TOKEN"
  token_args=(--set model.hfTokenSecret.name=hf-token --set model.hfTokenSecret.key=token)
fi

log "chart charts/rollfleet with $VALUES"
run helm upgrade --install "$RELEASE" charts/rollfleet -f "$VALUES" --kube-context "$CONTEXT" --namespace "$NAMESPACE" \
  --set "image.repository=${IMAGE%:*}" --set "image.tag=${IMAGE##*:}" "${token_args[@]}"

log "waiting for the RayJob to succeed"
run "$ROLLFLEET" status "$RELEASE" -n "$NAMESPACE" --context "$CONTEXT" --wait complete --timeout "$TIMEOUT"

log "smoke result: the RayJob's logs"
run "$ROLLFLEET" logs "$RELEASE" -n "$NAMESPACE" --context "$CONTEXT" --tail 50
if [[ "$DRY_RUN" == 1 ]]; then
  log "dry run: the commands above were printed, none was run (nothing was tested)"
else
  log "PASSED"
fi

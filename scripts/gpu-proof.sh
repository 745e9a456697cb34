#!/usr/bin/env bash
# The GPU proof (docs/benchmarks.md): real vLLM engines on a GPU host with no network.
# Prepare the host with ../shared/offline-gpu-vllm (vllm 0.20.2 + ray 2.52.1 into /root/site), then:
#   bash scripts/gpu-proof.sh tests|bench|rollout|colocated|all   (results under $OUT, default ./gpu-results)
# tests: tests/test_gpu.py (1 GPU runs the colocated case; 2-3 the dedicated ones); bench: rollfleet bench gpu
# (2+ GPUs); rollout: rollfleet bench rollout (1 GPU; a 2nd adds the push costs); colocated: bench colocated (1 GPU)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
what=${1:-all}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
PY=${PY:-/opt/torch/.venv/bin/python3}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="${SITE:-/root/site}:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c 'import torch, vllm, ray, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version()); print("vllm", vllm.__version__, "ray", ray.__version__, "transformers", transformers.__version__)'
} 2>&1 | tee "$OUT/env.txt"
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout "${TESTS_TIMEOUT:-540}" "$PY" -m pytest -m gpu tests/test_gpu.py -v -s -x -p no:cacheprovider 2>&1 | tail -n 400 > "$OUT/gpu-tests.log"
  rc=${PIPESTATUS[0]}
  tail -n 60 "$OUT/gpu-tests.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  read -ra extra <<< "${BENCH_ARGS:-}"
  timeout "${BENCH_TIMEOUT:-560}" "$PY" -m rollfleet.cli bench gpu --engines "${ENGINES:-1,2,3}" "${extra[@]}" --json "$OUT/bench-gpu.json" 2>&1 \
    | tail -n 300 > "$OUT/bench-gpu.log"
  rc=$(( rc || PIPESTATUS[0] ))
  tail -n 80 "$OUT/bench-gpu.log"
fi
for which in rollout colocated; do
  if [ "$what" = "$which" ] || [ "$what" = all ]; then
    read -ra extra <<< "${BENCH_ARGS:-}"
    timeout "${BENCH_TIMEOUT:-560}" "$PY" -m rollfleet.cli bench "$which" "${extra[@]}" --json "$OUT/bench-$which.json" 2>&1 \
      | tail -n 300 > "$OUT/bench-$which.log"
    rc=$(( rc || PIPESTATUS[0] ))
    tail -n 60 "$OUT/bench-$which.log"
  fi
done
exit "$rc"

#!/usr/bin/env bash
# Compile images/runtime/requirements.in into the hash-locked requirements.lock (`make lock`).
# tests/test_image.py runs this same script into a temporary file and requires a byte-identical
# result, so these arguments are the one definition of how the lock is made.
#   usage: images/runtime/lock.sh [OUTPUT]      (UV=path/to/uv to pick the uv binary)
set -euo pipefail
out="$(realpath -m "${1:-$(dirname "$0")/requirements.lock}")"
# Run from the repository root: uv writes the input's path into the lock's `# via` comments.
cd "$(dirname "$0")/../.."
# The image runs Ubuntu 22.04 (glibc 2.35), x86_64, CPython 3.12. With manylinux_2_28 uv would
# silently pick vllm's source package; --only-binary keeps vllm and torch to PyPI's wheels.
# --exclude-newer freezes the index: a later run resolves the same versions and hashes.
exec env UV_PYTHON_DOWNLOADS=never "${UV:-uv}" pip compile images/runtime/requirements.in \
  --output-file "$out" \
  --python-platform x86_64-manylinux_2_35 \
  --python-version 3.12 \
  --only-binary vllm \
  --only-binary torch \
  --generate-hashes \
  --exclude-newer 2026-01-31T00:00:00Z \
  --index-url https://pypi.org/simple \
  --no-config \
  --custom-compile-command "make lock" \
  --quiet

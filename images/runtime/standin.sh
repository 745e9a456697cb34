#!/usr/bin/env bash
# Stand-in build of images/runtime/Dockerfile (`make image-standin`) for machines that can reach no
# container registry: a Debian 12 base made locally with debootstrap stands in for the CUDA base, and a
# local CPython 3.12, served to uv on loopback as its managed download, for python-build-standalone.
# It builds all of the Dockerfile's stages (tools, python, builder, runtime) with buildah and then
# proves the user, layout, PATH, labels, default command and KubeRay's probe commands. What it cannot
# prove (CUDA, vllm, torch, flash-attn) is listed in docs/image.md. The packages are a subset of
# requirements.lock compiled against it (same versions, hashes checked): the whole lock needs a CUDA
# machine to be worth checking.
#
# Needs: root, buildah, debootstrap, patchelf, unshare, ip (Debian: apt-get install buildah debootstrap
# patchelf), Debian's mirror and PyPI, a CPython 3.12 prefix (STANDIN_PYTHON, default: pyenv's newest).
# Exit status 3 means a prerequisite is missing (tests/test_image.py skips on it).
set -euo pipefail
cd "$(dirname "$0")/../.."
export BUILDAH_ISOLATION=chroot
work=.cache/standin
tag=localhost/rollfleet-runtime:standin
uv=${UV:-.venv/bin/uv}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { printf '\n== image-standin: %s\n' "$*"; }
missing() { echo "image-standin: $*" >&2; exit 3; }

[ "$(id -u)" = 0 ] || missing "needs root (debootstrap, buildah storage)"
for tool in buildah debootstrap patchelf; do
  command -v "$tool" >/dev/null || missing "$tool not found (apt-get install buildah debootstrap patchelf)"
done
python_prefix=${STANDIN_PYTHON:-$(printf '%s\n' /root/.pyenv/versions/3.12.* | sort -V | tail -1)}
[ -x "${python_prefix}/bin/python3.12" ] || missing "no CPython 3.12 prefix (set STANDIN_PYTHON=/path/prefix)"
buildah info >/dev/null 2>&1 || missing "buildah cannot run here ($(buildah info 2>&1 | tail -1))"
# One run at a time on this machine: buildah's storage and the localhost/ image names are shared by
# every checkout (another session's `pytest` runs this same script).
exec 9>/tmp/rollfleet-image-standin.lock
flock -w 1800 9 || missing "another image-standin run held /tmp/rollfleet-image-standin.lock for 30 min"
mkdir -p "$work"

log "1/6 Debian 12 root filesystem (debootstrap, cached in $work/rootfs)"
# glibc 2.36 stands in for Ubuntu 22.04's 2.35; the extra libraries are the ones a non-standalone
# CPython links (python-build-standalone, the real image's Python, carries its own).
fresh=0
if [ ! -f "$work/rootfs.done" ]; then
  rm -rf "$work/rootfs"
  debootstrap --variant=minbase \
    --include=ca-certificates,libssl3,libffi8,libsqlite3-0,libreadline8,libncursesw6,libbz2-1.0,liblzma5,zlib1g,libuuid1 \
    bookworm "$work/rootfs" "$mirror"
  rm -f "$work"/rootfs/var/cache/apt/archives/*.deb
  # A TLS-intercepting egress proxy's CA: if the host trusts extra CAs, the build must too.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$work/rootfs/usr/local/share/ca-certificates/"
    chroot "$work/rootfs" update-ca-certificates >/dev/null
  fi
  touch "$work/rootfs.done"
  fresh=1
fi

log "2/6 base image localhost/rollfleet-standin-base (stands in for nvidia/cuda:12.9.1-base-ubuntu22.04)"
# Made once per root filesystem, so its digest (and buildah's view of it) stays the same between runs.
if [ "$fresh" = 1 ] || ! buildah inspect --type image localhost/rollfleet-standin-base >/dev/null 2>&1; then
  ctr=$(buildah from scratch)
  buildah copy --quiet "$ctr" "$work/rootfs" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt --cmd /bin/bash "$ctr"
  old_base=$(buildah images -q localhost/rollfleet-standin-base 2>/dev/null || true)
  buildah commit --quiet --rm "$ctr" localhost/rollfleet-standin-base >/dev/null
  [ -z "$old_base" ] || buildah rmi "$old_base" >/dev/null 2>&1 || true
fi
base_digest=$(buildah images --digests --format '{{.Digest}}' localhost/rollfleet-standin-base | head -1)
echo "base digest: $base_digest"

log "3/6 CPython for uv: a python-build-standalone-shaped archive of $python_prefix, served on loopback"
# The Dockerfile's `python` stage runs `uv python install` as in the real build, pointed by
# PYTHON_DOWNLOADS_JSON_URL at a download index naming this archive and its sha256.
rm -rf "$work/pbs" && mkdir -p "$work/pbs"
cp -a "$python_prefix" "$work/pbs/python"
rm -rf "$work/pbs/python/lib/python3.12/site-packages"/* "$work/pbs/python/lib/python3.12/test"
# shellcheck disable=SC2016  # a literal $ORIGIN: pyenv's RPATH is absolute, this makes it relative
patchelf --set-rpath '$ORIGIN/../lib' "$work/pbs/python/bin/python3.12"
tar -C "$work/pbs" -czf "$work/pbs/cpython.tar.gz" python && rm -rf "$work/pbs/python"
python_version=$(sed -n 's/^ARG PYTHON_VERSION=//p' images/runtime/Dockerfile)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 - "$work/pbs" "$python_version" "$port" <<'EOF'
import hashlib, json, sys
root, version, port = sys.argv[1], sys.argv[2], sys.argv[3]
major, minor, patch = map(int, version.split("."))
sha = hashlib.sha256(open(f"{root}/cpython.tar.gz", "rb").read()).hexdigest()
entry = {"name": "cpython", "arch": {"family": "x86_64", "variant": None}, "os": "linux", "libc": "gnu",
         "major": major, "minor": minor, "patch": patch, "prerelease": "", "variant": None,
         "url": f"http://127.0.0.1:{port}/cpython.tar.gz", "sha256": sha, "build": "standin"}
json.dump({f"cpython-{version}-linux-x86_64-gnu": entry}, open(f"{root}/downloads.json", "w"))
print(f"cpython.tar.gz sha256 {sha}, announced as {version}")
EOF
python3 -m http.server --bind 127.0.0.1 --directory "$work/pbs" "$port" >"$work/pbs/http.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
sleep 1

log "4/6 stand-in lock: requirements.in without vllm/torch, constrained to requirements.lock"
grep -v -E '^(vllm|torch)==' images/runtime/requirements.in > "$work/requirements-standin.in"
UV_PYTHON_DOWNLOADS=never "$uv" pip compile "$work/requirements-standin.in" -c images/runtime/requirements.lock \
  --output-file "$work/requirements.lock" --python-platform x86_64-manylinux_2_35 --python-version 3.12 \
  --generate-hashes --index-url https://pypi.org/simple --no-config --quiet
echo "$(grep -c '^[a-z]' "$work/requirements.lock") pins, each equal to requirements.lock's:"
python3 - "$work/requirements.lock" images/runtime/requirements.lock <<'EOF'
import re, sys
pin = re.compile(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", re.I)
sub, full = ({m[1].lower(): m[2] for m in map(pin.match, open(p)) if m} for p in sys.argv[1:])
bad = {k: (v, full.get(k)) for k, v in sub.items() if full.get(k) != v}
print("  OK" if not bad else f"  MISMATCH {bad}")
sys.exit(1 if bad else 0)
EOF

log "5/6 buildah bud images/runtime/Dockerfile (stages base, tools, python, builder, runtime)"
# --format docker: the OCI format has no SHELL, and the Dockerfile's RUNs use bash with pipefail.
# No --layers: nothing but the final image is kept, and the previous one is removed after a success.
previous=$(buildah images -q "$tag" 2>/dev/null || true)
containers_before=$(buildah containers -q | sort)
buildah bud --isolation chroot --format docker -f images/runtime/Dockerfile \
  --build-arg BASE_IMAGE=localhost/rollfleet-standin-base --build-arg BASE_DIGEST="$base_digest" \
  --build-arg PYTHON_DOWNLOADS_JSON_URL="http://127.0.0.1:$port/downloads.json" \
  --build-arg LOCK="$work/requirements.lock" --build-arg WITH_FLASH_ATTN=0 \
  --build-arg VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)" \
  --build-arg REVISION="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  -t "$tag" .
if [ -n "$previous" ] && [ "$previous" != "$(buildah images -q "$tag")" ]; then
  buildah rmi "$previous" >/dev/null 2>&1 || true
fi
# buildah 1.28 leaves the working containers of stages used only as a FROM (seen here): remove the
# ones this build made (runs are serialized by the lock above).
for leftover in $(comm -13 <(echo "$containers_before") <(buildah containers -q | sort)); do
  buildah rm "$leftover" >/dev/null 2>&1 || true
done

log "6/6 prove user, layout, env, labels, default command and the KubeRay probes"
buildah inspect --type image "$tag" > "$work/inspect.json"
python3 - "$work/inspect.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))["Docker"]["config"]
env = dict(e.split("=", 1) for e in c["Env"])
want_env = {"VLLM_USE_V1": "1", "VLLM_DISABLE_COMPILE_CACHE": "1", "VLLM_ATTENTION_BACKEND": "FLASH_ATTN",
            "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_LOGGING_LEVEL": "WARNING", "VIRTUAL_ENV": "/opt/venv"}
checks = {
    "User is 1000:100": c.get("User") == "1000:100",
    "WorkingDir is /home/ray": c.get("WorkingDir") == "/home/ray",
    "Cmd is the RayJob entrypoint": c.get("Cmd") == ["python", "-m", "rollfleet.runtime.launch", "--config", "/etc/rollfleet/fleet.json"],
    "no Entrypoint (KubeRay sets the command)": not c.get("Entrypoint"),
    "seed env": all(env.get(k) == v for k, v in want_env.items()),
    "PATH starts with /opt/venv/bin": env.get("PATH", "").startswith("/opt/venv/bin:"),
    "OCI labels": all(k in c.get("Labels", {}) for k in ("org.opencontainers.image.version", "org.opencontainers.image.revision", "org.opencontainers.image.base.digest")),
}
for name, ok in checks.items():
    print(f"  {'ok  ' if ok else 'FAIL'} {name}")
sys.exit(0 if all(checks.values()) else 1)
EOF
kill "$server" 2>/dev/null || true
ctr=$(buildah from "$tag")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
# As the pods run it: uid 1000, KubeRay's `bash -lc` login shell, its probe commands verbatim against
# a real Ray head. The container gets its own PID and network namespaces: Ray's ports and processes
# are this run's alone (loopback only) and every process it started ends with the namespace.
read -r -d '' inside <<'SCRIPT' || true
set -euo pipefail
echo "  id: $(id)"; echo "  HOME=$HOME"
for tool in python ray wget gcc bash; do printf "  %-6s %s\n" "$tool" "$(command -v "$tool")"; done
test -w "$HOME" && test -w /tmp/ray && test -d /etc/rollfleet && echo "  home and /tmp/ray writable, /etc/rollfleet present"
! test -w /opt/venv && echo "  /opt/venv read-only for uid 1000"
! command -v g++ >/dev/null && ! command -v make >/dev/null && ! command -v nvcc >/dev/null && echo "  no g++, make or nvcc"
python -c "import rollfleet.spec as s, ray; assert s.RAY_VERSION == ray.__version__; print('  ray', ray.__version__, '== rollfleet.spec.RAY_VERSION')"
python -m rollfleet.runtime.launch --help >/dev/null && echo "  python -m rollfleet.runtime.launch --help: ok"
ray start --head --node-ip-address=127.0.0.1 --num-cpus=1 --disable-usage-stats --include-dashboard=true \
  --dashboard-host=127.0.0.1 >/tmp/ray-start.log 2>&1 || { cat /tmp/ray-start.log; exit 1; }
for _ in $(seq 1 60); do
  bash -c "wget -T 4 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success" >/dev/null 2>&1 && break
  sleep 1
done
bash -c "wget -T 4 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success" && echo "  ^ raylet probe (head and workers)"
bash -c "wget -T 4 -q -O- http://localhost:8265/api/gcs_healthz | grep success" && echo "  ^ GCS probe (head)"
ray stop >/dev/null 2>&1
SCRIPT
# shellcheck disable=SC2016  # $0/$1 belong to the inner bash
unshare --pid --net --fork --mount-proc bash -c \
  'ip link set lo up && exec buildah run --user 1000:100 "$0" -- bash -lc "$1"' "$ctr" "$inside"
echo
echo "image-standin: OK ($tag)"

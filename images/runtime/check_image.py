"""Build-time check of the runtime image: what is installed is exactly what the lock says.

Runs in the image's final stage (images/runtime/Dockerfile), as the pods' user, and exits non-zero on
any drift, so a wrong image never gets a tag:
  * every distribution pinned in requirements.lock is installed at exactly that version, and nothing
    else is installed except rollfleet and flash-attn (at --flash-attn=VERSION);
  * the compiled parts load: torch, vllm's extensions (vllm._C, _moe_C and the vllm_flash_attn
    kernels, built against torch 2.9.1's ABI), ray, flash_attn_2_cuda (flash-attn's source install
    silently leaves it out), rollfleet;
  * rollfleet.spec.RAY_VERSION, the manifests' rayVersion, equals the installed ray.

Standard library only: it must run before anything is known to be right. No GPU is needed: the
extensions need libcuda.so.1 only to load, and where no driver is mounted (an image build) the CUDA
base's forward-compatibility copy (/usr/local/cuda*/compat/libcuda.so.1) is loaded for the check.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import importlib
import importlib.metadata
import importlib.resources
import importlib.util
import re
import sys
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
LIBCUDA_FALLBACKS = ("/usr/local/cuda/compat/libcuda.so.1", "/usr/local/cuda-*/compat/libcuda.so.1")


def normalize(name: str) -> str:
    """PEP 503 name: `Flash_Attn` and `flash-attn` are the same distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, str]:
    """`name==version` pins of a `uv pip compile` output (hash and comment lines skipped)."""
    pins: dict[str, str] = {}
    for line in text.splitlines():
        match = PIN.match(line)
        if match:
            pins[normalize(match[1])] = match[2]
    return pins


def installed_distributions() -> dict[str, str]:
    return {normalize(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}


def compare(expected: dict[str, str | None], installed: dict[str, str]) -> list[str]:
    """Problems between what must be installed (version None: any) and what is."""
    problems = []
    for name, version in sorted(expected.items()):
        have = installed.get(name)
        if have is None:
            problems.append(f"{name}: not installed (the lock pins {version or 'it'})")
        elif version is not None and have != version:
            problems.append(f"{name}: installed {have}, the lock pins {version}")
    for name in sorted(set(installed) - set(expected)):
        problems.append(f"{name}: installed {installed[name]} but not in the lock")
    return problems


def load_libcuda(extra: list[str]) -> str:
    """Make libcuda.so.1 loadable for the extensions that link it; returns where it came from."""
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        return "libcuda.so.1 (the driver's)"
    except OSError:
        pass
    candidates = [p for pattern in (*extra, *LIBCUDA_FALLBACKS) for p in sorted(glob.glob(pattern))]
    for path in candidates:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
        except OSError:
            continue
    raise SystemExit("check_image: libcuda.so.1 is not loadable and no forward-compatibility copy was "
                     f"found at {', '.join(LIBCUDA_FALLBACKS)}; pass --libcuda PATH")


def _loaded_libraries(prefixes: tuple[str, ...]) -> dict[str, list[str]]:
    """Which file of each shared library this process mapped (e.g. torch's libcudart 12.8 wheel)."""
    found: dict[str, list[str]] = {}
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return found
    for path in sorted({line.split()[-1] for line in maps.splitlines() if "/" in line}):
        for prefix in prefixes:
            if Path(path).name.startswith(prefix):
                found.setdefault(prefix, []).append(path)
    return found


def check_imports(pins: dict[str, str], flash_attn: str | None, libcuda: list[str]) -> list[str]:
    problems: list[str] = []
    report: list[tuple[str, str]] = [("python", sys.version.split()[0])]

    def attempt(module: str):
        try:
            return importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure is the finding
            problems.append(f"import {module}: {type(exc).__name__}: {exc}")
            return None

    if "vllm" in pins or flash_attn:
        report.append(("libcuda", load_libcuda(libcuda)))
    if "torch" in pins and (torch := attempt("torch")):
        report.append(("torch", f"{torch.__version__} (CUDA {torch.version.cuda}, "
                                f"cxx11abi {torch._C._GLIBCXX_USE_CXX11_ABI})"))
        if torch.__version__.split("+")[0] != pins["torch"]:
            problems.append(f"torch.__version__ {torch.__version__} != lock {pins['torch']}")
    if "vllm" in pins and (vllm := attempt("vllm")):
        report.append(("vllm", vllm.__version__))
        if vllm.__version__ != pins["vllm"]:
            problems.append(f"vllm.__version__ {vllm.__version__} != lock {pins['vllm']}")
        # the compiled ops, and the attention kernels the FLASH_ATTN backend uses on CUDA (vllm's own
        # vllm_flash_attn, whose package swallows their import errors)
        for module in ("vllm._C", "vllm._moe_C", "vllm.vllm_flash_attn._vllm_fa2_C",
                       "vllm.vllm_flash_attn._vllm_fa3_C"):
            if attempt(module):
                report.append((module, "loaded"))
    if flash_attn:
        if (fa := attempt("flash_attn")) and fa.__version__ != flash_attn:
            problems.append(f"flash_attn.__version__ {fa.__version__} != {flash_attn}")
        if (kernels := attempt("flash_attn_2_cuda")) is not None:
            report.append(("flash_attn_2_cuda", kernels.__file__))
    loaded = _loaded_libraries(("libcudart.so", "libnccl.so", "libcuda.so"))
    for name, paths in loaded.items():
        report.append((f"loaded {name}", ", ".join(paths)))
    ray = attempt("ray") if "ray" in pins else None
    if ray:
        report.append(("ray", ray.__version__))
    if spec := attempt("rollfleet.spec"):
        report.append(("rollfleet.spec.RAY_VERSION", spec.RAY_VERSION))
        if ray and spec.RAY_VERSION != ray.__version__:
            problems.append(f"rollfleet.spec.RAY_VERSION {spec.RAY_VERSION} != installed ray "
                            f"{ray.__version__}: the manifests' rayVersion must equal the image's Ray")
    if importlib.util.find_spec("rollfleet.runtime.launch") is None:
        problems.append("rollfleet.runtime.launch (the RayJob entrypoint) is not installed")
    if importlib.util.find_spec("rollfleet") is not None:
        package = importlib.resources.files("rollfleet")
        for data, pattern in (("templates", "*.j2"), ("examples", "*.yaml")):
            found = sorted(p.name for p in Path(str(package / data)).glob(pattern))
            report.append((f"rollfleet/{data}/{pattern}", ", ".join(found) or "NONE"))
            if data == "templates" and not found:
                problems.append("rollfleet/templates/*.j2 missing: `rollfleet render` cannot work "
                                "(the build context must carry manifests/, the symlinks' target)")
    width = max(len(k) for k, _ in report)
    for key, value in report:
        print(f"  {key:<{width}}  {value}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, required=True, help="the requirements.lock installed")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--flash-attn", metavar="VERSION", help="flash-attn version that must be installed")
    group.add_argument("--no-flash-attn", action="store_true", help="stand-in builds only")
    parser.add_argument("--libcuda", action="append", default=[], metavar="PATH",
                        help="extra libcuda.so.1 to try when no driver is mounted")
    args = parser.parse_args(argv)

    pins = parse_lock(args.lock.read_text())
    expected: dict[str, str | None] = {**pins, "rollfleet": None}
    if args.flash_attn:
        expected["flash-attn"] = args.flash_attn
    print(f"check_image: {len(pins)} pins in {args.lock}")
    problems = compare(expected, installed_distributions())
    problems += check_imports(pins, args.flash_attn, args.libcuda)
    if problems:
        print(f"check_image: FAILED, {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("check_image: OK, installed distributions match the lock and the imports load")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Estimate the runtime image's Python payload from requirements.lock, without downloading it.

For every pin, finds on PyPI the wheel that the image installs (the lock's hashes, CPython 3.12,
manylinux x86_64 up to glibc 2.35, most specific tag first), and reads only the wheel's zip central
directory (zipfile over rollfleet.ranged.RangedFile, shared with tests/wheel_source.py: HTTP range
requests) to add up its unpacked size. Prints the largest wheels and the totals that docs/image.md
quotes. flash-attn is not on PyPI and is not counted.

    .venv/bin/python images/runtime/size_estimate.py [images/runtime/requirements.lock]
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

from rollfleet.ranged import RangedFile

LOCK = Path(__file__).with_name("requirements.lock")
PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(35, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
TAGS = list(cpython_tags((3, 12), ["cp312", "abi3", "none"], PLATFORMS)) + list(
    compatible_tags((3, 12), "cp312", PLATFORMS))
RANK = {tag: i for i, tag in enumerate(TAGS)}


def parse_lock(text: str) -> dict[str, tuple[str, set[str]]]:
    pins: dict[str, tuple[str, set[str]]] = {}
    name = None
    for line in text.splitlines():
        if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line):
            name = match[1].lower()
            pins[name] = (match[2], set())
        for digest in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            pins[name][1].add(digest)
    return pins


def measure(name: str, version: str, hashes: set[str]) -> tuple[str, str, str, int, int]:
    request = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    best = None
    for f in files:
        if not f["filename"].endswith(".whl") or f["hashes"].get("sha256") not in hashes:
            continue
        _, wheel_version, _, tags = parse_wheel_filename(f["filename"])
        rank = min((RANK[t] for t in tags if t in RANK), default=None)
        if str(wheel_version) == version and rank is not None and (best is None or rank < best[0]):
            best = (rank, f)
    if best is None:
        raise SystemExit(f"{name}=={version}: no wheel for CPython 3.12 manylinux_2_35 x86_64 in the lock")
    f = best[1]
    with zipfile.ZipFile(RangedFile(f["url"], f["size"])) as z:
        unpacked = sum(i.file_size for i in z.infolist())
    return name, version, f["filename"], f["size"], unpacked


def main() -> int:
    lock = Path(sys.argv[1]) if len(sys.argv) > 1 else LOCK
    pins = parse_lock(lock.read_text())
    with ThreadPoolExecutor(16) as pool:
        rows = list(pool.map(lambda kv: measure(kv[0], *kv[1]), pins.items()))
    rows.sort(key=lambda r: -r[4])
    mib = 1 << 20
    print(f"{'package':<28} {'version':<14} {'wheel MiB':>10} {'unpacked MiB':>13}")
    for name, version, _, size, unpacked in rows[:25]:
        print(f"{name:<28} {version:<14} {size / mib:>10.1f} {unpacked / mib:>13.1f}")
    nvidia = [r for r in rows if r[0].startswith("nvidia-")]
    print(f"{'... ' + str(len(rows) - 25) + ' more':<43}")
    print(f"{'nvidia-* (' + str(len(nvidia)) + ' wheels)':<43} {sum(r[3] for r in nvidia) / mib:>10.1f} "
          f"{sum(r[4] for r in nvidia) / mib:>13.1f}")
    print(f"{'TOTAL (' + str(len(rows)) + ' wheels)':<43} {sum(r[3] for r in rows) / mib:>10.1f} "
          f"{sum(r[4] for r in rows) / mib:>13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Read single ``.py`` files out of a vLLM wheel on PyPI without downloading or installing it.

The wheel is a zip file. ``files.pythonhosted.org`` honours HTTP ``Range`` requests, so we fetch the
zip's central directory (a few hundred KB at the end of the file) once, then fetch each needed member
(a local header plus its deflated bytes) on demand. A 250-500 MB wheel costs well under 1 MB of
transfer for the dozen or so modules the compatibility test reads.

Integrity:
  * ``PINNED`` records the exact filename, URL and sha256 of each wheel used; PyPI's simple API must
    report exactly that URL and sha256 for that filename (the whole wheel is never hashed: that would
    mean downloading it; the URL path itself is content-addressed by PyPI);
  * every member's CRC-32 is checked when it is inflated;
  * every extracted file must match the sha256 the wheel's own ``RECORD`` lists for it, when first
    extracted and every time it is read back from the cache (a damaged cache entry is refetched).

Cache layout (``$ROLLFLEET_VLLM_SRC_CACHE`` or ``~/.cache/rollfleet/vllm-src``)::

    <version>/wheel.json    filename, url, sha256, size of the wheel used
    <version>/index.json    zip index of the wheel's .py files + RECORD (name -> offset, sizes, crc)
    <version>/RECORD        the wheel's RECORD
    <version>/vllm/...      extracted source files, at their path inside the wheel

With the cache warm no network access happens at all.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SIMPLE_API = "https://pypi.org/simple/vllm/"

# Exact wheels the compatibility test reads: the manylinux x86_64 build of each version, as PyPI's
# simple API (files[].url, files[].hashes.sha256) published them when this list was written.
_FILES = "https://files.pythonhosted.org/packages"
PINNED: dict[str, tuple[str, str, str]] = {  # version -> (filename, url, sha256)
    "0.14.1": (
        "vllm-0.14.1-cp38-abi3-manylinux_2_31_x86_64.whl",
        f"{_FILES}/3d/ee/17d0727901b9e9c25a8a1d24e87fb0bb22d1da960e9b6e10ebcba4c671ec/"
        "vllm-0.14.1-cp38-abi3-manylinux_2_31_x86_64.whl",
        "435565a8299a5fcdbf5af4a798e342ddeec3f90df83c8227cc204bdebca19494",
    ),
    "0.20.2": (
        "vllm-0.20.2-cp38-abi3-manylinux_2_35_x86_64.whl",
        f"{_FILES}/c5/aa/4488d49c481a2184e6e285b8d3f937905205f52cd5ac30fb348770494b6e/"
        "vllm-0.20.2-cp38-abi3-manylinux_2_35_x86_64.whl",
        "22a7dd06eb03371298e13d6100f3dedbf307352342aaf08e87c929c60aae9b4d",
    ),
}

_TIMEOUT_S = 30
_TAIL_BYTES = 1 << 20  # first guess at central directory + EOCD size; refetched if too small


class WheelSourceError(RuntimeError):
    """The wheel (or a file in it) could not be obtained or failed verification."""


def cache_root() -> Path:
    env = os.environ.get("ROLLFLEET_VLLM_SRC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rollfleet" / "vllm-src"


def _urlopen(req: urllib.request.Request) -> bytes:
    last: Exception | None = None
    for attempt in range(3):
        try:
            with urllib.request.urlopen(req, timeout=_TIMEOUT_S) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                raise
            last = exc
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            last = exc
        time.sleep(0.5 * (attempt + 1))
    assert last is not None
    raise last


def _range(url: str, start: int, end_inclusive: int | None = None, *, suffix: int | None = None) -> bytes:
    spec = f"bytes=-{suffix}" if suffix is not None else f"bytes={start}-{end_inclusive}"
    return _urlopen(urllib.request.Request(url, headers={"Range": spec}))


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@dataclass(frozen=True)
class _Member:
    offset: int
    csize: int
    usize: int
    method: int
    crc: int


def _parse_central_directory(tail: bytes, tail_start: int) -> tuple[dict[str, _Member], int]:
    """Parse EOCD (+ zip64) and the central directory found in ``tail`` (bytes from ``tail_start``).

    Returns (members, cd_offset). If the central directory starts before ``tail_start`` the caller must
    refetch a larger tail: members is then empty and cd_offset tells how far back to go.
    """
    eocd = tail.rfind(b"PK\x05\x06")
    if eocd < 0:
        raise WheelSourceError("zip end-of-central-directory record not found")
    (_, _, _, _, n_entries, cd_size, cd_offset, _) = struct.unpack("<IHHHHIIH", tail[eocd : eocd + 22])
    if cd_offset == 0xFFFFFFFF or n_entries == 0xFFFF:  # zip64
        loc = tail.rfind(b"PK\x06\x07", 0, eocd)
        (_, _, z64_off, _) = struct.unpack("<IIQI", tail[loc : loc + 20])
        rec = tail[z64_off - tail_start : z64_off - tail_start + 56]
        (_, _, _, _, _, _, _, n_entries, cd_size, cd_offset) = struct.unpack("<IQHHIIQQQQ", rec)
    if cd_offset < tail_start:
        return {}, cd_offset
    members: dict[str, _Member] = {}
    pos = cd_offset - tail_start
    for _ in range(n_entries):
        if tail[pos : pos + 4] != b"PK\x01\x02":
            raise WheelSourceError("corrupt zip central directory")
        (method, _, _, crc, csize, usize, nlen, xlen, clen) = struct.unpack("<HHHIIIHHH", tail[pos + 10 : pos + 34])
        (offset,) = struct.unpack("<I", tail[pos + 42 : pos + 46])
        name = tail[pos + 46 : pos + 46 + nlen].decode("utf-8")
        extra = tail[pos + 46 + nlen : pos + 46 + nlen + xlen]
        if 0xFFFFFFFF in (csize, usize, offset):  # zip64 extended information extra field
            x = 0
            while x + 4 <= len(extra):
                hid, hlen = struct.unpack("<HH", extra[x : x + 4])
                if hid == 1:
                    vals = list(struct.unpack(f"<{hlen // 8}Q", extra[x + 4 : x + 4 + (hlen // 8) * 8]))
                    if usize == 0xFFFFFFFF:
                        usize = vals.pop(0)
                    if csize == 0xFFFFFFFF:
                        csize = vals.pop(0)
                    if offset == 0xFFFFFFFF:
                        offset = vals.pop(0)
                    break
                x += 4 + hlen
        members[name] = _Member(offset, csize, usize, method, crc)
        pos += 46 + nlen + xlen + clen
    return members, cd_offset


class WheelSource:
    """Source files of one pinned vLLM wheel, fetched lazily with Range requests and cached on disk."""

    def __init__(self, version: str, cache: Path | None = None) -> None:
        if version not in PINNED:
            raise WheelSourceError(f"vllm {version} has no pinned wheel in tests/wheel_source.py PINNED")
        self.version = version
        self.filename, self.url, self.sha256 = PINNED[version]
        self.dir = (cache or cache_root()) / version
        self._lock = threading.Lock()
        self._wheel: dict | None = None
        self._index: dict[str, _Member] | None = None
        self._record: dict[str, str] | None = None
        self._texts: dict[str, str | None] = {}

    # -- wheel location and zip index ---------------------------------------------------------------

    def wheel(self) -> dict:
        """{filename, url, sha256, size} of the wheel, checked against PINNED and PyPI's simple API."""
        if self._wheel is None:
            path = self.dir / "wheel.json"
            if path.exists():
                info = json.loads(path.read_text())
            else:
                info = self._wheel_from_pypi()
                self.dir.mkdir(parents=True, exist_ok=True)
                _atomic_write(path, json.dumps(info, indent=2).encode())
            if (info.get("filename"), info.get("url"), info.get("sha256")) != (self.filename, self.url, self.sha256):
                raise WheelSourceError(f"{path}: wheel {info} does not match the pinned "
                                       f"{self.filename} {self.url} sha256={self.sha256}")
            self._wheel = info
        return self._wheel

    def _wheel_from_pypi(self) -> dict:
        req = urllib.request.Request(SIMPLE_API, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        try:
            meta = json.loads(_urlopen(req))
        except (urllib.error.URLError, OSError) as exc:
            raise WheelSourceError(
                f"cannot reach PyPI ({SIMPLE_API}: {exc}) and no cached vLLM {self.version} sources under "
                f"{self.dir}. This test needs network access to pypi.org and files.pythonhosted.org once "
                f"(CI has it), or a warm cache (set ROLLFLEET_VLLM_SRC_CACHE to point at one)."
            ) from exc
        files = [f for f in meta.get("files", []) if f.get("filename") == self.filename]
        if not files:
            raise WheelSourceError(f"PyPI lists no file {self.filename}")
        f = files[0]
        got = f.get("hashes", {}).get("sha256")
        if got != self.sha256:
            raise WheelSourceError(f"PyPI sha256 of {self.filename} is {got}, pinned {self.sha256}")
        if f.get("url") != self.url:
            raise WheelSourceError(f"PyPI serves {self.filename} from {f.get('url')}, pinned {self.url}")
        if not f.get("size"):
            raise WheelSourceError(f"PyPI did not report the size of {self.filename}")
        return {"filename": self.filename, "url": self.url, "sha256": got, "size": f["size"],
                "yanked": bool(f.get("yanked"))}

    def index(self) -> dict[str, _Member]:
        """Zip index of the wheel's .py files and its RECORD."""
        if self._index is None:
            self.wheel()  # the cache must belong to the pinned wheel
            path = self.dir / "index.json"
            if path.exists():
                raw = json.loads(path.read_text())
            else:
                raw = self._index_from_wheel()
                _atomic_write(path, json.dumps(raw, sort_keys=True).encode())
            self._index = {name: _Member(*vals) for name, vals in raw.items()}
        return self._index

    def _index_from_wheel(self) -> dict[str, list[int]]:
        info = self.wheel()
        url, size = info["url"], info["size"]
        tail_len = _TAIL_BYTES
        while True:
            tail = self._get(url, f"the zip index of {self.filename}", suffix=tail_len)
            tail_start = size - len(tail)
            members, cd_offset = _parse_central_directory(tail, tail_start)
            if members:
                break
            tail_len = size - cd_offset + 1024
        keep = {n: m for n, m in members.items() if n.endswith(".py") or n.endswith(".dist-info/RECORD")}
        return {n: [m.offset, m.csize, m.usize, m.method, m.crc] for n, m in keep.items()}

    # -- members --------------------------------------------------------------------------------------

    def _get(self, url: str, what: str, start: int = 0, end: int | None = None, *, suffix: int | None = None) -> bytes:
        try:
            return _range(url, start, end, suffix=suffix)
        except (urllib.error.URLError, OSError) as exc:
            raise WheelSourceError(
                f"cannot fetch {what} from {url}: {exc}. Reading vLLM {self.version} sources needs network "
                f"access to files.pythonhosted.org for files not yet cached under {self.dir}."
            ) from exc

    def _fetch_member(self, name: str) -> bytes:
        m = self.index()[name]
        url = self.wheel()["url"]
        slack = 30 + len(name.encode()) + 1024  # local header + name + generous local extra field
        blob = self._get(url, name, m.offset, m.offset + m.csize + slack - 1)
        if blob[:4] != b"PK\x03\x04":
            raise WheelSourceError(f"{name}: no local file header at offset {m.offset}")
        nlen, xlen = struct.unpack("<HH", blob[26:30])
        start = 30 + nlen + xlen
        if len(blob) < start + m.csize:
            blob += self._get(url, name, m.offset + len(blob), m.offset + start + m.csize - 1)
        comp = blob[start : start + m.csize]
        if m.method == 0:
            data = comp
        elif m.method == 8:
            data = zlib.decompress(comp, -15)
        else:
            raise WheelSourceError(f"{name}: unsupported zip compression method {m.method}")
        if len(data) != m.usize or zlib.crc32(data) != m.crc:
            raise WheelSourceError(f"{name}: CRC/size mismatch after download")
        return data

    def record(self) -> dict[str, str]:
        """path -> 'sha256=...' from the wheel's RECORD."""
        if self._record is None:
            path = self.dir / "RECORD"
            name = f"vllm-{self.version}.dist-info/RECORD"
            if name not in self.index():
                raise WheelSourceError(f"{self.filename} has no {name}")
            data = path.read_bytes() if path.exists() else None
            if data is None or zlib.crc32(data) != self.index()[name].crc:  # absent or damaged
                data = self._fetch_member(name)  # CRC-checked
                _atomic_write(path, data)
            rec: dict[str, str] = {}
            for line in data.decode().splitlines():
                parts = line.rsplit(",", 2)
                if len(parts) == 3 and parts[1]:
                    rec[parts[0]] = parts[1]
            self._record = rec
        return self._record

    def _matches_record(self, name: str, data: bytes) -> bool:
        want = self.record().get(name)
        if want is None:
            raise WheelSourceError(f"{name} is not listed in the RECORD of {self.filename}")
        return _record_hash(data) == want

    def has_file(self, name: str) -> bool:
        return name in self.index()

    def read(self, name: str) -> str | None:
        """Text of wheel member ``name`` (e.g. 'vllm/outputs.py'), or None if the wheel has no such file."""
        with self._lock:
            if name in self._texts:
                return self._texts[name]
        if not self.has_file(name):
            text = None
        else:
            path = self.dir / name
            data = path.read_bytes() if path.exists() else None
            if data is None or not self._matches_record(name, data):  # absent, or a damaged cache entry
                data = self._fetch_member(name)
                if not self._matches_record(name, data):
                    raise WheelSourceError(f"{name}: sha256 does not match the RECORD of {self.filename}")
                _atomic_write(path, data)
            text = data.decode("utf-8")
        with self._lock:
            self._texts[name] = text
        return text

    def module_file(self, module: str) -> str | None:
        """Wheel member holding dotted ``module`` ('vllm.a.b' -> 'vllm/a/b.py' or 'vllm/a/b/__init__.py')."""
        base = module.replace(".", "/")
        for cand in (base + ".py", base + "/__init__.py"):
            if self.has_file(cand):
                return cand
        return None

    def module_source(self, module: str) -> str | None:
        name = self.module_file(module)
        return None if name is None else self.read(name)

    def prefetch(self, modules: list[str], workers: int = 8) -> None:
        """Fetch several modules concurrently (cold-cache speed-up; no-op when cached)."""
        names = [n for n in (self.module_file(m) for m in modules) if n and not (self.dir / n).exists()]
        if not names:
            return
        self.record()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(self.read, names))


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

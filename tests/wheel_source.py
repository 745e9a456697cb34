"""Read single ``.py`` files out of a vLLM wheel on PyPI without downloading or installing it.

The wheel is a zip file and ``files.pythonhosted.org`` honours HTTP ``Range`` requests, so
``zipfile.ZipFile`` reads it through ``rollfleet.ranged.RangedFile`` (a seekable, read-only file
object over range requests, with a block cache): the central directory costs two requests, each
needed member one (its range is loaded ahead from the index). A 250-500 MB wheel costs about 1 MB
of transfer for the modules the compatibility test reads.

Integrity:
  * ``PINNED`` records the exact filename, URL and sha256 of each wheel used; PyPI's simple API must
    report exactly that URL and sha256 for that filename (the whole wheel is never hashed: that would
    mean downloading it; the URL path itself is content-addressed by PyPI), and every range response
    must come from a file of the size PyPI reported;
  * every member's CRC-32 is checked by ``zipfile`` when it is inflated, and must equal the CRC the
    cached index recorded for it;
  * every extracted file must match the sha256 the wheel's own ``RECORD`` lists for it, when first
    extracted and every time it is read back from the cache (a damaged cache entry is refetched).

Cache layout (``$ROLLFLEET_VLLM_SRC_CACHE`` or ``~/.cache/rollfleet/vllm-src``)::

    <version>/wheel.json    filename, url, sha256, size of the wheel used
    <version>/index.json    zip index of the wheel's .py files + RECORD
                            (name -> [header offset, compressed size, size, method, crc])
    <version>/RECORD        the wheel's RECORD
    <version>/vllm/...      extracted source files, at their path inside the wheel

With the cache warm no network access happens at all.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from pathlib import Path

from rollfleet.ranged import RangedFile

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
    "0.16.0": (  # the only 0.16 release
        "vllm-0.16.0-cp38-abi3-manylinux_2_31_x86_64.whl",
        f"{_FILES}/84/ce/44a5a999eb7116516a8d4a08ab9fe14df773f0da4b243ceffe76b0afe54a/"
        "vllm-0.16.0-cp38-abi3-manylinux_2_31_x86_64.whl",
        "f066b2a2f8597a4a3ada8fbbfd122b59086864b2260ca42dc81bf9fb57af0c42",
    ),
    "0.17.1": (  # the newest 0.17
        "vllm-0.17.1-cp38-abi3-manylinux_2_31_x86_64.whl",
        f"{_FILES}/18/28/f85e67b390082481298e27a5c9f1da540d2d5abb1a06a594545cdc320818/"
        "vllm-0.17.1-cp38-abi3-manylinux_2_31_x86_64.whl",
        "c52e892309532b4e51cb94d022c5e3c0087300cdb56e4645708601443299d871",
    ),
    "0.20.2": (
        "vllm-0.20.2-cp38-abi3-manylinux_2_35_x86_64.whl",
        f"{_FILES}/c5/aa/4488d49c481a2184e6e285b8d3f937905205f52cd5ac30fb348770494b6e/"
        "vllm-0.20.2-cp38-abi3-manylinux_2_35_x86_64.whl",
        "22a7dd06eb03371298e13d6100f3dedbf307352342aaf08e87c929c60aae9b4d",
    ),
}

_TIMEOUT_S = 30
_RETRY_PAUSE_S = 0.5
_BLOCK = 8 << 10  # RangedFile block: small, so a member's transfer is close to its compressed size
_LOCAL_HEADER_SLACK = 1024  # local file header (30 bytes) + name + extra field, loaded with the member


class WheelSourceError(RuntimeError):
    """The wheel (or a file in it) could not be obtained or failed verification."""


def cache_root() -> Path:
    env = os.environ.get("ROLLFLEET_VLLM_SRC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rollfleet" / "vllm-src"


def _urlopen(req: urllib.request.Request) -> bytes:
    """The body of a small GET, retrying server errors and dropped connections."""
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
        if attempt < 2:
            time.sleep(_RETRY_PAUSE_S * (attempt + 1))
    assert last is not None
    raise last


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@dataclass(frozen=True)
class _Member:
    """One entry of index.json: where a member lies in the wheel and what it inflates to."""

    offset: int  # of its local file header
    csize: int
    usize: int
    method: int
    crc: int

    @classmethod
    def of(cls, info: zipfile.ZipInfo) -> _Member:
        return cls(info.header_offset, info.compress_size, info.file_size, info.compress_type, info.CRC)


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
        self._remote: RangedFile | None = None
        self._zip: zipfile.ZipFile | None = None

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

    def _network(self, what: str, exc: Exception) -> WheelSourceError:
        return WheelSourceError(
            f"cannot fetch {what} from {self.url}: {exc}. Reading vLLM {self.version} sources needs network "
            f"access to files.pythonhosted.org for files not yet cached under {self.dir}.")

    def _open_zip(self) -> zipfile.ZipFile:
        """The remote wheel as a ZipFile (reads its central directory: two range requests)."""
        with self._lock:
            if self._zip is None:
                info = self.wheel()
                remote = RangedFile(info["url"], info["size"], block_size=_BLOCK, timeout=_TIMEOUT_S)
                try:
                    self._zip = zipfile.ZipFile(remote)
                except (urllib.error.URLError, OSError) as exc:
                    raise self._network(f"the zip index of {self.filename}", exc) from exc
                except zipfile.BadZipFile as exc:
                    raise WheelSourceError(f"{self.filename}: not a readable zip file: {exc}") from exc
                self._remote = remote
            return self._zip

    def index(self) -> dict[str, _Member]:
        """Zip index of the wheel's .py files and its RECORD."""
        if self._index is None:
            self.wheel()  # the cache must belong to the pinned wheel
            path = self.dir / "index.json"
            if path.exists():
                raw = json.loads(path.read_text())
            else:
                raw = {i.filename: list(astuple(_Member.of(i))) for i in self._open_zip().infolist()
                       if i.filename.endswith(".py") or i.filename.endswith(".dist-info/RECORD")}
                _atomic_write(path, json.dumps(raw, sort_keys=True).encode())
            self._index = {name: _Member(*vals) for name, vals in raw.items()}
        return self._index

    # -- members --------------------------------------------------------------------------------------

    def _load_ahead(self, names: list[str], workers: int = 8) -> None:
        """Load the byte ranges of these members into the remote file's cache, concurrently."""
        self._open_zip()
        assert self._remote is not None
        spans = [(m.offset, m.offset + 30 + len(n.encode()) + _LOCAL_HEADER_SLACK + m.csize)
                 for n, m in ((n, self.index()[n]) for n in names)]
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(lambda span: self._remote.fetch(*span), spans))
        except (urllib.error.URLError, OSError) as exc:
            raise self._network(f"{len(names)} source file(s)", exc) from exc

    def _fetch_member(self, name: str) -> bytes:
        """Member ``name`` inflated by zipfile (CRC-checked there), from the pinned remote wheel."""
        want = self.index()[name]
        zf = self._open_zip()
        try:
            info = zf.getinfo(name)
        except KeyError:
            raise WheelSourceError(f"{self.filename} has no member {name}, although index.json lists it") from None
        if _Member.of(info) != want:
            raise WheelSourceError(f"{name}: the wheel's central directory says {_Member.of(info)}, the cached "
                                   f"index {self.dir / 'index.json'} says {want}; remove {self.dir}")
        self._load_ahead([name])
        try:
            with zf.open(info) as member:
                return member.read()
        except (urllib.error.URLError, OSError) as exc:
            raise self._network(name, exc) from exc
        except (zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:  # bad CRC, bad header, method
            raise WheelSourceError(f"{self.filename}: {name}: {exc}") from exc

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
        self._load_ahead(names, workers)  # concurrent range requests; the reads below then hit the cache
        for name in names:
            self.read(name)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

"""A remote file read through HTTP ``Range`` requests: seekable, read-only, with a small block cache.

Host-side tooling (nothing in the runtime image uses it): ``zipfile.ZipFile(RangedFile(url, size))``
reads a wheel's central directory and single members without downloading the wheel. Used by
images/runtime/size_estimate.py (unpacked sizes of the lock's wheels) and tests/wheel_source.py (vLLM
sources for the compatibility test).

The file is cut into aligned blocks (64 KiB by default). A read fetches the blocks it misses, each run
of consecutive missing blocks in one request, and keeps them in an LRU cache bounded in bytes, so
zipfile's many small reads (end record, zip64 locator, local header, then the data in 4 KiB steps)
cost one or two requests per structure. ``fetch(start, end)`` loads a range ahead of reading it (one
request; callers that know where a member lies use it, from several threads if they like).

Every response must be a ``206 Partial Content`` for exactly the bytes asked, out of a file of the
size the caller stated (``Content-Range: bytes a-b/size``): a server that ignores ``Range`` (``200``,
the whole file) or serves a file of another size is an error, never a silent full download.
"""

from __future__ import annotations

import io
import re
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from typing import Callable

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class RangeRequestError(OSError):
    """The server did not answer a range request with the bytes asked for, of the file expected."""


class RangedFile(io.RawIOBase):
    """Read-only, seekable view of ``size`` bytes at ``url``, one HTTP range request per missing run."""

    def __init__(self, url: str, size: int, *, block_size: int = 1 << 16, cache_bytes: int = 32 << 20,
                 timeout: float = 60, attempts: int = 3,
                 urlopen: Callable[..., object] = urllib.request.urlopen) -> None:
        super().__init__()
        if size < 0 or block_size <= 0:
            raise ValueError(f"size {size} and block_size {block_size} must be positive")
        self.url, self.size, self.block_size = url, size, block_size
        self.name = url  # what zipfile and error messages show
        self.requests = 0  # range requests sent (for tests and for reports)
        self.bytes_fetched = 0
        self._cache_blocks = max(1, cache_bytes // block_size)
        self._timeout, self._attempts, self._urlopen = timeout, attempts, urlopen
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._pos = 0

    # -- io.RawIOBase ----------------------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence}")
        if base + offset < 0:
            raise OSError(f"seek to {base + offset}: negative position in {self.url}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        """Fill ``buffer`` from the current position (short only at the end of the file)."""
        self._checkClosed()
        view = memoryview(buffer).cast("B")
        start, end = self._pos, min(self._pos + len(view), self.size)
        if start >= end:
            return 0
        data = self._span(start, end)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        data = self._span(self._pos, self.size) if self._pos < self.size else b""
        self._pos += len(data)
        return data

    # -- the block cache -------------------------------------------------------------------------------

    def fetch(self, start: int, end: int) -> None:
        """Load bytes [start, end) into the cache now (one request for what is missing). Thread-safe."""
        start, end = max(0, start), min(end, self.size)
        if start < end:
            self._blocks_for(start // self.block_size, (end - 1) // self.block_size)

    def _span(self, start: int, end: int) -> bytes:
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs
        blocks = self._blocks_for(first, last)
        joined = b"".join(blocks[i] for i in range(first, last + 1))
        return joined[start - first * bs : end - first * bs]

    def _blocks_for(self, first: int, last: int) -> dict[int, bytes]:
        have: dict[int, bytes] = {}
        with self._lock:
            for i in range(first, last + 1):
                if i in self._blocks:
                    self._blocks.move_to_end(i)
                    have[i] = self._blocks[i]
        missing = [i for i in range(first, last + 1) if i not in have]
        runs: list[list[int]] = []
        for i in missing:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:  # outside the lock: threads fetch in parallel (a duplicate fetch is harmless)
            bs = self.block_size
            lo, hi = run[0] * bs, min((run[-1] + 1) * bs, self.size)
            data = self._get(lo, hi)
            for i in run:
                have[i] = data[(i - run[0]) * bs : (i - run[0] + 1) * bs]
            with self._lock:
                for i in run:
                    self._blocks[i] = have[i]
                    self._blocks.move_to_end(i)
                while len(self._blocks) > self._cache_blocks:
                    self._blocks.popitem(last=False)
        return have

    # -- HTTP ------------------------------------------------------------------------------------------

    def _get(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the remote file, retrying server errors and dropped connections."""
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end - 1}"})
        last: Exception | None = None
        for attempt in range(self._attempts):
            try:
                with self._urlopen(request, timeout=self._timeout) as response:
                    status = getattr(response, "status", None)
                    if status != 206:
                        raise RangeRequestError(f"{self.url}: answered a range request with HTTP {status}, "
                                                f"not 206 Partial Content (range requests unsupported?)")
                    self._check_content_range(response.headers.get("Content-Range"), start, end)
                    data = response.read()
                if len(data) != end - start:
                    raise RangeRequestError(f"{self.url}: asked for bytes {start}-{end - 1}, "
                                            f"got {len(data)} bytes")
                with self._lock:
                    self.requests += 1
                    self.bytes_fetched += len(data)
                return data
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    raise
                last = exc
            except RangeRequestError:
                raise
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = exc
            if attempt + 1 < self._attempts:
                time.sleep(0.5 * (attempt + 1))
        assert last is not None
        raise last

    def _check_content_range(self, header: str | None, start: int, end: int) -> None:
        match = _CONTENT_RANGE.fullmatch((header or "").strip())
        if not match:
            raise RangeRequestError(f"{self.url}: 206 without a usable Content-Range ({header!r})")
        lo, hi, total = int(match[1]), int(match[2]), match[3]
        if (lo, hi) != (start, end - 1):
            raise RangeRequestError(f"{self.url}: asked for bytes {start}-{end - 1}, got {lo}-{hi}")
        if total != "*" and int(total) != self.size:
            raise RangeRequestError(f"{self.url}: the file has {total} bytes, expected {self.size} "
                                    f"(a different file than the one pinned?)")

"""rollfleet.ranged.RangedFile against a local HTTP server that honours (or breaks) Range requests."""

from __future__ import annotations

import io
import random
import zipfile
from collections.abc import Iterator

import pytest

from range_server import RangeServer
from rollfleet.ranged import RangedFile, RangeRequestError


@pytest.fixture
def server() -> Iterator[RangeServer]:
    with RangeServer() as srv:
        yield srv


def _serve(srv: RangeServer, body: bytes) -> tuple[str, int]:
    srv.files["/f.whl"] = body
    return srv.url("/f.whl"), len(body)


def _wheel() -> tuple[bytes, dict[str, bytes]]:
    rng = random.Random(0)
    members = {f"pkg/mod{i}.py": "".join(rng.choice("abc def\n") for _ in range(rng.randrange(100, 60_000))).encode()
               for i in range(40)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue(), members


def test_zipfile_reads_members_with_few_requests(server: RangeServer) -> None:
    body, members = _wheel()
    remote = RangedFile(*_serve(server, body), block_size=4096)
    with zipfile.ZipFile(remote) as z:
        assert remote.requests <= 2, server.log  # end record + central directory
        assert sorted(z.namelist()) == sorted(members)
        for name in ("pkg/mod3.py", "pkg/mod17.py"):
            info, before = z.getinfo(name), remote.requests
            remote.fetch(info.header_offset, info.header_offset + 30 + len(name) + 64 + info.compress_size)
            assert z.read(name) == members[name]  # CRC checked by zipfile
            assert remote.requests == before + 1, server.log  # the load-ahead; the reads hit the cache
        before = remote.requests
        assert z.read("pkg/mod25.py") == members["pkg/mod25.py"]  # no hint: header block, then the rest
        assert remote.requests - before <= 2
    assert remote.bytes_fetched < len(body)


def test_file_semantics(server: RangeServer) -> None:
    body = bytes(range(256)) * 40  # 10240 bytes
    f = RangedFile(*_serve(server, body), block_size=1000, cache_bytes=3000)
    assert (f.readable(), f.seekable(), f.writable()) == (True, True, False)
    assert f.seek(-10, io.SEEK_END) == 10230 and f.read(100) == body[-10:] and f.read(1) == b""
    assert f.seek(995) == 995 and f.read(10) == body[995:1005] and f.tell() == 1005
    assert f.seek(5, io.SEEK_CUR) == 1010
    buf = bytearray(2500)
    assert f.readinto(buf) == 2500 and bytes(buf) == body[1010:3510]
    assert len(f._blocks) <= 3  # the LRU holds cache_bytes
    f.seek(0)
    assert f.read() == body
    with pytest.raises(OSError, match="negative"):
        f.seek(-1)
    f.close()
    with pytest.raises(ValueError):
        f.read(1)


def test_server_ignoring_range_is_an_error(server: RangeServer) -> None:
    server.mode = "ignore-range"
    with pytest.raises(RangeRequestError, match="HTTP 200, not 206"):
        RangedFile(*_serve(server, b"x" * 100_000)).read(10)


def test_a_file_of_another_size_is_an_error(server: RangeServer) -> None:
    server.mode = "other-size"
    with pytest.raises(RangeRequestError, match="has 1001 bytes, expected 1000"):
        RangedFile(*_serve(server, b"x" * 1000)).read(10)


def test_server_errors_are_retried(server: RangeServer) -> None:
    server.mode = "fail-once"
    f = RangedFile(*_serve(server, b"0123456789"))
    assert f.read(4) == b"0123"
    assert len(server.log) == 2 and f.requests == 1

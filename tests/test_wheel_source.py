"""tests/wheel_source.py against a local stand-in for PyPI (tests/range_server.py): what it fetches, what
it checks, what it caches. The real wheels are read by tests/test_vllm_compat.py."""

from __future__ import annotations

import hashlib
import io
import json
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import wheel_source
from range_server import RangeServer
from wheel_source import WheelSource, WheelSourceError

VERSION = "0.0.1"
FILENAME = f"vllm-{VERSION}-cp38-abi3-manylinux_2_31_x86_64.whl"
SOURCES = {
    "vllm/__init__.py": b'"""vllm"""\n',
    "vllm/outputs.py": b"class CompletionOutput:\n    text: str\n" * 200,
    "vllm/stored.py": b"STORED = 1\n",  # ZIP_STORED: a flipped byte in the wheel is caught by the CRC
}


def _wheel(sources: dict[str, bytes], record_of: dict[str, bytes] | None = None) -> bytes:
    record_of = record_of or sources
    record = "".join(f"{n},{wheel_source._record_hash(record_of[n])},{len(record_of[n])}\n" for n in sources)
    record += f"vllm-{VERSION}.dist-info/RECORD,,\n"
    buf, rng = io.BytesIO(), random.Random(0)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i, (name, data) in enumerate(sources.items()):  # 64 KiB of incompressible bytes around each
            z.writestr(f"vllm/_C{i}.abi3.so", rng.randbytes(64 << 10))
            z.writestr(name, data, zipfile.ZIP_STORED if name.endswith("stored.py") else zipfile.ZIP_DEFLATED)
        z.writestr("vllm/_C.abi3.so", rng.randbytes(64 << 10))
        z.writestr(f"vllm-{VERSION}.dist-info/RECORD", record)
    return buf.getvalue()


@pytest.fixture
def pypi(monkeypatch: pytest.MonkeyPatch) -> Iterator[RangeServer]:
    """Serves the simple API page and one wheel, pinned as vllm 0.0.1."""
    with RangeServer() as srv:
        publish(srv, _wheel(SOURCES))
        monkeypatch.setattr(wheel_source, "SIMPLE_API", srv.url("/simple/vllm/"))
        monkeypatch.setitem(wheel_source.PINNED, VERSION, (FILENAME, srv.url(f"/p/{FILENAME}"),
                                                           hashlib.sha256(srv.files[f"/p/{FILENAME}"]).hexdigest()))
        yield srv


def publish(srv: RangeServer, wheel: bytes, sha256: str | None = None) -> None:
    srv.files[f"/p/{FILENAME}"] = wheel
    srv.files["/simple/vllm/"] = json.dumps({"files": [{
        "filename": FILENAME, "url": srv.url(f"/p/{FILENAME}"), "size": len(wheel),
        "hashes": {"sha256": sha256 or hashlib.sha256(wheel).hexdigest()}}]}).encode()


def _ranges(srv: RangeServer) -> tuple[int, int]:
    """(range requests for the wheel, bytes they asked for); fails on a request for the whole wheel."""
    specs = [spec for path, spec in srv.log if path.startswith("/p/")]
    assert all(specs), f"a request without Range: {srv.log}"
    spans = [tuple(map(int, spec.removeprefix("bytes=").split("-"))) for spec in specs]
    return len(spans), sum(hi - lo + 1 for lo, hi in spans)


@pytest.fixture(autouse=True)
def _no_retry_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wheel_source, "_RETRY_PAUSE_S", 0)


def test_cold_then_warm(pypi: RangeServer, tmp_path: Path) -> None:
    src = WheelSource(VERSION, cache=tmp_path)
    assert src.module_source("vllm.outputs") == SOURCES["vllm/outputs.py"].decode()
    assert src.module_file("vllm") == "vllm/__init__.py" and src.module_source("vllm.nothing") is None
    # the simple API once; the last 8 KiB block (end record, central directory, RECORD); the member
    requests, asked = _ranges(pypi)
    assert pypi.log[0] == ("/simple/vllm/", "") and requests == 2, pypi.log
    assert asked < len(pypi.files[f"/p/{FILENAME}"]) / 4, pypi.log
    cached = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert cached == [f"{VERSION}/RECORD", f"{VERSION}/index.json", f"{VERSION}/vllm/outputs.py",
                      f"{VERSION}/wheel.json"]
    index = json.loads((tmp_path / VERSION / "index.json").read_text())
    info = zipfile.ZipFile(io.BytesIO(pypi.files[f"/p/{FILENAME}"])).getinfo("vllm/outputs.py")
    assert index["vllm/outputs.py"] == [info.header_offset, info.compress_size, info.file_size,
                                        info.compress_type, info.CRC]

    pypi.mode, pypi.log[:] = "down", []
    again = WheelSource(VERSION, cache=tmp_path)
    again.prefetch(["vllm.outputs"])
    assert again.read("vllm/outputs.py") == SOURCES["vllm/outputs.py"].decode()
    assert pypi.log == []  # warm: no network at all


def test_prefetch_loads_members_concurrently_then_reads_the_cache(pypi: RangeServer, tmp_path: Path) -> None:
    src = WheelSource(VERSION, cache=tmp_path)
    src.prefetch(["vllm", "vllm.outputs", "vllm.stored"])
    assert _ranges(pypi)[0] == 1 + 3, pypi.log  # the tail (directory, RECORD), then one per member
    assert all((tmp_path / VERSION / n).read_bytes() == data for n, data in SOURCES.items())


def test_a_damaged_cache_entry_is_fetched_again(pypi: RangeServer, tmp_path: Path) -> None:
    WheelSource(VERSION, cache=tmp_path).read("vllm/outputs.py")
    (tmp_path / VERSION / "vllm/outputs.py").write_bytes(b"damaged")
    (tmp_path / VERSION / "RECORD").write_bytes(b"damaged")
    assert WheelSource(VERSION, cache=tmp_path).read("vllm/outputs.py") == SOURCES["vllm/outputs.py"].decode()
    assert (tmp_path / VERSION / "vllm/outputs.py").read_bytes() == SOURCES["vllm/outputs.py"]


def test_offline_without_a_cache_fails_with_one_clear_message(pypi: RangeServer, tmp_path: Path) -> None:
    pypi.mode = "down"
    with pytest.raises(WheelSourceError, match=r"cannot reach PyPI .* no cached vLLM 0\.0\.1 sources under .*"
                                               r"ROLLFLEET_VLLM_SRC_CACHE"):
        WheelSource(VERSION, cache=tmp_path).read("vllm/outputs.py")


def test_pypi_must_publish_the_pinned_sha256(pypi: RangeServer, tmp_path: Path) -> None:
    publish(pypi, pypi.files[f"/p/{FILENAME}"], sha256="0" * 64)
    with pytest.raises(WheelSourceError, match="PyPI sha256 of .* is 0000"):
        WheelSource(VERSION, cache=tmp_path).read("vllm/outputs.py")


def test_a_member_must_match_the_wheels_record(pypi: RangeServer, tmp_path: Path) -> None:
    wheel = _wheel(SOURCES, record_of={**SOURCES, "vllm/outputs.py": b"something else"})
    publish(pypi, wheel)
    pypi_pin = wheel_source.PINNED[VERSION]
    wheel_source.PINNED[VERSION] = (pypi_pin[0], pypi_pin[1], hashlib.sha256(wheel).hexdigest())
    with pytest.raises(WheelSourceError, match="vllm/outputs.py: sha256 does not match the RECORD"):
        WheelSource(VERSION, cache=tmp_path).read("vllm/outputs.py")


def test_a_corrupt_member_fails_its_crc(pypi: RangeServer, tmp_path: Path) -> None:
    wheel = bytearray(pypi.files[f"/p/{FILENAME}"])
    at = wheel.index(b"STORED = 1")
    wheel[at] ^= 1
    publish(pypi, bytes(wheel))
    wheel_source.PINNED[VERSION] = (*wheel_source.PINNED[VERSION][:2], hashlib.sha256(wheel).hexdigest())
    with pytest.raises(WheelSourceError, match="Bad CRC-32 for file 'vllm/stored.py'"):
        WheelSource(VERSION, cache=tmp_path).read("vllm/stored.py")


def test_a_cache_of_another_wheel_is_refused(pypi: RangeServer, tmp_path: Path) -> None:
    WheelSource(VERSION, cache=tmp_path).index()
    info = json.loads((tmp_path / VERSION / "wheel.json").read_text())
    (tmp_path / VERSION / "wheel.json").write_text(json.dumps({**info, "sha256": "f" * 64}))
    with pytest.raises(WheelSourceError, match="does not match the pinned"):
        WheelSource(VERSION, cache=tmp_path).read("vllm/outputs.py")

"""A tiny file server on 127.0.0.1 for tests of HTTP range reading (rollfleet.ranged, wheel_source).

Serves ``files`` (path -> bytes): ``Range: bytes=a-b`` gets ``206`` with ``Content-Range``, no Range
gets ``200`` and the whole body. ``mode`` breaks it on purpose: ``ignore-range`` (always 200),
``other-size`` (Content-Range names a total one byte larger), ``fail-once`` (the first request 503),
``down`` (every request 503). ``log`` keeps (path, Range header) of every request.
"""

from __future__ import annotations

import http.server
import re
import threading


class RangeServer(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.mode = "ok"
        self.log: list[tuple[str, str]] = []
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: RangeServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        s, spec = self.server, self.headers.get("Range", "")
        s.log.append((self.path, spec))
        if s.mode == "down" or (s.mode == "fail-once" and len(s.log) == 1):
            self.send_error(503)
            return
        body = s.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", spec)
        if s.mode == "ignore-range" or not match:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        lo, hi = int(match[1]), min(int(match[2]), len(body) - 1)
        total = len(body) + (1 if s.mode == "other-size" else 0)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {lo}-{hi}/{total}")
        self.send_header("Content-Length", str(hi - lo + 1))
        self.end_headers()
        self.wfile.write(body[lo : hi + 1])

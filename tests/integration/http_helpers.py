"""A small HTTP server on the loopback address serving fake files (weights, dataset
archives), with what a download client needs: HEAD, GET, byte ranges, and the headers the
Hugging Face client reads."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class FakeServer:
    """``files``: URL path -> bytes. ``cut``: URL path -> bytes after which a GET without a
    range stops (the connection drops mid-file). ``requests``: (method, path, Range header)."""

    files: dict[str, bytes]
    cut: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    url: str = ""


def _handler(server: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _serve(self, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            rng = self.headers.get("Range")
            server.requests.append((self.command, path, rng))
            data = server.files.get(path)
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, status = 0, 200
            if rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-", 1)[0])
                status = 206
            part = data[start:]
            limit = server.cut.get(path) if status == 200 else None
            self.send_response(status)
            self.send_header("Content-Length", str(len(part)))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            digest = hashlib.sha256(data).hexdigest()
            self.send_header("ETag", f'"{digest}"')
            self.send_header("X-Repo-Commit", digest[:40])
            self.end_headers()
            if body:
                if limit is not None:
                    self.wfile.write(part[:limit])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(part)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

    return Handler


@contextmanager
def serve(files: dict[str, bytes], cut: dict[str, int] | None = None) -> Iterator[FakeServer]:
    """Serve ``files`` on 127.0.0.1 (a free port) for the duration of the block."""
    state = FakeServer(dict(files), dict(cut or {}))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()

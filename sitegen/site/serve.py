"""`sitegen serve`: a local static server that applies netlify.toml's rules and headers (rules.py)
and answers its edge functions' paths with their Python ports (edge.py)."""

from __future__ import annotations

import mimetypes
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sitegen.errors import BuildError
from sitegen.site import edge as edge_functions
from sitegen.site.rules import NETLIFY_TOML, Rules, load_rules

_TYPES = {".json": "application/json", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}


class Handler(SimpleHTTPRequestHandler):
    rules: Rules
    root: Path

    def log_message(self, fmt, *args):  # quiet by default; errors still reach stderr
        pass

    def _file(self, site_path: str) -> Path | None:
        rel = site_path.lstrip("/")
        path = (self.root / rel).resolve()
        if self.root not in path.parents and path != self.root:
            return None
        if path.is_dir():
            path = path / "index.html"
        return path if path.is_file() else None

    def _read(self, site_path: str) -> bytes | None:
        file = self._file(unquote(site_path))
        return file.read_bytes() if file else None

    def _respond(self, head_only: bool) -> None:
        url = urlsplit(self.path)
        edge = edge_functions.handle(NETLIFY_TOML, url.path, url.query, self._read)  # before the rules, as on Netlify
        if edge is not None:
            self.send_response(edge.status)
            for name, value in edge.headers + (("Content-Length", str(len(edge.body))),):
                self.send_header(name, value)
            self.end_headers()
            if not head_only:
                self.wfile.write(edge.body)
            return
        path = unquote(url.path)
        res = self.rules.resolve(path, url.query, lambda p: self._file(p) is not None)
        if 300 <= res.status < 400:
            self.send_response(res.status)
            self.send_header("Location", res.target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        file = self._file(res.target)
        body = file.read_bytes() if file else b"Not Found"
        status = res.status if file else 404
        self.send_response(status)
        ctype = _TYPES.get(file.suffix, mimetypes.guess_type(file.name)[0] or "application/octet-stream") if file else "text/plain"
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in self.rules.headers_for(path):
            self.send_header(name, value)
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def do_GET(self):
        self._respond(False)

    def do_HEAD(self):
        self._respond(True)


def make_server(root: Path, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    root = Path(root).resolve()
    if not (root / "index.html").is_file():
        raise BuildError(f"{root} has no index.html; build the site first: sitegen build STORE --out {root}")
    handler = type("SiteHandler", (Handler,), {"rules": load_rules(), "root": root})
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise BuildError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port") from None


def serve_forever(root: Path, host: str, port: int) -> None:
    server = make_server(root, host, port)
    print(f"serving {Path(root).resolve()} at http://{host}:{server.server_address[1]}/  (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

"""`sitegen serve`: a local static server that applies netlify.toml's rules and headers (rules.py).

Every request gets an HTTP answer carrying netlify.toml's headers (security headers included):
malformed requests, unsupported methods and internal errors too. One thread per connection
(daemon threads, so Ctrl-C never waits), HTTP/1.1 keep-alive, a listen backlog sized for many
concurrent clients, and a connection idle for IDLE_TIMEOUT seconds is closed. Paths declared for
netlify.toml's edge functions are answered first, by their Python ports (edge.py), with only the
headers the function sets (as on Netlify).
"""

from __future__ import annotations

import mimetypes
import re
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote_to_bytes

from sitegen.errors import BuildError
from sitegen.resources import resource
from sitegen.site import edge as edge_functions
from sitegen.site.rules import Decision, Rules, remove_dot_segments, site_rules

IDLE_TIMEOUT = 15.0  # seconds a connection may wait for (the rest of) a request
LISTEN_BACKLOG = 128  # socketserver's default of 5 refuses bursts of new connections
# Netlify's content types for the site's files (tests/test_netlify.py compares them).
_TYPES = {".json": "application/json; charset=utf-8", ".js": "application/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}
# What may go into a header value we build from a request: printable ASCII without backslash.
_HEADER_SAFE = re.compile(r"[\x21-\x5b\x5d-\x7e]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Netlify's pretty URLs: a path with no such file is looked up with these endings too (none for a
# path that already ends in one of these asset extensions), and "/a/" as "/a.html" first.
_ASSET = re.compile(r"\.(html?|png|jpg|js|css|svg|gif|ico|woff|woff2)$")


class Handler(BaseHTTPRequestHandler):
    rules: Rules
    root: Path
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length
    default_request_version = "HTTP/1.0"  # a version-less request line still gets a status line and headers
    server_version = "sitegen"
    sys_version = ""
    timeout = IDLE_TIMEOUT

    def log_message(self, fmt, *args):  # quiet: a preview server, not an access log
        pass

    # ---- answers -------------------------------------------------------------------------

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, head_only: bool, path: str | None = "/") -> None:
        """Status line, HEADERS, netlify.toml's headers for PATH (none when PATH is None: an edge
        function's answer), Content-Length, then BODY."""
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        for name, value in (self.rules.headers_for(path) if path is not None else ()):
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head_only and body:
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Every error answer, including http.server's own (400 malformed, 414 too long, 501
        method): a short plain-text body and the security headers. The status line carries only
        the standard reason phrase, never text from the request. A method other than GET/HEAD
        (http.server's 501) is a client error on a static site: 405 with Allow."""
        if code == 501:
            self._plain(405, "", [("Allow", "GET, HEAD")])
        else:
            self._plain(code, "")

    def _plain(self, code: int, detail: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """A plain-text error answer that closes the connection; DETAIL is our own text."""
        self.close_connection = True
        reason = self.responses.get(code, ("Error",))[0]
        body = f"{code} {reason}" + (f": {detail}" if detail else "") + "\n"
        head_only = getattr(self, "command", None) == "HEAD"
        self._send(code, [("Content-Type", "text/plain; charset=utf-8"), *headers], body.encode("ascii", "backslashreplace"), head_only)

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, None)  # the standard reason phrase only

    def _file(self, site_path: str) -> Path | None:
        """The file a site path names, or None: outside the root, a control character, a name
        too long, or nothing there. As on Netlify (pretty URLs), "/a" is also "/a.html",
        "/a.htm", "/a/index.html" and "/a/index.htm", and "/a/" is "/a.html", "/a.htm",
        "/a/index.html" and "/a/index.htm"."""
        if _CONTROL.search(site_path):
            return None
        if site_path.endswith("/"):
            stem = site_path[:-1]
            names = ([stem + ".html", stem + ".htm"] if stem else []) + [site_path + "index.html", site_path + "index.htm"]
        else:
            names = [site_path] + ([] if _ASSET.search(site_path) else
                                   [site_path + ".html", site_path + ".htm", site_path + "/index.html", site_path + "/index.htm"])
        for name in names:
            try:
                path = (self.root / name.lstrip("/")).resolve()
                if self.root not in path.parents:
                    continue
                if path.is_file():
                    return path
            except (OSError, ValueError):
                continue
        return None

    def _read(self, site_path: str) -> bytes | None:
        """An edge function's read of a static file of the site (a decoded site path)."""
        file = self._file(site_path)
        return file.read_bytes() if file else None

    def _answer(self, head_only: bool) -> None:
        raw = self.path
        if not raw.startswith("/"):  # absolute-form (a proxy request) or garbage
            self._plain(400, "the request target must be a path")
            return
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body we do not read must not be taken for the next request
        raw_path, _, query = raw.partition("?")
        query = query.partition("#")[0]
        # "." and ".." segments (also as %2e) resolved first, as Netlify's CDN does, so
        # "/api/m/./neuron2graph-search" is the search URL and "/api/%2e%2e/index" is "/index".
        raw_path = remove_dot_segments(raw_path.partition("#")[0])
        # Percent-decode as bytes, then UTF-8 (undecodable bytes become U+FFFD: no file has such
        # a name, so the rules answer 404, as Netlify does).
        path = unquote_to_bytes(raw_path.encode("latin-1")).decode("utf-8", "replace")
        edge = edge_functions.handle(resource("netlify.toml"), raw_path, query, self._read)
        if edge is not None:  # before the rules, as on Netlify
            self._send(edge.status, list(edge.headers), edge.body, head_only, None)
            return
        decision = self.rules.decide(path, query, lambda p: self._file(p) is not None)
        self._deliver(decision, path, head_only)

    def _deliver(self, d: Decision, path: str, head_only: bool) -> None:
        if d.status == 400:
            self._plain(400, d.reason)
            return
        if d.location is not None:
            if not _HEADER_SAFE.fullmatch(d.location):  # rules.py encodes values; this is the last guard
                self._plain(400, "the redirect target would not be a safe URL")
                return
            # Netlify's redirect answer: no Content-Type, this one-line body.
            self._send(d.status, [("Location", d.location)], f"Redirecting to {d.location}".encode("ascii"), head_only, path)
            return
        file = self._file(d.file) if d.file else None
        if file is None:  # only the 404 page itself can be missing here
            self._send(404, [("Content-Type", "text/plain; charset=utf-8")], b"404 Not Found\n", head_only, path)
            return
        body = file.read_bytes()
        ctype = _TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self._send(d.status, [("Content-Type", ctype)], body, head_only, path)

    def _guarded(self, head_only: bool) -> None:
        try:
            self._answer(head_only)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # a bug in the server: still an HTTP answer, and the traceback on stderr
            traceback.print_exc(file=sys.stderr)
            try:
                self.send_error(500)
            except OSError:
                self.close_connection = True

    def do_GET(self):
        self._guarded(False)

    def do_HEAD(self):
        self._guarded(True)


class SiteServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the client went away; nothing to report
        super().handle_error(request, client_address)


def make_server(root: Path, host: str = "127.0.0.1", port: int = 8000, *, idle_timeout: float = IDLE_TIMEOUT) -> SiteServer:
    root = Path(root).resolve()
    if not (root / "index.html").is_file():
        raise BuildError(f"{root} has no index.html; build the site first: sitegen build STORE --out {root}")
    handler = type("SiteHandler", (Handler,), {"rules": site_rules(root), "root": root, "timeout": idle_timeout})
    try:
        return SiteServer((host, port), handler)
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
